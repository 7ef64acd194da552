"""The gateway's agents, routing and escalation routes without a broker.

Requests go through the same werkzeug URL rules nameko's ``@http`` entrypoints register, into a
``worker_factory`` GatewayService whose ``routing`` and ``tickets`` proxies are mocks: each test
checks which RPC call a request becomes (method and arguments) and what HTTP answer a result or
a typed error becomes.
"""
import dataclasses
import functools
import json

import eventlet
import pytest
from nameko.exceptions import RemoteError, UnknownService
from nameko.testing.services import worker_factory
from nameko.web.handlers import HttpRequestHandler
from werkzeug.routing import Map, Rule
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from contracts.errors import (Conflict, Forbidden, InvalidTransition, NotFound, PreconditionFailed,
                              ValidationError)
from gateway.auth import Authenticator, mint_token
from gateway.openapi import build_openapi
from gateway.ratelimit import TokenBuckets
from gateway.service import ROUTES, GatewayService
from gateway.settings import GatewaySettings
from servicekit.context import accept_request_id

MAX_BODY = 4096
TICKET_ID = "6f0c2a9e-3b1d-4c55-9a61-0d6e1f2a3b4c"
RULE_ID = "1d7a4f8e-6c2b-4e9a-8f30-5b1c2d3e4f50"

AGENT_DOC = {"id": "agent-2", "display_name": "Bo", "tiers": ["L1"], "skills": [], "languages": [],
             "groups": [], "capacity": 3, "presence": "offline", "presence_changed_at": "2026-01-05T09:00:00Z",
             "active_tickets": 0, "last_assigned_at": None, "version": 4,
             "created_at": "2026-01-05T09:00:00Z", "updated_at": "2026-01-05T09:00:00Z"}
RULE_BODY = {"name": "VPN to L2", "conditions": [{"field": "subject", "operator": "contains_any",
                                                   "value": ["vpn"]}],
             "actions": {"set_tier": "L2", "require_skills": ["vpn"]}}
RULE_DOC = {"id": RULE_ID, "position": 10, "enabled": True, "match": "all", "stop": False, "version": 2,
            "created_at": "2026-01-05T09:00:00Z", "updated_at": "2026-01-05T09:00:00Z", **RULE_BODY}
SKILL_DOC = {"name": "vpn", "description": None, "created_at": "2026-01-05T09:00:00Z"}
QUEUES_DOC = {"as_of": "2026-01-05T09:00:00Z", "tiers": [
    {"tier": "L1", "depth": 2, "oldest_queued_at": "2026-01-05T08:50:00Z", "oldest_age_seconds": 600.0,
     "agents_online": 1, "active_tickets": 3, "capacity_online": 3}]}
DECISION_DOC = {"id": "d-1", "ticket_id": TICKET_ID, "decided_at": "2026-01-05T09:00:00Z", "trigger": "escalated",
                "tier": "L2", "outcome": "queued", "agent_id": None, "required_skills": [],
                "skills_relaxed": False, "detail": None, "candidates": []}
ROUTING_DOC = {"ticket_id": TICKET_ID, "tier": "L2", "state": "queued", "assignee_id": None,
               "required_skills": [], "queued_at": "2026-01-05T09:00:00Z", "decisions": [DECISION_DOC]}
ESCALATION_DOC = {"ticket_id": TICKET_ID, "from_tier": "L1", "to_tier": "L2", "reason": "needs network team",
                  "decision": DECISION_DOC}

USERS = {  # role -> token subject
    "requester": "alice", "agent": "agent-1", "supervisor": "sup-1", "admin": "admin-1", "viewer": "viewer-1",
}


def actor(role: str) -> dict:
    """The actor dict the ticket routes send too (Identity.as_actor of a staff token)."""
    return {"id": USERS[role], "role": role, "organization_id": None, "org_wide": False}


# --- an in-process gateway ----------------------------------------------------------------------

def _url_map() -> Map:
    """The rules nameko's web server builds from GatewayService's @http entrypoints."""
    rules = []
    for name in dir(GatewayService):
        for entrypoint in getattr(getattr(GatewayService, name), "nameko_entrypoints", ()):
            if isinstance(entrypoint, HttpRequestHandler):
                rules.append(Rule(entrypoint.url, methods=entrypoint.method.split(","), endpoint=name))
    return Map(rules)


