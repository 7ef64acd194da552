"""HTTP bodies and query strings of the /v1 API, and the documents it returns.

Ticket request bodies are the tickets contract's request schemas narrowed per role, so a field a
role may not set is an unknown field (422), exactly like a typo. Agent and routing bodies are the
routing contract's request schemas as they are: who may send them is decided by role alone.
"""
from marshmallow import Schema, fields, validate

from contracts import routing
from contracts.tickets import (CHANNELS, PRIORITIES, ROLES, STATUSES, CommentRequest, CreateTicketRequest,
                               ListTicketsRequest, UpdateTicketRequest)

STAFF_ONLY_CREATE_FIELDS = ("requester_id", "organization_id")
REQUESTER_UPDATE_FIELDS = ("subject", "description")


# Built once: a schema instance holds no per-load state, and building one (deep-copying its
# fields) cost more than validating a body with it.
_CREATE_BODY = {True: CreateTicketRequest(), False: CreateTicketRequest(exclude=STAFF_ONLY_CREATE_FIELDS)}
_UPDATE_BODY = {True: UpdateTicketRequest(), False: UpdateTicketRequest(only=REQUESTER_UPDATE_FIELDS)}
_COMMENT_BODY = CommentRequest()


def create_ticket_body(is_staff: bool) -> Schema:
    return _CREATE_BODY[bool(is_staff)]


def update_ticket_body(is_staff: bool) -> Schema:
    return _UPDATE_BODY[bool(is_staff)]


def comment_body() -> Schema:
    return _COMMENT_BODY


class ListTicketsQuery(ListTicketsRequest):
    """The tickets contract's list request under its HTTP query names.

    List fields accept ``status=open,pending`` or ``status=open&status=pending``.
    """

    assignee_id = fields.String(data_key="assignee", validate=validate.Length(min=1, max=200),
                                metadata={"description": "agent id, or `me`"})
    requester_id = fields.String(data_key="requester", validate=validate.Length(min=1, max=200))
    organization_id = fields.String(data_key="organization", validate=validate.Length(min=1, max=200))


LIST_FIELDS = ("status", "priority")
# HTTP query name -> tickets RPC filter name
QUERY_TO_FILTER = {field.data_key: name for name, field in ListTicketsQuery().fields.items() if field.data_key}


# routing: built once, like the ticket bodies
CREATE_AGENT_BODY = routing.CreateAgentRequest()
UPDATE_AGENT_BODY = routing.UpdateAgentRequest()
PRESENCE_BODY = routing.PresenceRequest()
SKILL_BODY = routing.SkillRequest()
RULE_BODY = routing.RuleRequest()
ESCALATE_BODY = routing.EscalateRequest()
LIST_AGENTS_QUERY = routing.ListAgentsRequest()


# --- documents (response shapes, for the OpenAPI document) ----------------------------------

class TicketDocument(Schema):
    id = fields.String(metadata={"format": "uuid"})
    number = fields.Integer(metadata={"description": "human sequential number, e.g. 1042"})
    subject = fields.String()
    description = fields.String()
    status = fields.String(validate=validate.OneOf(STATUSES))
    priority = fields.String(validate=validate.OneOf(PRIORITIES))
    category = fields.String(allow_none=True)
    tags = fields.List(fields.String())
    channel = fields.String(validate=validate.OneOf(CHANNELS))
    requester_id = fields.String()
    organization_id = fields.String(allow_none=True)
    assignee_id = fields.String(allow_none=True)
    group = fields.String(allow_none=True)
    first_response_due_at = fields.String(allow_none=True, metadata={"format": "date-time"})
    resolution_due_at = fields.String(allow_none=True, metadata={"format": "date-time"})
    first_responded_at = fields.String(allow_none=True, metadata={"format": "date-time"})
    solved_at = fields.String(allow_none=True, metadata={"format": "date-time"})
    closed_at = fields.String(allow_none=True, metadata={"format": "date-time"})
    created_at = fields.String(metadata={"format": "date-time"})
    updated_at = fields.String(metadata={"format": "date-time"})
    version = fields.Integer(metadata={"description": "also the ETag"})


