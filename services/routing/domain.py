"""Who gets which ticket: the chooser and the waiting queue's order. Plain Python, no I/O.

* An agent is a candidate for a ticket when online, in the ticket's tier, holding every
  required skill (unless skills are relaxed for a ticket that waited long enough) and below
  capacity. Among candidates: the least loaded, then the longest idle, then the smallest id
  (deterministic, so replicas and replays agree).
* The queue of a tier is ordered by effective priority (the ticket's priority raised one level
  per ``aging_seconds`` waited: starvation protection), then SLA due time when known, then the
  ticket's age, then id.
"""
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import NamedTuple

from contracts.routing import ACTIVE_STATUSES, EXCLUSION_REASONS, ROUTING_STATES, TIERS
from contracts.tickets import PRIORITIES

PRIORITY_RANK = {priority: rank for rank, priority in enumerate(reversed(PRIORITIES))}  # low 0 .. critical 3
MAX_RANK = max(PRIORITY_RANK.values())
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_FAR_FUTURE = datetime(9999, 1, 1, tzinfo=timezone.utc)

# why an agent was not chosen, as recorded in decisions
OFFLINE, AWAY, NOT_IN_TIER, MISSING_SKILLS, AT_CAPACITY = EXCLUSION_REASONS


def counts_against_capacity(status: str) -> bool:
    return status in ACTIVE_STATUSES


def next_tier(tier: str) -> str | None:
    index = TIERS.index(tier)
    return TIERS[index + 1] if index + 1 < len(TIERS) else None


@dataclass(frozen=True)
class AgentState:
    id: str
    tiers: frozenset
    skills: frozenset
    presence: str
    capacity: int
    load: int
    idle_since: datetime | None = None  # None: never assigned, the longest idle of all

    @property
    def free_slots(self) -> int:
        return max(0, self.capacity - self.load)


@dataclass(frozen=True)
class QueuedTicket:
    ticket_id: str
    tier: str
    priority: str
    required_skills: frozenset
    created_at: datetime
    queued_at: datetime
    sla_due_at: datetime | None = None


class Candidate(NamedTuple):
    """One agent of the ticket's tier as the chooser saw it (a tuple: a decision builds one per
    agent of the tier, and a frozen dataclass cost several times more to build)."""
    agent_id: str
    excluded: str | None
    missing_skills: tuple = ()
    load: int = 0
    capacity: int = 0
    idle_since: datetime | None = None
    rank: int | None = None  # 1 = the winner, among the eligible


@dataclass(frozen=True)
class Choice:
    winner: str | None
    candidates: tuple = ()
    skills_relaxed: bool = False
    not_in_tier: int = 0  # agents outside the tier, counted rather than listed


def skills_relaxed(ticket: QueuedTicket, now: datetime, relax_after_seconds: float | None) -> bool:
    return bool(ticket.required_skills) and relax_after_seconds is not None and (
        (now - ticket.queued_at).total_seconds() >= relax_after_seconds)


def _exclusion(agent: AgentState, required_skills: frozenset, relaxed: bool) -> tuple[str | None, tuple]:
    if agent.presence == "offline":
        return OFFLINE, ()
    if agent.presence == "away":
        return AWAY, ()
    missing = () if relaxed else tuple(sorted(required_skills - agent.skills))
    if missing:
        return MISSING_SKILLS, missing
    if agent.load >= agent.capacity:
        return AT_CAPACITY, ()
    return None, ()


def _preference(agent: AgentState):
    return agent.load, agent.idle_since or _EPOCH, agent.id


def choose_agent(ticket: QueuedTicket, agents, now: datetime,
                 relax_after_seconds: float | None = None, record: bool = True) -> Choice:
    """The best agent for ``ticket`` among ``agents`` (any iterable of AgentState).

    ``record=False`` skips building the per-agent explanation (the drain planner's inner loop).
    """
    relaxed = skills_relaxed(ticket, now, relax_after_seconds)
    if record:
        return explain_choice(ticket.tier, ticket.required_skills, relaxed, agents)
    tier, required = ticket.tier, ticket.required_skills
    best, best_key, not_in_tier = None, None, 0
    for agent in agents:
        if tier not in agent.tiers:
            not_in_tier += 1
            continue
        # the hot path: the same tests as _exclusion, without building the explanation
        if (agent.presence != "online" or agent.load >= agent.capacity
                or (not relaxed and not required <= agent.skills)):
            continue
        key = _preference(agent)
        if best_key is None or key < best_key:
            best, best_key = agent, key
    return Choice(best.id if best else None, (), relaxed, not_in_tier)


