"""Contract of the tickets service: vocabularies, event payload schemas, RPC method names.

Event types (source "tickets"): ticket_created, ticket_updated, ticket_status_changed,
ticket_assigned, comment_added. Events consumed by tickets: ("sla", "ticket_sla_updated").
"""
import re
from datetime import timezone

from marshmallow import RAISE, Schema, ValidationError as SchemaError, fields, post_load, validate, validates

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


# --- RPC requests (the gateway derives its HTTP bodies from these) -------------------------

MAX_TAGS = 20
TAG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_\-:.]{0,49}$")
SORTS = ("created_at", "-created_at", "updated_at", "-updated_at", "priority", "-priority",
         "number", "-number")


def _normalise_tags(tags):
    """Tags are a set: trimmed, lowercased, deduplicated and sorted (the order they are stored
    and read back in), so a new order is not a change."""
    return sorted({tag.strip().lower() for tag in tags})


class _TagsMixin:
    @validates("tags")
    def _check_tags(self, value, **_):
        normalised = _normalise_tags(value)
        if len(normalised) > MAX_TAGS:
            raise SchemaError(f"at most {MAX_TAGS} tags")
        bad = [tag for tag in normalised if not TAG_PATTERN.match(tag)]
        if bad:
            raise SchemaError(f"tags are lowercase letters, digits and _-:. (1-50 chars): {bad[:3]}")


class CreateTicketRequest(_TagsMixin, _Strict):
    subject = fields.String(required=True, validate=validate.Length(min=1, max=250))
    description = fields.String(required=True, validate=validate.Length(min=1, max=65536))
    priority = fields.String(load_default="normal", validate=validate.OneOf(PRIORITIES))
    category = fields.String(load_default=None, allow_none=True, validate=validate.Length(min=1, max=100))
    tags = fields.List(fields.String(validate=validate.Length(min=1, max=50)), load_default=list)
    channel = fields.String(load_default="api", validate=validate.OneOf(CHANNELS))
    # staff creating on someone's behalf
    requester_id = fields.String(load_default=None, allow_none=True, validate=validate.Length(min=1, max=200))
    organization_id = fields.String(load_default=None, allow_none=True, validate=validate.Length(min=1, max=200))

    @post_load
    def _clean(self, data, **_):
        data["subject"] = data["subject"].strip()
        if not data["subject"]:
            raise SchemaError("must not be blank", "subject")
        data["tags"] = _normalise_tags(data["tags"])
        return data


class UpdateTicketRequest(_TagsMixin, _Strict):
    subject = fields.String(validate=validate.Length(min=1, max=250))
    description = fields.String(validate=validate.Length(min=1, max=65536))
    priority = fields.String(validate=validate.OneOf(PRIORITIES))
    category = fields.String(allow_none=True, validate=validate.Length(min=1, max=100))
    tags = fields.List(fields.String(validate=validate.Length(min=1, max=50)))
    status = fields.String(validate=validate.OneOf(STATUSES))
    assignee_id = fields.String(allow_none=True, validate=validate.Length(min=1, max=200))
    group = fields.String(allow_none=True, validate=validate.Length(min=1, max=50))

    @post_load
    def _clean(self, data, **_):
        if "tags" in data:
            data["tags"] = _normalise_tags(data["tags"])
        if "subject" in data:
            data["subject"] = data["subject"].strip()
            if not data["subject"]:
                raise SchemaError("must not be blank", "subject")
        return data


class AssignRequest(_Strict):
    assignee_id = fields.String(required=True, allow_none=True, validate=validate.Length(min=1, max=200))
    group = fields.String(load_default=None, allow_none=True, validate=validate.Length(min=1, max=50))


# assign_tickets: many assignments in one call (routing delivers its batches so); each one is
# applied on its own, as assign_ticket, or update_ticket when it carries other changes
MAX_ASSIGNMENTS_PER_CALL = 100


class AssignmentRequest(AssignRequest):
    ticket_id = fields.String(required=True, validate=validate.Length(min=1, max=36))
    # other fields to change with the assignment (an update_ticket body without assignee_id,
    # group or status; refused per assignment otherwise)
    changes = fields.Dict(load_default=None, allow_none=True)
    expected_version = fields.Integer(load_default=None, allow_none=True, strict=True,
                                      validate=validate.Range(min=1))
    # applied (as assign_ticket would) only while the ticket has no assignee or already this
    # one; a ticket someone else took meanwhile is refused with a conflict, so that a late or
    # repeated delivery never takes it back from the person it went to
    only_if_unassigned = fields.Boolean(load_default=False)


class CommentRequest(_Strict):
    body = fields.String(required=True, validate=validate.Length(min=1, max=65536))
    public = fields.Boolean(load_default=True)

    @post_load
    def _clean(self, data, **_):
        if not data["body"].strip():
            raise SchemaError("must not be blank", "body")
        return data


class ListTicketsRequest(_Strict):
    status = fields.List(fields.String(validate=validate.OneOf(STATUSES)))
    priority = fields.List(fields.String(validate=validate.OneOf(PRIORITIES)))
    assignee_id = fields.String(validate=validate.Length(min=1, max=200))
    unassigned = fields.Boolean()
    requester_id = fields.String(validate=validate.Length(min=1, max=200))
    organization_id = fields.String(validate=validate.Length(min=1, max=200))
    tag = fields.String(validate=validate.Length(min=1, max=50))
    category = fields.String(validate=validate.Length(min=1, max=100))
    created_after = fields.AwareDateTime()
    created_before = fields.AwareDateTime()
    updated_after = fields.AwareDateTime()
    updated_before = fields.AwareDateTime()
    sort = fields.String(load_default="-created_at", validate=validate.OneOf(SORTS))
    limit = fields.Integer(load_default=25, validate=validate.Range(min=1, max=100))
    cursor = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=500))

    @validates("created_after", "created_before", "updated_after", "updated_before")
    def _representable_in_utc(self, value, **_):
        try:
            value.astimezone(timezone.utc)
        except OverflowError:
            raise SchemaError("out of range once converted to UTC")


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
    """A target left out is unchanged; ``null`` clears it."""

    ticket_id = fields.String(required=True)
    first_response_due_at = fields.AwareDateTime(allow_none=True)
    resolution_due_at = fields.AwareDateTime(allow_none=True)
