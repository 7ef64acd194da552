"""Queries and writes on the tickets service's tables (repository style)."""
import uuid
from datetime import datetime

from sqlalchemy import and_, bindparam, or_, select, update
from sqlalchemy.orm import Session, joinedload

from servicekit.db import column_values
from services.tickets.models import Comment, Counter, HistoryEntry, IdempotencyKey, Ticket, TicketTag

SORT_COLUMNS = {
    "created_at": Ticket.created_at,
    "updated_at": Ticket.updated_at,
    "priority": Ticket.priority_rank,
    "number": Ticket.number,
}


def new_id() -> str:
    return str(uuid.uuid4())


_COUNTERS = Counter.__table__
# a Core statement, built once: no Counter objects live in the session, so the ORM's
# synchronize-the-identity-map pass (and rebuilding the statement) per ticket is pure overhead
_NEXT_TICKET_NUMBER = (
    update(_COUNTERS).where(_COUNTERS.c.name == "ticket_number")
    .values(value=_COUNTERS.c.value + 1).returning(_COUNTERS.c.value)
)


def next_ticket_number(session: Session) -> int:
    # one row-locked increment: unique across replicas on PostgreSQL, serialised on SQLite
    return session.execute(_NEXT_TICKET_NUMBER).scalar_one()


def _is_uuid(value) -> bool:
    try:
        uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return False
    return True


# session.info key: the tickets a batch of writes locked up front (``lock_tickets``), by id
_LOCKED_TICKETS = "locked_tickets"


def lock_tickets(session: Session, ticket_ids) -> None:
    """Lock and load these tickets (in id order, so two batches cannot deadlock) with their
    tags, for several writes in this one transaction: each write's locked read then takes its
    ticket from here instead of running two SELECTs of its own."""
    ids = sorted({ticket_id for ticket_id in ticket_ids if _is_uuid(ticket_id)})
    # the tags by the relationship's own second SELECT, after the lock (see get_ticket)
    tickets = session.execute(select(Ticket).where(Ticket.id.in_(ids)).order_by(Ticket.id)
                              .with_for_update()).scalars().all()
    session.info[_LOCKED_TICKETS] = {ticket.id: ticket for ticket in tickets}


def get_ticket(session: Session, ticket_id: str, for_update: bool = False) -> Ticket | None:
    if not _is_uuid(ticket_id):
        return None
    query = select(Ticket).where(Ticket.id == ticket_id)
    if for_update:
        locked = session.info.get(_LOCKED_TICKETS)
        if locked is not None and ticket_id in locked:
            return locked[ticket_id]
        # the tags by their own SELECT, after the lock: a PostgreSQL query that waited for the
        # row lock returns the ticket's new row but the joined tag rows as they were before
        return session.execute(query.with_for_update()).scalar_one_or_none()
    # a plain read: the tags in the same query (the relationship's own loader, a second SELECT,
    # took about 40% of the time of loading one ticket)
    return session.execute(query.options(joinedload(Ticket.tag_rows))).unique().scalar_one_or_none()


def set_tags(ticket: Ticket, tags: list[str]) -> None:
    ticket.tag_rows = [TicketTag(ticket_id=ticket.id, tag=tag) for tag in tags]


_INSERT_TICKET = Ticket.__table__.insert()
_INSERT_TAG = TicketTag.__table__.insert()


def insert_new_ticket(session: Session, ticket: Ticket) -> None:
    """INSERT a just-built ticket and its tags now, with Core statements built once.

    What ``session.add(ticket); session.flush()`` wrote, without the unit of work: a create
    reads nothing back, and the object (left outside the session) still serves the views.
    """
    session.execute(_INSERT_TICKET, column_values(ticket))
    if ticket.tag_rows:
        session.execute(_INSERT_TAG, [{"ticket_id": ticket.id, "tag": row.tag} for row in ticket.tag_rows])


# History rows are written, never read back in the transaction that writes them, so they skip
# the ORM unit of work (an INSERT statement built once; the ticket row already exists).
_INSERT_HISTORY = HistoryEntry.__table__.insert()


def add_history(session: Session, ticket: Ticket, actor, action: str, changes: dict,
                at: datetime, public: bool = True) -> None:
    session.execute(_INSERT_HISTORY, {
        "ticket_id": ticket.id, "occurred_at": at, "actor_id": actor.id, "actor_role": actor.role,
        "action": action, "changes": changes, "public": public,
    })


