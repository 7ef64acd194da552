"""The outbox relay against a broker that goes away: events wait in the database, none are lost."""
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
from tests.support.broker import BROKER_HOST, BROKER_PORT
from tests.support.polling import wait_for
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy():
    """A proxy to the broker: ``stop()`` is an outage (listener and every connection closed),
    ``start()`` brings it back on the same port."""
    proxy = TcpProxy(BROKER_HOST, BROKER_PORT).start()
    yield proxy
    proxy.stop()


def through(proxy, vhost_uri):
    """``vhost_uri`` routed through ``proxy``."""
    return vhost_uri.replace(f"@{BROKER_HOST}:{BROKER_PORT}/", f"@127.0.0.1:{proxy.port}/")


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
    relay = relay_through(through(proxy, vhost))

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