URL_MAP = _url_map()


@functools.cache
def _shared() -> tuple:
    """Settings, the OpenAPI document and one token per role: built once, read-only."""
    settings = dataclasses.replace(GatewaySettings.load(), max_body_bytes=MAX_BODY, rpc_timeout_seconds=0.05)
    tokens = {role: mint_token(sub, role, "acme" if role == "requester" else None, settings=settings.auth,
                               ttl_seconds=3600)
              for role, sub in USERS.items()}
    return settings, json.dumps(build_openapi("http://localhost:8000")), tokens


class State:
    """GatewayState without reading files or the broker: real auth, a generous rate limit."""

    def __init__(self):
        self.settings, self.openapi, _ = _shared()
        self.authenticator = Authenticator(self.settings.auth)
        self.rate_limiter = TokenBuckets(10_000, 10_000)


class Gateway:
    def __init__(self):
        self.state = State()
        self.service = worker_factory(GatewayService, state=self.state)
        self.routing = self.service.routing  # MagicMock proxies
        self.tickets = self.service.tickets
        self.tokens = _shared()[2]

    def request(self, method, path, as_="agent", json_body=None, data=None, headers=None,
                content_type="application/json"):
        headers = dict(headers or {})
        if as_ is not None:
            headers["Authorization"] = f"Bearer {self.tokens[as_]}"
        if json_body is not None:
            data = json.dumps(json_body)
        builder = EnvironBuilder(path=path, method=method, headers=headers, data=data,
                                 content_type=content_type if data is not None else None)
        request = Request(builder.get_environ())
        # what HttpRequestContext injects: the caller's X-Request-ID if sane, else a fresh one
        self.service.request_id = accept_request_id(request.headers.get("X-Request-ID"))
        endpoint, path_values = URL_MAP.bind("localhost").match(request.path, method)
        return getattr(self.service, endpoint)(request, **path_values)

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path, body, **kwargs):
        return self.request("POST", path, json_body=body, **kwargs)

    def put(self, path, body, **kwargs):
        return self.request("PUT", path, json_body=body, **kwargs)

    def patch(self, path, body, **kwargs):
        return self.request("PATCH", path, json_body=body, **kwargs)

    def delete(self, path, **kwargs):
        return self.request("DELETE", path, **kwargs)


@pytest.fixture
def gw() -> Gateway:
    return Gateway()


def body_of(response) -> dict:
    return json.loads(response.get_data())


