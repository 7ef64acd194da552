"""Reliable, idempotent event handling.

``@handles_event_once(source, event_type)`` on a service method ``(self, session, envelope)``
(which may return ``AfterCommit(func, ...)`` for work that must follow the commit):

* validates the envelope (a malformed one is dead-lettered at once: retrying cannot fix it);
* records the ``event_id`` in ``handled_events`` in the same transaction as the handler's
  writes, so a redelivered event has no second effect;
* retries a failing handler with exponential back-off, each attempt a fresh worker and a
  fresh transaction (the message stays un-acked meanwhile, so a crash loses nothing);
* after the last attempt, parks the message in a durable dead-letter queue
  ``dlq.<queue>`` (with the error in its headers) and only then acks it. nameko's default
  would ack and drop it.

``@handles_events_in_batches(source, event_type)`` on a method ``(self, session, envelopes)``
does the same for a busy event type, a batch at a time: one worker per replica takes every
message that arrived meanwhile and handles them in one transaction (a batch that fails is
handled again one event per transaction, each event then retried or parked on its own).
"""
import functools
import logging
from datetime import datetime, timezone

from kombu import Exchange, Queue
from marshmallow import ValidationError as SchemaError
from nameko.amqp.publish import Publisher
from nameko.constants import PERSISTENT
from nameko.containers import ContainerBeingKilled
from nameko.events import EventHandler
from nameko.messaging import QueueConsumer
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
import eventlet

from contracts.errors import HelpdeskError
from contracts.events import EventEnvelopeSchema
from servicekit import metrics
from servicekit.config import settings_from_container
from servicekit.tables import HANDLED_EVENTS

log = logging.getLogger(__name__)

DEAD_LETTER_EXCHANGE = Exchange("helpdesk.dead-letter", type="direct", durable=True)
_envelope_schema = EventEnvelopeSchema()


class UnprocessableEvent(Exception):
    """The message itself is wrong; retrying cannot help."""


def dead_letter_queue(queue_name: str) -> Queue:
    name = f"dlq.{queue_name}"
    return Queue(name, exchange=DEAD_LETTER_EXCHANGE, routing_key=name, durable=True)


class DeadLetteringQueueConsumer(QueueConsumer):
    """nameko's consumer acks and drops a body it cannot decode (kombu's default); ours hands it
    to the handler that owns the queue, to be parked in its dead-letter queue."""

    @property
    def prefetch_count(self):
        # nameko's is max_workers; a batching handler can take only as many messages at once as
        # the broker lets its consumer hold (one qos for the channel: every consumer gets it)
        return max([self.container.max_workers] + [getattr(p, "max_batch", 0) for p in self._providers])

    def on_decode_error(self, message, exc):
        tag = message.delivery_info.get("consumer_tag")
        for provider, consumer in list(self._consumers.items()):
            if tag in consumer._active_tags.values() and hasattr(provider, "dead_letter_undecodable"):
                provider.dead_letter_undecodable(message, exc)
                return
        super().on_decode_error(message, exc)


