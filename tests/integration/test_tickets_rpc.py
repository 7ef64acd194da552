"""The tickets service over real RPC: events through the outbox, typed errors, metrics, probes."""
import uuid

import pytest

from contracts.errors import InvalidTransition, NotFound, PreconditionFailed, ValidationError
from contracts.events import EventEnvelopeSchema
from contracts.tickets import PAYLOAD_SCHEMAS, TICKET_CREATED
from tests.integration.conftest import STAFF

pytestmark = pytest.mark.integration


def new_ticket(cluster, subject="Printer on fire", **extra):
    data = {"subject": subject, "description": "It is really on fire", **extra}
    return cluster.tickets.create_ticket(STAFF, data)["ticket"]


def test_creating_a_ticket_publishes_ticket_created_through_the_outbox(tickets, amqp, rpc_factory):
    observer = amqp.bind("tickets", TICKET_CREATED)
    request_id = f"req-{uuid.uuid4().hex[:12]}"

    with rpc_factory(request_id=request_id) as cluster:
        ticket = new_ticket(cluster)

    message = amqp.wait_message(observer, timeout=5)
    envelope = EventEnvelopeSchema().load(message.payload)
    payload = PAYLOAD_SCHEMAS[TICKET_CREATED]().load(envelope["payload"])
    assert envelope["event_type"] == TICKET_CREATED
    assert envelope["source"] == "tickets"
    assert envelope["subject_ids"] == {"ticket_id": ticket["id"]}
    assert payload["ticket"]["id"] == ticket["id"]
    assert payload["actor_id"] == STAFF["id"]
    assert message.headers["nameko.request_id"] == request_id
    assert message.properties.get("message_id") == str(envelope["event_id"])


def test_typed_errors_cross_rpc_as_the_same_class(tickets, rpc):
    with pytest.raises(NotFound):
        rpc.tickets.get_ticket(STAFF, str(uuid.uuid4()))

    with pytest.raises(ValidationError) as invalid:
        rpc.tickets.create_ticket(STAFF, {"description": "no subject", "priority": "urgent-ish"})
    assert set(invalid.value.errors) == {"subject", "priority"}

    ticket = new_ticket(rpc)
    with pytest.raises(InvalidTransition) as transition:
        rpc.tickets.update_ticket(STAFF, ticket["id"], {"status": "closed"})
    assert transition.value.errors == {"status": ["new -> closed is not allowed"]}

    rpc.tickets.update_ticket(STAFF, ticket["id"], {"priority": "high"}, expected_version=1)
    with pytest.raises(PreconditionFailed) as stale:
        rpc.tickets.update_ticket(STAFF, ticket["id"], {"priority": "low"}, expected_version=1)
    assert "version" in stale.value.errors
    assert rpc.tickets.get_ticket(STAFF, ticket["id"])["priority"] == "high"


def test_metrics_count_rpc_outcomes_and_readyz_answers(tickets, rpc):
    def rpc_count(method, outcome):
        return tickets.metric("helpdesk_rpc_requests_total", service="tickets", method=method,
                              outcome=outcome)

    created_before = rpc_count("create_ticket", "success")
    not_found_before = rpc_count("get_ticket", "not_found")

    new_ticket(rpc)
    new_ticket(rpc)
    with pytest.raises(NotFound):
        rpc.tickets.get_ticket(STAFF, str(uuid.uuid4()))

    response = tickets.get("/metrics")
    assert response.status_code == 200
    assert 'helpdesk_rpc_requests_total{method="create_ticket",outcome="success",service="tickets"}' \
        in response.text
    assert rpc_count("create_ticket", "success") == created_before + 2
    assert rpc_count("get_ticket", "not_found") == not_found_before + 1

    ready = tickets.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}
    assert tickets.get("/livez").status_code == 200
