"""Tables of the tickets service (its own database)."""
from datetime import datetime

from sqlalchemy import (JSON, BigInteger, Boolean, ForeignKey, Index, Integer,
                        SmallInteger, String, Text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from servicekit.tables import service_metadata
from servicekit.types import UtcDateTime as _UtcDateTime


class Base(DeclarativeBase):
    metadata = service_metadata()


UtcDateTime = _UtcDateTime()
AutoId = BigInteger().with_variant(Integer, "sqlite")


class Ticket(Base):
    __tablename__ = "tickets"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, unique=True)
    subject: Mapped[str] = mapped_column(String(250))
    description: Mapped[str] = mapped_column(Text)
    requester_id: Mapped[str] = mapped_column(String(200), index=True)
    organization_id: Mapped[str | None] = mapped_column(String(200), index=True)
    channel: Mapped[str] = mapped_column(String(10))
    priority: Mapped[str] = mapped_column(String(10))
    # low=0 .. critical=3 (domain.PRIORITY_RANK): lets "sort by priority" use an index and a cursor
    priority_rank: Mapped[int] = mapped_column(SmallInteger, index=True)
    category: Mapped[str | None] = mapped_column(String(100), index=True)
    status: Mapped[str] = mapped_column(String(10), index=True)
    assignee_id: Mapped[str | None] = mapped_column(String(200), index=True)
    group_name: Mapped[str | None] = mapped_column(String(50))
    first_response_due_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    resolution_due_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    first_responded_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    solved_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    version: Mapped[int] = mapped_column(Integer)

    tag_rows: Mapped[list["TicketTag"]] = relationship(
        cascade="all, delete-orphan", lazy="selectin", order_by="TicketTag.tag")

    @property
    def tags(self) -> list[str]:
        return [row.tag for row in self.tag_rows]


class TicketTag(Base):
    __tablename__ = "ticket_tags"

    ticket_id: Mapped[str] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(50), primary_key=True, index=True)


class Comment(Base):
    __tablename__ = "comments"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    ticket_id: Mapped[str] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"))
    author_id: Mapped[str] = mapped_column(String(200))
    author_role: Mapped[str] = mapped_column(String(20))
    body: Mapped[str] = mapped_column(Text)
    public: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)

    __table_args__ = (Index("ix_comments_ticket_created", "ticket_id", "created_at"),)


class HistoryEntry(Base):
    """One change to a ticket: who, when, what (field -> [old, new])."""

    __tablename__ = "ticket_history"

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    ticket_id: Mapped[str] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"), index=True)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime)
    actor_id: Mapped[str] = mapped_column(String(200))
    actor_role: Mapped[str] = mapped_column(String(20))
    action: Mapped[str] = mapped_column(String(30))
    changes: Mapped[dict] = mapped_column(JSON)
    # internal notes' entries are hidden from requesters
    public: Mapped[bool] = mapped_column(Boolean, default=True)


class Counter(Base):
    """Sequences that must stay gap-tolerant but unique across replicas (ticket numbers)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class IdempotencyKey(Base):
    """A create request's Idempotency-Key, scoped to the caller, and what it produced."""

    __tablename__ = "idempotency_keys"

    actor_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    operation: Mapped[str] = mapped_column(String(50))  # create_ticket, add_comment
    request_hash: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