class TicketPage(Schema):
    items = fields.List(fields.Nested(TicketDocument))
    next_cursor = fields.String(allow_none=True)


class CommentDocument(Schema):
    id = fields.String(metadata={"format": "uuid"})
    ticket_id = fields.String(metadata={"format": "uuid"})
    author_id = fields.String()
    author_role = fields.String(validate=validate.OneOf(ROLES))
    body = fields.String()
    public = fields.Boolean(metadata={"description": "false: internal note, never shown to requesters"})
    created_at = fields.String(metadata={"format": "date-time"})


class CommentList(Schema):
    items = fields.List(fields.Nested(CommentDocument))


class HistoryEntryDocument(Schema):
    id = fields.Integer()
    occurred_at = fields.String(metadata={"format": "date-time"})
    actor_id = fields.String()
    actor_role = fields.String()
    action = fields.String(metadata={"description": "created, updated, assigned, unassigned, commented, "
                                                    "noted, sla_updated"})
    changes = fields.Dict(metadata={"description": "field -> [old, new]"})


class AssignmentPeriod(Schema):
    assignee_id = fields.String(allow_none=True)
    started_at = fields.String(metadata={"format": "date-time"})
    ended_at = fields.String(allow_none=True, metadata={"format": "date-time"})
    seconds = fields.Float()


class HistoryDocument(Schema):
    items = fields.List(fields.Nested(HistoryEntryDocument))
    time_in_status = fields.Dict(keys=fields.String(), values=fields.Float(),
                                 metadata={"description": "seconds spent in each status so far"})
    assignment_periods = fields.List(fields.Nested(AssignmentPeriod))


# --- routing documents ------------------------------------------------------------------------

class AgentSkillDocument(Schema):
    name = fields.String()
    proficiency = fields.Integer(allow_none=True, metadata={
        "description": f"1 (basic) .. {routing.MAX_PROFICIENCY} (expert); null: level unstated"})


class AgentDocument(Schema):
    id = fields.String(metadata={"description": "the agent's token subject"})
    display_name = fields.String()
    tiers = fields.List(fields.String(validate=validate.OneOf(routing.TIERS)))
    skills = fields.List(fields.Nested(AgentSkillDocument))
    languages = fields.List(fields.String())
    groups = fields.List(fields.String())
    capacity = fields.Integer(metadata={"description": "how many active (new, open) tickets at once"})
    presence = fields.String(validate=validate.OneOf(routing.PRESENCES))
    presence_changed_at = fields.String(metadata={"format": "date-time"})
    active_tickets = fields.Integer(metadata={"description": "current load: assigned new and open tickets"})
    last_assigned_at = fields.String(allow_none=True, metadata={"format": "date-time"})
    version = fields.Integer(metadata={"description": "also the ETag"})
    created_at = fields.String(metadata={"format": "date-time"})
    updated_at = fields.String(metadata={"format": "date-time"})


class AgentList(Schema):
    items = fields.List(fields.Nested(AgentDocument))


class SkillDocument(Schema):
    name = fields.String()
    description = fields.String(allow_none=True)
    created_at = fields.String(metadata={"format": "date-time"})


class SkillList(Schema):
    items = fields.List(fields.Nested(SkillDocument))


class RuleConditionDocument(Schema):
    field = fields.String(validate=validate.OneOf(routing.RULE_FIELDS))
    operator = fields.String(validate=validate.OneOf(routing.RULE_OPERATORS))
    value = fields.Raw(metadata={"description": "a string (matches, equals) or a list of strings "
                                                "(contains_any, contains_all, in)"})


class RuleActionsDocument(Schema):
    set_category = fields.String()
    require_skills = fields.List(fields.String())
    set_tier = fields.String(validate=validate.OneOf(routing.TIERS))
    raise_priority = fields.String(validate=validate.OneOf(PRIORITIES))