def explain_choice(tier: str, required_skills: frozenset, relaxed: bool, agents) -> Choice:
    """``choose_agent`` with its explanation, for a ticket of ``tier`` needing ``required_skills``
    (``relaxed``: skills relaxed). Also used to explain, when it is read, a decision recorded
    only as a step of a dispatch round's plan (see ``agents_at_step``)."""
    eligible, candidates, not_in_tier = [], [], 0
    for agent in agents:
        if tier not in agent.tiers:
            not_in_tier += 1
            continue
        reason, missing = _exclusion(agent, required_skills, relaxed)
        if reason is None:
            eligible.append(agent)
        else:
            candidates.append(Candidate(agent.id, reason, missing, agent.load, agent.capacity, agent.idle_since))
    eligible.sort(key=_preference)
    ranked = [Candidate(agent.id, None, (), agent.load, agent.capacity, agent.idle_since, rank)
              for rank, agent in enumerate(eligible, start=1)]
    candidates.sort(key=lambda c: c.agent_id)
    return Choice(eligible[0].id if eligible else None, tuple(ranked + candidates), relaxed, not_in_tier)


def agents_at_step(agents, plan: list, step: int, planned_at: datetime) -> list:
    """The agents as a dispatch round's plan had them when it chose for its step ``step``:
    ``agents`` as the round read them, and ``plan`` the agent chosen at each step, whose load
    each choice raised by one (and whose idle time it ended at ``planned_at``), as
    ``plan_drain`` does."""
    raised = {}
    for agent_id in plan[:step]:
        raised[agent_id] = raised.get(agent_id, 0) + 1
    return [AgentState(a.id, a.tiers, a.skills, a.presence, a.capacity, a.load + raised[a.id], planned_at)
            if a.id in raised else a for a in agents]


# --- the waiting queue ------------------------------------------------------------------------

