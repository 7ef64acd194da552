"""Contract of the routing service: vocabularies, RPC request schemas, event payload schemas.

RPC methods (service "routing"), every one taking the caller's ``actor`` first:
  create_skill, list_skills,
  create_agent, get_agent, list_agents, update_agent, set_presence,
  create_rule, get_rule, list_rules, update_rule, delete_rule,
  get_queues, escalate_ticket, get_ticket_routing.

Events produced (source "routing"): ticket_routed, ticket_queued, ticket_escalated,
agent_presence_changed. Consumed: tickets' ticket_created / ticket_updated /
ticket_status_changed / ticket_assigned, and ("sla", "ticket_sla_updated"), ("sla", "sla_breached").
"""
import re

from marshmallow import (RAISE, Schema, ValidationError as SchemaError, fields, post_load, validate,
                         validates, validates_schema)

from contracts.tickets import CHANNELS, PRIORITIES

SERVICE = "routing"

TIERS = ("L1", "L2", "L3")
PRESENCES = ("online", "away", "offline")
# ticket statuses that occupy one of an agent's capacity slots; pending and on_hold do not
ACTIVE_STATUSES = ("new", "open")
DEFAULT_CAPACITY = 3
MAX_CAPACITY = 50
MAX_PROFICIENCY = 5
SKILL_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_\-.]{0,49}$")
LANGUAGE_PATTERN = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")
MAX_SKILLS_PER_AGENT = 50
MAX_RULES = 500

# who may do what (the service enforces it; the gateway documents it)
MANAGE_AGENT_ROLES = ("supervisor", "admin")
MANAGE_RULE_ROLES = ("admin",)
READ_ROLES = ("agent", "supervisor", "admin", "viewer")
ESCALATE_ROLES = ("agent", "supervisor", "admin")

# why routing looked at a ticket (decision records, metrics label `reason`)
TRIGGERS = ("created", "reopened", "escalated", "unassigned", "capacity_freed", "agent_online",
            "requeued", "sweep")

# routing's state of a ticket: triage (rules not yet run), queued (waits for an agent),
# assigning (claimed, the tickets service being told), assigned, idle (nothing to route)
ROUTING_STATES = ("triage", "queued", "assigning", "assigned", "idle")
# what a recorded decision did
DECISION_OUTCOMES = ("triaged", "queued", "assigning", "assigned", "released", "escalated")
# why a candidate agent was not chosen
EXCLUSION_REASONS = ("offline", "away", "not_in_tier", "missing_skills", "at_capacity")

TICKET_ROUTED = "ticket_routed"
TICKET_QUEUED = "ticket_queued"
TICKET_ESCALATED = "ticket_escalated"
AGENT_PRESENCE_CHANGED = "agent_presence_changed"
EVENT_TYPES = (TICKET_ROUTED, TICKET_QUEUED, TICKET_ESCALATED, AGENT_PRESENCE_CHANGED)


class _Strict(Schema):
    class Meta:
        unknown = RAISE


def _check_skill_name(value):
    if not SKILL_PATTERN.match(value):
        raise SchemaError("skill names are lowercase letters, digits and _-. (1-50 chars)")


# --- skills -----------------------------------------------------------------------------------

class SkillRequest(_Strict):
    name = fields.String(required=True, validate=_check_skill_name)
    description = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=500))


# --- agents -----------------------------------------------------------------------------------

class AgentSkillSchema(_Strict):
    name = fields.String(required=True, validate=_check_skill_name)
    # 1 (basic) .. 5 (expert); None: has the skill, level unstated
    proficiency = fields.Integer(load_default=None, allow_none=True,
                                 validate=validate.Range(min=1, max=MAX_PROFICIENCY), strict=True)


def _unique_sorted(values):
    return sorted(set(values))


class _AgentFields(_Strict):
    display_name = fields.String(validate=validate.Length(min=1, max=200))
    tiers = fields.List(fields.String(validate=validate.OneOf(TIERS)),
                        validate=validate.Length(min=1, max=len(TIERS)))
    skills = fields.List(fields.Nested(AgentSkillSchema), validate=validate.Length(max=MAX_SKILLS_PER_AGENT))
    languages = fields.List(fields.String(validate=validate.Regexp(LANGUAGE_PATTERN,
                                                                   error="an ISO 639 code such as en or es-MX")),
                            validate=validate.Length(max=20))
    groups = fields.List(fields.String(validate=validate.Length(min=1, max=50)), validate=validate.Length(max=20))
    capacity = fields.Integer(strict=True, validate=validate.Range(min=0, max=MAX_CAPACITY))

    @validates("skills")
    def _distinct_skills(self, value, **_):
        # a nested entry that failed its own validation arrives without its name: skip it
        names = [skill["name"] for skill in value if isinstance(skill, dict) and "name" in skill]
        if len(names) != len(set(names)):
            raise SchemaError("each skill at most once")

    @post_load
    def _normalise(self, data, **_):
        for key in ("tiers", "languages", "groups"):
            if key in data:
                data[key] = _unique_sorted(data[key])
        if "skills" in data:
            data["skills"] = sorted(data["skills"], key=lambda skill: skill["name"])
        if "display_name" in data:
            data["display_name"] = data["display_name"].strip()
            if not data["display_name"]:
                raise SchemaError("must not be blank", "display_name")
        return data


