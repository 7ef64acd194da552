"""Nothing is lost or doubled across duplicate deliveries, a broker outage and a restart.

These tests stop and start parts of the module's stack; they run in file order and each
leaves the stack running again.
"""
import signal
import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from contracts.events import iso_utc, make_envelope
from contracts.tickets import SLA_SOURCE, TICKET_CREATED, TICKET_SLA_UPDATED
from tests.e2e.conftest import wait_until

pytestmark = pytest.mark.e2e


def _metric(stack, name: str, **labels) -> float:
    text = requests.get(stack.tickets_url + "/metrics", timeout=5).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def _ticket_created_messages(amqp, queue) -> list:
    return [(m.payload, m.headers) for m in amqp.drain(queue)]


def test_sla_event_delivered_twice_has_one_effect(stack, api, amqp):
    ticket = api.create_ticket("alice", priority="high")
    now = datetime.now(timezone.utc).replace(microsecond=0)
    first_due, resolution_due = now + timedelta(hours=1), now + timedelta(hours=8)
    envelope = make_envelope(SLA_SOURCE, TICKET_SLA_UPDATED, {"ticket_id": ticket["id"]}, {
        "ticket_id": ticket["id"], "first_response_due_at": iso_utc(first_due),
        "resolution_due_at": iso_utc(resolution_due)})
    handled_before = _metric(stack, "helpdesk_event_requests_total", method="on_ticket_sla_updated",
                             outcome="success")

    amqp.publish_event(SLA_SOURCE, TICKET_SLA_UPDATED, envelope)
    amqp.publish_event(SLA_SOURCE, TICKET_SLA_UPDATED, envelope)

    # both deliveries were handled (successfully: the second one as a known duplicate)
    wait_until(lambda: _metric(stack, "helpdesk_event_requests_total", method="on_ticket_sla_updated",
                               outcome="success") >= handled_before + 2,
               timeout=15, message="two deliveries of the sla event handled\n" + stack.logs())
    history = api.get(f"/v1/tickets/{ticket['id']}/history", as_="agent").json()["items"]
    sla_entries = [e for e in history if e["action"] == "sla_updated"]
    assert len(sla_entries) == 1, history
    assert sla_entries[0]["changes"]["first_response_due_at"] == [None, iso_utc(first_due)]
    mirrored = api.get(f"/v1/tickets/{ticket['id']}", as_="alice").json()
    assert mirrored["first_response_due_at"] == iso_utc(first_due)
    assert mirrored["resolution_due_at"] == iso_utc(resolution_due)
    assert mirrored["version"] == ticket["version"] + 1
    assert _metric(stack, "helpdesk_events_duplicate_total", method="on_ticket_sla_updated") >= 1


def test_ticket_created_during_a_broker_outage_is_announced_once_it_returns(stack, api, amqp):
    created_events = amqp.bind("tickets", TICKET_CREATED)
    # the relay is connected through the proxy and idle
    warm = api.create_ticket("alice", subject="before the outage")
    wait_until(lambda: any(p["subject_ids"]["ticket_id"] == warm["id"]
                           for p, _ in _ticket_created_messages(amqp, created_events)),
               timeout=15, message="the warm-up ticket_created event\n" + stack.logs())

    stack.proxy.stop()
    try:
        request_id = f"e2e-outage-{uuid.uuid4().hex[:12]}"
        response = api.post("/v1/tickets", as_="alice", headers={"X-Request-ID": request_id},
                            json={"subject": "created while the broker is away", "description": "d"})
        assert response.status_code == 201, response.text  # RPC does not need the outbox's connection
        ticket = response.json()
        assert api.get(f"/v1/tickets/{ticket['id']}", as_="alice").status_code == 200

        seen = []
        with pytest.raises(AssertionError):  # nothing can arrive while the publisher is cut off
            wait_until(lambda: seen.extend(_ticket_created_messages(amqp, created_events)) or seen,
                       timeout=2, interval=0.2)
        assert seen == []
        wait_until(lambda: _metric(stack, "helpdesk_outbox_pending_events") >= 1, timeout=5,
                   message="the event waiting in the outbox")
    finally:
        stack.proxy.start()  # the same port: the relay's configured URI works again

    def announced():
        seen.extend(_ticket_created_messages(amqp, created_events))
        return any(p["subject_ids"]["ticket_id"] == ticket["id"] for p, _ in seen)

    wait_until(announced, timeout=25, interval=0.2,
               message="ticket_created after the broker returned\n" + stack.logs())
    wait_until(lambda: _metric(stack, "helpdesk_outbox_pending_events") == 0, timeout=10,
               message="the outbox drained")
    seen.extend(_ticket_created_messages(amqp, created_events))
    # the relay publishes at least once: the warm-up's batch, seen by this test just before the
    # proxy stopped, may have lost its confirm with the connection and come again with the
    # outage ticket (seen twice in CI). Consumers drop such repeats by event_id; what must hold
    # is that the outage ticket is announced, as one event.
    seen = [(p, h) for p, h in seen if p["subject_ids"]["ticket_id"] == ticket["id"]]
    assert seen and len({p["event_id"] for p, _ in seen}) == 1, [
        (p["event_id"], p["subject_ids"], p["occurred_at"], h) for p, h in seen]
    payload, headers = seen[0]
    assert payload["event_type"] == TICKET_CREATED and payload["source"] == "tickets"
    assert payload["subject_ids"] == {"ticket_id": ticket["id"]}
    assert payload["payload"]["ticket"]["id"] == ticket["id"]
    assert headers["nameko.request_id"] == request_id
    assert _metric(stack, "helpdesk_outbox_publish_failures_total") >= 1


def test_create_waits_in_the_queue_while_tickets_restarts(stack, api, amqp, tag):
    stack.tickets.stop(signal.SIGTERM)
    wait_until(lambda: api.get("/readyz").status_code == 503, timeout=10,
               message="the gateway to report tickets unavailable")

    key = f"restart-{uuid.uuid4().hex}"
    body = {"subject": f"filed during a restart {tag}", "description": "d", "tags": [tag]}
    outcome = {}

    def create():
        try:
            outcome["response"] = api.post("/v1/tickets", as_="alice", json=body,
                                           headers={"Idempotency-Key": key})
        except Exception as exc:  # reported below
            outcome["error"] = exc

    worker = threading.Thread(target=create)
    worker.start()
    try:
        # the request is parked in the durable RPC queue, not failed
        wait_until(lambda: amqp.message_count("rpc-tickets") >= 1, timeout=5,
                   message="the create request waiting in rpc-tickets")
        stack.tickets.start()
        stack.wait_tickets_ready(30)
    finally:
        worker.join(timeout=40)
    assert not worker.is_alive(), "the create request never finished"
    assert "error" not in outcome, outcome.get("error")
    response = outcome["response"]
    if response.status_code == 504:  # it took longer than the gateway waits: retrying is safe
        response = api.post("/v1/tickets", as_="alice", json=body, headers={"Idempotency-Key": key})
    assert response.status_code == 201, response.text + "\n" + stack.logs()

    retry = api.post("/v1/tickets", as_="alice", json=body, headers={"Idempotency-Key": key})
    assert retry.status_code == 201 and retry.json()["id"] == response.json()["id"]
    assert retry.headers["Idempotent-Replayed"] == "true"
    listed = api.get("/v1/tickets", as_="agent", params={"tag": tag}).json()["items"]
    assert [t["id"] for t in listed] == [response.json()["id"]]
    stack.wait_ready(15)