def effective_rank(ticket: QueuedTicket, now: datetime, aging_seconds: float | None) -> int:
    """The priority rank, raised one level per ``aging_seconds`` waited, up to critical."""
    rank = PRIORITY_RANK[ticket.priority]
    if aging_seconds:
        waited = (now - ticket.queued_at).total_seconds()
        if waited > 0:
            rank += int(waited // aging_seconds)
    return min(rank, MAX_RANK)


def queue_key(ticket: QueuedTicket, now: datetime, aging_seconds: float | None):
    return (-effective_rank(ticket, now, aging_seconds), ticket.sla_due_at or _FAR_FUTURE,
            ticket.created_at, ticket.ticket_id)


def order_queue(tickets, now: datetime, aging_seconds: float | None) -> list:
    return sorted(tickets, key=lambda t: queue_key(t, now, aging_seconds))


def next_ticket_for(agent: AgentState, queue, now: datetime, aging_seconds: float | None,
                    relax_after_seconds: float | None = None) -> QueuedTicket | None:
    """The first ticket in queue order that ``agent`` may take (None: none, or agent not free).

    It scans a tier's whole queue for every freed slot, so rather than build ``queue_key`` for
    each ticket it compares the key's fields one by one, and it skips the aged priority of a
    ticket that is behind the best so far on the rest of the key while the best is critical.
    """
    if agent.presence != "online" or agent.load >= agent.capacity:
        return None
    tiers, skills = agent.tiers, agent.skills
    best, best_rank, best_due, behind = None, None, None, False
    for ticket in queue:
        if ticket.tier not in tiers:
            continue
        required = ticket.required_skills
        if required and not required <= skills and not skills_relaxed(ticket, now, relax_after_seconds):
            continue
        due = ticket.sla_due_at or _FAR_FUTURE
        if best is not None:
            behind = due > best_due or (due == best_due and (ticket.created_at, ticket.ticket_id)
                                        >= (best.created_at, best.ticket_id))
            if behind and best_rank == MAX_RANK:
                continue  # its priority can at most tie the best's
        rank = effective_rank(ticket, now, aging_seconds)
        if best is not None and (rank < best_rank or (rank == best_rank and behind)):
            continue
        best, best_rank, best_due = ticket, rank, due
    return best


@dataclass
class Assignment:
    ticket: QueuedTicket
    agent_id: str


@dataclass
class DrainPlan:
    assignments: list = field(default_factory=list)


def plan_drain(queue, agents, now: datetime, aging_seconds: float | None,
               relax_after_seconds: float | None = None) -> DrainPlan:
    """Which queued tickets go to which free agents, in queue order.

    A ticket nobody free can take is skipped, not blocking those behind it (a ticket needing a
    rare skill must not hold up the tier). Loads are updated as the plan assigns, so one agent
    never receives more than their free slots.
    """
    free = {a.id: a for a in agents if a.presence == "online" and a.load < a.capacity}
    plan = DrainPlan()
    if not free:
        return plan
    for ticket in order_queue(queue, now, aging_seconds):
        choice = choose_agent(ticket, free.values(), now, relax_after_seconds, record=False)
        if choice.winner is None:
            continue
        agent = free[choice.winner]
        plan.assignments.append(Assignment(ticket, agent.id))
        agent = AgentState(agent.id, agent.tiers, agent.skills, agent.presence, agent.capacity,
                           agent.load + 1, now)
        if agent.load >= agent.capacity:
            del free[agent.id]
            if not free:
                break
        else:
            free[agent.id] = agent
    return plan


# --- what a change to a ticket means for routing -----------------------------------------------

FINISHED_STATUSES = ("solved", "closed")
# routing's states of a ticket (RoutedTicket.state)
TRIAGE, QUEUED, ASSIGNING, ASSIGNED, IDLE = ROUTING_STATES
ROUTABLE_STATES = (TRIAGE, QUEUED)


@dataclass(frozen=True)
class MirrorChange:
    state: str
    trigger: str | None = None       # route the ticket now, for this reason
    freed_agent: str | None = None   # this agent's load went down: pull from their queues
    unassign_first: bool = False     # the assignee cannot take it back: unassign, then route


def after_snapshot(prev_state: str | None, before_status: str | None, before_assignee: str | None,
                   status: str, assignee: str | None, assignee_online: bool) -> MirrorChange:
    """Routing's state once a newer ticket snapshot is applied (``prev_state`` None: first seen).

    * A ticket being claimed (``assigning``) keeps its claim: the claim's own confirmation decides.
    * Solved or closed: nothing to route. Assigned: the assignee has it, unless a solved ticket
      was reopened while its assignee is not online (then it is re-routed).
    * Unassigned and active (new/open): triage when first seen (rules run), else queued.
      Unassigned pending/on_hold: idle until the requester answers.
    """
    freed = None
    if before_assignee and counts_against_capacity(before_status or "") and (
            assignee != before_assignee or not counts_against_capacity(status)):
        freed = before_assignee
    if prev_state == ASSIGNING:
        return MirrorChange(ASSIGNING)
    if status in FINISHED_STATUSES:
        return MirrorChange(IDLE, freed_agent=freed)
    if assignee:
        reopened = before_status in FINISHED_STATUSES and counts_against_capacity(status)
        if reopened and not assignee_online:
            return MirrorChange(ASSIGNED, "reopened", freed, unassign_first=True)
        return MirrorChange(ASSIGNED, freed_agent=freed)
    if not counts_against_capacity(status):
        return MirrorChange(IDLE, freed_agent=freed)
    if prev_state in ROUTABLE_STATES:
        return MirrorChange(prev_state, freed_agent=freed)
    if prev_state is None:
        return MirrorChange(TRIAGE, "created")
    trigger = "unassigned" if before_assignee else "reopened"
    return MirrorChange(QUEUED, trigger, freed)
