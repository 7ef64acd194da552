"""HTTP bodies and query strings of the /v1 API, and the documents it returns.

Request bodies are the tickets contract's request schemas narrowed per role, so a field a
role may not set is an unknown field (422), exactly like a typo.
"""
from marshmallow import Schema, fields, validate

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


class Problem(Schema):
    type = fields.String()
    title = fields.String()
    status = fields.Integer()
    detail = fields.String()
    errors = fields.Dict(keys=fields.String(), values=fields.Raw())
    request_id = fields.String()
