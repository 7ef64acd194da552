"""Transactional outbox: events are rows written in the same transaction as the change, then
relayed to RabbitMQ with publisher confirms. A broker outage only delays them.

Publish is at-least-once (a crash between confirm and marking the row re-publishes it);
consumers dedupe on ``event_id`` (see ``servicekit.events``).
"""
import logging
import socket
import threading
import time
from collections import deque
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import eventlet
from kombu import Connection, Producer
from nameko.constants import PERSISTENT
from nameko.standalone.events import get_event_exchange
from sqlalchemy import Text, bindparam, cast, delete, func, select, update
from sqlalchemy.orm import Session

from contracts.events import make_envelope
from servicekit import metrics
from servicekit.context import current_request_id
from servicekit.tables import OUTBOX

log = logging.getLogger(__name__)

BATCH_SIZE = 200
IDLE_POLL_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 10.0
RETENTION = timedelta(days=1)
# the pending-events gauge is recounted at most this often (it used to be every wake-up, i.e.
# after every commit that wrote events); metrics scrapes are far apart anyway
PENDING_RECOUNT_SECONDS = 1.0


# built once; each call only binds its values (no per-call .values() coercion and cache-key work)
_INSERT_EVENT = OUTBOX.insert()
# the envelope as the JSON text stored, published as it is: decoding it only for the broker
# client to encode it again was most of the relay's own work
_NEXT_BATCH = (
    select(OUTBOX.c.id, OUTBOX.c.event_id, OUTBOX.c.source, OUTBOX.c.event_type,
           cast(OUTBOX.c.envelope, Text).label("envelope_json"), OUTBOX.c.request_id, OUTBOX.c.created_at)
    # past the rows this relay has sent and not yet marked: on SQLite (no row locks to skip
    # them; its one writer hands out ids in commit order); PostgreSQL skips them as locked, and
    # there a lower id can commit after a higher one, so it always reads from the start
    .where(OUTBOX.c.published_at.is_(None), OUTBOX.c.id > bindparam("after"))
    .order_by(OUTBOX.c.id)
    .limit(BATCH_SIZE)
    .with_for_update(skip_locked=True)
)
_MARK_PUBLISHED = (
    update(OUTBOX).where(OUTBOX.c.id.in_(bindparam("ids", expanding=True)))
    .values(published_at=bindparam("at"), attempts=OUTBOX.c.attempts + 1)
)
_COUNT_PENDING = select(func.count()).select_from(OUTBOX).where(OUTBOX.c.published_at.is_(None))


def add_event(session: Session, source: str, event_type: str, subject_ids: dict, payload: dict,
              occurred_at: datetime | None = None) -> dict:
    """Record an event in the caller's transaction; it is published after commit."""
    return add_events(session, source, event_type, [(subject_ids, payload)], occurred_at)[0]


def add_events(session: Session, source: str, event_type: str, events: list,
               occurred_at: datetime | None = None) -> list:
    """Record many events of one type, ``(subject_ids, payload)`` pairs, with one INSERT (a
    batch of assignments announces one per ticket); returns their envelopes, in order."""
    envelopes = [make_envelope(source, event_type, subject_ids, payload, occurred_at=occurred_at)
                 for subject_ids, payload in events]
    if not envelopes:
        return []
    request_id, created_at = current_request_id(), datetime.now(timezone.utc)
    session.execute(_INSERT_EVENT, [{
        "event_id": envelope["event_id"],
        "source": source,
        "event_type": event_type,
        "envelope": envelope,
        "request_id": request_id,
        "created_at": created_at,
        "attempts": 0,
    } for envelope in envelopes])
    session.info["outbox_dirty"] = True
    return envelopes


CONFIRM_TIMEOUT_SECONDS = 10.0


class UnconfirmedPublish(Exception):
    """The broker refused (nack) or did not confirm a batch in time: it is published again."""


