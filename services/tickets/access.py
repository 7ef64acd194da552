"""Who may see and do what with a ticket. Deny by default.

* requester: own tickets (their organization's when the token says ``org_wide``); public
  comments only; may edit subject/description of their own unsolved tickets and reply publicly.
* viewer: reads everything (internal notes included), writes nothing.
* agent, supervisor, admin: everything.

What an actor may not see is reported as NotFound, so ids of others' tickets leak nothing.
"""
from sqlalchemy import or_

from contracts.errors import Forbidden, NotFound
from servicekit.actor import Actor  # noqa: F401  (services.tickets.access.Actor for callers)

REQUESTER_EDITABLE = frozenset({"subject", "description"})
STAFF_EDITABLE = frozenset({"subject", "description", "priority", "category", "tags", "status",
                            "assignee_id", "group"})


def can_read(actor: Actor, requester_id: str, organization_id: str | None) -> bool:
    if actor.is_staff or actor.role == "viewer":
        return True
    if actor.role == "requester":
        if requester_id == actor.id:
            return True
        return bool(actor.org_wide and actor.organization_id and organization_id == actor.organization_id)
    return False


def ensure_readable(actor: Actor, ticket) -> None:
    if ticket is None or not can_read(actor, ticket.requester_id, ticket.organization_id):
        raise NotFound("ticket not found")


def visibility_condition(actor: Actor, ticket_table):
    """SQL condition restricting a ticket query to what the actor may read (None: no limit)."""
    if actor.is_staff or actor.role == "viewer":
        return None
    if actor.role == "requester":
        own = ticket_table.requester_id == actor.id
        if actor.org_wide and actor.organization_id:
            return or_(own, ticket_table.organization_id == actor.organization_id)
        return own
    return ticket_table.id.is_(None)  # unknown role: sees nothing


def sees_internal_notes(actor: Actor) -> bool:
    return actor.is_staff or actor.role == "viewer"


def ensure_can_edit(actor: Actor, fields: set[str], ticket) -> None:
    if actor.role == "viewer":
        raise Forbidden("viewers have read-only access")
    allowed = STAFF_EDITABLE if actor.is_staff else REQUESTER_EDITABLE if actor.role == "requester" else frozenset()
    refused = sorted(set(fields) - allowed)
    if refused:
        raise Forbidden(f"{actor.role}s may not change: {', '.join(refused)}",
                        {field: ["not allowed for your role"] for field in refused})
    # org-wide visibility is for following colleagues' tickets, not rewriting them
    if actor.role == "requester" and ticket.requester_id != actor.id:
        raise Forbidden("requesters may edit only their own tickets")


def ensure_can_comment(actor: Actor, public: bool) -> None:
    if actor.role == "viewer":
        raise Forbidden("viewers have read-only access")
    if not public and not actor.is_staff:
        raise Forbidden("only agents can add internal notes", {"public": ["must be true for requesters"]})


def ensure_can_assign(actor: Actor) -> None:
    if not actor.is_staff:
        raise Forbidden("only agents can assign tickets")


def ensure_can_create(actor: Actor, on_behalf_of: str | None) -> None:
    if actor.role == "viewer":
        raise Forbidden("viewers have read-only access")
    if on_behalf_of and on_behalf_of != actor.id and not actor.is_staff:
        raise Forbidden("requesters create tickets for themselves",
                        {"requester_id": ["not allowed for your role"]})
