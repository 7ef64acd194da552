"""Integration fixtures: a throwaway RabbitMQ vhost and database per test, the real tickets
service in-process (nameko ``ServiceRunner``) and a ``ClusterRpcProxy`` client.

The root conftest has already monkey-patched eventlet, so sockets, threads and psycopg2 are
green here, as they are under ``nameko run``.
"""
import dataclasses
import functools
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from contextlib import contextmanager
from urllib.parse import quote

import eventlet
import pytest
import requests
from kombu import Connection, Queue
from nameko.runners import ServiceRunner
from nameko.standalone.events import get_event_exchange
from nameko.standalone.rpc import ClusterRpcProxy
from prometheus_client.parser import text_string_to_metric_families

from servicekit.config import ServiceSettings
from servicekit.migrate import upgrade

BROKER_HOST = os.environ.get("TEST_AMQP_HOST", "localhost")
BROKER_PORT = int(os.environ.get("TEST_AMQP_PORT", "5672"))
MANAGEMENT_URL = os.environ.get("TEST_RABBITMQ_MANAGEMENT_URL", "http://localhost:15672")
BROKER_USER, BROKER_PASSWORD = "guest", "guest"

STAFF = {"id": "agent-1", "role": "agent"}


# --- polling ---------------------------------------------------------------------------------