class BatchPublisher:
    """Publishes batches of messages in confirm mode; the confirms are taken as they come.

    nameko's Publisher waits for each message's confirm before sending the next (a broker round
    trip and a green-thread switch per event): an operation announcing three events paid three.
    Here a batch goes out back to back (one write), and the caller learns when the broker has
    confirmed its last delivery tag, meanwhile sending more. Any failure closes the connection:
    the caller keeps the rows of everything not confirmed and sends it again (at-least-once).
    """

    def __init__(self, amqp_uri: str, confirm_timeout: float = CONFIRM_TIMEOUT_SECONDS):
        self.amqp_uri = amqp_uri
        self.confirm_timeout = confirm_timeout
        self._connection = self._channel = self._producer = None
        self._declared = set()
        self._next_tag = 1
        self._confirmed_through = 0
        self._confirmed_out_of_order = set()
        self._refused = False

    def _open(self):
        # confirm_publish off: py-amqp would otherwise wait for each confirm inside basic_publish
        connection = Connection(self.amqp_uri, connect_timeout=5, transport_options={"confirm_publish": False})
        connection.connect()
        channel = connection.channel()
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        self._connection, self._channel = connection, channel
        self._producer = Producer(channel, serializer="json")
        self._declared.clear()
        self._next_tag, self._confirmed_through = 1, 0
        self._confirmed_out_of_order.clear()
        self._refused = False

    def _on_ack(self, delivery_tag, multiple):
        if multiple:
            self._confirmed_through = max(self._confirmed_through, delivery_tag)
        else:
            self._confirmed_out_of_order.add(delivery_tag)
        while self._confirmed_through + 1 in self._confirmed_out_of_order:
            self._confirmed_through += 1
            self._confirmed_out_of_order.discard(self._confirmed_through)

    def _on_nack(self, delivery_tag, multiple):
        self._refused = True

    def confirmed(self, tag: int) -> bool:
        """Whether the broker confirmed every message sent on this connection up to ``tag``."""
        return self._confirmed_through >= tag

    def poll_confirms(self, timeout: float) -> None:
        """Take the confirms that arrive within ``timeout`` seconds (0: those already here).
        A refusal (nack) or a broken connection closes the connection and raises: what was sent
        and not confirmed must be sent again."""
        try:
            if self._connection is None:
                raise UnconfirmedPublish("the connection was closed")
            try:
                self._connection.drain_events(timeout=timeout)
            except socket.timeout:
                pass
            if self._refused:
                raise UnconfirmedPublish("the broker refused (nack) a published event")
        except BaseException:
            self.close()
            raise

    def send(self, messages) -> int:
        """Publish ``messages`` without waiting for their confirms; returns the delivery tag of
        the last one (``confirmed(tag)`` tells when the broker has them all). ``messages``:
        (exchange, routing_key, body, headers, message_id) tuples; ``body`` is JSON text, sent as
        it is (``application/json``)."""
        try:
            if self._connection is None:
                self._open()
            last_tag = 0
            for exchange in {message[0].name: message[0] for message in messages}.values():
                if exchange.name not in self._declared:  # before the writes are held back below
                    exchange(self._channel).declare()
                    self._declared.add(exchange.name)
            with _one_write(self._connection.connection):
                for exchange, routing_key, body, headers, message_id in messages:
                    self._producer.publish(body, exchange=exchange, routing_key=routing_key, headers=headers,
                                           message_id=message_id, delivery_mode=PERSISTENT, retry=False,
                                           content_type="application/json", content_encoding="utf-8")
                    last_tag = self._next_tag
                    self._next_tag += 1
            return last_tag
        except BaseException:
            self.close()
            raise

    def drop(self):
        """Close without the broker's close handshake (which waits for its answer): for a
        connection that may be stuck."""
        self.close(handshake=False)

    def close(self, handshake: bool = True):
        connection, self._connection = self._connection, None
        self._channel = self._producer = None
        if connection is not None:
            try:
                connection.release() if handshake else connection.collect()
            except Exception:  # already broken: nothing to release
                pass


@contextmanager
def _one_write(amqp_connection):
    """The frames of the messages published inside go to the socket in one write when the
    block ends (py-amqp writes each message on its own: a system call each, and under load
    often a switch to the broker's process and back). Nothing is written if the block fails:
    the caller drops the connection and publishes the batch again. A transport that does not
    write through ``_write`` is left as it is (one write per message)."""
    transport = getattr(amqp_connection, "transport", None)
    write = getattr(transport, "_write", None)
    if write is None:
        yield
        return
    held = []
    # py-amqp hands over a view of a buffer it reuses for the next frame: copied
    transport._write = lambda data: held.append(bytes(data))
    try:
        yield
    finally:
        transport._write = write
    if held:
        write(b"".join(held))


