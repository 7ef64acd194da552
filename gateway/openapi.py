"""The OpenAPI 3 document, generated from the marshmallow schemas the API validates with."""
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

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


def _json(schema_name):
    return {"application/json": {"schema": schema_name}}


def build_openapi(server_url: str) -> dict:
    spec = APISpec(
        title="Helpdesk API",
        version="1.0.0",
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": "Tickets, comments and history behind one gateway. Errors are "
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
    for path, summary in (("/healthz", "Liveness"), ("/readyz", "Readiness: broker and tickets answer")):
        spec.path(path=path, operations={"get": {"summary": summary, "responses": {
            "200": {"description": "ok"}, "503": {"description": "not ready"}}}})
    return spec.to_dict()


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