# built once (every write runs one); Core statements on the table, so the session's objects
# are left alone (the caller sets the new version on the object)
_TICKETS = Ticket.__table__
_BUMP_VERSION = (update(_TICKETS).where(_TICKETS.c.id == bindparam("b_id"))
                 .values(version=_TICKETS.c.version + 1, updated_at=bindparam("b_at")))
_BUMP_VERSION_IF = _BUMP_VERSION.where(_TICKETS.c.version == bindparam("b_expected"))


def bump_version(session: Session, ticket: Ticket, expected_version: int | None, at: datetime) -> bool:
    """Compare-and-set the version in SQL so concurrent writers cannot both win."""
    if expected_version is None:
        result = session.execute(_BUMP_VERSION, {"b_id": ticket.id, "b_at": at})
    else:
        result = session.execute(_BUMP_VERSION_IF, {"b_id": ticket.id, "b_at": at, "b_expected": expected_version})
    if result.rowcount != 1:
        return False
    ticket.version = (expected_version if expected_version is not None else ticket.version) + 1
    ticket.updated_at = at
    return True


def list_tickets(session: Session, filters: dict, visibility, after: tuple | None, sort: str, limit: int):
    descending = sort.startswith("-")
    column = SORT_COLUMNS[sort.lstrip("-")]
    query = select(Ticket)
    if visibility is not None:
        query = query.where(visibility)
    if filters.get("status"):
        query = query.where(Ticket.status.in_(filters["status"]))
    if filters.get("priority"):
        query = query.where(Ticket.priority.in_(filters["priority"]))
    if filters.get("assignee_id"):
        query = query.where(Ticket.assignee_id == filters["assignee_id"])
    if filters.get("unassigned") is True:
        query = query.where(Ticket.assignee_id.is_(None))
    elif filters.get("unassigned") is False:
        query = query.where(Ticket.assignee_id.is_not(None))
    for key in ("requester_id", "organization_id", "category"):
        if filters.get(key):
            query = query.where(getattr(Ticket, key) == filters[key])
    if filters.get("tag"):
        query = query.where(Ticket.id.in_(select(TicketTag.ticket_id).where(TicketTag.tag == filters["tag"])))
    if filters.get("created_after"):
        query = query.where(Ticket.created_at >= filters["created_after"])
    if filters.get("created_before"):
        query = query.where(Ticket.created_at < filters["created_before"])
    if filters.get("updated_after"):
        query = query.where(Ticket.updated_at >= filters["updated_after"])
    if filters.get("updated_before"):
        query = query.where(Ticket.updated_at < filters["updated_before"])
    if after is not None:
        value, number = after
        if column is Ticket.number:
            query = query.where(Ticket.number < number if descending else Ticket.number > number)
        elif descending:
            query = query.where(or_(column < value, and_(column == value, Ticket.number < number)))
        else:
            query = query.where(or_(column > value, and_(column == value, Ticket.number > number)))
    order = (column.desc(), Ticket.number.desc()) if descending else (column.asc(), Ticket.number.asc())
    return list(session.execute(query.order_by(*order).limit(limit + 1)).scalars())


def get_comment(session: Session, ticket_id: str, comment_id: str) -> Comment | None:
    try:
        uuid.UUID(comment_id)
    except (ValueError, AttributeError, TypeError):
        return None
    return session.execute(
        select(Comment).where(Comment.id == comment_id, Comment.ticket_id == ticket_id)
    ).scalar_one_or_none()


def list_comments(session: Session, ticket_id: str, include_internal: bool) -> list[Comment]:
    query = select(Comment).where(Comment.ticket_id == ticket_id)
    if not include_internal:
        query = query.where(Comment.public.is_(True))
    return list(session.execute(query.order_by(Comment.created_at, Comment.id)).scalars())


def list_history(session: Session, ticket_id: str) -> list[HistoryEntry]:
    """Every entry, internal ones included: time in status is derived from all of them."""
    return list(session.execute(
        select(HistoryEntry).where(HistoryEntry.ticket_id == ticket_id).order_by(HistoryEntry.id)
    ).scalars())


def find_idempotency_key(session: Session, actor_id: str, key: str) -> IdempotencyKey | None:
    return session.get(IdempotencyKey, (actor_id, key))