class ReliableEventHandler(EventHandler):
    """A SERVICE_POOL, reliable-delivery event handler that dead-letters instead of dropping."""

    queue_consumer = DeadLetteringQueueConsumer()

    def __init__(self, *args, stale_without_worker=None, **kwargs):
        # ``stale_without_worker(body) -> bool``: a check in memory only (no I/O) that the event
        # can have no effect; True acks it in the consumer, without spawning a worker
        self.stale_without_worker = stale_without_worker
        super().__init__(*args, **kwargs)

    def handle_message(self, body, message):
        if self.stale_without_worker is not None and _known_stale(self.stale_without_worker, body):
            metrics.EVENTS_SUPERSEDED.labels(self.container.service_name, self.method_name).inc()
            self._attempts.pop(id(message), None)  # a retry that became stale meanwhile
            self.queue_consumer.ack_message(message)
            return
        super().handle_message(body, message)

    def setup(self):
        super().setup()
        settings = settings_from_container(self.container)
        self.max_attempts = settings.event_max_attempts
        self.retry_base_seconds = settings.event_retry_base_seconds
        self.dlq = dead_letter_queue(self.queue.name)
        self._attempts = {}
        self._dlq_publisher = Publisher(
            settings.amqp_uri, use_confirms=True, serializer="json", delivery_mode=PERSISTENT,
            declare=[DEAD_LETTER_EXCHANGE, self.dlq],
        )

    def retry_delay(self, attempt: int) -> float:
        return min(10.0, self.retry_base_seconds * 2 ** (attempt - 1))

    def handle_result(self, message, worker_ctx, result=None, exc_info=None):
        key = id(message)
        if exc_info is None:
            self._attempts.pop(key, None)
            self.queue_consumer.ack_message(message)
            return result, exc_info
        exc = exc_info[1]
        attempt = self._attempts.get(key, 1)
        if _retryable(exc) and attempt < self.max_attempts:
            self._attempts[key] = attempt + 1
            log.warning("event handler %s failed (attempt %s of %s), retrying: %s",
                        self.method_name, attempt, self.max_attempts, exc)
            # retry from a timer, not from this worker: sleeping here would hold a worker slot,
            # and with every slot retrying, nobody could spawn the retries (deadlock)
            eventlet.spawn_after(self.retry_delay(attempt), self.handle_message, message.payload, message)
            return result, exc_info
        self._attempts.pop(key, None)
        self._dead_letter(message, exc, attempt)
        return result, exc_info

    def dead_letter_undecodable(self, message, exc):
        """Runs in the consumer thread: park the raw bytes, then ack."""
        headers = dict(message.headers or {})
        headers.update(self._error_headers("unprocessable", 0, exc))
        try:
            self._dlq_publisher.publish(
                message.body, exchange=DEAD_LETTER_EXCHANGE, routing_key=self.dlq.name, headers=headers,
                content_type=message.content_type or "application/octet-stream",
                content_encoding=message.content_encoding or "binary",
            )
        except Exception:
            log.exception("could not dead-letter an undecodable event; requeueing it")
            message.requeue()
            return
        metrics.EVENTS_DEAD_LETTERED.labels(self.container.service_name, self.method_name).inc()
        log.error("undecodable event parked in %s: %s", self.dlq.name, exc)
        message.ack()

    def _error_headers(self, reason: str, attempts: int, exc) -> dict:
        return {
            "x-dead-letter-reason": reason,
            "x-attempts": attempts,
            "x-error-type": type(exc).__name__,
            "x-error-message": str(exc)[:1000],
            "x-original-queue": self.queue.name,
            "x-dead-lettered-at": datetime.now(timezone.utc).isoformat(),
        }

    def _dead_letter(self, message, exc, attempts: int):
        if isinstance(exc, UnprocessableEvent):
            reason = "unprocessable"  # the message itself is malformed
        elif not _retryable(exc):
            reason = "rejected"  # a deterministic domain refusal: retrying gives the same answer
        else:
            reason = "retries_exhausted"
        try:
            headers = dict(message.headers or {})
            headers.update(self._error_headers(reason, attempts, exc))
            self._dlq_publisher.publish(
                message.payload, exchange=DEAD_LETTER_EXCHANGE, routing_key=self.dlq.name,
                headers=headers,
            )
        except Exception:
            # cannot park it: give it back to the broker rather than lose it
            log.exception("could not dead-letter a failed event; requeueing it")
            self.queue_consumer.requeue_message(message)
            return
        metrics.EVENTS_DEAD_LETTERED.labels(self.container.service_name, self.method_name).inc()
        log.error("event parked in %s after failure: %s", self.dlq.name, exc)
        self.queue_consumer.ack_message(message)


class BatchingEventHandler(ReliableEventHandler):
    """Runs its service method with a list of message bodies: the messages that arrived while
    the previous batch ran, up to ``max_batch``; one batch at a time per replica. The method
    answers, per body, None (handled: acked) or the exception it failed with (retried with
    back-off, then parked, each message on its own as ReliableEventHandler does)."""

    def __init__(self, *args, max_batch: int = 50, **kwargs):
        self.max_batch = max_batch
        super().__init__(*args, **kwargs)

    def setup(self):
        super().setup()
        self._waiting = []  # (body, message) not in a batch yet
        self._batch_running = False

    def handle_message(self, body, message):
        if self.stale_without_worker is not None and _known_stale(self.stale_without_worker, body):
            super().handle_message(body, message)  # acked there, without a worker
            return
        self._waiting.append((body, message))
        self._next_batch()

    def _next_batch(self):
        if self._batch_running or not self._waiting:
            return
        batch, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
        self._batch_running = True
        try:
            self.container.spawn_worker(self, ([body for body, _ in batch],), {},
                                        context_data=self.unpack_message_headers(batch[0][1]),
                                        handle_result=functools.partial(self._batch_done, batch))
        except Exception as exc:  # e.g. ContainerBeingKilled: the broker delivers them again
            self._batch_running = False
            for _, message in batch:
                self.queue_consumer.requeue_message(message)
            if not isinstance(exc, ContainerBeingKilled):
                log.exception("could not start a batch of %s; its events were requeued", self.method_name)

    def _batch_done(self, batch, worker_ctx, result=None, exc_info=None):
        try:
            if exc_info is not None or not isinstance(result, list) or len(result) != len(batch):
                outcomes = [exc_info[1] if exc_info else RuntimeError(f"batch handler answered {result!r}")] * len(batch)
            else:
                outcomes = result
            for (_, message), outcome in zip(batch, outcomes):
                failure = None if outcome is None else (type(outcome), outcome, outcome.__traceback__)
                super().handle_result(message, worker_ctx, None, failure)
        finally:
            self._batch_running = False
            if self._waiting:  # not from this worker: it still holds its slot in the pool
                self.container.spawn_managed_thread(self._next_batch, identifier=f"{self.method_name}.next_batch")
        return result, exc_info


