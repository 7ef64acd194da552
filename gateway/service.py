"""The one HTTP API (/v1): authentication, validation, authorization context, problem errors.

Entrypoints stay thin: parse and check the request, call a service over RPC with the caller's
identity, shape the response. Object-level rules live in the service that owns the object.
"""
import functools
import json
import logging

import eventlet
from nameko.constants import NON_PERSISTENT
from nameko.exceptions import RemoteError, UnknownService
from nameko.extensions import DependencyProvider
from nameko.rpc import RpcProxy
from nameko.web.handlers import http
from werkzeug.exceptions import MethodNotAllowed, NotFound as RouteNotFound
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Response

from contracts.errors import HelpdeskError, ValidationError
from gateway import http as web
from gateway import schemas
from gateway.auth import AuthError, Authenticator, IdentityProviderUnavailable
from gateway.openapi import DOCS_HTML, build_openapi
from gateway.problems import ApiProblem, from_api_problem, from_domain_error, problem_response
from gateway.ratelimit import TokenBuckets
from gateway.settings import RPC_TIMEOUT_SECONDS, GatewaySettings
from servicekit.context import RequestContext
from servicekit.metrics import EntrypointMetrics, metrics_response

log = logging.getLogger(__name__)

# (verb, path) of every public route; also what decides 404 versus 405 for unknown requests
ROUTES = [
    ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
    ("GET", "/v1/openapi.json"), ("GET", "/v1/docs"),
    ("POST", "/v1/tickets"), ("GET", "/v1/tickets"),
    ("GET", "/v1/tickets/<ticket_id>"), ("PATCH", "/v1/tickets/<ticket_id>"),
    ("POST", "/v1/tickets/<ticket_id>/comments"), ("GET", "/v1/tickets/<ticket_id>/comments"),
    ("GET", "/v1/tickets/<ticket_id>/comments/<comment_id>"),
    ("GET", "/v1/tickets/<ticket_id>/history"),
    ("POST", "/v1/tickets/<ticket_id>/escalate"), ("GET", "/v1/tickets/<ticket_id>/routing"),
    ("GET", "/v1/agents"), ("POST", "/v1/agents"),
    ("GET", "/v1/agents/<agent_id>"), ("PATCH", "/v1/agents/<agent_id>"),
    ("PUT", "/v1/agents/<agent_id>/presence"),  # also /v1/agents/me/presence
    ("GET", "/v1/routing/skills"), ("POST", "/v1/routing/skills"),
    ("GET", "/v1/routing/rules"), ("POST", "/v1/routing/rules"),
    ("GET", "/v1/routing/rules/<rule_id>"), ("PUT", "/v1/routing/rules/<rule_id>"),
    ("DELETE", "/v1/routing/rules/<rule_id>"),
    ("GET", "/v1/routing/queues"),
]
_ROUTE_MAP = Map([Rule(path, methods=[verb]) for verb, path in ROUTES])


class GatewayTimeout(Exception):
    """The named service did not answer within the RPC timeout."""

    def __init__(self, service: str):
        super().__init__(service)
        self.service = service


class HttpRequestContext(RequestContext):
    """Takes the caller's X-Request-ID (if sane) or mints one, before the worker runs."""

    def incoming_request_id(self, worker_ctx):
        request = worker_ctx.args[0] if worker_ctx.args else None
        return request.headers.get("X-Request-ID") if request is not None else None


class GatewayState(DependencyProvider):
    """Process-wide gateway state: settings, authenticator, rate limiter, OpenAPI document."""

    def setup(self):
        self.settings = GatewaySettings.load()
        self.authenticator = Authenticator(self.settings.auth)
        self.rate_limiter = TokenBuckets(self.settings.rate_limit_per_second, self.settings.rate_limit_burst)
        self.openapi = json.dumps(build_openapi(self.settings.public_base_url))

    def get_dependency(self, worker_ctx):
        return self


