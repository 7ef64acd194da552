"""SQLAlchemy 2 engines and a nameko dependency provider giving each worker a unit of work.

SQLite (embedded default) and PostgreSQL (production) behave the same to callers. Under
eventlet, psycopg2 is made cooperative with psycogreen; SQLite calls are short local file
operations and never yield inside a transaction, so they cannot deadlock the hub.
"""
import logging
from contextlib import contextmanager

import eventlet.patcher
from nameko.extensions import DependencyProvider
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from servicekit.config import settings_from_container

log = logging.getLogger(__name__)


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str, pool_size: int = 10) -> Engine:
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
        self.engine = make_engine(self.settings.database_url, pool_size=self.settings.max_workers + 2)
        self.session_factory = sessionmaker(self.engine, expire_on_commit=False)
        self.relay = OutboxRelay(self.engine, self.settings.outbox_amqp_uri or self.settings.amqp_uri,
                                 self.settings.service)

    def start(self):
        self.container.spawn_managed_thread(self.relay.run, identifier="outbox_relay")

    def stop(self):
        self.relay.stop()
        self.engine.dispose()

    def kill(self):
        self.relay.stop()
        self.engine.dispose()

    def get_dependency(self, worker_ctx):
        return UnitOfWork(self.session_factory, self.relay.wake)