class AfterCommit:
    """Returned by a handler: work to run once the handler's transaction has committed (calls
    to other services that must see the change). The event already counts as handled then: a
    failure here is not retried by the event machinery, so the service needs its own way to
    finish the work (routing's sweeper, for instance)."""

    def __init__(self, func, *args, **kwargs):
        self.func, self.args, self.kwargs = func, args, kwargs

    def run(self):
        return self.func(*self.args, **self.kwargs)


def _retryable(exc: BaseException) -> bool:
    # domain errors and bad payloads are deterministic: same input, same failure
    return not isinstance(exc, (UnprocessableEvent, HelpdeskError, SchemaError))


def handles_event_once(source_service: str, event_type: str, payload_schema=None, db_attr: str = "db",
                       already_applied=None, known_stale=None):
    """``already_applied(self, session, body) -> bool``: an optional read-only check, on the raw
    message body, that the event can have no effect any more (e.g. its snapshot is older than
    what the service holds); such an event is acked without validation or a write transaction.
    ``known_stale(body) -> bool``: the same question answered from memory alone, before a
    worker is spawned (e.g. a version this process saw committed). Only for handlers whose
    effect is a pure function of state, where applying a stale event again would change
    nothing either. An exception in either check counts as "not applied"."""

    def decorator(method):
        handler_name = method.__name__
        # built once: a schema instance holds no per-load state, and building one costs more
        # than loading a payload with it
        payload_loader = payload_schema() if isinstance(payload_schema, type) else payload_schema

        @functools.wraps(method)
        def wrapper(self, body):
            # before validation, which costs more than the check: most superseded events are
            # routine (a service's own changes coming back), and one that cannot be read this
            # way goes through the full validation below
            if already_applied is not None and _already_applied(already_applied, self, db_attr, body):
                metrics.EVENTS_SUPERSEDED.labels(self.name, handler_name).inc()
                return None
            envelope = _load_event(body, payload_loader)
            result = _handle_alone(self, db_attr, handler_name, method, envelope)
            if isinstance(result, AfterCommit):
                result.run()
            return None

        return ReliableEventHandler.decorator(source_service, event_type, stale_without_worker=known_stale)(wrapper)

    return decorator


def handles_events_in_batches(source_service: str, event_type: str, payload_schema=None, db_attr: str = "db",
                              known_stale=None, already_applied=None, max_batch: int = 50):
    """As ``handles_event_once``, for a method ``(self, session, envelopes)`` that applies a list
    of events in the caller's transaction (in the order given; duplicates already left out) and
    may return AfterCommit work, or a list of it. The events that arrive together are handled
    in one transaction, with one worker; if that fails, each is handled again in a transaction
    of its own (the method then gets a list of one), so one bad event costs the others nothing
    but a second try.

    ``already_applied(self, session, bodies) -> [bool]``: the read-only check of
    ``handles_event_once`` for a whole batch (one read for all); the events it answers True for
    are acked without validation or a mark. An exception counts as False for every body."""

    def decorator(method):
        handler_name = method.__name__
        payload_loader = payload_schema() if isinstance(payload_schema, type) else payload_schema

        @functools.wraps(method)
        def wrapper(self, bodies):
            outcomes, loaded = [None] * len(bodies), []
            applied = _already_applied_batch(already_applied, self, db_attr, bodies)
            for index, body in enumerate(bodies):
                if applied[index]:
                    metrics.EVENTS_SUPERSEDED.labels(self.name, handler_name).inc()
                    continue
                try:
                    loaded.append((index, _load_event(body, payload_loader)))
                except UnprocessableEvent as exc:
                    outcomes[index] = exc
            if not loaded:
                return outcomes
            after, alone = [], loaded
            if len(loaded) > 1:  # a batch of one is handled alone at once: a failure is its own
                try:
                    after.append(_handle_together(self, db_attr, handler_name, method, [e for _, e in loaded]))
                    alone = []
                except Exception as exc:
                    log.warning("a batch of %d events for %s failed (%r); handling them one at a time",
                                len(loaded), handler_name, exc)
            for index, envelope in alone:
                try:
                    after.append(_handle_alone(self, db_attr, handler_name, method, envelope, batch_method=True))
                except Exception as exc:  # retried on its own, then parked
                    outcomes[index] = exc
            for work in _after_commit_work(after):
                try:
                    work.run()
                except Exception:  # the events are handled; the service has its own way to finish
                    log.exception("work after %s's commit failed", handler_name)
            return outcomes

        return BatchingEventHandler.decorator(source_service, event_type, stale_without_worker=known_stale,
                                              max_batch=max_batch)(wrapper)

    return decorator


