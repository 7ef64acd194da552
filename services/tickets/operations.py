"""What each tickets RPC does, on a session the caller commits.

Every change: access check -> domain rules -> rows + history -> outbox events, all in the
caller's transaction, so the record and its announcement never disagree.
"""
import hashlib
import json
from datetime import datetime, timezone

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from contracts import tickets as contract
from contracts.events import iso_utc as _iso
from contracts.errors import Conflict, NotFound, PreconditionFailed, ValidationError
from servicekit.outbox import add_event
from services.tickets import access, cursor, domain, store
from services.tickets.access import Actor
from services.tickets.models import Comment, IdempotencyKey, Ticket
from services.tickets.schemas import (comment_view, history_view, ticket_snapshot, ticket_view)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _emit(session: Session, ticket: Ticket, event_type: str, payload: dict) -> None:
    payload = {"ticket": ticket_snapshot(ticket), **payload}
    add_event(session, contract.SERVICE, event_type, {"ticket_id": ticket.id}, payload)


def request_fingerprint(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# --- create ---------------------------------------------------------------------------------

def create_ticket(session: Session, actor: Actor, data: dict, idempotency_key: str | None = None) -> tuple[dict, bool]:
    """Returns (ticket view, replayed). ``replayed``: the key was seen with the same request."""
    access.ensure_can_create(actor, data.get("requester_id"))
    fingerprint = request_fingerprint({"operation": "create_ticket", **data})
    replay = _replay(session, actor, idempotency_key, "create_ticket", fingerprint)
    if replay is not None:
        return ticket_view(store.get_ticket(session, replay)), True

    now = _now()
    requester_id = data.get("requester_id") or actor.id
    if actor.is_staff:
        organization_id = data.get("organization_id") if data.get("requester_id") else (
            data.get("organization_id") or actor.organization_id)
    else:
        if data.get("organization_id") not in (None, actor.organization_id):
            raise ValidationError("requesters file tickets in their own organization",
                                  {"organization_id": ["must match your organization"]})
        organization_id = actor.organization_id
    ticket = Ticket(
        id=store.new_id(), number=store.next_ticket_number(session), subject=data["subject"],
        description=data["description"], requester_id=requester_id, organization_id=organization_id,
        channel=data["channel"], priority=data["priority"],
        priority_rank=domain.PRIORITY_RANK[data["priority"]], category=data.get("category"),
        status="new", created_at=now, updated_at=now, version=1,
    )
    store.set_tags(ticket, data["tags"])
    store.insert_new_ticket(session, ticket)  # the ticket row first: history references it
    store.add_history(session, ticket, actor, "created", {
        "status": [None, "new"], "priority": [None, ticket.priority],
        "subject": [None, ticket.subject], "category": [None, ticket.category],
        "tags": [None, data["tags"]],
    }, now)
    replay = _remember(session, actor, idempotency_key, "create_ticket", fingerprint, ticket.id, now)
    if replay is not None:
        return ticket_view(store.get_ticket(session, replay)), True
    _emit(session, ticket, contract.TICKET_CREATED, {"actor_id": actor.id})
    return ticket_view(ticket), False


def _replay(session, actor, key, operation, fingerprint) -> str | None:
    """The id a previous request with this key produced, if any (same body required)."""
    if not key:
        return None
    seen = store.find_idempotency_key(session, actor.id, key)
    if seen is None:
        return None
    if seen.operation != operation or seen.request_hash != fingerprint:
        raise ValidationError(
            "this Idempotency-Key was already used with a different request",
            {"idempotency_key": ["reused with a different body or endpoint"]})
    return seen.resource_id


def _remember(session, actor, key, operation, fingerprint, resource_id, now) -> str | None:
    """Record the key; if a concurrent request with the same key won, return its resource id."""
    if not key:
        return None
    try:
        with session.begin_nested():
            session.add(IdempotencyKey(actor_id=actor.id, key=key, operation=operation,
                                       request_hash=fingerprint, resource_id=resource_id, created_at=now))
    except IntegrityError:
        session.rollback()  # drop our half-done work; the winner's result is the answer
        replay = _replay(session, actor, key, operation, fingerprint)
        if replay is None:
            raise
        return replay
    return None


# --- read -----------------------------------------------------------------------------------

def _readable_ticket(session: Session, actor: Actor, ticket_id: str, for_update: bool = False) -> Ticket:
    ticket = store.get_ticket(session, ticket_id, for_update=for_update)
    access.ensure_readable(actor, ticket)
    return ticket


def get_ticket(session: Session, actor: Actor, ticket_id: str) -> dict:
    return ticket_view(_readable_ticket(session, actor, ticket_id))


def list_tickets(session: Session, actor: Actor, filters: dict) -> dict:
    sort, limit = filters["sort"], filters["limit"]
    after = None
    if filters.get("cursor"):
        value, number = cursor.decode(filters["cursor"], sort)
        after = (_cursor_value(sort, value), number)
    visibility = access.visibility_condition(actor, Ticket)
    rows = store.list_tickets(session, filters, visibility, after, sort, limit)
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = cursor.encode(sort, _sort_value(sort, last), last.number)
    return {"items": [ticket_view(t) for t in rows], "next_cursor": next_cursor}


def _sort_value(sort: str, ticket: Ticket):
    key = sort.lstrip("-")
    if key in ("created_at", "updated_at"):
        return getattr(ticket, key).isoformat()
    if key == "priority":
        return ticket.priority_rank
    return ticket.number


def _cursor_value(sort: str, value):
    key = sort.lstrip("-")
    try:
        if key in ("created_at", "updated_at"):
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is None:
                raise ValueError("naive")
            return parsed.astimezone(timezone.utc)
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValidationError("malformed cursor", {"cursor": ["not a cursor this API issued"]})


# --- change ---------------------------------------------------------------------------------

def _check_version(ticket, expected_version) -> None:
    if expected_version is not None and ticket.version != expected_version:
        raise PreconditionFailed(
            f"the ticket changed since you read it (version {ticket.version}, you sent {expected_version})",
            {"version": [f"current version is {ticket.version}"]})


def _lock_version(session, ticket, expected_version, now):
    _check_version(ticket, expected_version)
    if not store.bump_version(session, ticket, expected_version, now):
        raise PreconditionFailed("the ticket changed while this update was applied; read it again")


EDITABLE_FIELDS = ("subject", "description", "priority", "category")


def _check_unassigned(ticket: Ticket, assignee_id: str | None) -> None:
    """For an assignment sent ``only_if_unassigned``: the ticket has no assignee, or this one."""
    if ticket.assignee_id is not None and ticket.assignee_id != assignee_id:
        raise Conflict("the ticket was assigned to someone else meanwhile",
                       {"assignee_id": [f"assigned to {ticket.assignee_id}"]})


def update_ticket(session: Session, actor: Actor, ticket_id: str, changes: dict,
                  expected_version: int | None = None, only_if_unassigned: bool = False) -> dict:
    """Fields, status and (staff) assignment in one transaction and one version step."""
    if not changes:
        raise ValidationError("nothing to update", {"_schema": ["send at least one field"]})
    ticket = _readable_ticket(session, actor, ticket_id, for_update=True)
    # who may ask first (403: no state would allow it), then what the ticket's state allows (409)
    access.ensure_can_edit(actor, set(changes), ticket)
    if only_if_unassigned:
        _check_unassigned(ticket, changes.get("assignee_id"))
    if ticket.status == "closed":
        raise Conflict("closed tickets cannot be changed", {"status": ["ticket is closed"]})
    if ticket.status == "solved" and not actor.is_staff:
        raise Conflict("a solved ticket can no longer be edited; reply to reopen it",
                       {"status": ["ticket is solved"]})
    _check_version(ticket, expected_version)  # a stale If-Match fails even when nothing would change

    field_diff = {f: [getattr(ticket, f), changes[f]] for f in EDITABLE_FIELDS
                  if f in changes and changes[f] != getattr(ticket, f)}
    if "tags" in changes and changes["tags"] != ticket.tags:
        field_diff["tags"] = [ticket.tags, changes["tags"]]
    new_assignee = changes.get("assignee_id", ticket.assignee_id)
    assigning = new_assignee != ticket.assignee_id or (
        "group" in changes and changes["group"] != ticket.group_name)
    status_before = ticket.status
    # an assignment opens a new ticket first; an explicit status then has the last word
    status_after_assignment = (domain.status_after_assignment(status_before)
                               if assigning and new_assignee is not None else status_before)
    wanted_status = changes.get("status", status_after_assignment)
    domain.check_transition(status_after_assignment, wanted_status)
    if not field_diff and not assigning and wanted_status == status_before:
        return ticket_view(ticket)  # nothing changed: no version bump, no event

    now = _now()
    _lock_version(session, ticket, expected_version, now)
    for field in EDITABLE_FIELDS:
        if field in field_diff:
            setattr(ticket, field, changes[field])
    if "priority" in field_diff:
        ticket.priority_rank = domain.PRIORITY_RANK[ticket.priority]
    if "tags" in field_diff:
        store.set_tags(ticket, changes["tags"])

    history = dict(field_diff)
    if "description" in history:
        history["description"] = ["(previous)", "(edited)"]  # bodies stay out of history
    if assigning:
        history.update(_assign(session, actor, ticket, new_assignee, changes.get("group", KEEP_GROUP), now))
    if wanted_status != ticket.status:
        old_status = ticket.status
        _apply_status(ticket, wanted_status, now)
        _emit(session, ticket, contract.TICKET_STATUS_CHANGED, {
            "actor_id": actor.id, "old_status": old_status, "new_status": wanted_status,
            "reason": "agent" if actor.is_staff else "requester"})
    if ticket.status != status_before:
        history["status"] = [status_before, ticket.status]
    store.add_history(session, ticket, actor, "updated", history, now)
    announced = {k: v for k, v in history.items() if k not in ("status", "assignee_id", "group")}
    if announced:
        _emit(session, ticket, contract.TICKET_UPDATED, {"actor_id": actor.id, "changes": announced})
    return ticket_view(ticket)


def _apply_status(ticket: Ticket, status: str, now: datetime) -> None:
    ticket.status = status
    if status == "solved":
        ticket.solved_at = now
    elif status == "closed":
        ticket.closed_at = now
    elif status == "open" and ticket.solved_at is not None:
        ticket.solved_at = None  # reopened


def assign_ticket(session: Session, actor: Actor, ticket_id: str, assignee_id: str | None,
                  group: str | None = None, expected_version: int | None = None,
                  only_if_unassigned: bool = False) -> dict:
    access.ensure_can_assign(actor)
    ticket = _readable_ticket(session, actor, ticket_id, for_update=True)
    _check_version(ticket, expected_version)
    if only_if_unassigned:
        _check_unassigned(ticket, assignee_id)
    if ticket.status == "closed":
        raise Conflict("closed tickets cannot be reassigned", {"status": ["ticket is closed"]})
    # the RPC's group=None means "keep the group" (routing assigns within a tier); PATCH can clear it
    group = KEEP_GROUP if group is None else group
    if assignee_id == ticket.assignee_id and group in (KEEP_GROUP, ticket.group_name):
        return ticket_view(ticket)  # idempotent: routing may retry the call
    now = _now()
    _lock_version(session, ticket, expected_version, now)
    changes = _assign(session, actor, ticket, assignee_id, group, now)
    store.add_history(session, ticket, actor, _assignment_action(changes), changes, now)
    return ticket_view(ticket)


def _assignment_action(changes: dict) -> str:
    if "assignee_id" not in changes:
        return "regrouped"
    return "assigned" if changes["assignee_id"][1] is not None else "unassigned"


KEEP_GROUP = object()  # "leave the group as it is", as opposed to None: "no group"


def _assign(session, actor, ticket, assignee_id, group, now) -> dict:
    """Apply an assignment (version already taken) and announce it; returns the changes."""
    changes = {}
    if assignee_id != ticket.assignee_id:
        changes["assignee_id"] = [ticket.assignee_id, assignee_id]
    if group is not KEEP_GROUP and group != ticket.group_name:
        changes["group"] = [ticket.group_name, group]
        ticket.group_name = group
    old_assignee = ticket.assignee_id
    ticket.assignee_id = assignee_id
    old_status = ticket.status
    if assignee_id is not None:
        new_status = domain.status_after_assignment(ticket.status)
        if new_status != old_status:
            changes["status"] = [old_status, new_status]
            _apply_status(ticket, new_status, now)
    _emit(session, ticket, contract.TICKET_ASSIGNED, {
        "actor_id": actor.id, "old_assignee_id": old_assignee, "new_assignee_id": assignee_id,
        "group": ticket.group_name})
    if "status" in changes:
        _emit(session, ticket, contract.TICKET_STATUS_CHANGED, {
            "actor_id": actor.id, "old_status": old_status, "new_status": ticket.status,
            "reason": "assignment"})
    return changes


def add_comment(session: Session, actor: Actor, ticket_id: str, body: str, public: bool,
                idempotency_key: str | None = None) -> tuple[dict, bool]:
    """Returns (comment view, replayed)."""
    ticket = _readable_ticket(session, actor, ticket_id, for_update=True)
    access.ensure_can_comment(actor, public)
    fingerprint = request_fingerprint({"operation": "add_comment", "ticket_id": ticket.id,
                                       "body": body, "public": public})
    replay = _replay(session, actor, idempotency_key, "add_comment", fingerprint)
    if replay is not None:
        return comment_view(session.get(Comment, replay)), True
    now = _now()
    old_status = ticket.status
    new_status = old_status
    if actor.role == "requester":
        new_status = domain.status_after_requester_reply(old_status)
    elif old_status == "closed":
        raise Conflict("this ticket is closed; open a new ticket to follow up",
                       {"ticket": ["closed tickets accept no comments"]})
    _lock_version(session, ticket, None, now)
    comment = Comment(id=store.new_id(), ticket_id=ticket.id, author_id=actor.id,
                      author_role=actor.role, body=body, public=public, created_at=now)
    session.add(comment)
    session.flush()
    replay = _remember(session, actor, idempotency_key, "add_comment", fingerprint, comment.id, now)
    if replay is not None:
        return comment_view(session.get(Comment, replay)), True
    changes = {"comment_id": [None, comment.id], "public": [None, public]}
    if domain.is_first_response(actor.role, public, ticket.first_responded_at is not None):
        ticket.first_responded_at = now
    if new_status != old_status:
        _apply_status(ticket, new_status, now)
        changes["status"] = [old_status, new_status]
    store.add_history(session, ticket, actor, "commented" if public else "noted", changes, now, public=public)
    _emit(session, ticket, contract.COMMENT_ADDED, {
        "comment_id": comment.id, "author_id": actor.id, "author_role": actor.role, "public": public})
    if new_status != old_status:
        _emit(session, ticket, contract.TICKET_STATUS_CHANGED, {
            "actor_id": actor.id, "old_status": old_status, "new_status": new_status,
            "reason": "requester_reply"})
    return comment_view(comment), False


def list_comments(session: Session, actor: Actor, ticket_id: str) -> dict:
    ticket = _readable_ticket(session, actor, ticket_id)
    comments = store.list_comments(session, ticket.id, access.sees_internal_notes(actor))
    return {"items": [comment_view(c) for c in comments]}


def get_comment(session: Session, actor: Actor, ticket_id: str, comment_id: str) -> dict:
    """One comment of a readable ticket; an internal note is NotFound for requesters."""
    ticket = _readable_ticket(session, actor, ticket_id)
    comment = store.get_comment(session, ticket.id, comment_id)
    if comment is None or (not comment.public and not access.sees_internal_notes(actor)):
        raise NotFound("comment not found")
    return comment_view(comment)


def get_history(session: Session, actor: Actor, ticket_id: str) -> dict:
    """The change log plus what it tells: time in each status, who had it and how long."""
    ticket = _readable_ticket(session, actor, ticket_id)
    entries = store.list_history(session, ticket.id)
    timeline = [(e.occurred_at, e.changes) for e in entries]
    now = _now()
    status_periods = domain.periods_of("status", "new", ticket.created_at, timeline)
    assignee_periods = domain.periods_of("assignee_id", None, ticket.created_at, timeline)
    include_internal = access.sees_internal_notes(actor)
    return {
        "items": [history_view(e) for e in entries if include_internal or e.public],
        "time_in_status": domain.time_in_status(status_periods, now),
        "assignment_periods": [
            {**p, "started_at": _iso(p["started_at"]), "ended_at": _iso(p["ended_at"])}
            for p in domain.assignment_periods(assignee_periods, now)
        ],
    }


def apply_sla_due_dates(session: Session, ticket_id: str, due: dict) -> None:
    """Mirror SLA due dates announced by the sla service (an event, handled once)."""
    ticket = store.get_ticket(session, ticket_id, for_update=True)
    if ticket is None:
        raise NotFound(f"ticket {ticket_id} not found")
    changes = {}
    for field in ("first_response_due_at", "resolution_due_at"):
        if field in due and due[field] != getattr(ticket, field):
            changes[field] = [_iso(getattr(ticket, field)), _iso(due[field])]
            setattr(ticket, field, due[field])
    if changes:
        now = _now()
        store.bump_version(session, ticket, None, now)
        store.add_history(session, ticket, Actor("sla", "admin"), "sla_updated", changes, now)
