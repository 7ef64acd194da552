"""Contract of the tickets service: vocabularies, event payload schemas, RPC method names.

Event types (source "tickets"): ticket_created, ticket_updated, ticket_status_changed,
ticket_assigned, comment_added. Events consumed by tickets: ("sla", "ticket_sla_updated").
"""
from marshmallow import RAISE, Schema, fields, validate

SERVICE = "tickets"

STATUSES = ("new", "open", "pending", "on_hold", "solved", "closed")
PRIORITIES = ("critical", "high", "normal", "low")
CHANNELS = ("web", "email", "api", "phone", "chat")
ROLES = ("requester", "agent", "supervisor", "admin", "viewer")
STAFF_ROLES = ("agent", "supervisor", "admin")

TICKET_CREATED = "ticket_created"
TICKET_UPDATED = "ticket_updated"
TICKET_STATUS_CHANGED = "ticket_status_changed"
TICKET_ASSIGNED = "ticket_assigned"
COMMENT_ADDED = "comment_added"
EVENT_TYPES = (TICKET_CREATED, TICKET_UPDATED, TICKET_STATUS_CHANGED, TICKET_ASSIGNED, COMMENT_ADDED)


class _Strict(Schema):
    class Meta:
        unknown = RAISE


class ActorSchema(_Strict):
    """Who is calling: the verified identity the gateway passes with every RPC."""

    id = fields.String(required=True, validate=validate.Length(min=1, max=200))
    role = fields.String(required=True, validate=validate.OneOf(ROLES))
    organization_id = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=200))
    # a requester whose token grants it sees every ticket of their organization
    org_wide = fields.Boolean(load_default=False)


class TicketSnapshotSchema(_Strict):
    id = fields.String(required=True)
    number = fields.Integer(required=True)
    subject = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(STATUSES))
    priority = fields.String(required=True, validate=validate.OneOf(PRIORITIES))
    category = fields.String(allow_none=True)
    tags = fields.List(fields.String(), required=True)
    channel = fields.String(required=True, validate=validate.OneOf(CHANNELS))
    requester_id = fields.String(required=True)
    organization_id = fields.String(allow_none=True)
    assignee_id = fields.String(allow_none=True)
    group = fields.String(allow_none=True)
    version = fields.Integer(required=True)
    created_at = fields.String(required=True)
    updated_at = fields.String(required=True)


class TicketCreatedPayload(_Strict):
    ticket = fields.Nested(TicketSnapshotSchema, required=True)
    actor_id = fields.String(required=True)


class TicketUpdatedPayload(_Strict):
    ticket = fields.Nested(TicketSnapshotSchema, required=True)
    actor_id = fields.String(required=True)
    # field -> [old, new]
    changes = fields.Dict(keys=fields.String(), values=fields.List(fields.Raw(allow_none=True)), required=True)


class TicketStatusChangedPayload(_Strict):
    ticket = fields.Nested(TicketSnapshotSchema, required=True)
    actor_id = fields.String(required=True)
    old_status = fields.String(required=True, validate=validate.OneOf(STATUSES))
    new_status = fields.String(required=True, validate=validate.OneOf(STATUSES))
    # why: "agent", "requester_reply", "assignment"
    reason = fields.String(required=True)


class TicketAssignedPayload(_Strict):
    ticket = fields.Nested(TicketSnapshotSchema, required=True)
    actor_id = fields.String(required=True)
    old_assignee_id = fields.String(allow_none=True, required=True)
    new_assignee_id = fields.String(allow_none=True, required=True)
    group = fields.String(allow_none=True)


class CommentAddedPayload(_Strict):
    ticket = fields.Nested(TicketSnapshotSchema, required=True)
    comment_id = fields.String(required=True)
    author_id = fields.String(required=True)
    author_role = fields.String(required=True, validate=validate.OneOf(ROLES))
    public = fields.Boolean(required=True)
    # bodies are not copied into events: internal notes must not leak to every consumer


PAYLOAD_SCHEMAS = {
    TICKET_CREATED: TicketCreatedPayload,
    TICKET_UPDATED: TicketUpdatedPayload,
    TICKET_STATUS_CHANGED: TicketStatusChangedPayload,
    TICKET_ASSIGNED: TicketAssignedPayload,
    COMMENT_ADDED: CommentAddedPayload,
}


# Consumed by tickets: the sla service announces due dates that tickets mirrors.
SLA_SOURCE = "sla"
TICKET_SLA_UPDATED = "ticket_sla_updated"


class TicketSlaUpdatedPayload(_Strict):
    ticket_id = fields.String(required=True)
    first_response_due_at = fields.AwareDateTime(allow_none=True, load_default=None)
    resolution_due_at = fields.AwareDateTime(allow_none=True, load_default=None)
