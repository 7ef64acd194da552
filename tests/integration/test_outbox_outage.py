"""The outbox relay against a broker that goes away: events wait in the database, none are lost."""
import socket
import time
import uuid

import eventlet
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select
from sqlalchemy.orm import Session

from contracts.tickets import TICKET_UPDATED
from servicekit.context import set_current_request_id
from servicekit.outbox import OutboxRelay, add_event
from servicekit.tables import OUTBOX
from tests.integration.conftest import BROKER_HOST, BROKER_PORT, free_port, wait_for

pytestmark = pytest.mark.integration


class TcpProxy:
    """Forwards a local port to the broker; ``stop()`` is an outage (listener and every
    connection closed), ``start()`` brings it back on the same port."""

    def __init__(self, target_host=BROKER_HOST, target_port=BROKER_PORT):
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener = None
        self._acceptor = None
        self._sockets = set()
        self._pipes = set()

    def start(self):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        self._acceptor = eventlet.spawn(self._accept, listener)
        return self

    def _accept(self, listener):
        while True:
            client, _ = listener.accept()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self._sockets.update((client, upstream))
            self._pipes.add(eventlet.spawn(self._pipe, client, upstream))
            self._pipes.add(eventlet.spawn(self._pipe, upstream, client))

    def _pipe(self, source, destination):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                destination.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, destination):
                self._close(sock)

    def _close(self, sock):
        self._sockets.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def stop(self):
        if self._acceptor is not None:
            self._acceptor.kill()
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for sock in list(self._sockets):
            self._close(sock)
        for pipe in list(self._pipes):
            pipe.kill()
        self._pipes.clear()

    def uri(self, vhost_uri):
        """``vhost_uri`` routed through this proxy."""
        return vhost_uri.replace(f"@{BROKER_HOST}:{BROKER_PORT}/", f"@127.0.0.1:{self.port}/")


@pytest.fixture
def proxy():
    proxy = TcpProxy().start()
    yield proxy
    proxy.stop()


@pytest.fixture
def relay_through(engine):
    """Run an ``OutboxRelay`` on the test database publishing to ``uri``; stopped afterwards."""
    running = []

    def start(uri):
        relay = OutboxRelay(engine, uri, "tickets")
        running.append((relay, eventlet.spawn(relay.run)))
        return relay

    yield start
    for relay, thread in running:
        relay.stop()
        try:
            with eventlet.Timeout(5):
                thread.wait()
        except eventlet.Timeout:
            thread.kill()


def commit_event(engine, relay, note):
    ticket_id = str(uuid.uuid4())
    with Session(engine) as session, session.begin():
        envelope = add_event(session, "tickets", TICKET_UPDATED, {"ticket_id": ticket_id}, {"note": note})
    relay.wake()  # what UnitOfWork does after a commit that wrote events
    return envelope


def publish_failures():
    return REGISTRY.get_sample_value("helpdesk_outbox_publish_failures_total", {"service": "tickets"}) or 0


def outbox_row(engine, event_id):
    with Session(engine) as session:
        return session.execute(select(OUTBOX).where(OUTBOX.c.event_id == event_id)).one()


def test_event_committed_while_the_broker_is_unreachable_arrives_after_it_returns(
        engine, vhost, amqp, proxy, relay_through):
    observer = amqp.bind("tickets", TICKET_UPDATED)
    relay = relay_through(proxy.uri(vhost))

    # the relay works through the proxy and holds an open connection when the outage starts
    warm_up = commit_event(engine, relay, "before the outage")
    assert amqp.wait_message(observer, timeout=5).payload["event_id"] == warm_up["event_id"]

    failures_before = publish_failures()
    proxy.stop()
    set_current_request_id("req-during-outage")
    try:
        envelope = commit_event(engine, relay, "during the outage")
    finally:
        set_current_request_id(None)

    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        assert amqp.get(observer) is None, "published while the broker was unreachable"
        eventlet.sleep(0.1)
    row = outbox_row(engine, envelope["event_id"])
    assert row.published_at is None
    assert publish_failures() > failures_before  # it kept trying, and kept the row

    proxy.start()
    message = amqp.wait_message(observer, timeout=15)
    assert message.payload == envelope
    assert message.headers["nameko.request_id"] == "req-during-outage"

    wait_for(lambda: outbox_row(engine, envelope["event_id"]).published_at is not None, timeout=5,
             message="the outbox row to be marked published")
    eventlet.sleep(0.5)  # a duplicate publish would be right behind the first
    assert amqp.count(observer) == 0
    with Session(engine) as session:
        unpublished = session.execute(select(OUTBOX.c.event_id).where(OUTBOX.c.published_at.is_(None))).all()
    assert unpublished == []
