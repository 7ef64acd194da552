"""Tables of the routing service (its own database)."""
from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from servicekit.tables import service_metadata
from servicekit.types import UtcDateTime as _UtcDateTime


class Base(DeclarativeBase):
    metadata = service_metadata()


UtcDateTime = _UtcDateTime()


class Skill(Base):
    __tablename__ = "skills"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(200))
    tiers: Mapped[list] = mapped_column(JSON)
    skills: Mapped[list] = mapped_column(JSON)  # [{"name", "proficiency"}]
    languages: Mapped[list] = mapped_column(JSON)
    groups: Mapped[list] = mapped_column(JSON)
    capacity: Mapped[int] = mapped_column(Integer)
    presence: Mapped[str] = mapped_column(String(10))
    presence_changed_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_assigned_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    version: Mapped[int] = mapped_column(Integer)
    # claims made on this agent, ever (diagnostics; the slot itself is taken on active_load)
    claim_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    # the agent's active tickets (status new/open) as routing mirrors them, kept exact by
    # operations.set_assignment in the same transaction as every change of a ticket's assignee
    # or status; a claim takes a slot with one atomic UPDATE ... WHERE active_load < capacity
    active_load: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Rule(Base):
    __tablename__ = "rules"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    position: Mapped[int] = mapped_column(Integer)
    enabled: Mapped[bool] = mapped_column(Boolean)
    match: Mapped[str] = mapped_column(String(3))
    conditions: Mapped[list] = mapped_column(JSON)
    actions: Mapped[dict] = mapped_column(JSON)
    stop: Mapped[bool] = mapped_column(Boolean)
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class RoutedTicket(Base):
    """Routing's view of a ticket: a mirror of the tickets service's snapshot (applied only when
    its ``version`` is newer) plus what routing owns: tier, required skills, queue state."""

    __tablename__ = "routed_tickets"

    ticket_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    number: Mapped[int] = mapped_column(Integer)
    subject: Mapped[str] = mapped_column(String(250))
    status: Mapped[str] = mapped_column(String(10))
    priority: Mapped[str] = mapped_column(String(10))
    category: Mapped[str | None] = mapped_column(String(100))
    channel: Mapped[str] = mapped_column(String(10))
    organization_id: Mapped[str | None] = mapped_column(String(200))
    tags: Mapped[list] = mapped_column(JSON)
    assignee_id: Mapped[str | None] = mapped_column(String(200))
    ticket_version: Mapped[int] = mapped_column(Integer)
    ticket_created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # routing's own
    tier: Mapped[str] = mapped_column(String(2))
    required_skills: Mapped[list] = mapped_column(JSON)
    # queued: waits in its tier's queue; assigning: claimed for assignee_id, the tickets RPC in
    # flight; assigned: has an assignee; idle: nothing to route (solved, closed, unassigned and
    # not active)
    state: Mapped[str] = mapped_column(String(10))
    queued_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    queue_trigger: Mapped[str | None] = mapped_column(String(20))
    # the "nobody free, waiting" decision for the current queue entry is recorded once
    queue_noted: Mapped[bool] = mapped_column(Boolean, default=False)
    sla_due_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    claim_decision_id: Mapped[str | None] = mapped_column(String(36))
    claimed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # what the rules changed (category, priority, group) and the tickets service does not have
    # yet: delivered with the assignment, or on its own when the ticket has to wait
    pending_changes: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)

    __table_args__ = (
        Index("ix_routed_tickets_state_tier", "state", "tier"),
        Index("ix_routed_tickets_assignee_status", "assignee_id", "status"),
        # the sweeper looks for undelivered rules' changes: a handful of rows among all tickets
        Index("ix_routed_tickets_pending_changes", "ticket_id", sqlite_where=text("pending_changes IS NOT NULL"),
              postgresql_where=text("pending_changes IS NOT NULL")),
    )


class Decision(Base):
    """One routing decision about one ticket, with every candidate and why it lost: listed in
    ``candidates``, or, for a decision of a dispatch round, explained when it is read from the
    round's ``AgentSnapshot`` (``plan_step``: its step in the round's plan)."""

    __tablename__ = "routing_decisions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    ticket_id: Mapped[str] = mapped_column(String(36), index=True)
    decided_at: Mapped[datetime] = mapped_column(UtcDateTime)
    trigger: Mapped[str] = mapped_column(String(20))
    tier: Mapped[str] = mapped_column(String(2))
    outcome: Mapped[str] = mapped_column(String(10))
    agent_id: Mapped[str | None] = mapped_column(String(200))
    required_skills: Mapped[list] = mapped_column(JSON)
    skills_relaxed: Mapped[bool] = mapped_column(Boolean)
    candidates: Mapped[list] = mapped_column(JSON)
    detail: Mapped[str | None] = mapped_column(Text)
    agent_snapshot_id: Mapped[str | None] = mapped_column(String(36))
    plan_step: Mapped[int | None] = mapped_column(Integer)


class AgentSnapshot(Base):
    """The agents of the tiers one dispatch round assigned in, as it read them, and the agent
    its plan chose at each step.

    Every decision of the round is explained from it when read (the chooser is deterministic),
    instead of listing every agent of the tier itself: with 200 agents a listed decision was
    about 16 KB, written once and rewritten when confirmed, for each ticket."""

    __tablename__ = "routing_agent_snapshots"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    planned_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # [id, tiers, skills, presence, capacity, load, idle_since (ISO 8601 or null)] per agent
    agents: Mapped[list] = mapped_column(JSON)
    plan: Mapped[list] = mapped_column(JSON)  # agent ids, one per step
    # agents in none of the round's tiers: counted, not listed (a decision lists its tier's agents)
    agents_not_listed: Mapped[int] = mapped_column(Integer)
