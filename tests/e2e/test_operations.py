"""What operators and integrators rely on: probes, the OpenAPI document, docs, metrics."""
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import wait_until

pytestmark = pytest.mark.e2e

TICKET_PATHS = {"/v1/tickets", "/v1/tickets/{ticket_id}", "/v1/tickets/{ticket_id}/comments",
                "/v1/tickets/{ticket_id}/history"}


def _samples(text: str, name: str) -> list:
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == name]


def test_liveness_and_readiness_answer_without_a_token(api):
    alive = api.get("/healthz")
    assert alive.status_code == 200 and alive.json()["status"] == "alive"
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.headers["Content-Type"].startswith("application/json")


def test_readiness_reports_routing_without_depending_on_it(stack, api):
    assert api.get("/readyz").json()["routing"] == "ok"
    stack.routing.stop()
    try:
        ready = api.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["tickets"] == "ok" and ready.json()["routing"] != "ok"
        api.create_ticket("alice")  # filing and reading tickets go on while routing is down
    finally:
        stack.routing.start()
        stack.wait_routing_ready(45)
    wait_until(lambda: api.get("/readyz").json()["routing"] == "ok", timeout=15, message="routing back")


def test_tickets_process_has_its_own_probes_and_metrics(stack):
    assert requests.get(stack.tickets_url + "/livez", timeout=5).status_code == 200
    assert requests.get(stack.tickets_url + "/readyz", timeout=5).status_code == 200
    metrics = requests.get(stack.tickets_url + "/metrics", timeout=5).text
    methods = {s.labels["method"] for s in _samples(metrics, "helpdesk_rpc_requests_total")}
    assert "health_ping" in methods


def test_openapi_document_is_valid_openapi_3_listing_the_ticket_api(api):
    response = api.get("/v1/openapi.json")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    doc = response.json()
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"] and doc["info"]["version"]
    assert TICKET_PATHS <= set(doc["paths"])
    assert set(doc["paths"]["/v1/tickets"]) >= {"get", "post"}
    assert set(doc["paths"]["/v1/tickets/{ticket_id}"]) >= {"get", "patch"}
    assert set(doc["paths"]["/v1/tickets/{ticket_id}/comments"]) >= {"get", "post"}
    assert {"Ticket", "Problem", "CreateTicket", "UpdateTicket"} <= set(doc["components"]["schemas"])
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    create = doc["paths"]["/v1/tickets"]["post"]
    assert "application/problem+json" in create["responses"]["422"]["content"]
    list_params = {p["name"] for p in doc["paths"]["/v1/tickets"]["get"]["parameters"]}
    assert {"status", "assignee", "unassigned", "cursor", "sort", "limit"} <= list_params
    try:
        from openapi_spec_validator import validate
    except ImportError:  # optional: not pinned in the test extra
        return
    validate(doc)


def test_docs_page_is_html_built_from_the_document(api):
    response = api.get("/v1/docs")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert "<html" in response.text.lower() and "/v1/openapi.json" in response.text


def test_gateway_metrics_count_requests_per_route(api):
    ticket = api.create_ticket("alice")
    api.get(f"/v1/tickets/{ticket['id']}", as_="alice")
    api.get("/v1/tickets/00000000-0000-4000-8000-000000000000", as_="alice")
    response = api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = _samples(response.text, "helpdesk_http_requests_total")
    by_route = {}
    for sample in samples:
        assert sample.labels["service"] == "gateway"
        key = (sample.labels["route"], sample.labels["verb"], sample.labels["status_class"])
        by_route[key] = sample.value
    assert by_route[("/v1/tickets", "POST", "2xx")] >= 1
    assert by_route[("/v1/tickets/<ticket_id>", "GET", "2xx")] >= 1
    assert by_route[("/v1/tickets/<ticket_id>", "GET", "4xx")] >= 1
    # route labels are templates, never ids
    assert not any(ticket["id"] in route for route, _, _ in by_route)
    before = by_route[("/v1/tickets", "POST", "2xx")]
    api.create_ticket("alice")
    after = [s.value for s in _samples(api.get("/metrics").text, "helpdesk_http_requests_total")
             if (s.labels["route"], s.labels["verb"], s.labels["status_class"]) == ("/v1/tickets", "POST", "2xx")]
    assert after == [before + 1]
