"""A tickets instance restarted mid-flow: queued and in-flight calls complete, once."""
import functools
import uuid

import eventlet
import pytest
from kombu import Queue
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.tickets.models import Ticket
from tests.integration.conftest import STAFF
from tests.support.polling import wait_for

pytestmark = pytest.mark.integration

RPC_QUEUE = Queue("rpc-tickets", no_declare=True)


def tickets_with_subject(engine, subject) -> int:
    with Session(engine) as session:
        return session.execute(select(func.count()).select_from(Ticket).where(Ticket.subject == subject)).scalar_one()


def call_in_background(rpc_factory, method, *args):
    def call():
        with rpc_factory(timeout=15) as cluster:
            return getattr(cluster.tickets, method)(*args)

    return eventlet.spawn(call)


def slow_once(monkeypatch, method_name):
    """Make ``TicketsService.<method_name>`` hold its first call *after* it has committed."""
    from services.tickets.service import TicketsService

    real = getattr(TicketsService, method_name)
    entered, release = eventlet.Event(), eventlet.Event()
    results = []

    @functools.wraps(real)  # keeps nameko's entrypoint registration
    def held(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        results.append(result)
        if len(results) == 1:
            entered.send()
            release.wait()
        return result

    monkeypatch.setattr(TicketsService, method_name, held)
    return entered, release, results


def create_held_after_commit(tickets_factory, rpc_factory, monkeypatch, subject, description, key):
    """Start an instance and call ``create_ticket`` in the background; return once the instance
    has committed the ticket and is held before replying (the request not yet acked).

    Returns the instance, the background caller, the ``release`` event and the results list."""
    entered, release, results = slow_once(monkeypatch, "create_ticket")
    first = tickets_factory().start()
    caller = call_in_background(rpc_factory, "create_ticket", STAFF,
                                {"subject": subject, "description": description}, key)
    with eventlet.Timeout(5):
        entered.wait()
    return first, caller, release, results


def test_a_call_in_flight_when_the_service_stops_completes_and_creates_one_ticket(
        tickets_factory, rpc_factory, amqp, engine, monkeypatch):
    subject = f"restart {uuid.uuid4().hex[:6]}"
    first, caller, release, results = create_held_after_commit(
        tickets_factory, rpc_factory, monkeypatch, subject, "mid-flight", "idem-stop-1")
    stopping = eventlet.spawn(first.stop)
    eventlet.sleep(0.3)  # entrypoints stop; the running worker is waited for
    release.send()
    with eventlet.Timeout(10):
        stopping.wait()
    second = tickets_factory().start()

    with eventlet.Timeout(15):
        result = caller.wait()
    assert result["ticket"]["subject"] == subject
    # had the request been left un-acked, the new instance would have replayed it by now
    wait_for(lambda: amqp.count(RPC_QUEUE) == 0, timeout=5, message="rpc-tickets to drain")
    with rpc_factory() as cluster:
        assert cluster.tickets.get_ticket(STAFF, result["ticket"]["id"])["subject"] == subject
    assert [r["replayed"] for r in results].count(False) == 1
    assert tickets_with_subject(engine, subject) == 1
    assert second.get("/readyz").status_code == 200


def test_a_call_whose_instance_dies_after_commit_is_replayed_by_the_next_and_creates_one_ticket(
        tickets_factory, rpc_factory, engine, monkeypatch):
    subject = f"crash {uuid.uuid4().hex[:6]}"
    # the ticket is committed; no reply sent, request not acked
    first, caller, _release, results = create_held_after_commit(
        tickets_factory, rpc_factory, monkeypatch, subject, "committed, not acked", "idem-kill-1")
    first.kill()  # a crash: the broker requeues the un-acked request
    tickets_factory().start()

    with eventlet.Timeout(15):
        result = caller.wait()
    assert result["replayed"] is True
    assert result["ticket"] == results[0]["ticket"]
    assert [r["replayed"] for r in results] == [False, True]
    assert tickets_with_subject(engine, subject) == 1


def test_a_call_made_while_no_instance_runs_completes_when_one_starts(
        tickets_factory, rpc_factory, amqp, engine):
    subject = f"queued {uuid.uuid4().hex[:6]}"
    tickets_factory().start().stop()  # declares the durable rpc-tickets queue, then goes away

    caller = call_in_background(rpc_factory, "create_ticket", STAFF,
                                {"subject": subject, "description": "waiting"}, "idem-queued-1")
    wait_for(lambda: amqp.count(RPC_QUEUE) == 1, timeout=5, message="the request to wait in rpc-tickets")

    tickets_factory().start()
    with eventlet.Timeout(10):
        result = caller.wait()
    assert result["replayed"] is False
    assert result["ticket"]["subject"] == subject
    assert tickets_with_subject(engine, subject) == 1