class _SentBatch:
    """A batch published and not confirmed yet: its rows' session (on PostgreSQL it holds their
    row locks, so that no other replica publishes them meanwhile) and its last delivery tag."""

    def __init__(self, session, ids, last_tag, deadline):
        self.session, self.ids, self.last_tag, self.deadline = session, ids, last_tag, deadline


# batches published and waiting for their confirms at once: the broker confirms persistent
# messages once they are on its disk, usually in ~10 ms but at times in hundreds, and events
# committed meanwhile go out without waiting for that (their consumers get them at once)
MAX_BATCHES_IN_FLIGHT = 8
# while batches wait for confirms and nothing new is committed, how long one look for confirms
# lasts (a commit's wake is seen at the latest after this)
CONFIRM_POLL_SECONDS = 0.005
# how long stop() waits for the relay's loop to end (a step takes milliseconds)
STOP_WAIT_SECONDS = 2.0


class OutboxRelay:
    """Publishes committed outbox rows, at least once; one relay per service instance.

    One relay publishes in row order, and marks rows published in that order as the broker
    confirms them; it sends the next batch without waiting for the confirms of the last ones
    (up to MAX_BATCHES_IN_FLIGHT). If a batch is refused or not confirmed in time, every batch
    not confirmed yet is sent again. Several replicas may run: on PostgreSQL rows are claimed
    with ``FOR UPDATE SKIP LOCKED`` (held until they are marked) so each row is published by
    one relay at a time, and then order across replicas (and across concurrently committing
    transactions) is not guaranteed; consumers must not rely on it (envelopes carry
    ``occurred_at``, snapshots a ``version``).
    """

    def __init__(self, engine, amqp_uri: str, service: str):
        self.engine = engine
        self.service = service
        # no retries inside: the relay backs off itself (kombu's would block it for long stretches)
        self.publisher = BatchPublisher(amqp_uri)
        self._wake = threading.Event()
        self._exchanges = {}
        self._consecutive_failures = 0
        self._last_purge = datetime.now(timezone.utc)
        self._last_recount = float("-inf")
        self._sent = deque()  # _SentBatch, oldest first
        self._sent_through = 0  # SQLite: the highest row id sent and not yet marked published
        self._ids_in_commit_order = engine.dialect.name == "sqlite"
        self._look = True  # whether there may be rows to send (a wake came, or the last batch was full)
        self._stopped = threading.Event()
        self._stopped.set()  # until run() starts
        self._stop_requested = threading.Event()

    def wake(self):
        self._wake.set()

    def stop(self, timeout: float = STOP_WAIT_SECONDS):
        """Ask run() to end and wait for it (it forgets the batches not confirmed and closes
        the connection itself: done from here, a step under way could open another)."""
        self._stop_requested.set()
        self._wake.set()
        if not self._stopped.wait(timeout):
            log.warning("outbox relay did not stop within %.1fs; dropping its connection", timeout)
            self._abandon_sent()
            self.publisher.drop()

    def run(self):
        self._stopped.clear()
        try:
            self._run()
        finally:
            self._abandon_sent()
            self.publisher.close()
            self._stopped.set()

    def _run(self):
        while not self._stop_requested.is_set():
            try:
                published = self.relay_step()
                self._consecutive_failures = 0
            except Exception as exc:  # broker or database down: keep rows, back off, retry
                self._abandon_sent()
                self._consecutive_failures += 1
                delay = min(MAX_BACKOFF_SECONDS, 0.2 * 2 ** min(self._consecutive_failures, 10))
                metrics.OUTBOX_PUBLISH_FAILURES.labels(self.service).inc()
                log.warning("outbox relay failed (attempt %s), retrying in %.1fs: %s",
                            self._consecutive_failures, delay, exc)
                self._stop_requested.wait(delay)  # a stop does not wait for the back-off
                continue
            if published:
                eventlet.sleep(0)  # more may be waiting: go again, but let workers run
                continue
            if self._sent:
                continue  # relay_step waited for confirms a little already
            self._wake.wait(IDLE_POLL_SECONDS)
            self._look = True  # woken, or the idle poll's look (a wake lost to a crash)
            self._maybe_purge()

    def relay_step(self) -> int:
        """Send the next batch if there may be one and the window allows it, then take the
        confirms that came (waiting up to CONFIRM_POLL_SECONDS if nothing was sent) and mark
        the confirmed batches published. Returns how many rows were sent."""
        sent = 0
        if self._wake.is_set():
            self._wake.clear()
            self._look = True
        if self._look and len(self._sent) < MAX_BATCHES_IN_FLIGHT:
            self._look = False
            sent = self._send_next()
        if self._sent:
            self.publisher.poll_confirms(0 if sent else CONFIRM_POLL_SECONDS)
            self._mark_confirmed()
        return sent

    def _send_next(self) -> int:
        session = Session(self.engine)
        try:
            rows = session.execute(_NEXT_BATCH, {"after": self._sent_through if self._ids_in_commit_order else 0}).all()
            self._observe_lag(session, rows)
            if not rows:
                session.close()
                return 0
            last_tag = self.publisher.send([
                (self._exchange(row.source), row.event_type, row.envelope_json,
                 {"nameko.request_id": row.request_id} if row.request_id else {}, row.event_id)
                for row in rows])
        except BaseException:
            session.close()
            raise
        self._sent.append(_SentBatch(session, [row.id for row in rows], last_tag,
                                     time.monotonic() + self.publisher.confirm_timeout))
        self._sent_through = rows[-1].id
        self._look = len(rows) >= BATCH_SIZE
        return len(rows)

    def _mark_confirmed(self) -> None:
        """Mark published, oldest first, the batches the broker has confirmed; a batch past its
        deadline fails the relay step (everything not confirmed is sent again)."""
        while self._sent and self.publisher.confirmed(self._sent[0].last_tag):
            batch = self._sent.popleft()
            try:
                batch.session.execute(_MARK_PUBLISHED, {"ids": batch.ids, "at": datetime.now(timezone.utc)})
                batch.session.commit()
            finally:
                batch.session.close()
            metrics.OUTBOX_PUBLISHED.labels(self.service).inc(len(batch.ids))
        if not self._sent:
            self._sent_through = 0  # nothing in flight: look from the start (rows a failure left)
        elif self._sent[0].deadline < time.monotonic():
            self.publisher.close()
            raise UnconfirmedPublish(f"no confirm within {self.publisher.confirm_timeout}s")

    def _abandon_sent(self) -> None:
        """Forget the batches not confirmed: their rows stay unpublished and are sent again."""
        while self._sent:
            batch = self._sent.popleft()
            try:
                batch.session.close()
            except Exception:  # its connection is gone already
                pass
        self._sent_through = 0
        self._look = True

    def _exchange(self, source):
        exchange = self._exchanges.get(source)
        if exchange is None:
            exchange = self._exchanges[source] = get_event_exchange(source, {})
        return exchange

    def _observe_lag(self, session, rows):
        now = time.monotonic()
        if now - self._last_recount >= PENDING_RECOUNT_SECONDS:
            self._last_recount = now
            pending = session.execute(_COUNT_PENDING).scalar_one()
            metrics.OUTBOX_PENDING.labels(self.service).set(pending)
        if rows:
            oldest = rows[0].created_at
            if oldest.tzinfo is None:
                oldest = oldest.replace(tzinfo=timezone.utc)
            metrics.OUTBOX_LAG.labels(self.service).set(
                (datetime.now(timezone.utc) - oldest).total_seconds())
        else:
            metrics.OUTBOX_LAG.labels(self.service).set(0)

    def _maybe_purge(self):
        now = datetime.now(timezone.utc)
        if now - self._last_purge < timedelta(minutes=10):
            return
        self._last_purge = now
        with Session(self.engine) as session:
            session.execute(delete(OUTBOX).where(OUTBOX.c.published_at < now - RETENTION))
            session.commit()
