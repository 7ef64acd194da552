"""marshmallow schemas of the tickets service's RPC payloads, and the views it returns.

The request schemas are part of the contract (the gateway derives its HTTP bodies from them),
so they live in ``contracts.tickets``; this module names them for the service.
"""
from contracts.events import iso_utc
from contracts.tickets import (SORTS, AssignRequest as AssignSchema, CommentRequest as CommentSchema,  # noqa: F401
                               CreateTicketRequest as CreateTicketSchema,
                               ListTicketsRequest as ListTicketsSchema,
                               UpdateTicketRequest as UpdateTicketSchema)


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
