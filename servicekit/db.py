"""SQLAlchemy 2 engines and a nameko dependency provider giving each worker a unit of work.

SQLite (embedded default) and PostgreSQL (production) behave the same to callers. Under
eventlet, psycopg2 is made cooperative with psycogreen; SQLite calls are short local file
operations and never yield inside a transaction, so they cannot deadlock the hub.
"""
import logging
import os
import sqlite3
from contextlib import contextmanager

import eventlet
import eventlet.patcher
import eventlet.tpool
from nameko.extensions import DependencyProvider
from sqlalchemy import create_engine, event, inspect as sa_inspect, make_url
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from servicekit.config import settings_from_container

log = logging.getLogger(__name__)


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


# SQLite WAL checkpoints of a running service (see ``WalCheckpointer``)
CHECKPOINT_INTERVAL_SECONDS = 0.2
# past this the WAL is truncated when no transaction is open (never waiting for one) ...
WAL_TRUNCATE_BYTES = 4 * 1024 * 1024
# ... and past this, waiting up to WAL_FORCE_WAIT_MS for open transactions to end
WAL_FORCE_TRUNCATE_BYTES = 64 * 1024 * 1024
WAL_FORCE_WAIT_MS = 100
TRUNCATE_ATTEMPTS = 25
_real_sleep = eventlet.patcher.original("time").sleep


def make_engine(url: str, pool_size: int = 10, manual_checkpoints: bool = False) -> Engine:
    """``manual_checkpoints``: SQLite only, turn off the automatic WAL checkpoint, which would
    otherwise run inside whichever commit crosses the threshold and block the whole process
    (every green thread) while it copies pages and fsyncs; the caller must then run a
    ``WalCheckpointer``."""
    if _is_sqlite(url):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 5},
            pool_size=pool_size,
            max_overflow=pool_size,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            # WAL: readers never block the writer; NORMAL sync is durable across process crashes
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            if manual_checkpoints:
                cursor.execute("PRAGMA wal_autocheckpoint=0")
            cursor.close()

        return engine

    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    if eventlet.patcher.is_monkey_patched("socket"):
        from psycogreen.eventlet import patch_psycopg

        patch_psycopg()
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        # a half-open server must not hang a green thread forever
        connect_args={"connect_timeout": 5, "options": "-c statement_timeout=15000"},
    )


def column_values(obj) -> dict:
    """{column key: value} of every mapped column of an ORM object built outside the session,
    for a Core INSERT of it (a statement built once, without the unit of work's flush, which
    cost more than the rest of a hot write; the object stays outside the session)."""
    columns = _MAPPED_COLUMNS.get(type(obj))
    if columns is None:
        columns = _MAPPED_COLUMNS[type(obj)] = tuple(
            (attr.columns[0].key, attr.key) for attr in sa_inspect(type(obj)).column_attrs)
    return {column: getattr(obj, attr) for column, attr in columns}


_MAPPED_COLUMNS: dict = {}  # model class -> (column key, attribute name) pairs


