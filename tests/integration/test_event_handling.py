"""Events consumed by tickets (sla.ticket_sla_updated): once-only effects, retries, dead letters."""
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from kombu import Exchange, Queue

from contracts.events import iso_utc, make_envelope
from contracts.tickets import SLA_SOURCE, TICKET_SLA_UPDATED
from services.tickets import operations
from tests.integration.conftest import STAFF, wait_for

pytestmark = pytest.mark.integration

HANDLER = "on_ticket_sla_updated"
DLQ = Queue("dlq.evt-sla-ticket_sla_updated--tickets.on_ticket_sla_updated",
            exchange=Exchange("helpdesk.dead-letter", type="direct", durable=True),
            routing_key="dlq.evt-sla-ticket_sla_updated--tickets.on_ticket_sla_updated", durable=True)


def sla_envelope(ticket_id, hours=4):
    due = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(hours=hours)
    return make_envelope(SLA_SOURCE, TICKET_SLA_UPDATED, {"ticket_id": ticket_id}, {
        "ticket_id": ticket_id,
        "first_response_due_at": iso_utc(due),
        "resolution_due_at": iso_utc(due + timedelta(hours=20)),
    })


def create_ticket(rpc):
    return rpc.tickets.create_ticket(STAFF, {"subject": "VPN down", "description": "since 9am"})["ticket"]


def sla_entries(rpc, ticket_id):
    history = rpc.tickets.get_history(STAFF, ticket_id)["items"]
    return [entry for entry in history if entry["action"] == "sla_updated"]


class Counters:
    """Reads this handler's counters from the instance's /metrics."""

    def __init__(self, tickets):
        self.tickets = tickets

    def handled(self, outcome):
        return self.tickets.metric("helpdesk_event_requests_total", service="tickets", method=HANDLER,
                                   outcome=outcome)

    def dead_lettered(self):
        return self.tickets.metric("helpdesk_events_dead_lettered_total", service="tickets", method=HANDLER)

    def duplicates(self):
        # labelled like every other per-handler series: the handling service and method
        return self.tickets.metric("helpdesk_events_duplicate_total", service="tickets", method=HANDLER)


def read_dead_letters(amqp, expected):
    assert amqp.count(DLQ) == expected
    return [amqp.get(DLQ) for _ in range(expected)]


def test_an_event_delivered_twice_has_one_effect(tickets, rpc, amqp):
    counters = Counters(tickets)
    ticket = create_ticket(rpc)
    envelope = sla_envelope(ticket["id"])
    duplicates_before = counters.duplicates()

    amqp.publish_event(SLA_SOURCE, TICKET_SLA_UPDATED, envelope)
    amqp.publish_event(SLA_SOURCE, TICKET_SLA_UPDATED, envelope)

    wait_for(lambda: counters.duplicates() > duplicates_before, timeout=5,
             message="the second delivery to be recognised as a duplicate")
    assert counters.duplicates() == duplicates_before + 1
    assert len(sla_entries(rpc, ticket["id"])) == 1
    mirrored = rpc.tickets.get_ticket(STAFF, ticket["id"])
    assert mirrored["first_response_due_at"] == envelope["payload"]["first_response_due_at"]
    assert mirrored["resolution_due_at"] == envelope["payload"]["resolution_due_at"]
    assert mirrored["version"] == 2