def wait_for(predicate, timeout=5.0, interval=0.05, message="condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        eventlet.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- RabbitMQ vhost --------------------------------------------------------------------------

class _ManagementApi:
    def __init__(self, base_url):
        self.base_url = base_url.rstrip("/")
        self.auth = (BROKER_USER, BROKER_PASSWORD)

    def available(self) -> bool:
        try:
            return requests.get(f"{self.base_url}/api/overview", auth=self.auth, timeout=1).ok
        except requests.RequestException:
            return False

    def add(self, name):
        vh = quote(name, safe="")
        requests.put(f"{self.base_url}/api/vhosts/{vh}", auth=self.auth, timeout=10).raise_for_status()
        requests.put(f"{self.base_url}/api/permissions/{vh}/{BROKER_USER}", auth=self.auth, timeout=10,
                     json={"configure": ".*", "write": ".*", "read": ".*"}).raise_for_status()

    def delete(self, name):
        response = requests.delete(f"{self.base_url}/api/vhosts/{quote(name, safe='')}",
                                   auth=self.auth, timeout=10)
        if response.status_code not in (204, 404):
            response.raise_for_status()


    def finish(self):
        pass


class _Rabbitmqctl:
    """Each call is a CLI start (~0.4 s), so deletions run in the background and are reaped
    (and checked) at the end of the session."""

    def __init__(self):
        self._pending = []

    def available(self) -> bool:
        return shutil.which("rabbitmqctl") is not None

    @staticmethod
    def _run(*args):
        subprocess.run(["rabbitmqctl", "--quiet", *args], check=True, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def add(self, name):
        self._run("add_vhost", name)
        self._run("set_permissions", "-p", name, BROKER_USER, ".*", ".*", ".*")

    def delete(self, name):
        self._pending.append((name, subprocess.Popen(
            ["rabbitmqctl", "--quiet", "delete_vhost", name],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))

    def finish(self):
        failed = []
        for name, process in self._pending:
            _, stderr = process.communicate(timeout=60)
            if process.returncode != 0:
                failed.append(f"{name}: {stderr.decode(errors='replace').strip()}")
        self._pending.clear()
        if failed:
            raise RuntimeError("could not delete test vhosts: " + "; ".join(failed))


@pytest.fixture(scope="session")
def broker_admin():
    """The management HTTP API when it answers (fast), else rabbitmqctl."""
    admin = None
    if os.environ.get("TEST_RABBITMQ_ADMIN") != "rabbitmqctl":
        api = _ManagementApi(MANAGEMENT_URL)
        if api.available():
            admin = api
    if admin is None:
        admin = _Rabbitmqctl()
        if not admin.available():
            pytest.skip("no RabbitMQ management API and no rabbitmqctl to create test vhosts")
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
    name = f"hd-test-{uuid.uuid4().hex[:8]}"
    broker_admin.add(name)
    try:
        yield f"amqp://{BROKER_USER}:{BROKER_PASSWORD}@{BROKER_HOST}:{BROKER_PORT}/{quote(name, safe='')}"
    finally:
        broker_admin.delete(name)


# --- database --------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    """A migrated, empty tickets database: SQLite in tmp_path, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'tickets.db'}"
        upgrade("tickets", url)
        yield url
        return

    server_url = os.environ.get("TEST_POSTGRES_URL")
    if not server_url:
        pytest.skip("PostgreSQL variant: set TEST_POSTGRES_URL "
                    "(e.g. postgresql://postgres@localhost:5432/postgres) to run it")
    import psycopg2
    from sqlalchemy.engine import make_url

    name = f"hd_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(server_url, connect_timeout=5)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
        try:
            upgrade("tickets", url)
            yield url
        finally:
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


@pytest.fixture
def engine(database_url):
    from servicekit.db import make_engine

    engine = make_engine(database_url, pool_size=2)
    yield engine
    engine.dispose()


# --- the service -----------------------------------------------------------------------------

class TicketsHarness:
    """Runs ``TicketsService`` in this process; ``start()`` again after ``stop()`` is a restart."""

    def __init__(self, amqp_uri, database_url, **overrides):
        self.settings = dataclasses.replace(ServiceSettings(
            service="tickets",
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
        self.runner = None

    @property
    def config(self) -> dict:
        return self.settings.nameko_config()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.http_port}"

    def start(self, **overrides):
        from services.tickets.service import TicketsService

        if overrides:
            self.settings = dataclasses.replace(self.settings, **overrides)
        assert self.runner is None, "already running"
        self.runner = ServiceRunner(self.config)
        self.runner.add_service(TicketsService)
        self.runner.start()
        return self

    @property
    def container(self):
        return self.runner.service_map["tickets"]

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


@pytest.fixture
def tickets_factory(vhost, database_url):
    """Build (not start) tickets instances on this test's vhost and database; all are stopped after."""
    harnesses = []

    def make(**overrides) -> TicketsHarness:
        harness = TicketsHarness(vhost, database_url, **overrides)
        harnesses.append(harness)
        return harness

    yield make
    for harness in harnesses:
        harness.stop()


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

class Amqp:
    """A plain kombu connection to the test's vhost: bind observer queues, publish, read."""

    def __init__(self, uri):
        self.connection = Connection(uri)
        self.channel = self.connection.channel()

    def close(self):
        self.connection.release()

    def bind(self, source, routing_key, name=None) -> Queue:
        """A queue on ``<source>.events``; declare it before the event is published."""
        exchange = get_event_exchange(source, {})
        queue = Queue(name or f"test-{source}-{routing_key}-{uuid.uuid4().hex[:6]}", exchange=exchange,
                      routing_key=routing_key, durable=False, auto_delete=False)
        queue(self.channel).declare()
        return queue

    def declare(self, queue: Queue) -> Queue:
        queue(self.channel).declare()
        return queue

    def get(self, queue: Queue):
        return queue(self.channel).get(no_ack=True)

    def wait_message(self, queue: Queue, timeout=5.0):
        return wait_for(lambda: self.get(queue), timeout=timeout, message=f"a message in {queue.name}")

    def count(self, queue: Queue) -> int:
        return queue(self.channel).queue_declare(passive=True).message_count

    def publish_event(self, source, event_type, body, **kwargs):
        exchange = get_event_exchange(source, {})
        producer = self.connection.Producer(self.channel)
        producer.publish(body if isinstance(body, (str, bytes)) else json.dumps(body),
                         exchange=exchange, routing_key=event_type, declare=[exchange],
                         content_type="application/json", content_encoding="utf-8", **kwargs)


@pytest.fixture
def amqp(vhost):
    client = Amqp(vhost)
    yield client
    client.close()
