"""marshmallow schemas of the tickets service's RPC payloads, and the views it returns."""
import re

from marshmallow import RAISE, Schema, ValidationError as SchemaError, fields, post_load, validate, validates

from contracts.events import iso_utc
from contracts.tickets import CHANNELS, PRIORITIES, STATUSES

MAX_TAGS = 20
TAG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_\-:.]{0,49}$")
SORTS = ("created_at", "-created_at", "updated_at", "-updated_at", "priority", "-priority",
         "number", "-number")


class _Strict(Schema):
    class Meta:
        unknown = RAISE


def _normalise_tags(tags):
    seen = []
    for tag in tags:
        tag = tag.strip().lower()
        if tag not in seen:
            seen.append(tag)
    return seen


class _TagsMixin:
    @validates("tags")
    def _check_tags(self, value, **_):
        normalised = _normalise_tags(value)
        if len(normalised) > MAX_TAGS:
            raise SchemaError(f"at most {MAX_TAGS} tags")
        bad = [tag for tag in normalised if not TAG_PATTERN.match(tag)]
        if bad:
            raise SchemaError(f"tags are lowercase letters, digits and _-:. (1-50 chars): {bad[:3]}")


class CreateTicketSchema(_TagsMixin, _Strict):
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


class UpdateTicketSchema(_TagsMixin, _Strict):
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


class AssignSchema(_Strict):
    assignee_id = fields.String(required=True, allow_none=True, validate=validate.Length(min=1, max=200))
    group = fields.String(load_default=None, allow_none=True, validate=validate.Length(min=1, max=50))


class CommentSchema(_Strict):
    body = fields.String(required=True, validate=validate.Length(min=1, max=65536))
    public = fields.Boolean(load_default=True)

    @post_load
    def _clean(self, data, **_):
        if not data["body"].strip():
            raise SchemaError("must not be blank", "body")
        return data


class ListTicketsSchema(_Strict):
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


class TicketSlaSchema(_Strict):
    first_response_due_at = fields.AwareDateTime(allow_none=True)
    resolution_due_at = fields.AwareDateTime(allow_none=True)


# --- views (what RPC returns: JSON-ready dicts, times as ISO 8601 with Z) ---------------------

def ticket_view(ticket) -> dict:
    return {
        "id": ticket.id,
        "number": ticket.number,
        "subject": ticket.subject,
        "description": ticket.description,
        "status": ticket.status,
        "priority": ticket.priority,
        "category": ticket.category,
        "tags": ticket.tags,
        "channel": ticket.channel,
        "requester_id": ticket.requester_id,
        "organization_id": ticket.organization_id,
        "assignee_id": ticket.assignee_id,
        "group": ticket.group_name,
        "first_response_due_at": iso_utc(ticket.first_response_due_at),
        "resolution_due_at": iso_utc(ticket.resolution_due_at),
        "first_responded_at": iso_utc(ticket.first_responded_at),
        "solved_at": iso_utc(ticket.solved_at),
        "closed_at": iso_utc(ticket.closed_at),
        "created_at": iso_utc(ticket.created_at),
        "updated_at": iso_utc(ticket.updated_at),
        "version": ticket.version,
    }


SNAPSHOT_FIELDS = ("id", "number", "subject", "status", "priority", "category", "tags", "channel",
                   "requester_id", "organization_id", "assignee_id", "group", "version",
                   "created_at", "updated_at")


def ticket_snapshot(ticket) -> dict:
    """The part of a ticket every event carries (no description: it can hold personal data)."""
    view = ticket_view(ticket)
    return {key: view[key] for key in SNAPSHOT_FIELDS}


def comment_view(comment) -> dict:
    return {
        "id": comment.id,
        "ticket_id": comment.ticket_id,
        "author_id": comment.author_id,
        "author_role": comment.author_role,
        "body": comment.body,
        "public": comment.public,
        "created_at": iso_utc(comment.created_at),
    }


def history_view(entry) -> dict:
    return {
        "id": entry.id,
        "occurred_at": iso_utc(entry.occurred_at),
        "actor_id": entry.actor_id,
        "actor_role": entry.actor_role,
        "action": entry.action,
        "changes": entry.changes,
    }