def test_an_event_that_cannot_succeed_is_dead_lettered_not_dropped(tickets, amqp):
    counters = Counters(tickets)
    dead_before = counters.dead_lettered()
    not_found_before = counters.handled("not_found")
    unknown = sla_envelope(str(uuid.uuid4()))
    malformed = {"event_id": "not-a-uuid", "payload": {}}

    amqp.publish_event(SLA_SOURCE, TICKET_SLA_UPDATED, unknown)
    amqp.publish_event(SLA_SOURCE, TICKET_SLA_UPDATED, malformed)

    wait_for(lambda: counters.dead_lettered() >= dead_before + 2, timeout=5,
             message="both events in the dead-letter queue")
    parked = {message.headers["x-error-type"]: message for message in read_dead_letters(amqp, 2)}
    assert set(parked) == {"NotFound", "UnprocessableEvent"}

    assert parked["NotFound"].payload == unknown
    assert unknown["payload"]["ticket_id"] in parked["NotFound"].headers["x-error-message"]
    assert parked["UnprocessableEvent"].payload == malformed
    assert parked["UnprocessableEvent"].headers["x-dead-letter-reason"] == "unprocessable"
    assert parked["NotFound"].headers["x-dead-letter-reason"] == "rejected"  # not retried
    assert parked["NotFound"].headers["x-attempts"] == 1
    for message in parked.values():
        assert message.headers["x-original-queue"] == "evt-sla-ticket_sla_updated--tickets.on_ticket_sla_updated"
        assert message.properties["delivery_mode"] == 2
    # a domain error is deterministic: one attempt, no retries
    assert counters.handled("not_found") == not_found_before + 1


def test_a_transient_handler_failure_is_retried_and_applied_once(tickets, rpc, amqp, monkeypatch):
    counters = Counters(tickets)
    ticket = create_ticket(rpc)
    real_apply = operations.apply_sla_due_dates
    calls = []

    def flaky_apply(session, ticket_id, due):
        calls.append(ticket_id)
        if len(calls) <= 2:
            raise ConnectionError("database went away (simulated)")
        return real_apply(session, ticket_id, due)

    monkeypatch.setattr(operations, "apply_sla_due_dates", flaky_apply)
    errors_before, dead_before = counters.handled("error"), counters.dead_lettered()

    amqp.publish_event(SLA_SOURCE, TICKET_SLA_UPDATED, sla_envelope(ticket["id"]))

    wait_for(lambda: sla_entries(rpc, ticket["id"]), timeout=5, message="the SLA update to apply")
    assert len(calls) == 3
    assert len(sla_entries(rpc, ticket["id"])) == 1
    assert counters.handled("error") == errors_before + 2
    assert counters.dead_lettered() == dead_before
    assert amqp.count(amqp.declare(DLQ)) == 0


def test_an_event_still_failing_after_the_last_attempt_is_dead_lettered(tickets_factory, rpc, amqp,
                                                                        monkeypatch):
    tickets = tickets_factory(event_max_attempts=3).start()
    counters = Counters(tickets)
    ticket = create_ticket(rpc)
    calls = []

    def broken_apply(session, ticket_id, due):
        calls.append(ticket_id)
        raise RuntimeError("still broken")

    monkeypatch.setattr(operations, "apply_sla_due_dates", broken_apply)
    dead_before = counters.dead_lettered()
    envelope = sla_envelope(ticket["id"])

    amqp.publish_event(SLA_SOURCE, TICKET_SLA_UPDATED, envelope)

    wait_for(lambda: counters.dead_lettered() > dead_before, timeout=5, message="the event to be parked")
    assert len(calls) == 3
    [parked] = read_dead_letters(amqp, 1)
    assert parked.payload == envelope
    assert parked.headers["x-dead-letter-reason"] == "retries_exhausted"
    assert parked.headers["x-error-type"] == "RuntimeError"
    assert sla_entries(rpc, ticket["id"]) == []


def test_an_event_body_that_is_not_json_is_dead_lettered_not_dropped(tickets, amqp):
    counters = Counters(tickets)
    dead_before = counters.dead_lettered()

    amqp.publish_event(SLA_SOURCE, TICKET_SLA_UPDATED, b"{not json")

    wait_for(lambda: counters.dead_lettered() > dead_before, timeout=2, message="the body to be parked")
    [parked] = read_dead_letters(amqp, 1)
    raw = parked.body if isinstance(parked.body, bytes) else parked.body.encode()
    assert raw == b"{not json"  # the original bytes, untouched
    assert parked.headers["x-dead-letter-reason"] == "unprocessable"