def _after_commit_work(results) -> list:
    work = []
    for result in results:
        if isinstance(result, AfterCommit):
            work.append(result)
        elif isinstance(result, list):
            work.extend(item for item in result if isinstance(item, AfterCommit))
    return work


def _load_event(body, payload_loader) -> dict:
    try:
        envelope = _envelope_schema.load(body)
        if payload_loader is not None:
            envelope["payload"] = payload_loader.load(envelope["payload"])
    except (SchemaError, TypeError) as exc:
        raise UnprocessableEvent(f"malformed event: {exc}") from exc
    return envelope


def _handle_alone(service, db_attr: str, handler_name: str, method, envelope, batch_method: bool = False):
    """One event in its own transaction, with its handled mark; None if it was handled before.
    ``batch_method``: the method takes a list of envelopes (it gets a list of one)."""
    event_id = str(envelope["event_id"])
    with getattr(service, db_attr).transaction() as session:
        if not _claim(session, handler_name, event_id):
            metrics.EVENTS_DUPLICATE.labels(service.name, handler_name).inc()
            log.info("event %s already handled by %s; skipped", event_id, handler_name)
            return None
        return method(service, session, [envelope] if batch_method else envelope)


def _handle_together(service, db_attr: str, handler_name: str, method, envelopes: list):
    """Many events in one transaction: the ones handled before (and repeats within the batch)
    are left out, the others marked handled with one INSERT and given to the method together.
    A mark a concurrent replica wrote meanwhile fails the INSERT (and the batch)."""
    ids = [str(envelope["event_id"]) for envelope in envelopes]
    with getattr(service, db_attr).transaction() as session:
        seen = set(session.execute(select(HANDLED_EVENTS.c.event_id).where(
            HANDLED_EVENTS.c.handler == handler_name, HANDLED_EVENTS.c.event_id.in_(ids))).scalars())
        fresh = []
        for event_id, envelope in zip(ids, envelopes):
            if event_id in seen:
                metrics.EVENTS_DUPLICATE.labels(service.name, handler_name).inc()
                log.info("event %s already handled by %s; skipped", event_id, handler_name)
                continue
            seen.add(event_id)
            fresh.append(envelope)
        if not fresh:
            return None
        handled_at = datetime.now(timezone.utc)
        session.execute(_MARK_HANDLED, [{"handler": handler_name, "event_id": str(envelope["event_id"]),
                                         "handled_at": handled_at} for envelope in fresh])
        return method(service, session, fresh)


def _known_stale(check, body) -> bool:
    try:
        return bool(check(body))
    except Exception:  # a body the check cannot read: a worker and the full validation decide
        return False


def _already_applied_batch(check, service, db_attr: str, bodies: list) -> list:
    if check is None:
        return [False] * len(bodies)
    try:
        with getattr(service, db_attr).read() as session:
            answers = [bool(answer) for answer in check(service, session, bodies)]
    except Exception:  # bodies the check cannot read: the full validation decides
        return [False] * len(bodies)
    return answers if len(answers) == len(bodies) else [False] * len(bodies)


def _already_applied(check, service, db_attr: str, body) -> bool:
    try:
        with getattr(service, db_attr).read() as session:
            return bool(check(service, session, body))
    except Exception:  # a body the check cannot read: the full validation decides
        return False


_MARK_HANDLED = HANDLED_EVENTS.insert()  # built once: one per event handled


def _claim(session, handler_name: str, event_id: str) -> bool:
    """Insert the (handler, event_id) mark as the transaction's first write; False if it was
    already there.

    No SAVEPOINT here: with pysqlite a SAVEPOINT sent before any write opens the transaction
    itself and releasing it commits, so the mark outlived a handler that then failed and the
    retry skipped the event. The mark is the first write, so on a duplicate rolling back the
    whole transaction loses nothing.
    """
    try:
        session.execute(_MARK_HANDLED, {"handler": handler_name, "event_id": event_id,
                                        "handled_at": datetime.now(timezone.utc)})
    except IntegrityError:
        session.rollback()
        return False
    return True