class WalCheckpointer:
    """Checkpoints a SQLite WAL from a real OS thread, off the request path.

    Every ``interval`` a PASSIVE checkpoint (never waits for, nor blocks, readers or writers)
    runs in eventlet's thread pool on its own connection, so the green threads keep running
    while it copies pages and fsyncs. Under steady writes a passive checkpoint never catches up
    with the end of the WAL, so the WAL is never restarted and would grow without bound: past
    ``WAL_TRUNCATE_BYTES`` a TRUNCATE checkpoint (which takes the write lock, copies the few
    frames written since the passive one and empties the file) is tried without waiting: it
    gives up at once if a transaction is open. Past ``WAL_FORCE_TRUNCATE_BYTES`` it waits up to
    ``WAL_FORCE_WAIT_MS`` for them. A writer of this process that meets the checkpoint's write
    lock waits in SQLite's busy handler, blocking the process briefly; that is what the
    automatic checkpoint did on every ~4 MB, for a whole copy and fsync.
    """

    def __init__(self, path: str, interval: float = CHECKPOINT_INTERVAL_SECONDS):
        self.path = path
        self.interval = interval
        self._connection = None
        self._running = True

    def _checkpoint(self):
        # runs in an OS thread; sqlite3 releases the GIL while it works
        if self._connection is None:
            self._connection = sqlite3.connect(self.path, timeout=0, check_same_thread=False,
                                               isolation_level=None)
        connection = self._connection
        connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        try:
            wal_bytes = os.path.getsize(self.path + "-wal")
        except OSError:
            return
        if wal_bytes <= WAL_TRUNCATE_BYTES:
            return
        # retried here in the OS thread (a failed attempt holds no lock), not with SQLite's busy
        # handler, which would keep the write lock while it waits for readers
        force = wal_bytes > WAL_FORCE_TRUNCATE_BYTES
        for _ in range(TRUNCATE_ATTEMPTS):
            try:
                busy, _log, _done = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.OperationalError:
                busy = 1
            if not busy:
                return
            _real_sleep(0.002)
        if force:
            connection.execute(f"PRAGMA busy_timeout={WAL_FORCE_WAIT_MS}")
            try:
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.OperationalError:  # busy: the next round tries again
                pass
            finally:
                connection.execute("PRAGMA busy_timeout=0")

    def run(self):
        busy = False
        try:
            while self._running:
                eventlet.sleep(self.interval)
                if not self._running:
                    break
                busy = True
                try:
                    eventlet.tpool.execute(self._checkpoint)
                except Exception as exc:  # e.g. SQLITE_BUSY on TRUNCATE: next round tries again
                    log.warning("sqlite wal checkpoint failed: %s", exc)
                busy = False
        finally:
            # killed while the OS thread still uses the connection: leave it to that thread/gc
            if self._connection is not None and not busy:
                self._connection.close()
                self._connection = None

    def stop(self):
        self._running = False


class UnitOfWork:
    """Hands out transactions; after a commit that wrote events it wakes the outbox relay."""

    def __init__(self, session_factory: sessionmaker, on_events_committed=None):
        self._session_factory = session_factory
        self._on_events_committed = on_events_committed

    @contextmanager
    def transaction(self):
        session: Session = self._session_factory()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()
        if session.info.pop("outbox_dirty", False) and self._on_events_committed:
            self._on_events_committed()

    @contextmanager
    def read(self):
        session: Session = self._session_factory()
        try:
            yield session
        finally:
            session.rollback()
            session.close()


class Database(DependencyProvider):
    """``db = Database()`` on a service: ``with self.db.transaction() as session: ...``.

    Also runs the outbox relay of this service instance, so every service that writes events
    publishes them without further wiring.
    """

    def setup(self):
        from servicekit.outbox import OutboxRelay

        self.settings = settings_from_container(self.container)
        url = self.settings.database_url
        self.checkpointer = None
        if _is_sqlite(url):
            path = make_url(url).database
            if path and path != ":memory:" and not path.startswith("file:"):
                self.checkpointer = WalCheckpointer(path)
        self.engine = make_engine(url, pool_size=self.settings.max_workers + 2,
                                  manual_checkpoints=self.checkpointer is not None)
        self.session_factory = sessionmaker(self.engine, expire_on_commit=False)
        self.relay = OutboxRelay(self.engine, self.settings.outbox_amqp_uri or self.settings.amqp_uri,
                                 self.settings.service)

    def start(self):
        self.container.spawn_managed_thread(self.relay.run, identifier="outbox_relay")
        if self.checkpointer is not None:
            self.container.spawn_managed_thread(self.checkpointer.run, identifier="wal_checkpointer")

    def stop(self):
        self.relay.stop()
        if self.checkpointer is not None:
            self.checkpointer.stop()
        self.engine.dispose()

    def kill(self):
        self.stop()

    def get_dependency(self, worker_ctx):
        return UnitOfWork(self.session_factory, self.relay.wake)