class CreateAgentRequest(_AgentFields):
    # the agent's token subject: the agent acts under this id
    id = fields.String(required=True, validate=validate.Length(min=1, max=200))
    display_name = fields.String(required=True, validate=validate.Length(min=1, max=200))
    tiers = fields.List(fields.String(validate=validate.OneOf(TIERS)),
                        validate=validate.Length(min=1, max=len(TIERS)), load_default=lambda: ["L1"])
    skills = fields.List(fields.Nested(AgentSkillSchema), validate=validate.Length(max=MAX_SKILLS_PER_AGENT),
                         load_default=list)
    languages = fields.List(fields.String(validate=validate.Regexp(LANGUAGE_PATTERN,
                                                                   error="an ISO 639 code such as en or es-MX")),
                            validate=validate.Length(max=20), load_default=list)
    groups = fields.List(fields.String(validate=validate.Length(min=1, max=50)), validate=validate.Length(max=20),
                         load_default=list)
    capacity = fields.Integer(strict=True, validate=validate.Range(min=0, max=MAX_CAPACITY),
                              load_default=DEFAULT_CAPACITY)


class UpdateAgentRequest(_AgentFields):
    """Fields left out are unchanged; presence has its own call."""


class PresenceRequest(_Strict):
    presence = fields.String(required=True, validate=validate.OneOf(PRESENCES))


class ListAgentsRequest(_Strict):
    tier = fields.String(validate=validate.OneOf(TIERS))
    presence = fields.String(validate=validate.OneOf(PRESENCES))
    skill = fields.String(validate=_check_skill_name)


# --- rules ------------------------------------------------------------------------------------

RULE_FIELDS = ("subject", "description", "category", "channel", "organization", "priority", "tags")
# contains_any / contains_all: keywords, case- and accent-insensitive, whole words
# matches: a regular expression (Python syntax, case-insensitive), searched anywhere
# equals / in: exact value(s), for the enumerated fields too
RULE_OPERATORS = ("contains_any", "contains_all", "matches", "equals", "in")
MAX_PATTERN_LENGTH = 500
MAX_KEYWORDS = 50


class RuleConditionSchema(_Strict):
    field = fields.String(required=True, validate=validate.OneOf(RULE_FIELDS))
    operator = fields.String(required=True, validate=validate.OneOf(RULE_OPERATORS))
    # a string for matches/equals, a list of strings for contains_any/contains_all/in
    value = fields.Raw(required=True)

    @validates_schema
    def _value_fits_operator(self, data, **_):
        operator, value, field = data.get("operator"), data.get("value"), data.get("field")
        if operator is None or field is None:
            return
        if operator in ("contains_any", "contains_all", "in"):
            if (not isinstance(value, list) or not value or len(value) > MAX_KEYWORDS
                    or not all(isinstance(v, str) and 0 < len(v.strip()) <= 100 for v in value)):
                raise SchemaError(f"{operator} takes a list of 1-{MAX_KEYWORDS} non-blank strings", "value")
            values = value
        else:
            if not isinstance(value, str) or not 0 < len(value) <= MAX_PATTERN_LENGTH:
                raise SchemaError(f"{operator} takes one string of 1-{MAX_PATTERN_LENGTH} characters", "value")
            values = [value]
        if operator == "matches":
            try:
                re.compile(value)
            except re.error as exc:
                raise SchemaError(f"not a valid regular expression: {exc}", "value")
        if operator in ("contains_any", "contains_all") and field in ("channel", "priority"):
            raise SchemaError(f"{field} is one value: use equals or in", "operator")
        allowed = {"channel": CHANNELS, "priority": PRIORITIES}.get(field)
        if allowed and operator in ("equals", "in"):
            unknown = sorted(set(values) - set(allowed))
            if unknown:
                raise SchemaError(f"unknown {field}: {unknown}; one of {list(allowed)}", "value")


