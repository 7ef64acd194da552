"""Transactional outbox: events are rows written in the same transaction as the change, then
relayed to RabbitMQ with publisher confirms. A broker outage only delays them.

Publish is at-least-once (a crash between confirm and marking the row re-publishes it);
consumers dedupe on ``event_id`` (see ``servicekit.events``).
"""
import logging
import threading
import time
from datetime import datetime, timedelta, timezone

import eventlet
from nameko.amqp.publish import Publisher
from nameko.constants import PERSISTENT
from nameko.standalone.events import get_event_exchange
from sqlalchemy import bindparam, delete, func, select, update
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
_NEXT_BATCH = (
    select(OUTBOX.c.id, OUTBOX.c.source, OUTBOX.c.event_type, OUTBOX.c.envelope,
           OUTBOX.c.request_id, OUTBOX.c.created_at)
    .where(OUTBOX.c.published_at.is_(None))
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
    envelope = make_envelope(source, event_type, subject_ids, payload, occurred_at=occurred_at)
    session.execute(_INSERT_EVENT, {
        "event_id": envelope["event_id"],
        "source": source,
        "event_type": event_type,
        "envelope": envelope,
        "request_id": current_request_id(),
        "created_at": datetime.now(timezone.utc),
        "attempts": 0,
    })
    session.info["outbox_dirty"] = True
    return envelope


class OutboxRelay:
    """Publishes committed outbox rows, at least once; one relay per service instance.

    One relay publishes in row order. Several replicas may run: on PostgreSQL rows are claimed
    with ``FOR UPDATE SKIP LOCKED`` so each row is published by one relay at a time, and then
    order across replicas (and across concurrently committing transactions) is not guaranteed;
    consumers must not rely on it (envelopes carry ``occurred_at``, snapshots a ``version``).
    """

    def __init__(self, engine, amqp_uri: str, service: str):
        self.engine = engine
        self.service = service
        self.publisher = Publisher(
            amqp_uri,
            use_confirms=True,
            serializer="json",
            delivery_mode=PERSISTENT,
            # we do our own back-off; kombu's retry would block the relay for long stretches
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0.1, "interval_step": 0.1},
        )
        self._wake = threading.Event()
        self._running = True
        self._exchanges = {}
        self._consecutive_failures = 0
        self._last_purge = datetime.now(timezone.utc)
        self._last_recount = float("-inf")

    def wake(self):
        self._wake.set()

    def stop(self):
        self._running = False
        self._wake.set()

    def run(self):
        while self._running:
            try:
                published = self.relay_batch()
                self._consecutive_failures = 0
            except Exception as exc:  # broker or database down: keep rows, back off, retry
                self._consecutive_failures += 1
                delay = min(MAX_BACKOFF_SECONDS, 0.2 * 2 ** min(self._consecutive_failures, 10))
                metrics.OUTBOX_PUBLISH_FAILURES.labels(self.service).inc()
                log.warning("outbox relay failed (attempt %s), retrying in %.1fs: %s",
                            self._consecutive_failures, delay, exc)
                eventlet.sleep(delay)
                continue
            if published >= BATCH_SIZE:
                eventlet.sleep(0)  # more waiting: go again, but let workers run
                continue
            self._wake.wait(IDLE_POLL_SECONDS)
            self._wake.clear()
            self._maybe_purge()

    def _exchange(self, source):
        exchange = self._exchanges.get(source)
        if exchange is None:
            exchange = self._exchanges[source] = get_event_exchange(source, {})
        return exchange

    def relay_batch(self) -> int:
        published_ids = []
        with Session(self.engine) as session:
            rows = session.execute(_NEXT_BATCH).all()
            self._observe_lag(session, rows)
            try:
                for row in rows:
                    headers = {"nameko.request_id": row.request_id} if row.request_id else {}
                    exchange = self._exchange(row.source)
                    self.publisher.publish(
                        row.envelope,
                        exchange=exchange,
                        routing_key=row.event_type,
                        declare=[exchange],
                        headers=headers,
                        message_id=row.envelope["event_id"],
                    )
                    published_ids.append(row.id)
            finally:
                if published_ids:
                    session.execute(_MARK_PUBLISHED, {"ids": published_ids, "at": datetime.now(timezone.utc)})
                    session.commit()
                    metrics.OUTBOX_PUBLISHED.labels(self.service).inc(len(published_ids))
        return len(published_ids)

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
