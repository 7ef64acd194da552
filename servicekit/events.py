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
"""
import functools
import logging
from datetime import datetime, timezone

from kombu import Exchange, Queue
from marshmallow import ValidationError as SchemaError
from nameko.amqp.publish import Publisher
from nameko.constants import PERSISTENT
from nameko.events import EventHandler
from nameko.messaging import QueueConsumer
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
            try:
                envelope = _envelope_schema.load(body)
                if payload_loader is not None:
                    envelope["payload"] = payload_loader.load(envelope["payload"])
            except (SchemaError, TypeError) as exc:
                raise UnprocessableEvent(f"malformed event: {exc}") from exc
            event_id = str(envelope["event_id"])
            with getattr(self, db_attr).transaction() as session:
                if not _claim(session, handler_name, event_id):
                    metrics.EVENTS_DUPLICATE.labels(self.name, handler_name).inc()
                    log.info("event %s already handled by %s; skipped", event_id, handler_name)
                    return None
                result = method(self, session, envelope)
            if isinstance(result, AfterCommit):
                result.run()
            return None

        return ReliableEventHandler.decorator(source_service, event_type, stale_without_worker=known_stale)(wrapper)

    return decorator


def _known_stale(check, body) -> bool:
    try:
        return bool(check(body))
    except Exception:  # a body the check cannot read: a worker and the full validation decide
        return False


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