class RuleActionsSchema(_Strict):
    set_category = fields.String(validate=validate.Length(min=1, max=100))
    require_skills = fields.List(fields.String(validate=_check_skill_name), validate=validate.Length(min=1, max=10))
    set_tier = fields.String(validate=validate.OneOf(TIERS))
    # raises to at least this priority; never lowers one
    raise_priority = fields.String(validate=validate.OneOf(PRIORITIES))

    @validates_schema
    def _at_least_one(self, data, **_):
        if not data:
            raise SchemaError("a rule needs at least one action", "_schema")

    @post_load
    def _normalise(self, data, **_):
        if "require_skills" in data:
            data["require_skills"] = _unique_sorted(data["require_skills"])
        return data


class RuleRequest(_Strict):
    name = fields.String(required=True, validate=validate.Length(min=1, max=200))
    # lower runs first; left out: after every existing rule
    position = fields.Integer(load_default=None, allow_none=True, strict=True,
                              validate=validate.Range(min=0, max=1_000_000))
    enabled = fields.Boolean(load_default=True)
    # all: every condition must hold; any: one is enough
    match = fields.String(load_default="all", validate=validate.OneOf(("all", "any")))
    conditions = fields.List(fields.Nested(RuleConditionSchema), required=True,
                             validate=validate.Length(min=1, max=20))
    actions = fields.Nested(RuleActionsSchema, required=True)
    # later matching rules still run (their actions override earlier ones) unless a match stops
    stop = fields.Boolean(load_default=False)

    @post_load
    def _clean(self, data, **_):
        data["name"] = data["name"].strip()
        if not data["name"]:
            raise SchemaError("must not be blank", "name")
        return data


# --- escalation -------------------------------------------------------------------------------

class EscalateRequest(_Strict):
    reason = fields.String(required=True, validate=validate.Length(min=1, max=1000))
    # left out: the next tier up
    to_tier = fields.String(load_default=None, allow_none=True, validate=validate.OneOf(TIERS))

    @post_load
    def _clean(self, data, **_):
        data["reason"] = data["reason"].strip()
        if not data["reason"]:
            raise SchemaError("must not be blank", "reason")
        return data


# --- events -----------------------------------------------------------------------------------

class TicketRoutedPayload(_Strict):
    ticket_id = fields.String(required=True)
    agent_id = fields.String(required=True)
    tier = fields.String(required=True, validate=validate.OneOf(TIERS))
    trigger = fields.String(required=True, validate=validate.OneOf(TRIGGERS))
    decision_id = fields.String(required=True)
    # seconds from the ticket's creation to this assignment
    waited_seconds = fields.Float(required=True)


class TicketQueuedPayload(_Strict):
    ticket_id = fields.String(required=True)
    tier = fields.String(required=True, validate=validate.OneOf(TIERS))
    trigger = fields.String(required=True, validate=validate.OneOf(TRIGGERS))
    decision_id = fields.String(required=True)
    required_skills = fields.List(fields.String(), required=True)


class TicketEscalatedPayload(_Strict):
    ticket_id = fields.String(required=True)
    from_tier = fields.String(required=True, validate=validate.OneOf(TIERS))
    to_tier = fields.String(required=True, validate=validate.OneOf(TIERS))
    reason = fields.String(required=True)
    # who: an agent's id, "rule:<id>" or "sla"
    actor_id = fields.String(required=True)
    trigger = fields.String(required=True, validate=validate.OneOf(("agent", "rule", "sla_breach")))


class AgentPresenceChangedPayload(_Strict):
    agent_id = fields.String(required=True)
    presence = fields.String(required=True, validate=validate.OneOf(PRESENCES))
    previous = fields.String(required=True, validate=validate.OneOf(PRESENCES))
    tiers = fields.List(fields.String(validate=validate.OneOf(TIERS)), required=True)


PAYLOAD_SCHEMAS = {
    TICKET_ROUTED: TicketRoutedPayload,
    TICKET_QUEUED: TicketQueuedPayload,
    TICKET_ESCALATED: TicketEscalatedPayload,
    AGENT_PRESENCE_CHANGED: AgentPresenceChangedPayload,
}


# --- consumed from the sla service (it owns these; routing reads the fields it needs) --------

SLA_SOURCE = "sla"
SLA_BREACHED = "sla_breached"


class SlaBreachedPayload(Schema):
    class Meta:
        unknown = "exclude"  # the sla service may add fields; routing needs these

    ticket_id = fields.String(required=True)
    # first_response, next_reply, resolution
    target = fields.String(required=True)