def api(authenticated: bool = True):
    """Wrap a route: auth, rate limit, and every failure as application/problem+json."""

    def decorator(route):
        @functools.wraps(route)
        def wrapper(self, request, **path):
            request_id = self.request_id
            try:
                if authenticated:
                    identity = self._authenticate(request)
                    response = route(self, request, identity, **path)
                else:
                    response = route(self, request, **path)
            except ApiProblem as problem:
                response = from_api_problem(problem, request_id)
            except HelpdeskError as error:
                response = from_domain_error(error, request_id)
            except GatewayTimeout as timeout:
                response = problem_response(504, f"the {timeout.service} service did not answer in time",
                                            "upstream_timeout", request_id)
            except (UnknownService, ConnectionError, OSError) as exc:
                log.warning("upstream unavailable: %s", exc)
                response = problem_response(503, "a backing service is unavailable; retry shortly",
                                            "upstream_unavailable", request_id, headers={"Retry-After": "1"})
            except RemoteError as exc:
                # the service crashed on this request (an untyped error): a bug, not an outage
                log.error("upstream error %s: %s", exc.exc_type, exc.value)
                response = problem_response(500, "an unexpected error occurred; quote the request id",
                                            "internal_error", request_id)
            except Exception:
                log.exception("unhandled error in %s", route.__name__)
                response = problem_response(500, "an unexpected error occurred; quote the request id",
                                            "internal_error", request_id)
            response.headers["X-Request-ID"] = request_id
            return response

        return wrapper

    return decorator


