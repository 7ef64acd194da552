"""Unit-test fixtures: a real, migrated SQLite database file per test (see support.py), no broker."""
import shutil
from pathlib import Path

import pytest
from sqlalchemy.orm import sessionmaker

from servicekit.db import UnitOfWork, make_engine
from servicekit.migrate import upgrade
from services.tickets import operations
from tests.unit.support import T0, Clock, Desk, fresh_database


@pytest.fixture(scope="session")
def template_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("template")


@pytest.fixture
def db_url(tmp_path, template_dir) -> str:
    return fresh_database(tmp_path, template_dir)


@pytest.fixture
def engine(db_url):
    engine = make_engine(db_url, pool_size=2)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(engine):
    return sessionmaker(engine, expire_on_commit=False)


@pytest.fixture
def uow(session_factory) -> UnitOfWork:
    return UnitOfWork(session_factory)


@pytest.fixture
def session(session_factory):
    with session_factory() as session:
        yield session


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock(T0)
    monkeypatch.setattr(operations, "_now", clock)
    return clock


@pytest.fixture
def desk(uow, clock) -> Desk:
    return Desk(uow)


# --- the routing service's database (a migrated template copied per test) --------------------

@pytest.fixture(scope="session")
def routing_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("routing-template") / "routing.db"
    upgrade("routing", f"sqlite:///{path}")
    return path


@pytest.fixture
def routing_uow(tmp_path, routing_template):
    path = tmp_path / "routing.db"
    shutil.copyfile(routing_template, path)
    engine = make_engine(f"sqlite:///{path}", pool_size=2)
    yield UnitOfWork(sessionmaker(engine, expire_on_commit=False))
    engine.dispose()