class RuleDocument(Schema):
    id = fields.String(metadata={"format": "uuid"})
    name = fields.String()
    position = fields.Integer(metadata={"description": "lower runs first"})
    enabled = fields.Boolean()
    match = fields.String(validate=validate.OneOf(("all", "any")))
    conditions = fields.List(fields.Nested(RuleConditionDocument))
    actions = fields.Nested(RuleActionsDocument)
    stop = fields.Boolean(metadata={"description": "a match stops later rules from running"})
    version = fields.Integer(metadata={"description": "also the ETag"})
    created_at = fields.String(metadata={"format": "date-time"})
    updated_at = fields.String(metadata={"format": "date-time"})


class RuleList(Schema):
    items = fields.List(fields.Nested(RuleDocument))


class TierQueueDocument(Schema):
    tier = fields.String(validate=validate.OneOf(routing.TIERS))
    depth = fields.Integer(metadata={"description": "tickets waiting for an agent"})
    oldest_queued_at = fields.String(allow_none=True, metadata={"format": "date-time"})
    oldest_age_seconds = fields.Float(allow_none=True)
    agents_online = fields.Integer()
    active_tickets = fields.Integer(metadata={"description": "load of the tier's online agents"})
    capacity_online = fields.Integer(metadata={"description": "capacity of the tier's online agents"})


class QueuesDocument(Schema):
    as_of = fields.String(metadata={"format": "date-time"})
    tiers = fields.List(fields.Nested(TierQueueDocument))


EXCLUSIONS = routing.EXCLUSION_REASONS
DECISION_OUTCOMES = routing.DECISION_OUTCOMES
ROUTING_STATES = routing.ROUTING_STATES


class CandidateDocument(Schema):
    agent_id = fields.String()
    excluded = fields.String(allow_none=True, validate=validate.OneOf(EXCLUSIONS),
                             metadata={"description": "why the agent could not take it; null: eligible"})
    missing_skills = fields.List(fields.String())
    load = fields.Integer()
    capacity = fields.Integer()
    idle_since = fields.String(allow_none=True, metadata={"format": "date-time"})
    rank = fields.Integer(allow_none=True, metadata={"description": "1: chosen first; null: excluded"})


class DecisionDocument(Schema):
    id = fields.String(metadata={"format": "uuid"})
    ticket_id = fields.String(metadata={"format": "uuid"})
    decided_at = fields.String(metadata={"format": "date-time"})
    trigger = fields.String(validate=validate.OneOf(routing.TRIGGERS))
    tier = fields.String(validate=validate.OneOf(routing.TIERS))
    outcome = fields.String(validate=validate.OneOf(DECISION_OUTCOMES))
    agent_id = fields.String(allow_none=True)
    required_skills = fields.List(fields.String())
    skills_relaxed = fields.Boolean(metadata={"description": "the ticket had waited long enough that "
                                                             "its required skills were not insisted on"})
    detail = fields.String(allow_none=True)
    candidates = fields.List(fields.Nested(CandidateDocument))


class TicketRoutingDocument(Schema):
    ticket_id = fields.String(metadata={"format": "uuid"})
    tier = fields.String(validate=validate.OneOf(routing.TIERS))
    state = fields.String(validate=validate.OneOf(ROUTING_STATES))
    assignee_id = fields.String(allow_none=True)
    required_skills = fields.List(fields.String())
    queued_at = fields.String(allow_none=True, metadata={"format": "date-time"})
    decisions = fields.List(fields.Nested(DecisionDocument))


class EscalationDocument(Schema):
    ticket_id = fields.String(metadata={"format": "uuid"})
    from_tier = fields.String(validate=validate.OneOf(routing.TIERS))
    to_tier = fields.String(validate=validate.OneOf(routing.TIERS))
    reason = fields.String()
    decision = fields.Nested(DecisionDocument)


class Problem(Schema):
    type = fields.String()
    title = fields.String()
    status = fields.Integer()
    detail = fields.String()
    errors = fields.Dict(keys=fields.String(), values=fields.Raw())
    request_id = fields.String()