class GatewayService:
    name = "gateway"

    metrics = EntrypointMetrics()
    request_id = HttpRequestContext()
    state = GatewayState()
    tickets = RpcProxy("tickets", expiration=RPC_TIMEOUT_SECONDS, delivery_mode=NON_PERSISTENT)
    routing = RpcProxy("routing", expiration=RPC_TIMEOUT_SECONDS, delivery_mode=NON_PERSISTENT)

    # --- plumbing ---------------------------------------------------------------------------

    def _authenticate(self, request):
        try:
            identity = self.state.authenticator.authenticate(request.headers.get("Authorization"))
        except AuthError as exc:
            raise ApiProblem(401, str(exc), code="unauthorized",
                             headers={"WWW-Authenticate": 'Bearer realm="helpdesk"'})
        except IdentityProviderUnavailable as exc:
            log.warning("%s", exc)
            raise ApiProblem(503, "tokens cannot be verified right now; retry shortly",
                             code="identity_provider_unavailable", headers={"Retry-After": "5"})
        decision = self.state.rate_limiter.take(identity.token_id)
        if not decision.allowed:
            raise ApiProblem(429, f"rate limit of {decision.limit} requests exceeded; retry in "
                                  f"{decision.retry_after_seconds}s", code="rate_limited",
                             headers={"Retry-After": str(decision.retry_after_seconds)})
        return identity

    def _call_service(self, service: str, method: str, *args, **kwargs):
        """``service.method(*args)`` over RPC, or GatewayTimeout (504 naming the service)."""
        proxy = {"tickets": self.tickets, "routing": self.routing}[service]
        with eventlet.Timeout(self.state.settings.rpc_timeout_seconds, GatewayTimeout(service)):
            return getattr(proxy, method)(*args, **kwargs)

    def _call(self, method: str, *args, **kwargs):
        return self._call_service("tickets", method, *args, **kwargs)

    @staticmethod
    def _refuse_read_only(identity) -> None:
        if identity.role == "viewer":
            raise ApiProblem(403, "viewers have read-only access", code="forbidden")

    def _write_body(self, request, identity, schema) -> dict:
        """The body of a write, read and validated; the order of refusals is the same everywhere.

        Read-only roles are refused before their body is looked at: a viewer's PATCH naming a
        staff-only field is 403 like any other viewer write, not 'unknown field' (which would
        suggest another body could work).
        """
        self._refuse_read_only(identity)
        body = web.read_json_body(request, self.state.settings.max_body_bytes)
        web.validate(schema, body)
        return body  # forwarded as sent: the service applies its own defaults

    @staticmethod
    def _versioned_response(document: dict, status: int = 200, extra: dict | None = None) -> Response:
        """A ticket, agent or rule, with its version as the ETag."""
        headers = {"ETag": web.etag_for(document["version"]), **(extra or {})}
        return web.json_response(document, status, headers)

    def _versioned_read(self, request, document: dict) -> Response:
        if web.not_modified(request, document["version"]):
            return Response(status=304, headers={"ETag": web.etag_for(document["version"])})
        return self._versioned_response(document)

    @staticmethod
    def _idempotency_key(request) -> str | None:
        key = request.headers.get("Idempotency-Key")
        if key is None:
            return None
        key = key.strip()
        if not 1 <= len(key) <= 200 or not key.isprintable():
            raise ApiProblem(400, "Idempotency-Key must be 1-200 printable characters",
                             errors={"idempotency-key": ["1-200 printable characters"]})
        return key

    # --- operations probes ------------------------------------------------------------------

    @http("GET", "/healthz")
    @api(authenticated=False)
    def healthz(self, request):
        return web.json_response({"status": "alive"})

    @http("GET", "/readyz")
    @api(authenticated=False)
    def readyz(self, request):
        """Ready when tickets answers: without it the gateway serves nothing useful. Routing is
        reported but does not decide: tickets are filed and read while it is down, and its
        events wait in its queues."""
        try:
            with eventlet.Timeout(2, GatewayTimeout("tickets")):
                self.tickets.health_ping()
        except (GatewayTimeout, UnknownService, RemoteError, OSError) as exc:
            return web.json_response({"status": "unavailable", "tickets": type(exc).__name__}, 503)
        try:
            with eventlet.Timeout(1, GatewayTimeout("routing")):
                self.routing.health_ping()
            routing = "ok"
        except (GatewayTimeout, UnknownService, RemoteError, OSError) as exc:
            routing = type(exc).__name__
        return web.json_response({"status": "ready", "tickets": "ok", "routing": routing})

    @http("GET", "/metrics")
    def metrics_endpoint(self, request):
        return metrics_response()

    @http("GET", "/v1/openapi.json")
    @api(authenticated=False)
    def openapi(self, request):
        return Response(self.state.openapi, content_type="application/json")

    @http("GET", "/v1/docs")
    @api(authenticated=False)
    def docs(self, request):
        return Response(DOCS_HTML, content_type="text/html; charset=utf-8")

    # --- tickets ----------------------------------------------------------------------------

    @http("POST", "/v1/tickets")
    @api()
    def create_ticket(self, request, identity):
        body = self._write_body(request, identity, schemas.create_ticket_body(identity.is_staff()))
        key = self._idempotency_key(request)
        result = self._call("create_ticket", identity.as_actor(), body, key)
        ticket = result["ticket"]
        extra = {"Location": f"/v1/tickets/{ticket['id']}"}
        if result["replayed"]:
            extra["Idempotent-Replayed"] = "true"
        return self._versioned_response(ticket, 201, extra)

    @http("GET", "/v1/tickets")
    @api()
    def list_tickets(self, request, identity):
        raw = {}
        for name in request.args:
            values = request.args.getlist(name)
            if name in schemas.LIST_FIELDS:
                raw[name] = [v.strip() for value in values for v in value.split(",") if v.strip()]
            elif len(values) > 1:
                raise ApiProblem(400, f"query parameter {name} given more than once",
                                 errors={name: ["give it once"]})
            else:
                raw[name] = values[0]
        loaded = web.validate(schemas.ListTicketsQuery(), raw, status=400)
        filters = {}
        for name, value in raw.items():
            name = schemas.QUERY_TO_FILTER.get(name, name)
            if name == "assignee_id" and value == "me":
                value = identity.sub
            elif name in ("unassigned", "limit"):
                value = loaded[name]  # parsed exactly as validated (e.g. unassigned=t is true)
            # dates travel as the ISO strings the caller sent: the RPC payload stays plain JSON
            filters[name] = value
        try:
            page = self._call("list_tickets", identity.as_actor(), filters)
        except ValidationError as error:
            # all list_tickets can refuse is the query string (a cursor it did not issue, or one
            # of another sort): a bad query is 400 here, like the checks above and the OpenAPI doc
            raise ApiProblem(400, error.detail or "bad query parameters", code=error.code,
                             errors=error.errors)
        return web.json_response(page)

    @http("GET", "/v1/tickets/<ticket_id>")
    @api()
    def get_ticket(self, request, identity, ticket_id):
        ticket = self._call("get_ticket", identity.as_actor(), ticket_id)
        return self._versioned_read(request, ticket)

    @http("PATCH", "/v1/tickets/<ticket_id>")
    @api()
    def update_ticket(self, request, identity, ticket_id):
        body = self._write_body(request, identity, schemas.update_ticket_body(identity.is_staff()))
        if not body:
            raise ApiProblem(422, "send at least one field to change", code="validation_error",
                             errors={"_schema": ["empty update"]})
        expected = web.expected_version(request)
        ticket = self._call("update_ticket", identity.as_actor(), ticket_id, body, expected)
        return self._versioned_response(ticket)

    @http("POST", "/v1/tickets/<ticket_id>/comments")
    @api()
    def add_comment(self, request, identity, ticket_id):
        body = self._write_body(request, identity, schemas.comment_body())
        key = self._idempotency_key(request)
        result = self._call("add_comment", identity.as_actor(), ticket_id, body, key)
        headers = {"Location": f"/v1/tickets/{ticket_id}/comments/{result['comment']['id']}"}
        if result["replayed"]:
            headers["Idempotent-Replayed"] = "true"
        return web.json_response(result["comment"], 201, headers)

    @http("GET", "/v1/tickets/<ticket_id>/comments")
    @api()
    def list_comments(self, request, identity, ticket_id):
        return web.json_response(self._call("list_comments", identity.as_actor(), ticket_id))

    @http("GET", "/v1/tickets/<ticket_id>/comments/<comment_id>")
    @api()
    def get_comment(self, request, identity, ticket_id, comment_id):
        return web.json_response(self._call("get_comment", identity.as_actor(), ticket_id, comment_id))

    @http("GET", "/v1/tickets/<ticket_id>/history")
    @api()
    def history(self, request, identity, ticket_id):
        return web.json_response(self._call("get_history", identity.as_actor(), ticket_id))

    # --- agents and routing (the routing service) --------------------------------------------
    # The routing service decides who may do what (supervisors manage agents, admins manage
    # rules, ...). The gateway refuses early only what no body or id could change: requesters
    # have nothing here, viewers write nothing.

    @staticmethod
    def _refuse_requesters(identity) -> None:
        if identity.role == "requester":
            raise ApiProblem(403, "agents, escalation and routing are for staff; requesters have no "
                                  "access", code="forbidden")

    def _routing(self, method: str, identity, *args):
        return self._call_service("routing", method, identity.as_actor(), *args)

    @staticmethod
    def _agent_id(identity, agent_id: str) -> str:
        return identity.sub if agent_id == "me" else agent_id

    @http("GET", "/v1/agents")
    @api()
    def list_agents(self, request, identity):
        self._refuse_requesters(identity)
        filters = {}
        for name in request.args:
            values = request.args.getlist(name)
            if len(values) > 1:
                raise ApiProblem(400, f"query parameter {name} given more than once",
                                 errors={name: ["give it once"]})
            filters[name] = values[0]
        web.validate(schemas.LIST_AGENTS_QUERY, filters, status=400)  # a bad query is 400, as for tickets
        return web.json_response(self._routing("list_agents", identity, filters))

    @http("POST", "/v1/agents")
    @api()
    def create_agent(self, request, identity):
        self._refuse_requesters(identity)
        body = self._write_body(request, identity, schemas.CREATE_AGENT_BODY)
        agent = self._routing("create_agent", identity, body)
        return self._versioned_response(agent, 201, {"Location": f"/v1/agents/{agent['id']}"})

    @http("GET", "/v1/agents/<agent_id>")
    @api()
    def get_agent(self, request, identity, agent_id):
        self._refuse_requesters(identity)
        agent = self._routing("get_agent", identity, self._agent_id(identity, agent_id))
        return self._versioned_read(request, agent)

    @http("PATCH", "/v1/agents/<agent_id>")
    @api()
    def update_agent(self, request, identity, agent_id):
        self._refuse_requesters(identity)
        body = self._write_body(request, identity, schemas.UPDATE_AGENT_BODY)
        if not body:
            raise ApiProblem(422, "send at least one field to change", code="validation_error",
                             errors={"_schema": ["empty update"]})
        expected = web.expected_version(request)
        agent = self._routing("update_agent", identity, self._agent_id(identity, agent_id), body, expected)
        return self._versioned_response(agent)

    @http("PUT", "/v1/agents/<agent_id>/presence")  # <agent_id> "me": /v1/agents/me/presence
    @api()
    def set_presence(self, request, identity, agent_id):
        self._refuse_requesters(identity)
        body = self._write_body(request, identity, schemas.PRESENCE_BODY)
        agent = self._routing("set_presence", identity, self._agent_id(identity, agent_id), body["presence"])
        return self._versioned_response(agent)

    @http("GET", "/v1/routing/skills")
    @api()
    def list_skills(self, request, identity):
        self._refuse_requesters(identity)
        return web.json_response(self._routing("list_skills", identity))

    @http("POST", "/v1/routing/skills")
    @api()
    def create_skill(self, request, identity):
        self._refuse_requesters(identity)
        body = self._write_body(request, identity, schemas.SKILL_BODY)
        return web.json_response(self._routing("create_skill", identity, body), 201)

    @http("GET", "/v1/routing/rules")
    @api()
    def list_rules(self, request, identity):
        self._refuse_requesters(identity)
        return web.json_response(self._routing("list_rules", identity))

    @http("POST", "/v1/routing/rules")
    @api()
    def create_rule(self, request, identity):
        self._refuse_requesters(identity)
        body = self._write_body(request, identity, schemas.RULE_BODY)
        rule = self._routing("create_rule", identity, body)
        return self._versioned_response(rule, 201, {"Location": f"/v1/routing/rules/{rule['id']}"})

    @http("GET", "/v1/routing/rules/<rule_id>")
    @api()
    def get_rule(self, request, identity, rule_id):
        self._refuse_requesters(identity)
        return self._versioned_read(request, self._routing("get_rule", identity, rule_id))

    @http("PUT", "/v1/routing/rules/<rule_id>")
    @api()
    def update_rule(self, request, identity, rule_id):
        self._refuse_requesters(identity)
        body = self._write_body(request, identity, schemas.RULE_BODY)
        expected = web.expected_version(request, required=False)
        rule = self._routing("update_rule", identity, rule_id, body, expected)
        return self._versioned_response(rule)

    @http("DELETE", "/v1/routing/rules/<rule_id>")
    @api()
    def delete_rule(self, request, identity, rule_id):
        self._refuse_requesters(identity)
        self._refuse_read_only(identity)
        expected = web.expected_version(request, required=False)
        self._routing("delete_rule", identity, rule_id, expected)
        return Response(status=204)

    @http("GET", "/v1/routing/queues")
    @api()
    def get_queues(self, request, identity):
        self._refuse_requesters(identity)
        return web.json_response(self._routing("get_queues", identity))

    @http("POST", "/v1/tickets/<ticket_id>/escalate")
    @api()
    def escalate_ticket(self, request, identity, ticket_id):
        self._refuse_requesters(identity)
        body = self._write_body(request, identity, schemas.ESCALATE_BODY)
        return web.json_response(self._routing("escalate_ticket", identity, ticket_id, body))

    @http("GET", "/v1/tickets/<ticket_id>/routing")
    @api()
    def ticket_routing(self, request, identity, ticket_id):
        self._refuse_requesters(identity)
        return web.json_response(self._routing("get_ticket_routing", identity, ticket_id))

    # --- everything else --------------------------------------------------------------------

    # "/<path:...>" needs at least one character: "/" itself gets its own rule, or werkzeug
    # answers it with an HTML 404
    @http("GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS", "/")
    @http("GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS", "/<path:unknown>")
    @api(authenticated=False)
    def unknown_route(self, request, unknown=""):
        try:
            _ROUTE_MAP.bind("localhost").match("/" + unknown, method=request.method)
        except MethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.valid_methods or []))
            raise ApiProblem(405, f"{request.method} is not allowed here; use {allowed}",
                             headers={"Allow": allowed})
        except RouteNotFound:
            pass
        raise ApiProblem(404, f"no such endpoint: {request.method} {request.path}")
