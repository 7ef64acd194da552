"""The OpenAPI 3 document, generated from the marshmallow schemas the API validates with."""
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from contracts import routing
from gateway import schemas

PROBLEM = {"application/problem+json": {"schema": "Problem"}}


def _problem(description):
    return {"description": description, "content": PROBLEM}


COMMON_ERRORS = {
    "401": _problem("missing, invalid or expired bearer token"),
    "429": _problem("rate limit exceeded; see Retry-After"),
    "503": _problem("a backing service is unavailable"),
    "504": _problem("a backing service did not answer in time"),
}
TICKET_ID = {"name": "ticket_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
REQUEST_ID = {"name": "X-Request-ID", "in": "header", "required": False,
              "schema": {"type": "string", "maxLength": 128},
              "description": "your correlation id; echoed back and carried through every service"}
IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "required": False,
                   "schema": {"type": "string", "maxLength": 200},
                   "description": "same key and body: the first response again; same key, other body: 422"}
ETAG_HEADER = {"ETag": {"schema": {"type": "string"}, "description": "the ticket version; send it in If-Match"}}
AGENT_ID = {"name": "agent_id", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "an agent's id (their token subject), or `me` for yourself"}
RULE_ID = {"name": "rule_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
AGENT_ETAG = {"ETag": {"schema": {"type": "string"}, "description": "the agent's version; send it in If-Match"}}
RULE_ETAG = {"ETag": {"schema": {"type": "string"}, "description": "the rule's version; send it in If-Match"}}
IF_MATCH_REQUIRED = {"name": "If-Match", "in": "header", "required": True, "schema": {"type": "string"},
                     "description": "the ETag you last read (`*`: any version)"}
IF_MATCH_OPTIONAL = {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"},
                     "description": "the ETag you last read; without it the change applies to any version"}
STAFF_ONLY = _problem("requesters have no access here; viewers cannot write; or your role may not do this")
STAFF_READ = _problem("requesters have no access here")
BODY_ERRORS = {
    "400": _problem("malformed JSON"), "413": _problem("body too large"), "415": _problem("not JSON"),
    "422": _problem("invalid or unknown fields"),
}


def _roles(roles) -> str:
    return "Roles: " + ", ".join(roles) + "."


def _json(schema_name):
    return {"application/json": {"schema": schema_name}}


def build_openapi(server_url: str) -> dict:
    spec = APISpec(
        title="Helpdesk API",
        version="1.0.0",
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": "Tickets, comments, history, agents and routing behind one gateway. Errors are "
                             "application/problem+json (RFC 9457)."},
        servers=[{"url": server_url}],
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"})
    spec.components.schema("Problem", schema=schemas.Problem)
    spec.components.schema("Ticket", schema=schemas.TicketDocument)
    spec.components.schema("TicketPage", schema=schemas.TicketPage)
    spec.components.schema("Comment", schema=schemas.CommentDocument)
    spec.components.schema("CommentList", schema=schemas.CommentList)
    spec.components.schema("History", schema=schemas.HistoryDocument)
    spec.components.schema("CreateTicket", schema=schemas.create_ticket_body(is_staff=True).__class__)
    spec.components.schema("UpdateTicket", schema=schemas.update_ticket_body(is_staff=True).__class__)
    spec.components.schema("NewComment", schema=schemas.comment_body().__class__)
    spec.components.schema("AgentSkill", schema=schemas.AgentSkillDocument)
    spec.components.schema("Agent", schema=schemas.AgentDocument)
    spec.components.schema("AgentList", schema=schemas.AgentList)
    spec.components.schema("Skill", schema=schemas.SkillDocument)
    spec.components.schema("SkillList", schema=schemas.SkillList)
    spec.components.schema("RuleCondition", schema=schemas.RuleConditionDocument)
    spec.components.schema("RuleActions", schema=schemas.RuleActionsDocument)
    spec.components.schema("Rule", schema=schemas.RuleDocument)
    spec.components.schema("RuleList", schema=schemas.RuleList)
    spec.components.schema("TierQueue", schema=schemas.TierQueueDocument)
    spec.components.schema("Queues", schema=schemas.QueuesDocument)
    spec.components.schema("RoutingCandidate", schema=schemas.CandidateDocument)
    spec.components.schema("RoutingDecision", schema=schemas.DecisionDocument)
    spec.components.schema("TicketRouting", schema=schemas.TicketRoutingDocument)
    spec.components.schema("Escalation", schema=schemas.EscalationDocument)
    spec.components.schema("NewAgentSkill", schema=routing.AgentSkillSchema)
    spec.components.schema("NewAgent", schema=routing.CreateAgentRequest)
    spec.components.schema("UpdateAgent", schema=routing.UpdateAgentRequest)
    spec.components.schema("SetPresence", schema=routing.PresenceRequest)
    spec.components.schema("NewSkill", schema=routing.SkillRequest)
    spec.components.schema("NewRuleCondition", schema=routing.RuleConditionSchema)
    spec.components.schema("NewRuleActions", schema=routing.RuleActionsSchema)
    spec.components.schema("RuleBody", schema=routing.RuleRequest)
    spec.components.schema("Escalate", schema=routing.EscalateRequest)
    secured = [{"bearer": []}]

    spec.path(path="/v1/tickets", operations={
        "post": {
            "summary": "File a ticket",
            "description": "Requesters file for themselves (requester_id and organization_id are "
                           "staff-only). Unknown fields are refused.",
            "security": secured, "parameters": [IDEMPOTENCY_KEY, REQUEST_ID],
            "requestBody": {"required": True, "content": _json("CreateTicket")},
            "responses": {
                "201": {"description": "created", "headers": ETAG_HEADER, "content": _json("Ticket")},
                "400": _problem("malformed JSON"), "413": _problem("body too large"),
                "415": _problem("not JSON"), "422": _problem("invalid or unknown fields, or a reused "
                                                            "Idempotency-Key with another body"),
                **COMMON_ERRORS,
            },
        },
        "get": {
            "summary": "List tickets you may see",
            "security": secured,
            "parameters": [{"in": "query", "schema": schemas.ListTicketsQuery}, REQUEST_ID],
            "responses": {"200": {"description": "a page", "content": _json("TicketPage")},
                          "400": _problem("bad filter or cursor"), **COMMON_ERRORS},
        },
    })
    spec.path(path="/v1/tickets/{ticket_id}", operations={
        "get": {
            "summary": "Read a ticket", "security": secured, "parameters": [TICKET_ID, REQUEST_ID],
            "responses": {"200": {"description": "the ticket", "headers": ETAG_HEADER,
                                  "content": _json("Ticket")},
                          "304": {"description": "If-None-Match matched"},
                          "404": _problem("no such ticket, or not yours to see"), **COMMON_ERRORS},
        },
        "patch": {
            "summary": "Change a ticket",
            "description": "Requesters: subject and description. Agents: also priority, category, tags, "
                           "status (lifecycle enforced), assignee_id, group.",
            "security": secured,
            "parameters": [TICKET_ID, REQUEST_ID,
                           {"name": "If-Match", "in": "header", "required": True,
                            "schema": {"type": "string"}, "description": "the ETag you last read"}],
            "requestBody": {"required": True, "content": _json("UpdateTicket")},
            "responses": {
                "200": {"description": "updated", "headers": ETAG_HEADER, "content": _json("Ticket")},
                "403": _problem("your role may not change this"), "404": _problem("no such ticket"),
                "409": _problem("illegal status transition or closed ticket"),
                "412": _problem("the ticket changed since you read it"),
                "422": _problem("invalid or unknown fields"), "428": _problem("If-Match missing"),
                **COMMON_ERRORS,
            },
        },
    })
    spec.path(path="/v1/tickets/{ticket_id}/comments", operations={
        "post": {
            "summary": "Reply publicly or add an internal note (agents)",
            "description": "A requester's reply reopens a pending or solved ticket.",
            "security": secured, "parameters": [TICKET_ID, IDEMPOTENCY_KEY, REQUEST_ID],
            "requestBody": {"required": True, "content": _json("NewComment")},
            "responses": {"201": {"description": "added", "content": _json("Comment")},
                          "403": _problem("requesters cannot add internal notes; viewers cannot write"),
                          "404": _problem("no such ticket"), "409": _problem("ticket is closed"),
                          "422": _problem("invalid fields"), **COMMON_ERRORS},
        },
        "get": {
            "summary": "Comments you may see (requesters never see internal notes)",
            "security": secured, "parameters": [TICKET_ID, REQUEST_ID],
            "responses": {"200": {"description": "oldest first", "content": _json("CommentList")},
                          "404": _problem("no such ticket"), **COMMON_ERRORS},
        },
    })
    spec.path(path="/v1/tickets/{ticket_id}/comments/{comment_id}", operations={
        "get": {
            "summary": "One comment (the Location of a new comment)",
            "security": secured,
            "parameters": [TICKET_ID, {"name": "comment_id", "in": "path", "required": True,
                                       "schema": {"type": "string", "format": "uuid"}}, REQUEST_ID],
            "responses": {"200": {"description": "the comment", "content": _json("Comment")},
                          "404": _problem("no such ticket or comment, or an internal note you may not see"),
                          **COMMON_ERRORS},
        },
    })
    spec.path(path="/v1/tickets/{ticket_id}/history", operations={
        "get": {
            "summary": "Who changed what and when, time in each status, who had it and for how long",
            "security": secured, "parameters": [TICKET_ID, REQUEST_ID],
            "responses": {"200": {"description": "the history", "content": _json("History")},
                          "404": _problem("no such ticket"), **COMMON_ERRORS},
        },
    })
    _routing_paths(spec, secured)
    for path, summary in (("/healthz", "Liveness"), ("/readyz", "Readiness: broker and tickets answer")):
        spec.path(path=path, operations={"get": {"summary": summary, "responses": {
            "200": {"description": "ok"}, "503": {"description": "not ready"}}}})
    return spec.to_dict()


def _routing_paths(spec: APISpec, secured: list) -> None:
    """Agents, skills, rules, queues and escalation: served by the routing service, staff only."""
    manage_agents = _roles(routing.MANAGE_AGENT_ROLES)
    manage_rules = _roles(routing.MANAGE_RULE_ROLES)
    read = _roles(routing.READ_ROLES)

    spec.path(path="/v1/agents", operations={
        "get": {
            "summary": "List agents", "description": read, "security": secured,
            "parameters": [{"in": "query", "schema": schemas.LIST_AGENTS_QUERY.__class__}, REQUEST_ID],
            "responses": {"200": {"description": "agents matching every filter", "content": _json("AgentList")},
                          "403": STAFF_READ, "400": _problem("unknown filter or bad value"), **COMMON_ERRORS},
        },
        "post": {
            "summary": "Register an agent for routing",
            "description": f"{manage_agents} The id is the agent's token subject.",
            "security": secured, "parameters": [REQUEST_ID],
            "requestBody": {"required": True, "content": _json("NewAgent")},
            "responses": {"201": {"description": "created", "headers": AGENT_ETAG, "content": _json("Agent")},
                          "403": STAFF_ONLY, "409": _problem("an agent with this id is already registered"),
                          **BODY_ERRORS, **COMMON_ERRORS},
        },
    })
    agent_presence = {
        "summary": "Set an agent's presence (online, away, offline)",
        "description": "`me`: your own presence. Another agent's: " + ", ".join(routing.MANAGE_AGENT_ROLES)
                       + ". Coming online lets routing offer the agent queued tickets.",
        "security": secured,
        "requestBody": {"required": True, "content": _json("SetPresence")},
        "responses": {"200": {"description": "the agent", "headers": AGENT_ETAG, "content": _json("Agent")},
                      "403": STAFF_ONLY, "404": _problem("no such agent"), **BODY_ERRORS, **COMMON_ERRORS},
    }
    spec.path(path="/v1/agents/{agent_id}", operations={
        "get": {
            "summary": "Read an agent, with their current load", "description": read,
            "security": secured, "parameters": [AGENT_ID, REQUEST_ID],
            "responses": {"200": {"description": "the agent", "headers": AGENT_ETAG, "content": _json("Agent")},
                          "304": {"description": "If-None-Match matched"},
                          "403": STAFF_READ, "404": _problem("no such agent"), **COMMON_ERRORS},
        },
        "patch": {
            "summary": "Change an agent's tiers, skills, languages, groups or capacity",
            "description": f"{manage_agents} Fields left out are unchanged; presence has its own route.",
            "security": secured, "parameters": [AGENT_ID, REQUEST_ID, IF_MATCH_REQUIRED],
            "requestBody": {"required": True, "content": _json("UpdateAgent")},
            "responses": {"200": {"description": "updated", "headers": AGENT_ETAG, "content": _json("Agent")},
                          "403": STAFF_ONLY, "404": _problem("no such agent"),
                          "412": _problem("the agent changed since you read it"),
                          "428": _problem("If-Match missing"), **BODY_ERRORS, **COMMON_ERRORS},
        },
    })
    spec.path(path="/v1/agents/{agent_id}/presence", operations={
        "put": {**agent_presence, "parameters": [AGENT_ID, REQUEST_ID]}})
    spec.path(path="/v1/agents/me/presence", operations={
        "put": {**agent_presence, "summary": "Set your own presence", "parameters": [REQUEST_ID]}})

    spec.path(path="/v1/routing/skills", operations={
        "get": {
            "summary": "The skill catalogue", "description": read, "security": secured,
            "parameters": [REQUEST_ID],
            "responses": {"200": {"description": "every skill", "content": _json("SkillList")},
                          "403": STAFF_READ, **COMMON_ERRORS},
        },
        "post": {
            "summary": "Add a skill to the catalogue", "description": manage_agents, "security": secured,
            "parameters": [REQUEST_ID], "requestBody": {"required": True, "content": _json("NewSkill")},
            "responses": {"201": {"description": "created", "content": _json("Skill")},
                          "403": STAFF_ONLY, "409": _problem("the skill is already in the catalogue"),
                          **BODY_ERRORS, **COMMON_ERRORS},
        },
    })
    spec.path(path="/v1/routing/rules", operations={
        "get": {
            "summary": "Routing rules in the order they run", "description": read, "security": secured,
            "parameters": [REQUEST_ID],
            "responses": {"200": {"description": "every rule, by position", "content": _json("RuleList")},
                          "403": STAFF_READ, **COMMON_ERRORS},
        },
        "post": {
            "summary": "Add a routing rule",
            "description": f"{manage_rules} Rules run lowest position first; a matching rule applies its "
                           "actions (category, required skills, tier, priority) and stops later rules if "
                           "`stop` is set.",
            "security": secured, "parameters": [REQUEST_ID],
            "requestBody": {"required": True, "content": _json("RuleBody")},
            "responses": {"201": {"description": "created", "headers": RULE_ETAG, "content": _json("Rule")},
                          "403": STAFF_ONLY, "409": _problem(f"already {routing.MAX_RULES} rules"),
                          **BODY_ERRORS, **COMMON_ERRORS},
        },
    })
    spec.path(path="/v1/routing/rules/{rule_id}", operations={
        "get": {
            "summary": "Read a routing rule", "description": read, "security": secured,
            "parameters": [RULE_ID, REQUEST_ID],
            "responses": {"200": {"description": "the rule", "headers": RULE_ETAG, "content": _json("Rule")},
                          "304": {"description": "If-None-Match matched"},
                          "403": STAFF_READ, "404": _problem("no such rule"), **COMMON_ERRORS},
        },
        "put": {
            "summary": "Replace a routing rule", "description": f"{manage_rules} The body is the whole rule.",
            "security": secured, "parameters": [RULE_ID, REQUEST_ID, IF_MATCH_OPTIONAL],
            "requestBody": {"required": True, "content": _json("RuleBody")},
            "responses": {"200": {"description": "replaced", "headers": RULE_ETAG, "content": _json("Rule")},
                          "403": STAFF_ONLY, "404": _problem("no such rule"),
                          "412": _problem("the rule changed since you read it"), **BODY_ERRORS, **COMMON_ERRORS},
        },
        "delete": {
            "summary": "Delete a routing rule", "description": manage_rules, "security": secured,
            "parameters": [RULE_ID, REQUEST_ID, IF_MATCH_OPTIONAL],
            "responses": {"204": {"description": "deleted"}, "403": STAFF_ONLY, "404": _problem("no such rule"),
                          "412": _problem("the rule changed since you read it"), **COMMON_ERRORS},
        },
    })
    spec.path(path="/v1/routing/queues", operations={
        "get": {
            "summary": "Waiting tickets and online capacity per tier", "description": read,
            "security": secured, "parameters": [REQUEST_ID],
            "responses": {"200": {"description": "a snapshot", "content": _json("Queues")},
                          "403": STAFF_READ, **COMMON_ERRORS},
        },
    })
    spec.path(path="/v1/tickets/{ticket_id}/escalate", operations={
        "post": {
            "summary": "Escalate a ticket to a higher tier",
            "description": f"{_roles(routing.ESCALATE_ROLES)} Without to_tier: the next tier up. Routing "
                           "then decides again in the new tier; the response carries that decision.",
            "security": secured, "parameters": [TICKET_ID, REQUEST_ID],
            "requestBody": {"required": True, "content": _json("Escalate")},
            "responses": {"200": {"description": "escalated, with the routing decision it led to",
                                  "content": _json("Escalation")},
                          "403": STAFF_ONLY, "404": _problem("no such ticket"),
                          "409": _problem("the ticket cannot move to that tier (e.g. it is already there)"),
                          **BODY_ERRORS, **COMMON_ERRORS},
        },
    })
    spec.path(path="/v1/tickets/{ticket_id}/routing", operations={
        "get": {
            "summary": "Why a ticket went where it did: its tier, queue state and routing decisions",
            "description": read, "security": secured, "parameters": [TICKET_ID, REQUEST_ID],
            "responses": {"200": {"description": "the routing record, decisions oldest first",
                                  "content": _json("TicketRouting")},
                          "403": STAFF_READ, "404": _problem("no such ticket, or routing has no record of it"),
                          **COMMON_ERRORS},
        },
    })


DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Helpdesk API</title>
<style>
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h2{border-bottom:1px solid #ddd;padding-bottom:.3rem}
.op{margin:1rem 0;padding:.6rem .8rem;border:1px solid #e3e3e3;border-radius:6px}
.verb{display:inline-block;min-width:4.5rem;font-weight:bold;text-transform:uppercase}
code,pre{background:#f6f6f6;border-radius:4px;padding:.1rem .3rem}
pre{padding:.6rem;overflow:auto}
</style></head>
<body>
<h1>Helpdesk API</h1>
<p>This page is rendered from <a href="/v1/openapi.json">/v1/openapi.json</a> (OpenAPI 3).
Authenticate with <code>Authorization: Bearer &lt;token&gt;</code>; errors are
<code>application/problem+json</code>.</p>
<div id="ops">loading…</div>
<h2>Schemas</h2><div id="schemas"></div>
<script>
fetch('/v1/openapi.json').then(r => r.json()).then(doc => {
  const esc = s => String(s ?? '').replace(/[&<>]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;'}[c]));
  let html = '';
  for (const [path, ops] of Object.entries(doc.paths)) {
    for (const [verb, op] of Object.entries(ops)) {
      html += `<div class="op"><span class="verb">${esc(verb)}</span><code>${esc(path)}</code>
        <p>${esc(op.summary)}</p>${op.description ? `<p>${esc(op.description)}</p>` : ''}
        <ul>${Object.entries(op.responses || {}).map(([c, r]) => `<li><b>${esc(c)}</b> ${esc(r.description)}</li>`).join('')}</ul></div>`;
    }
  }
  document.getElementById('ops').innerHTML = html;
  document.getElementById('schemas').innerHTML = Object.entries(doc.components.schemas)
    .map(([name, s]) => `<h3>${esc(name)}</h3><pre>${esc(JSON.stringify(s, null, 2))}</pre>`).join('');
});
</script>
</body></html>
"""