def assert_problem(response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, response.get_data()
    assert response.content_type == "application/problem+json"
    problem = body_of(response)
    assert problem["status"] == status and problem["type"].startswith("urn:helpdesk:problem:")
    assert problem["title"] and problem["detail"]
    assert problem["request_id"] == response.headers["X-Request-ID"]
    if field is not None:
        assert field in problem["errors"], problem
    return problem


def assert_no_rpc(gw: Gateway) -> None:
    assert gw.routing.method_calls == [] and gw.tickets.method_calls == []


# --- every route: (verb, path, body, headers) ----------------------------------------------------

READS = [
    ("GET", "/v1/agents", None, {}),
    ("GET", "/v1/agents/agent-2", None, {}),
    ("GET", "/v1/agents/me", None, {}),
    ("GET", "/v1/routing/skills", None, {}),
    ("GET", "/v1/routing/rules", None, {}),
    ("GET", f"/v1/routing/rules/{RULE_ID}", None, {}),
    ("GET", "/v1/routing/queues", None, {}),
    ("GET", f"/v1/tickets/{TICKET_ID}/routing", None, {}),
]
BODY_WRITES = [
    ("POST", "/v1/agents", {"id": "agent-2", "display_name": "Bo"}, {}),
    ("PATCH", "/v1/agents/agent-2", {"capacity": 5}, {"If-Match": '"4"'}),
    ("PATCH", "/v1/agents/me", {"capacity": 5}, {"If-Match": '"4"'}),
    ("PUT", "/v1/agents/me/presence", {"presence": "online"}, {}),
    ("PUT", "/v1/agents/agent-2/presence", {"presence": "away"}, {}),
    ("POST", "/v1/routing/skills", {"name": "vpn"}, {}),
    ("POST", "/v1/routing/rules", RULE_BODY, {}),
    ("PUT", f"/v1/routing/rules/{RULE_ID}", RULE_BODY, {}),
    ("POST", f"/v1/tickets/{TICKET_ID}/escalate", {"reason": "needs network team"}, {}),
]
WRITES = BODY_WRITES + [("DELETE", f"/v1/routing/rules/{RULE_ID}", None, {})]
ALL_ROUTES = READS + WRITES


def _ids(routes):
    return [f"{verb} {path}" for verb, path, _, _ in routes]


def send(gw, route, as_, body=..., data=None):
    verb, path, default_body, headers = route
    body = default_body if body is ... else body
    return gw.request(verb, path, as_=as_, json_body=body, data=data, headers=headers)


# --- happy paths: the RPC each route makes and the answer it gives ------------------------------

def test_list_agents_forwards_the_filters(gw):
    gw.routing.list_agents.return_value = {"items": [AGENT_DOC]}
    response = gw.get("/v1/agents?tier=L2&presence=online&skill=vpn", as_="viewer")
    assert response.status_code == 200 and body_of(response) == {"items": [AGENT_DOC]}
    gw.routing.list_agents.assert_called_once_with(actor("viewer"), {"tier": "L2", "presence": "online",
                                                                     "skill": "vpn"})


def test_list_agents_without_filters_sends_none(gw):
    gw.routing.list_agents.return_value = {"items": []}
    assert gw.get("/v1/agents").status_code == 200
    gw.routing.list_agents.assert_called_once_with(actor("agent"), {})


def test_create_agent_is_201_with_etag_and_location_and_the_body_as_sent(gw):
    gw.routing.create_agent.return_value = AGENT_DOC
    body = {"id": "agent-2", "display_name": "Bo", "tiers": ["L2", "L1"], "skills": [{"name": "vpn"}]}
    response = gw.post("/v1/agents", body, as_="supervisor")
    assert response.status_code == 201 and body_of(response) == AGENT_DOC
    assert response.headers["ETag"] == '"4"' and response.headers["Location"] == "/v1/agents/agent-2"
    gw.routing.create_agent.assert_called_once_with(actor("supervisor"), body)


def test_get_agent_returns_it_with_its_etag(gw):
    gw.routing.get_agent.return_value = AGENT_DOC
    response = gw.get("/v1/agents/agent-2", as_="viewer")
    assert response.status_code == 200 and body_of(response) == AGENT_DOC
    assert response.headers["ETag"] == '"4"'
    gw.routing.get_agent.assert_called_once_with(actor("viewer"), "agent-2")


def test_get_agent_answers_304_when_if_none_match_is_current(gw):
    gw.routing.get_agent.return_value = AGENT_DOC
    response = gw.get("/v1/agents/agent-2", headers={"If-None-Match": '"4"'})
    assert response.status_code == 304 and response.headers["ETag"] == '"4"'


def test_me_is_the_callers_token_subject(gw):
    gw.routing.get_agent.return_value = AGENT_DOC
    gw.get("/v1/agents/me", as_="agent")
    gw.routing.get_agent.assert_called_once_with(actor("agent"), "agent-1")


def test_update_agent_sends_changes_and_the_if_match_version(gw):
    gw.routing.update_agent.return_value = {**AGENT_DOC, "capacity": 5, "version": 5}
    response = gw.patch("/v1/agents/agent-2", {"capacity": 5}, as_="supervisor", headers={"If-Match": '"4"'})
    assert response.status_code == 200 and response.headers["ETag"] == '"5"'
    gw.routing.update_agent.assert_called_once_with(actor("supervisor"), "agent-2", {"capacity": 5}, 4)


def test_update_me_with_if_match_star_sends_no_version(gw):
    gw.routing.update_agent.return_value = AGENT_DOC
    gw.patch("/v1/agents/me", {"languages": ["en"]}, as_="supervisor", headers={"If-Match": "*"})
    gw.routing.update_agent.assert_called_once_with(actor("supervisor"), "sup-1", {"languages": ["en"]}, None)


def test_set_my_presence(gw):
    gw.routing.set_presence.return_value = {**AGENT_DOC, "presence": "online"}
    response = gw.put("/v1/agents/me/presence", {"presence": "online"}, as_="agent")
    assert response.status_code == 200 and response.headers["ETag"] == '"4"'
    assert body_of(response)["presence"] == "online"
    gw.routing.set_presence.assert_called_once_with(actor("agent"), "agent-1", "online")


def test_set_another_agents_presence(gw):
    gw.routing.set_presence.return_value = AGENT_DOC
    gw.put("/v1/agents/agent-2/presence", {"presence": "offline"}, as_="supervisor")
    gw.routing.set_presence.assert_called_once_with(actor("supervisor"), "agent-2", "offline")


def test_list_skills(gw):
    gw.routing.list_skills.return_value = {"items": [SKILL_DOC]}
    response = gw.get("/v1/routing/skills")
    assert response.status_code == 200 and body_of(response) == {"items": [SKILL_DOC]}
    gw.routing.list_skills.assert_called_once_with(actor("agent"))


def test_create_skill_is_201(gw):
    gw.routing.create_skill.return_value = SKILL_DOC
    response = gw.post("/v1/routing/skills", {"name": "vpn"}, as_="admin")
    assert response.status_code == 201 and body_of(response) == SKILL_DOC
    gw.routing.create_skill.assert_called_once_with(actor("admin"), {"name": "vpn"})


def test_list_rules(gw):
    gw.routing.list_rules.return_value = {"items": [RULE_DOC]}
    assert body_of(gw.get("/v1/routing/rules", as_="supervisor")) == {"items": [RULE_DOC]}
    gw.routing.list_rules.assert_called_once_with(actor("supervisor"))


def test_create_rule_is_201_with_etag_and_location(gw):
    gw.routing.create_rule.return_value = RULE_DOC
    response = gw.post("/v1/routing/rules", RULE_BODY, as_="admin")
    assert response.status_code == 201 and body_of(response) == RULE_DOC
    assert response.headers["ETag"] == '"2"' and response.headers["Location"] == f"/v1/routing/rules/{RULE_ID}"
    gw.routing.create_rule.assert_called_once_with(actor("admin"), RULE_BODY)


def test_get_rule(gw):
    gw.routing.get_rule.return_value = RULE_DOC
    response = gw.get(f"/v1/routing/rules/{RULE_ID}")
    assert response.status_code == 200 and response.headers["ETag"] == '"2"'
    gw.routing.get_rule.assert_called_once_with(actor("agent"), RULE_ID)


@pytest.mark.parametrize("headers, expected", [({}, None), ({"If-Match": '"2"'}, 2), ({"If-Match": "*"}, None)])
def test_replace_rule_with_optional_if_match(gw, headers, expected):
    gw.routing.update_rule.return_value = {**RULE_DOC, "version": 3}
    response = gw.put(f"/v1/routing/rules/{RULE_ID}", RULE_BODY, as_="admin", headers=headers)
    assert response.status_code == 200 and response.headers["ETag"] == '"3"'
    gw.routing.update_rule.assert_called_once_with(actor("admin"), RULE_ID, RULE_BODY, expected)


@pytest.mark.parametrize("headers, expected", [({}, None), ({"If-Match": '"2"'}, 2)])
def test_delete_rule_is_204_without_a_body(gw, headers, expected):
    gw.routing.delete_rule.return_value = None
    response = gw.delete(f"/v1/routing/rules/{RULE_ID}", as_="admin", headers=headers)
    assert response.status_code == 204 and response.get_data() == b""
    gw.routing.delete_rule.assert_called_once_with(actor("admin"), RULE_ID, expected)


def test_queues(gw):
    gw.routing.get_queues.return_value = QUEUES_DOC
    response = gw.get("/v1/routing/queues", as_="viewer")
    assert response.status_code == 200 and body_of(response) == QUEUES_DOC
    gw.routing.get_queues.assert_called_once_with(actor("viewer"))


def test_escalate_forwards_the_body_as_sent(gw):
    gw.routing.escalate_ticket.return_value = ESCALATION_DOC
    response = gw.post(f"/v1/tickets/{TICKET_ID}/escalate", {"reason": "needs network team"})
    assert response.status_code == 200 and body_of(response) == ESCALATION_DOC
    gw.routing.escalate_ticket.assert_called_once_with(actor("agent"), TICKET_ID, {"reason": "needs network team"})
    assert gw.tickets.method_calls == []


def test_escalate_to_a_named_tier(gw):
    gw.routing.escalate_ticket.return_value = ESCALATION_DOC
    gw.post(f"/v1/tickets/{TICKET_ID}/escalate", {"reason": "x", "to_tier": "L3"}, as_="supervisor")
    gw.routing.escalate_ticket.assert_called_once_with(actor("supervisor"), TICKET_ID,
                                                       {"reason": "x", "to_tier": "L3"})


def test_ticket_routing(gw):
    gw.routing.get_ticket_routing.return_value = ROUTING_DOC
    response = gw.get(f"/v1/tickets/{TICKET_ID}/routing", as_="viewer")
    assert response.status_code == 200 and body_of(response) == ROUTING_DOC
    gw.routing.get_ticket_routing.assert_called_once_with(actor("viewer"), TICKET_ID)


def test_request_id_is_echoed_on_success_and_on_errors(gw):
    gw.routing.list_skills.return_value = {"items": []}
    ok = gw.get("/v1/routing/skills", headers={"X-Request-ID": "trace-123"})
    assert ok.headers["X-Request-ID"] == "trace-123"
    refused = gw.get("/v1/routing/skills", as_="requester", headers={"X-Request-ID": "trace-456"})
    assert assert_problem(refused, 403)["request_id"] == "trace-456"


def test_ticket_routes_still_call_the_tickets_service(gw):
    gw.tickets.get_ticket.return_value = {"id": TICKET_ID, "version": 7}
    response = gw.get(f"/v1/tickets/{TICKET_ID}")
    assert response.status_code == 200 and response.headers["ETag"] == '"7"'
    gw.tickets.get_ticket.assert_called_once_with(actor("agent"), TICKET_ID)
    assert gw.routing.method_calls == []


# --- who may call ---------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ALL_ROUTES, ids=_ids(ALL_ROUTES))
def test_requesters_are_refused_every_agent_and_routing_route(gw, route):
    problem = assert_problem(send(gw, route, "requester"), 403)
    assert "requesters" in problem["detail"]
    assert_no_rpc(gw)


@pytest.mark.parametrize("route", BODY_WRITES, ids=_ids(BODY_WRITES))
def test_requesters_are_refused_before_the_body_is_read(gw, route):
    assert_problem(send(gw, route, "requester", body=None, data="{not json"), 403)


@pytest.mark.parametrize("route", WRITES, ids=_ids(WRITES))
def test_viewers_may_not_write(gw, route):
    problem = assert_problem(send(gw, route, "viewer"), 403)
    assert "read-only" in problem["detail"]
    assert_no_rpc(gw)


@pytest.mark.parametrize("route", BODY_WRITES, ids=_ids(BODY_WRITES))
def test_viewer_writes_are_refused_before_the_body_is_read(gw, route):
    assert_problem(send(gw, route, "viewer", body={"colour": "red"}), 403)
    assert_no_rpc(gw)


@pytest.mark.parametrize("route", ALL_ROUTES, ids=_ids(ALL_ROUTES))
def test_every_route_needs_a_token(gw, route):
    response = send(gw, route, None)
    assert_problem(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert_no_rpc(gw)


def test_forbidden_from_the_routing_service_is_403(gw):
    gw.routing.create_rule.side_effect = Forbidden("only admins manage routing rules")
    problem = assert_problem(gw.post("/v1/routing/rules", RULE_BODY, as_="agent"), 403)
    assert problem["detail"] == "only admins manage routing rules"


# --- bodies and queries -----------------------------------------------------------------------

@pytest.mark.parametrize("route", BODY_WRITES, ids=_ids(BODY_WRITES))
def test_malformed_json_is_400(gw, route):
    assert_problem(send(gw, route, "admin", body=None, data='{"name": '), 400)
    assert_no_rpc(gw)


@pytest.mark.parametrize("route", BODY_WRITES, ids=_ids(BODY_WRITES))
def test_unknown_fields_are_422_naming_them(gw, route):
    assert_problem(send(gw, route, "admin", body={**route[2], "colour": "red"}), 422, "colour")
    assert_no_rpc(gw)


@pytest.mark.parametrize("route", BODY_WRITES, ids=_ids(BODY_WRITES))
def test_body_over_the_limit_is_413(gw, route):
    assert_problem(send(gw, route, "admin", body={"padding": "x" * MAX_BODY}), 413)
    assert_no_rpc(gw)


@pytest.mark.parametrize("route", BODY_WRITES, ids=_ids(BODY_WRITES))
def test_body_that_is_not_json_is_415(gw, route):
    verb, path, body, headers = route
    response = gw.request(verb, path, as_="admin", data=json.dumps(body), headers=headers, content_type="text/plain")
    assert_problem(response, 415, "content-type")


@pytest.mark.parametrize("verb, path, body, field", [
    ("POST", "/v1/agents", {"display_name": "Bo"}, "id"),
    ("POST", "/v1/agents", {"id": "a", "display_name": "Bo", "capacity": "3"}, "capacity"),
    ("POST", "/v1/agents", {"id": "a", "display_name": "Bo", "tiers": ["L9"]}, "tiers"),
    ("POST", "/v1/agents", {"id": "a", "display_name": "   "}, "display_name"),
    ("POST", "/v1/agents", {"id": "a", "display_name": "Bo", "skills": [{"name": "vpn"}, {"name": "vpn"}]},
     "skills"),
    ("PATCH", "/v1/agents/agent-2", {"capacity": 51}, "capacity"),
    ("PATCH", "/v1/agents/agent-2", {"languages": ["English"]}, "languages"),
    ("PATCH", "/v1/agents/agent-2", {"presence": "online"}, "presence"),
    ("PUT", "/v1/agents/me/presence", {"presence": "busy"}, "presence"),
    ("PUT", "/v1/agents/me/presence", {}, "presence"),
    ("POST", "/v1/routing/skills", {"name": "Not A Skill"}, "name"),
    ("POST", "/v1/routing/rules", {**RULE_BODY, "actions": {}}, "actions"),
    ("POST", "/v1/routing/rules", {**RULE_BODY, "conditions": [{"field": "subject", "operator": "matches",
                                                                 "value": "("}]}, "conditions"),
    ("PUT", f"/v1/routing/rules/{RULE_ID}", {"name": "only a name"}, "conditions"),
    ("POST", f"/v1/tickets/{TICKET_ID}/escalate", {"reason": "  "}, "reason"),
    ("POST", f"/v1/tickets/{TICKET_ID}/escalate", {"reason": "x", "to_tier": "L4"}, "to_tier"),
])
def test_bad_values_are_422_naming_the_field(gw, verb, path, body, field):
    response = gw.request(verb, path, as_="admin", json_body=body, headers={"If-Match": "*"})
    assert_problem(response, 422, field)
    assert_no_rpc(gw)


def test_empty_agent_update_is_422(gw):
    assert_problem(gw.patch("/v1/agents/agent-2", {}, as_="admin", headers={"If-Match": "*"}), 422)
    assert_no_rpc(gw)


@pytest.mark.parametrize("path", ["/v1/agents/agent-2", "/v1/agents/me"])
def test_agent_update_without_if_match_is_428(gw, path):
    response = gw.patch(path, {"capacity": 5}, as_="supervisor")
    assert assert_problem(response, 428)["type"].endswith("precondition_required")
    assert_no_rpc(gw)


@pytest.mark.parametrize("verb, path, body", [
    ("PATCH", "/v1/agents/agent-2", {"capacity": 5}),
    ("PUT", f"/v1/routing/rules/{RULE_ID}", RULE_BODY),
    ("DELETE", f"/v1/routing/rules/{RULE_ID}", None),
])
def test_an_if_match_this_api_did_not_issue_is_412(gw, verb, path, body):
    response = gw.request(verb, path, as_="admin", json_body=body, headers={"If-Match": '"abc"'})
    assert_problem(response, 412, "if-match")
    assert_no_rpc(gw)


@pytest.mark.parametrize("query, field", [
    ("tier=L9", "tier"), ("presence=busy", "presence"), ("skill=Not%20A%20Skill", "skill"),
    ("tier=", "tier"), ("colour=red", "colour"), ("tier=L1&tier=L2", "tier"),
])
def test_bad_agent_filters_are_400_like_ticket_filters(gw, query, field):
    assert_problem(gw.get(f"/v1/agents?{query}"), 400, field)
    assert_no_rpc(gw)


# --- errors from the routing service --------------------------------------------------------------

@pytest.mark.parametrize("error, status, code", [
    (NotFound("no agent agent-9"), 404, "not_found"),
    (Conflict("agent agent-2 is already registered"), 409, "conflict"),
    (InvalidTransition("ticket is closed"), 409, "invalid_transition"),
    (PreconditionFailed("the agent changed since version 4"), 412, "precondition_failed"),
    (ValidationError("unknown skill", {"skills": ["not in the catalogue: gpu"]}), 422, "validation_error"),
    (Forbidden("supervisors and admins only"), 403, "forbidden"),
])
@pytest.mark.parametrize("route", [
    ("GET", "/v1/agents/agent-9", None, {}, "get_agent"),
    ("PATCH", "/v1/agents/agent-2", {"skills": [{"name": "gpu"}]}, {"If-Match": '"4"'}, "update_agent"),
    ("PUT", "/v1/agents/me/presence", {"presence": "online"}, {}, "set_presence"),
    ("PUT", f"/v1/routing/rules/{RULE_ID}", RULE_BODY, {"If-Match": '"1"'}, "update_rule"),
    ("DELETE", f"/v1/routing/rules/{RULE_ID}", None, {"If-Match": '"1"'}, "delete_rule"),
    ("POST", f"/v1/tickets/{TICKET_ID}/escalate", {"reason": "r"}, {}, "escalate_ticket"),
    ("GET", f"/v1/tickets/{TICKET_ID}/routing", None, {}, "get_ticket_routing"),
], ids=lambda r: f"{r[0]} {r[1]}" if isinstance(r, tuple) else None)
def test_typed_service_errors_become_problems(gw, error, status, code, route):
    verb, path, body, headers, method = route
    getattr(gw.routing, method).side_effect = error
    response = gw.request(verb, path, as_="admin", json_body=body, headers=headers)
    problem = assert_problem(response, status)
    assert problem["type"] == f"urn:helpdesk:problem:{code}" and problem["detail"] == error.detail
    assert problem.get("errors", {}) == error.errors


def test_a_slow_routing_service_is_504_naming_it(gw):
    gw.routing.get_queues.side_effect = lambda *args: eventlet.sleep(5)
    problem = assert_problem(gw.get("/v1/routing/queues"), 504)
    assert "routing service" in problem["detail"]


def test_a_slow_tickets_service_is_still_504_naming_tickets(gw):
    gw.tickets.get_ticket.side_effect = lambda *args: eventlet.sleep(5)
    problem = assert_problem(gw.get(f"/v1/tickets/{TICKET_ID}"), 504)
    assert "tickets service" in problem["detail"]


def test_routing_not_running_is_503_with_retry_after(gw):
    gw.routing.list_agents.side_effect = UnknownService("routing")
    response = gw.get("/v1/agents")
    assert_problem(response, 503)
    assert response.headers["Retry-After"] == "1"


def test_an_untyped_routing_error_is_500(gw):
    gw.routing.get_rule.side_effect = RemoteError("KeyError", "'position'")
    assert assert_problem(gw.get(f"/v1/routing/rules/{RULE_ID}"), 500)["type"].endswith("internal_error")


# --- unknown routes and the OpenAPI document ------------------------------------------------------

def test_routes_table_knows_every_new_route(gw):
    for verb, path, _, _ in ALL_ROUTES:
        pattern = path.replace(TICKET_ID, "<ticket_id>").replace(RULE_ID, "<rule_id>")
        pattern = pattern.replace("/agents/agent-2", "/agents/<agent_id>").replace("/agents/me", "/agents/<agent_id>")
        assert (verb, pattern) in ROUTES


@pytest.mark.parametrize("verb, path, allowed", [
    ("DELETE", "/v1/agents", "GET, HEAD, POST"),  # werkzeug answers HEAD wherever GET is served
    ("DELETE", "/v1/agents/agent-2", "GET, HEAD, PATCH"),
    ("GET", "/v1/agents/me/presence", "PUT"),
    ("PATCH", f"/v1/routing/rules/{RULE_ID}", "DELETE, GET, HEAD, PUT"),
    ("POST", "/v1/routing/queues", "GET, HEAD"),
    ("GET", f"/v1/tickets/{TICKET_ID}/escalate", "POST"),
])
def test_wrong_verb_on_a_routing_path_is_405_with_allow(gw, verb, path, allowed):
    response = gw.request(verb, path)
    assert_problem(response, 405)
    assert response.headers["Allow"] == allowed


def test_unknown_routing_path_is_404(gw):
    assert_problem(gw.get("/v1/routing/nothing-here"), 404)


ROUTING_PATHS = {
    "/v1/agents": {"get", "post"},
    "/v1/agents/{agent_id}": {"get", "patch"},
    "/v1/agents/{agent_id}/presence": {"put"},
    "/v1/agents/me/presence": {"put"},
    "/v1/routing/skills": {"get", "post"},
    "/v1/routing/rules": {"get", "post"},
    "/v1/routing/rules/{rule_id}": {"get", "put", "delete"},
    "/v1/routing/queues": {"get"},
    "/v1/tickets/{ticket_id}/escalate": {"post"},
    "/v1/tickets/{ticket_id}/routing": {"get"},
}


def test_openapi_documents_every_routing_route_with_its_errors(gw):
    response = gw.request("GET", "/v1/openapi.json", as_=None)
    doc = body_of(response)
    for path, verbs in ROUTING_PATHS.items():
        assert set(doc["paths"][path]) == verbs, path
        for verb in verbs:
            operation = doc["paths"][path][verb]
            assert operation["security"] == [{"bearer": []}]
            assert {"401", "403", "503", "504"} <= set(operation["responses"]), (verb, path)
            for status, answer in operation["responses"].items():
                if status[0] in "45":
                    assert "application/problem+json" in answer["content"], (verb, path, status)
            if "requestBody" in operation:
                assert {"400", "413", "422"} <= set(operation["responses"]), (verb, path)
    patch = doc["paths"]["/v1/agents/{agent_id}"]["patch"]
    assert "428" in patch["responses"] and "412" in patch["responses"]
    if_match = [p for p in patch["parameters"] if p["name"] == "If-Match"]
    assert if_match and if_match[0]["required"] is True
    put_rule = doc["paths"]["/v1/routing/rules/{rule_id}"]["put"]
    assert [p["required"] for p in put_rule["parameters"] if p["name"] == "If-Match"] == [False]
    list_params = {p["name"] for p in doc["paths"]["/v1/agents"]["get"]["parameters"]}
    assert {"tier", "presence", "skill"} <= list_params
    assert {"Agent", "AgentList", "Skill", "SkillList", "Rule", "RuleList", "Queues", "RoutingDecision",
            "TicketRouting", "Escalation", "NewAgent", "UpdateAgent", "SetPresence", "NewSkill", "RuleBody",
            "Escalate"} <= set(doc["components"]["schemas"])


def test_openapi_document_is_valid_openapi_3():
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(build_openapi("http://localhost:8000"))


def test_every_routing_route_in_the_routes_table_is_documented():
    doc = build_openapi("http://localhost:8000")
    for verb, path in ROUTES:
        if path.startswith(("/v1/agents", "/v1/routing")) or path.endswith(("/escalate", "/routing")):
            documented = path.replace("<", "{").replace(">", "}")
            assert verb.lower() in doc["paths"][documented], (verb, path)
