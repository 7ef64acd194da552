"""Integration fixtures: a throwaway RabbitMQ vhost and database per test, the real tickets
service in-process (nameko ``ServiceRunner``) and a ``ClusterRpcProxy`` client.

The root conftest has already monkey-patched eventlet, so sockets, threads and psycopg2 are
green here, as they are under ``nameko run``.
"""
import dataclasses
import functools
import os
import uuid
from contextlib import contextmanager

import eventlet
import pytest
import requests
from nameko.runners import ServiceRunner
from nameko.standalone.rpc import ClusterRpcProxy
from prometheus_client.parser import text_string_to_metric_families

from servicekit.config import ServiceSettings
from servicekit.migrate import upgrade
from tests.support.amqp import AmqpClient
from tests.support.broker import VhostAdmin, amqp_uri
from tests.support.polling import wait_for  # noqa: F401  (the integration tests import it from here)
from tests.support.ports import free_port

STAFF = {"id": "agent-1", "role": "agent"}


# --- RabbitMQ vhost --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def broker_admin():
    admin = VhostAdmin.or_skip()
    yield admin
    admin.finish()


@pytest.fixture(scope="session", autouse=True)
def _quick_queue_consumer_shutdown():
    """nameko's QueueConsumer notices a stop request only between 1 s ``drain_events`` polls
    (kombu's ``safety_interval``), so every container stop or kill took 1-3 s. Poll at 0.1 s:
    same semantics, faster teardown."""
    from kombu.mixins import ConsumerMixin
    from nameko.messaging import QueueConsumer

    QueueConsumer.consume = functools.partialmethod(ConsumerMixin.consume, safety_interval=0.1)
    yield
    del QueueConsumer.consume


@pytest.fixture
def vhost(broker_admin):
    """A fresh vhost (guest has all permissions); yields its AMQP URI, deletes it afterwards."""
    with broker_admin.vhost("hd-test") as name:
        yield amqp_uri(name)


# --- database --------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_factory(request, tmp_path):
    """``make("routing")``: a migrated, empty database of that service (SQLite in tmp_path, or a
    fresh PostgreSQL database, dropped afterwards); every test runs on both backends."""
    backend = request.param
    server_url = os.environ.get("TEST_POSTGRES_URL")
    if backend == "postgres" and not server_url:
        pytest.skip("PostgreSQL variant: set TEST_POSTGRES_URL "
                    "(e.g. postgresql://postgres@localhost:5432/postgres) to run it")
    created = []
    admin = None

    def make(service: str = "tickets") -> str:
        nonlocal admin
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / (service + '.db')}"
            upgrade(service, url)
            return url
        import psycopg2
        from sqlalchemy.engine import make_url

        if admin is None:
            admin = psycopg2.connect(server_url, connect_timeout=5)
            admin.autocommit = True
        name = f"hd_{service[:8]}_{uuid.uuid4().hex[:8]}"
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
        upgrade(service, url)
        return url

    make.backend = backend
    yield make
    if admin is not None:
        try:
            with admin.cursor() as cur:
                for name in created:
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            admin.close()


@pytest.fixture
def database_url(database_factory):
    """A migrated, empty tickets database."""
    return database_factory("tickets")


@pytest.fixture
def engine(database_url):
    from servicekit.db import make_engine

    engine = make_engine(database_url, pool_size=2)
    yield engine
    engine.dispose()


# --- the service -----------------------------------------------------------------------------

class ServiceHarness:
    """Runs one service class in this process; ``start()`` again after ``stop()`` is a restart."""

    service = "tickets"

    def __init__(self, amqp_uri, database_url, extra_config=None, **overrides):
        self.settings = dataclasses.replace(ServiceSettings(
            service=self.service,
            amqp_uri=amqp_uri,
            database_url=database_url,
            http_host="127.0.0.1",
            http_port=free_port(),
            max_workers=10,
            log_level="WARNING",
            rpc_timeout_seconds=5,
            event_max_attempts=5,
            event_retry_base_seconds=0.05,
        ), **overrides)
        self.extra_config = dict(extra_config or {})
        self.runner = None

    def service_class(self):
        from services.tickets.service import TicketsService

        return TicketsService

    @property
    def config(self) -> dict:
        return {**self.settings.nameko_config(), **self.extra_config}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.http_port}"

    def start(self, **overrides):
        if overrides:
            self.settings = dataclasses.replace(self.settings, **overrides)
        assert self.runner is None, "already running"
        self.runner = ServiceRunner(self.config)
        self.runner.add_service(self.service_class())
        self.runner.start()
        return self

    @property
    def container(self):
        return self.runner.service_map[self.service]

    def stop(self, timeout=10):
        runner, self.runner = self.runner, None
        if runner is None:
            return
        try:
            with eventlet.Timeout(timeout):
                runner.stop()
        except eventlet.Timeout:
            runner.kill()

    def kill(self):
        """A crash: workers die mid-flight, un-acked messages go back to the broker."""
        runner, self.runner = self.runner, None
        runner.kill()

    def get(self, path, **kwargs):
        kwargs.setdefault("timeout", 5)
        return requests.get(self.base_url + path, **kwargs)

    def metric(self, name, **labels) -> float:
        """A sample from this instance's ``/metrics`` (0 when the series does not exist yet)."""
        text = self.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


TicketsHarness = ServiceHarness


class RoutingHarness(ServiceHarness):
    service = "routing"

    def service_class(self):
        from services.routing.service import RoutingService

        return RoutingService


@contextmanager
def harness_factory(build):
    """``make(**kwargs)`` -> ``build(**kwargs)``, a harness not yet started; every harness it
    made is stopped when the block ends."""
    harnesses = []

    def make(**kwargs):
        harness = build(**kwargs)
        harnesses.append(harness)
        return harness

    try:
        yield make
    finally:
        for harness in harnesses:
            harness.stop()


@pytest.fixture
def tickets_factory(vhost, database_url):
    """Build (not start) tickets instances on this test's vhost and database; all are stopped after."""
    with harness_factory(lambda **overrides: TicketsHarness(vhost, database_url, **overrides)) as make:
        yield make


@pytest.fixture
def tickets(tickets_factory):
    return tickets_factory().start()


@pytest.fixture
def rpc_factory(vhost):
    """``with rpc_factory(request_id="...") as cluster: cluster.tickets.create_ticket(...)``."""

    @contextmanager
    def make(timeout=5, **context_data):
        with ClusterRpcProxy({"AMQP_URI": vhost, "serializer": "json"}, timeout=timeout,
                             context_data=context_data or None) as cluster:
            yield cluster

    return make


@pytest.fixture
def rpc(rpc_factory):
    with rpc_factory() as cluster:
        yield cluster


# --- raw AMQP --------------------------------------------------------------------------------

@pytest.fixture
def amqp(vhost):
    client = AmqpClient(vhost, queue_prefix="test")
    yield client
    client.close()
