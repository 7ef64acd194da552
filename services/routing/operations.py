"""What the routing RPCs and ticket events do to routing's tables, on a session the caller commits.

Nothing here talks to another service: ``router.py`` orchestrates the calls to tickets around
these transactions.
"""
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache

from sqlalchemy import Text, bindparam, cast, event, func, insert, inspect as sa_inspect, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from contracts import routing as contract
from contracts.errors import Conflict, Forbidden, NotFound, PreconditionFailed, ValidationError
from contracts.events import iso_utc
from servicekit.actor import Actor  # noqa: F401  (operations.Actor for callers)
from servicekit.db import column_values
from servicekit.outbox import add_event
from services.routing import domain
from services.routing.models import Agent, AgentSnapshot, Decision, RoutedTicket, Rule, Skill

# routing acts on tickets under this identity (assign, unassign, escalation notes)
SYSTEM_ACTOR = {"id": "system:routing", "role": "supervisor", "organization_id": None, "org_wide": False}


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


def require_role(actor, roles, doing: str) -> None:
    if actor.role not in roles:
        raise Forbidden(f"{actor.role}s may not {doing}")


def _check_version(current: int, expected: int | None, what: str) -> None:
    if expected is not None and current != expected:
        raise PreconditionFailed(f"the {what} changed since you read it (version {current}, you sent {expected})",
                                 {"version": [f"current version is {current}"]})


def _unknown_skills(session: Session, names, field: str) -> None:
    names = set(names)
    if not names:
        return
    known = set(session.scalars(select(Skill.name).where(Skill.name.in_(names))))
    unknown = sorted(names - known)
    if unknown:
        raise ValidationError(f"unknown skills {unknown}: define them first (POST /v1/routing/skills)",
                              {field: [f"unknown skill: {name}" for name in unknown]})


# --- skills ---------------------------------------------------------------------------------------

def skill_view(skill: Skill) -> dict:
    return {"name": skill.name, "description": skill.description, "created_at": iso_utc(skill.created_at)}


def create_skill(session: Session, actor, data: dict) -> dict:
    require_role(actor, contract.MANAGE_AGENT_ROLES, "define skills")
    if session.get(Skill, data["name"]) is not None:
        raise Conflict(f"skill {data['name']!r} already exists", {"name": ["already exists"]})
    skill = Skill(name=data["name"], description=data.get("description"), created_at=now_utc())
    session.add(skill)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"skill {data['name']!r} already exists", {"name": ["already exists"]})
    return skill_view(skill)


def list_skills(session: Session, actor) -> dict:
    require_role(actor, contract.READ_ROLES, "read skills")
    return {"items": [skill_view(s) for s in session.scalars(select(Skill).order_by(Skill.name))]}


# --- agents ---------------------------------------------------------------------------------------

def recount_loads(session: Session) -> dict:
    """Active tickets per agent counted from the mirror: what ``agents.active_load`` must equal
    (tests and the consistency check use it; the hot path reads the counter)."""
    return dict(session.execute(
        select(RoutedTicket.assignee_id, func.count())
        .where(RoutedTicket.assignee_id.is_not(None), RoutedTicket.status.in_(contract.ACTIVE_STATUSES))
        .group_by(RoutedTicket.assignee_id)).all())


def agent_load(session: Session, agent_id: str) -> int:
    return session.scalar(select(Agent.active_load).where(Agent.id == agent_id)) or 0


def _counted_by(assignee_id: str | None, status: str | None) -> str | None:
    return assignee_id if assignee_id and domain.counts_against_capacity(status or "") else None


def set_assignment(session: Session, row: RoutedTicket, assignee_id: str | None, status: str) -> None:
    """The one way a mirrored ticket's assignee or status changes: moves the active-ticket count
    between agents in the same transaction (the caller holds the ticket row's lock). The counts
    are written when the transaction commits (``_write_load_changes``)."""
    before, after = _counted_by(row.assignee_id, row.status), _counted_by(assignee_id, status)
    if before != after:
        changes = session.info.setdefault(_LOAD_CHANGES, {})
        for agent_id, delta in ((before, -1), (after, 1)):
            if agent_id is not None:
                changes[agent_id] = changes.get(agent_id, 0) + delta
    row.assignee_id, row.status = assignee_id, status


# agent id -> change of its active_load, kept on the session until the commit
_LOAD_CHANGES = "routing.agent_load_changes"


@event.listens_for(Session, "before_commit")
def _write_load_changes(session: Session) -> None:
    """The agents' counts a transaction changed, written last and in agent id order. A batch of
    ticket events locks its tickets in id order; had it updated each ticket's agents as it went,
    the agents' rows would have been locked in ticket order, and two such transactions on
    PostgreSQL could each hold an agent the other waits for (a deadlock, detected after a
    second). Now every transaction locks tickets, then agents, each in id order, as claims do."""
    changes = session.info.pop(_LOAD_CHANGES, None)
    if not changes:
        return
    session.flush()  # the tickets' rows before the agents'
    for agent_id in sorted(changes):
        if changes[agent_id]:  # moved away and back within the transaction: nothing to write
            session.execute(update(Agent).where(Agent.id == agent_id)
                            .values(active_load=Agent.active_load + changes[agent_id]))


@event.listens_for(Session, "after_rollback")
def _forget_load_changes(session: Session) -> None:
    session.info.pop(_LOAD_CHANGES, None)


def reconcile_loads(session: Session) -> dict:
    """Set any agent's ``active_load`` that differs from a recount of the mirror (an agent
    registered while a ticket was being assigned to that id can miss it); returns
    {agent_id: (was, now)}. Each drifted agent's row is locked (the write lock on SQLite)
    before its recount, so a change in flight is counted once: before, or after."""
    counts = recount_loads(session)
    drifted = sorted(agent_id for agent_id, load in session.execute(select(Agent.id, Agent.active_load))
                     if load != counts.get(agent_id, 0))
    fixed = {}
    for agent_id in drifted:
        was = session.execute(update(Agent).where(Agent.id == agent_id).values(claim_seq=Agent.claim_seq)
                              .returning(Agent.active_load)).scalar_one_or_none()
        now = recount_loads_of(session, agent_id)
        if was is not None and was != now:
            session.execute(update(Agent).where(Agent.id == agent_id).values(active_load=now))
            fixed[agent_id] = (was, now)
    return fixed


def lock_ticket(session: Session, ticket_id: str) -> None:
    """Take the ticket row's lock (PostgreSQL) or the write lock (SQLite) before reading it, so
    what the transaction then reads cannot change under it (pysqlite reads before the first
    write outside any transaction)."""
    session.execute(update(RoutedTicket).where(RoutedTicket.ticket_id == ticket_id)
                    .values(updated_at=now_utc()))


def _sqlite_write_lock(session: Session, ticket_id: str) -> None:
    """On SQLite, take the database's write lock before reading what a batch will change (FOR
    UPDATE is not SQLite's: any write locks, this one changes nothing); elsewhere nothing."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(RoutedTicket).where(RoutedTicket.ticket_id == ticket_id)
                        .values(updated_at=RoutedTicket.updated_at))


_TICKETS, _AGENTS, _DECISIONS = RoutedTicket.__table__, Agent.__table__, Decision.__table__


def lock_claim_states(session: Session, ticket_ids) -> dict:
    """Lock these tickets' rows in id order (PostgreSQL: two batches never wait on each other
    in a cycle) or take SQLite's write lock, reading only what a confirmation checks:
    {ticket_id: (state, claim_decision_id, assignee_id, status, ticket_version)}."""
    ids = sorted(set(ticket_ids))
    if not ids:
        return {}
    _sqlite_write_lock(session, ids[0])
    return {ticket_id: tuple(rest) for ticket_id, *rest in session.execute(
        select(_TICKETS.c.ticket_id, _TICKETS.c.state, _TICKETS.c.claim_decision_id, _TICKETS.c.assignee_id,
               _TICKETS.c.status, _TICKETS.c.ticket_version)
        .where(_TICKETS.c.ticket_id.in_(ids)).order_by(_TICKETS.c.ticket_id).with_for_update())}


def confirms_plainly(state: tuple, claim_decision_id: str, view: dict) -> bool:
    """Whether the tickets service's answer to a won claim is the plain outcome: the ticket is
    still being claimed by that decision, the answer is newer than the mirror, names the claimed
    agent, and the ticket stays active. ``apply_snapshot`` would then only copy the snapshot's
    fields and end the claim (no load moves, nothing to route): ``confirm_plainly`` does that
    without loading the row."""
    row_state, row_decision, row_assignee, row_status, row_version = state
    return (row_state == domain.ASSIGNING and row_decision == claim_decision_id
            and type(view.get("version")) is int and view["version"] > row_version
            and view.get("assignee_id") == row_assignee and row_assignee is not None
            and domain.counts_against_capacity(row_status or "")
            and domain.counts_against_capacity(view.get("status") or ""))


_CONFIRM_PLAIN = (update(_TICKETS).where(_TICKETS.c.ticket_id == bindparam("b_ticket_id"))
                  .values(state=domain.ASSIGNED, queued_at=None, queue_trigger=None,
                          number=bindparam("b_number"), subject=bindparam("b_subject"),
                          priority=bindparam("b_priority"), category=bindparam("b_category"),
                          channel=bindparam("b_channel"), organization_id=bindparam("b_organization_id"),
                          tags=bindparam("b_tags"), ticket_version=bindparam("b_version"),
                          status=bindparam("b_status"), updated_at=bindparam("b_now")))
_CONFIRM_PLAIN_CLEARING = _CONFIRM_PLAIN.values(pending_changes=None)


def confirm_plainly(session: Session, confirmed: list) -> None:
    """``(ticket_id, view, clears_pending_changes)`` of claims that passed ``confirms_plainly``:
    each ticket takes its answer's snapshot and is assigned, in one statement per kind."""
    now = now_utc()
    for clearing, statement in ((False, _CONFIRM_PLAIN), (True, _CONFIRM_PLAIN_CLEARING)):
        rows = [{"b_ticket_id": ticket_id, "b_number": view["number"], "b_subject": view["subject"],
                 "b_priority": view["priority"], "b_category": view.get("category"), "b_channel": view["channel"],
                 "b_organization_id": view.get("organization_id"), "b_tags": list(view.get("tags") or []),
                 "b_version": view["version"], "b_status": view["status"], "b_now": now}
                for ticket_id, view, clears in confirmed if clears is clearing]
        if rows:
            session.execute(statement, rows)


_MARK_CLAIMED = (update(_TICKETS).where(_TICKETS.c.ticket_id == bindparam("b_ticket_id"))
                 .values(state=domain.ASSIGNING, assignee_id=bindparam("b_agent_id"),
                         claim_decision_id=bindparam("b_decision_id"), claimed_at=bindparam("b_now"),
                         updated_at=bindparam("b_now")))


def lock_claimable(session: Session, ticket_ids) -> list:
    """Lock these tickets (id order; SQLite: the write lock) and return (ticket_id, tier) of
    those a claim may still take: queued, unassigned, active. On PostgreSQL a ticket whose row
    another transaction holds (another router's claim, an event being mirrored) is skipped, not
    waited for: the claim counts it as a lost race and the next round reads it again."""
    ids = sorted(set(ticket_ids))
    if not ids:
        return []
    _sqlite_write_lock(session, ids[0])
    return list(session.execute(
        select(_TICKETS.c.ticket_id, _TICKETS.c.tier)
        .where(_TICKETS.c.ticket_id.in_(ids), _TICKETS.c.state == domain.QUEUED, _TICKETS.c.assignee_id.is_(None),
               _TICKETS.c.status.in_(contract.ACTIVE_STATUSES))
        .order_by(_TICKETS.c.ticket_id).with_for_update(skip_locked=True)).all())


# built once: a claim batch runs it once per agent, and building it each time (its cache key
# included) cost more than the UPDATE itself
_TAKE_SLOTS = (update(_AGENTS).where(_AGENTS.c.id == bindparam("b_agent_id"), _AGENTS.c.presence == "online",
                                     _AGENTS.c.active_load + bindparam("b_count") <= _AGENTS.c.capacity)
               .values(active_load=_AGENTS.c.active_load + bindparam("b_count"),
                       claim_seq=_AGENTS.c.claim_seq + bindparam("b_count"), last_assigned_at=bindparam("b_now")))


def take_slots(session: Session, agent_id: str, count: int, now: datetime) -> bool:
    """Take ``count`` of an online agent's free slots at once, or none (one atomic UPDATE)."""
    return bool(session.execute(_TAKE_SLOTS, {"b_agent_id": agent_id, "b_count": count, "b_now": now}).rowcount)


def mark_claimed(session: Session, claims, now: datetime) -> None:
    """(ticket_id, agent_id, decision_id) rows, locked by ``lock_claimable``: now assigning."""
    session.execute(_MARK_CLAIMED, [{"b_ticket_id": ticket_id, "b_agent_id": agent_id, "b_decision_id": decision_id,
                                     "b_now": now} for ticket_id, agent_id, decision_id in claims])


# built once: building the statement (its cache key) cost more than the INSERT of one row
_INSERT_DECISIONS = _DECISIONS.insert()


def insert_decisions(session: Session, rows: list) -> None:
    if rows:
        session.execute(_INSERT_DECISIONS, rows)


def confirm_decisions(session: Session, decision_ids) -> set:
    """``assigning -> assigned`` for these decisions; the ids that were still assigning."""
    ids = list(decision_ids)
    if not ids:
        return set()
    return set(session.scalars(update(_DECISIONS).where(_DECISIONS.c.id.in_(ids),
                                                        _DECISIONS.c.outcome == "assigning")
                               .values(outcome="assigned").returning(_DECISIONS.c.id)))


def agent_view(agent: Agent, load: int) -> dict:
    return {
        "id": agent.id, "display_name": agent.display_name, "tiers": agent.tiers, "skills": agent.skills,
        "languages": agent.languages, "groups": agent.groups, "capacity": agent.capacity,
        "presence": agent.presence, "presence_changed_at": iso_utc(agent.presence_changed_at),
        "active_tickets": load, "last_assigned_at": iso_utc(agent.last_assigned_at),
        "version": agent.version, "created_at": iso_utc(agent.created_at), "updated_at": iso_utc(agent.updated_at),
    }


# tiers and skills as their stored JSON text: decoded once per distinct value, not per decision
_AGENT_STATE_COLUMNS = select(Agent.id, cast(Agent.tiers, Text), cast(Agent.skills, Text), Agent.presence,
                              Agent.capacity, Agent.active_load, Agent.last_assigned_at)
_DECODED: dict = {}


def _remember(cache: dict, key, value, limit: int):
    """``value`` kept under ``key`` in one of this module's memo dicts (read with ``get``), the
    dict emptied first once it holds more than ``limit``: bounded, whatever ids come by."""
    if len(cache) > limit:
        cache.clear()
    cache[key] = value
    return value


def _decoded(raw: str, names_of=None) -> frozenset:
    """A JSON list column's text as a frozenset of names, decoded once per distinct text (the
    same few tier and skill lists repeat across agents and tickets). ``names_of``: how to take a
    name from an item (skills are objects with a name); plain strings otherwise."""
    key = (names_of is not None, raw)
    decoded = _DECODED.get(key)
    if decoded is None:
        items = json.loads(raw)
        decoded = _remember(_DECODED, key, frozenset(map(names_of, items) if names_of else items), 20_000)
    return decoded


def _skill_name(skill: dict) -> str:
    return skill["name"]


# an agent's row -> its AgentState: every dispatch round reads every agent, and between two
# rounds most rows are unchanged (only the agents just assigned have a new load)
_AGENT_STATES: dict = {}


def agent_states(session: Session) -> list:
    """Every agent as the chooser sees it (plain columns: no ORM objects on the hot path)."""
    states = []
    for row in session.execute(_AGENT_STATE_COLUMNS):
        key = tuple(row)
        state = _AGENT_STATES.get(key)
        if state is None:
            id_, tiers, skills, presence, capacity, load, last_assigned_at = key
            state = _remember(_AGENT_STATES, key, domain.AgentState(id_, _decoded(tiers), _decoded(skills, _skill_name),
                                                                    presence, capacity, load, last_assigned_at),
                              50_000)
        states.append(state)
    return states


def _get_agent(session: Session, agent_id: str, for_update: bool = False) -> Agent:
    agent = session.get(Agent, agent_id, with_for_update=for_update or None)
    if agent is None:
        raise NotFound(f"no agent {agent_id!r}; an admin or supervisor creates agents (POST /v1/agents)")
    return agent


def create_agent(session: Session, actor, data: dict) -> dict:
    require_role(actor, contract.MANAGE_AGENT_ROLES, "manage agents")
    _unknown_skills(session, [s["name"] for s in data["skills"]], "skills")
    if session.get(Agent, data["id"]) is not None:
        raise Conflict(f"agent {data['id']!r} already exists", {"id": ["already exists"]})
    now = now_utc()
    agent = Agent(id=data["id"], display_name=data["display_name"], tiers=data["tiers"], skills=data["skills"],
                  languages=data["languages"], groups=data["groups"], capacity=data["capacity"],
                  presence="offline", presence_changed_at=now, last_assigned_at=None, version=1, claim_seq=0,
                  active_load=recount_loads_of(session, data["id"]), created_at=now, updated_at=now)
    session.add(agent)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"agent {data['id']!r} already exists", {"id": ["already exists"]})
    return agent_view(agent, 0)


def recount_loads_of(session: Session, agent_id: str) -> int:
    """Tickets already assigned to this id (by hand, before the agent was registered)."""
    return session.scalar(select(func.count()).select_from(RoutedTicket).where(
        RoutedTicket.assignee_id == agent_id, RoutedTicket.status.in_(contract.ACTIVE_STATUSES))) or 0


def _may_read_agent(actor, agent_id: str) -> None:
    if actor.role not in contract.READ_ROLES and actor.id != agent_id:
        raise Forbidden(f"{actor.role}s may not read agents")


def get_agent(session: Session, actor, agent_id: str) -> dict:
    _may_read_agent(actor, agent_id)
    agent = _get_agent(session, agent_id)
    return agent_view(agent, agent.active_load)


def list_agents(session: Session, actor, filters: dict) -> dict:
    require_role(actor, contract.READ_ROLES, "read agents")
    items = []
    for agent in session.scalars(select(Agent).order_by(Agent.id)):
        if "tier" in filters and filters["tier"] not in agent.tiers:
            continue
        if "presence" in filters and agent.presence != filters["presence"]:
            continue
        if "skill" in filters and filters["skill"] not in {s["name"] for s in agent.skills}:
            continue
        items.append(agent_view(agent, agent.active_load))
    return {"items": items}


def update_agent(session: Session, actor, agent_id: str, changes: dict, expected_version: int | None) -> dict:
    """Returns the agent view; capacity, tiers or skills changes may let queued tickets through."""
    require_role(actor, contract.MANAGE_AGENT_ROLES, "manage agents")
    if not changes:
        raise ValidationError("nothing to update", {"_schema": ["send at least one field"]})
    agent = _get_agent(session, agent_id, for_update=True)
    _check_version(agent.version, expected_version, "agent")
    if "skills" in changes:
        _unknown_skills(session, [s["name"] for s in changes["skills"]], "skills")
    changed = {k: v for k, v in changes.items() if getattr(agent, k) != v}
    if changed:
        for key, value in changed.items():
            setattr(agent, key, value)
        agent.version += 1
        agent.updated_at = now_utc()
        session.flush()
    return agent_view(agent, agent.active_load)


def set_presence(session: Session, actor, agent_id: str, presence: str) -> tuple[dict, str]:
    """Returns (agent view, previous presence). Agents set their own; supervisors anyone's."""
    if actor.id != agent_id:
        require_role(actor, contract.MANAGE_AGENT_ROLES, "set another agent's presence")
    elif actor.role not in contract.ESCALATE_ROLES:
        raise Forbidden(f"{actor.role}s have no presence")
    agent = _get_agent(session, agent_id, for_update=True)
    previous = agent.presence
    if previous != presence:
        now = now_utc()
        agent.presence, agent.presence_changed_at = presence, now
        agent.version += 1
        agent.updated_at = now
        session.flush()
        add_event(session, contract.SERVICE, contract.AGENT_PRESENCE_CHANGED, {"agent_id": agent.id}, {
            "agent_id": agent.id, "presence": presence, "previous": previous, "tiers": agent.tiers})
    return agent_view(agent, agent.active_load), previous


def active_tickets_of(session: Session, agent_id: str) -> list:
    return list(session.scalars(select(RoutedTicket.ticket_id).where(
        RoutedTicket.assignee_id == agent_id, RoutedTicket.status.in_(contract.ACTIVE_STATUSES),
        RoutedTicket.state == domain.ASSIGNED)))


def agent_tiers(session: Session, agent_id: str) -> list:
    agent = session.get(Agent, agent_id)
    return list(agent.tiers) if agent is not None else []


# --- rules ----------------------------------------------------------------------------------------

def rule_view(rule: Rule) -> dict:
    return {"id": rule.id, "name": rule.name, "position": rule.position, "enabled": rule.enabled,
            "match": rule.match, "conditions": rule.conditions, "actions": rule.actions, "stop": rule.stop,
            "version": rule.version, "created_at": iso_utc(rule.created_at), "updated_at": iso_utc(rule.updated_at)}


def _rule_fields(session: Session, data: dict) -> dict:
    _unknown_skills(session, data["actions"].get("require_skills", []), "actions.require_skills")
    position = data.get("position")
    if position is None:
        last = session.scalar(select(func.max(Rule.position)))
        position = 0 if last is None else last + 10
    return {"name": data["name"], "position": position, "enabled": data["enabled"],
            "match": data["match"], "conditions": data["conditions"], "actions": data["actions"],
            "stop": data["stop"]}


def _get_rule(session: Session, rule_id: str, for_update: bool = False) -> Rule:
    rule = session.get(Rule, rule_id, with_for_update=for_update or None) if _is_uuid(rule_id) else None
    if rule is None:
        raise NotFound(f"no routing rule {rule_id!r}")
    return rule


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


def create_rule(session: Session, actor, data: dict) -> dict:
    require_role(actor, contract.MANAGE_RULE_ROLES, "manage routing rules")
    count = session.scalar(select(func.count()).select_from(Rule))
    if count >= contract.MAX_RULES:
        raise Conflict(f"at most {contract.MAX_RULES} rules; delete unused ones first")
    now = now_utc()
    rule = Rule(id=new_id(), version=1, created_at=now, updated_at=now, **_rule_fields(session, data))
    session.add(rule)
    session.flush()
    return rule_view(rule)


def get_rule(session: Session, actor, rule_id: str) -> dict:
    require_role(actor, contract.READ_ROLES, "read routing rules")
    return rule_view(_get_rule(session, rule_id))


def list_rules(session: Session, actor) -> dict:
    require_role(actor, contract.READ_ROLES, "read routing rules")
    return {"items": [rule_view(r) for r in session.scalars(select(Rule).order_by(Rule.position, Rule.id))]}


def update_rule(session: Session, actor, rule_id: str, data: dict, expected_version: int | None) -> dict:
    require_role(actor, contract.MANAGE_RULE_ROLES, "manage routing rules")
    rule = _get_rule(session, rule_id, for_update=True)
    _check_version(rule.version, expected_version, "rule")
    if data.get("position") is None:  # a replacement without a position keeps the rule's place
        data = {**data, "position": rule.position}
    for key, value in _rule_fields(session, data).items():
        setattr(rule, key, value)
    rule.version += 1
    rule.updated_at = now_utc()
    session.flush()
    return rule_view(rule)


def delete_rule(session: Session, actor, rule_id: str, expected_version: int | None) -> None:
    require_role(actor, contract.MANAGE_RULE_ROLES, "manage routing rules")
    rule = _get_rule(session, rule_id, for_update=True)
    _check_version(rule.version, expected_version, "rule")
    session.delete(rule)


# (database, fingerprint of the rules table) -> the enabled rules: every new ticket is triaged
# against them, and they change rarely
_ENABLED_RULES: dict = {}


def enabled_rules(session: Session) -> list:
    """The enabled rules in order (read-only views). Every rule's id and version are read every
    time and the rules themselves only when those changed, so a change made through any
    replica applies to the next ticket everywhere."""
    # every rule's id and version: a few hundred short rows at most, and exact (a deletion and
    # a creation cannot cancel out, whatever the clocks of the replicas that wrote them)
    fingerprint = (str(session.get_bind().url),
                   tuple(session.execute(select(Rule.id, Rule.version).order_by(Rule.id)).all()))
    cached = _ENABLED_RULES.get(fingerprint)
    if cached is None:
        cached = [rule_view(r) for r in session.scalars(select(Rule).where(Rule.enabled.is_(True))
                                                        .order_by(Rule.position, Rule.id))]
        if len(_ENABLED_RULES) > 100:
            _ENABLED_RULES.clear()
        _ENABLED_RULES[fingerprint] = cached
    return cached


# --- the ticket mirror ------------------------------------------------------------------------------

def _parse_time(value) -> datetime:
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def get_routed(session: Session, ticket_id: str, for_update: bool = False) -> RoutedTicket | None:
    return session.get(RoutedTicket, ticket_id, with_for_update=for_update or None)


def mirrored_ids(session: Session, ticket_ids) -> set:
    """The ones of these tickets routing mirrors already: a plain existence check, much cheaper
    than loading the rows (a ticket_created is nearly always the first routing hears of its
    ticket)."""
    ids = list(ticket_ids)
    if not ids:
        return set()
    return set(session.scalars(select(RoutedTicket.ticket_id).where(RoutedTicket.ticket_id.in_(ids))))


# ticket id -> a version this process saw committed to the mirror (the database holds it or a
# newer one: a mirrored version never goes down), or one the mirror is sure to hold (see
# remember_answered_version), so the events echoing routing's own assignments are recognised as
# stale without a read
_COMMITTED_VERSIONS: dict = {}
_COMMITTED_VERSIONS_MAX = 50_000


def remember_committed_version(ticket_id: str, version: int) -> None:
    """Call only after the transaction that mirrored ``version`` committed."""
    if len(_COMMITTED_VERSIONS) >= _COMMITTED_VERSIONS_MAX:
        _COMMITTED_VERSIONS.clear()
    if version > _COMMITTED_VERSIONS.get(ticket_id, -1):
        _COMMITTED_VERSIONS[ticket_id] = version


def remember_answered_version(ticket_id: str, version: int) -> None:
    """The tickets service answered one of this process's assignments with this version of the
    ticket: the events of that assignment carry nothing the mirror will not hold. Its
    confirmation applies the answer; if that fails, the claim stays "assigning" and the sweeper
    delivers it again and applies the new answer (the same version or a newer one); and a claim
    released meanwhile was overtaken by a newer version the mirror holds already. So those
    events are acked from memory as they arrive, rather than mirrored in a batch of their own
    just before the confirmation does the same (they often arrive first: the answer waits for
    the confirmation's turn, the events do not)."""
    remember_committed_version(ticket_id, version)


def forget_answered_version(ticket_id: str, version: int) -> None:
    """The confirmation that was to mirror an answered version failed for good: its events,
    those still to come, must be mirrored again (a claim still "assigning" is delivered again by
    the sweeper anyway)."""
    if _COMMITTED_VERSIONS.get(ticket_id) == version:
        del _COMMITTED_VERSIONS[ticket_id]


def snapshot_known_stale(snapshot: dict) -> bool:
    """From memory only: this process saw this version of the ticket, or a newer one, committed."""
    return snapshot["version"] <= _COMMITTED_VERSIONS.get(snapshot["id"], -1)


def mirrored_versions(session: Session, ticket_ids) -> dict:
    """ticket id -> the version routing mirrors of it (for the ids it mirrors at all): with it,
    the events echoing routing's own assignments are acked without a write transaction. Each
    id counts as the version this process saw committed if that is newer (no read for those
    that are all known)."""
    versions = {ticket_id: _COMMITTED_VERSIONS[ticket_id] for ticket_id in ticket_ids
                if ticket_id in _COMMITTED_VERSIONS}
    unknown = [ticket_id for ticket_id in ticket_ids if ticket_id not in versions]
    if unknown:
        for ticket_id, version in session.execute(
                select(RoutedTicket.ticket_id, RoutedTicket.ticket_version).where(RoutedTicket.ticket_id.in_(unknown))):
            versions[ticket_id] = version
    return versions


def apply_snapshot(session: Session, snapshot: dict, row: RoutedTicket | None = None, flush: bool = True,
                   resync: bool = False, created: bool = False,
                   mirrored: bool | None = None) -> tuple[RoutedTicket, domain.MirrorChange | None]:
    """Mirror a ticket snapshot (an event's or an RPC answer's) if it is newer than what we hold.
    ``row``: the ticket's row when the caller already holds it locked; ``flush=False``: the
    caller writes many rows and lets the commit flush them together; ``resync``: apply the
    version the mirror already holds too (its assignee may have been held for a claim);
    ``created``: a ticket_created's snapshot, nearly always new to routing: looked up with an
    existence check first (the row is loaded only when there is one), and a new row is not
    added to the session: the caller writes it with ``insert_routed`` once it is done changing
    it (one INSERT, without the unit of work); ``mirrored``: that check's answer, if the caller
    made it for many tickets at once (``mirrored_ids``).

    Returns the row and what the change means for routing (None: stale or duplicate snapshot).
    """
    if created and mirrored is None:
        mirrored = snapshot["id"] in mirrored_ids(session, [snapshot["id"]])
    if row is None and not (created and not mirrored):
        row = get_routed(session, snapshot["id"], for_update=True)
    now = now_utc()
    if row is not None and (snapshot["version"] < row.ticket_version
                            or snapshot["version"] == row.ticket_version and not resync):
        return row, None
    if row is None:
        before_status = before_assignee = prev_state = None
        group = snapshot.get("group")
        row = RoutedTicket(ticket_id=snapshot["id"], tier=group if group in contract.TIERS else contract.TIERS[0],
                           required_skills=[], state=domain.IDLE, queue_noted=False, assignee_id=None, status=None,
                           ticket_created_at=_parse_time(snapshot["created_at"]))
        if not created:
            session.add(row)
    else:
        before_status, before_assignee, prev_state = row.status, row.assignee_id, row.state
    assignee = snapshot.get("assignee_id")
    if prev_state == domain.ASSIGNING and assignee and assignee != row.assignee_id:
        # someone else assigned the ticket while our claim was in flight: theirs stands, our
        # claim is released (its confirmation and any re-delivery stop at the decision row)
        session.execute(update(Decision).where(Decision.id == row.claim_decision_id,
                                               Decision.outcome == "assigning")
                        .values(outcome="released", detail=f"assigned to {assignee} meanwhile"))
        prev_state = domain.ASSIGNED
    # presence matters only for a reopened ticket (after_snapshot): read it only then
    reopened = (before_status in domain.FINISHED_STATUSES and assignee
                and domain.counts_against_capacity(snapshot["status"]))
    online = bool(reopened) and session.scalar(select(Agent.presence).where(Agent.id == assignee)) == "online"
    change = domain.after_snapshot(prev_state, before_status, before_assignee, snapshot["status"], assignee, online)
    row.number, row.subject = snapshot["number"], snapshot["subject"]
    row.priority, row.category, row.channel = snapshot["priority"], snapshot.get("category"), snapshot["channel"]
    row.organization_id, row.tags = snapshot.get("organization_id"), list(snapshot.get("tags") or [])
    row.ticket_version, row.updated_at = snapshot["version"], now
    # a ticket being claimed keeps the claimed agent until the claim is confirmed or released;
    # not autoflushed by the agents' UPDATE: a new row has no status until this sets it
    with session.no_autoflush:
        set_assignment(session, row, row.assignee_id if change.state == domain.ASSIGNING else assignee,
                       snapshot["status"])
    if change.state in domain.ROUTABLE_STATES and row.state != change.state:
        row.queued_at, row.queue_trigger, row.queue_noted = now, change.trigger, False
    elif change.state not in domain.ROUTABLE_STATES + (domain.ASSIGNING,):
        row.queued_at, row.queue_trigger = None, None
    row.state = change.state
    if flush:
        session.flush()
    return row, change


_INSERT_ROUTED = RoutedTicket.__table__.insert()


def is_unsaved(row: RoutedTicket) -> bool:
    return sa_inspect(row).transient


def insert_routed(session: Session, rows: list) -> None:
    """INSERT rows ``apply_snapshot(created=True)`` built, as they stand now (one Core
    statement built once, for all of them: most tickets routing hears of are new, and the unit
    of work's flush of one object cost more than the rest of mirroring it). The objects stay
    outside the session."""
    if rows:
        session.execute(_INSERT_ROUTED, [column_values(row) for row in rows])


@dataclass(frozen=True)
class QueueEntry:
    """A queued ticket as the dispatcher needs it: the chooser's view, why it was queued,
    whether its waiting was already recorded, and the rules' changes not yet delivered."""
    ticket: domain.QueuedTicket
    trigger: str | None
    noted: bool
    changes: dict | None


# plain columns (no ORM objects): the whole queue is read for each dispatch round
_QUEUE_COLUMNS = select(RoutedTicket.ticket_id, RoutedTicket.tier, RoutedTicket.priority,
                        cast(RoutedTicket.required_skills, Text), RoutedTicket.ticket_created_at,
                        RoutedTicket.queued_at, RoutedTicket.sla_due_at, RoutedTicket.queue_trigger,
                        RoutedTicket.queue_noted, RoutedTicket.pending_changes)


_QUEUED = _QUEUE_COLUMNS.where(RoutedTicket.state == domain.QUEUED, RoutedTicket.status.in_(contract.ACTIVE_STATUSES))
# built once, the two reads every dispatch round makes: building the statement (its cache key)
# took 150 of the 200 us such a read of an empty queue takes
_QUEUED_UNNOTED = _QUEUED.where(RoutedTicket.queue_noted.is_(False))


def queue_entries(session: Session, tiers=None, ticket_ids=None, unnoted_only: bool = False) -> list:
    """The queued (and active) tickets of ``tiers``, or of ``ticket_ids``, as QueueEntry."""
    if tiers is not None and set(contract.TIERS) <= set(tiers):
        tiers = None  # every ticket is in one of the tiers
    if ticket_ids is None and tiers is None:
        query = _QUEUED_UNNOTED if unnoted_only else _QUEUED
    else:
        query = _QUEUED
        if tiers is not None:
            query = query.where(RoutedTicket.tier.in_(list(tiers)))
        if ticket_ids is not None:
            query = query.where(RoutedTicket.ticket_id.in_(list(ticket_ids)))
        if unnoted_only:
            query = query.where(RoutedTicket.queue_noted.is_(False))
    return [QueueEntry(domain.QueuedTicket(ticket_id, tier, priority, _decoded(skills), created_at,
                                           queued_at or created_at, sla_due_at),
                       trigger, bool(noted), changes or None)
            for ticket_id, tier, priority, skills, created_at, queued_at, sla_due_at, trigger, noted, changes
            in session.execute(query)]


def pending_changes_before(session: Session, before: datetime) -> list:
    """(ticket_id, pending_changes) of tickets whose rules' changes are still undelivered, not
    touched since ``before`` and not riding with a claim in flight."""
    return list(session.execute(
        select(RoutedTicket.ticket_id, RoutedTicket.pending_changes)
        .where(RoutedTicket.pending_changes.is_not(None), RoutedTicket.state != domain.ASSIGNING,
               RoutedTicket.updated_at < before)).all())


def set_sla_due(session: Session, ticket_id: str, due_at: datetime | None) -> None:
    session.execute(update(RoutedTicket).where(RoutedTicket.ticket_id == ticket_id).values(sla_due_at=due_at))


# --- decisions ------------------------------------------------------------------------------------

@lru_cache(maxsize=4096)
def _iso_idle_since(moment: datetime | None) -> str | None:
    # every decision lists every agent of the tier, whose idle times rarely change between two
    return iso_utc(moment)


# A decision's candidates are stored as rows of these fields and read back as objects: a
# decision lists every agent of the tier, and as objects their keys were most of each record
# and of the time it took to encode it.
CANDIDATE_FIELDS = domain.Candidate._fields


def _candidate_row(candidate: domain.Candidate) -> list:
    return [candidate.agent_id, candidate.excluded, list(candidate.missing_skills), candidate.load,
            candidate.capacity, _iso_idle_since(candidate.idle_since), candidate.rank]


def _candidate_view(stored) -> dict:
    if isinstance(stored, dict):  # recorded before candidates were stored as rows
        return stored
    return dict(zip(CANDIDATE_FIELDS, stored))


def _not_in_tier_detail(detail: str | None, not_in_tier: int, tier: str) -> str | None:
    if not not_in_tier:
        return detail
    return ((detail + "; ") if detail else "") + f"{not_in_tier} agents outside tier {tier} not listed"


def decision_values(ticket_id: str, tier: str, required_skills: list, trigger: str, outcome: str,
                    choice: domain.Choice | None = None, agent_id: str | None = None, detail: str | None = None,
                    decision_id: str | None = None, agent_snapshot_id: str | None = None,
                    plan_step: int | None = None) -> dict:
    """A decision row's columns (for a bulk insert; ``new_decision`` for one ORM object).
    ``agent_snapshot_id``, ``plan_step``: of a dispatch round's decision, which is explained
    from the round's snapshot when read (its ``choice`` then lists no candidates)."""
    candidates = [_candidate_row(c) for c in choice.candidates] if choice else []
    return {"id": decision_id or new_id(), "ticket_id": ticket_id, "decided_at": now_utc(), "trigger": trigger,
            "tier": tier, "outcome": outcome, "agent_id": agent_id, "required_skills": list(required_skills),
            "skills_relaxed": bool(choice and choice.skills_relaxed), "candidates": candidates,
            "detail": _not_in_tier_detail(detail, choice.not_in_tier if choice else 0, tier),
            "agent_snapshot_id": agent_snapshot_id, "plan_step": plan_step}


def insert_agent_snapshot(session: Session, snapshot_id: str, planned_at: datetime, agents, plan: list,
                          agents_not_listed: int = 0) -> None:
    """A dispatch round's agents as it read them (those of the tiers it assigns in; the others
    counted), and its plan's agent per step (see ``domain.agents_at_step``): written once for
    all the round's decisions."""
    session.execute(_INSERT_AGENT_SNAPSHOT, {"id": snapshot_id, "planned_at": planned_at, "plan": plan,
                                             "agents": [_snapshot_row(agent) for agent in agents],
                                             "agents_not_listed": agents_not_listed})


_INSERT_AGENT_SNAPSHOT = AgentSnapshot.__table__.insert()
_SNAPSHOT_ROWS: dict = {}  # AgentState -> its row in a snapshot (most repeat from round to round)


def _snapshot_row(agent: domain.AgentState) -> tuple:
    row = _SNAPSHOT_ROWS.get(agent)
    if row is None:
        # tuples: a row is shared by every snapshot that holds the agent unchanged
        row = _remember(_SNAPSHOT_ROWS, agent, (agent.id, tuple(sorted(agent.tiers)), tuple(sorted(agent.skills)),
                                                agent.presence, agent.capacity, agent.load,
                                                _iso_idle_since(agent.idle_since)), 50_000)
    return row


def _snapshot_agents(stored: list) -> list:
    return [domain.AgentState(id_, frozenset(tiers), frozenset(skills), presence, capacity, load,
                              datetime.fromisoformat(idle_since) if idle_since else None)
            for id_, tiers, skills, presence, capacity, load, idle_since in stored]


def _explained_from_snapshot(decision: Decision, snapshot: AgentSnapshot | None) -> tuple:
    """(candidates as stored rows, detail) of a dispatch round's decision."""
    if snapshot is None or not isinstance(decision.plan_step, int) or not 0 <= decision.plan_step < len(snapshot.plan):
        return [], ((decision.detail + "; ") if decision.detail else "") + "the agents it chose among were not kept"
    agents = domain.agents_at_step(_snapshot_agents(snapshot.agents), snapshot.plan, decision.plan_step,
                                   snapshot.planned_at)
    choice = domain.explain_choice(decision.tier, frozenset(decision.required_skills), decision.skills_relaxed,
                                   agents)
    return ([_candidate_row(c) for c in choice.candidates],
            _not_in_tier_detail(decision.detail, choice.not_in_tier + snapshot.agents_not_listed, decision.tier))


def new_decision(*args, **kwargs) -> Decision:
    return Decision(**decision_values(*args, **kwargs))


def record_decision(session: Session, row: RoutedTicket, trigger: str, outcome: str,
                    choice: domain.Choice | None = None, agent_id: str | None = None,
                    detail: str | None = None, tier: str | None = None) -> Decision:
    decision = new_decision(row.ticket_id, tier or row.tier, row.required_skills, trigger, outcome, choice,
                            agent_id, detail)
    session.add(decision)
    return decision


def decision_view(decision: Decision, snapshots: dict | None = None) -> dict:
    """``snapshots``: the AgentSnapshot rows by id, for decisions explained from one."""
    candidates, detail = decision.candidates, decision.detail
    if decision.agent_snapshot_id is not None:
        candidates, detail = _explained_from_snapshot(decision, (snapshots or {}).get(decision.agent_snapshot_id))
    return {"id": decision.id, "ticket_id": decision.ticket_id, "decided_at": iso_utc(decision.decided_at),
            "trigger": decision.trigger, "tier": decision.tier, "outcome": decision.outcome,
            "agent_id": decision.agent_id, "required_skills": decision.required_skills,
            "skills_relaxed": decision.skills_relaxed, "detail": detail,
            "candidates": [_candidate_view(c) for c in candidates]}


def ticket_routing(session: Session, actor, ticket_id: str) -> dict:
    require_role(actor, contract.READ_ROLES, "read routing decisions")
    row = get_routed(session, ticket_id) if isinstance(ticket_id, str) and len(ticket_id) <= 36 else None
    if row is None:
        raise NotFound("routing has no record of this ticket")
    decisions = list(session.scalars(select(Decision).where(Decision.ticket_id == ticket_id)
                                     .order_by(Decision.decided_at, Decision.id)))
    snapshot_ids = {d.agent_snapshot_id for d in decisions if d.agent_snapshot_id is not None}
    snapshots = {s.id: s for s in session.scalars(select(AgentSnapshot).where(AgentSnapshot.id.in_(snapshot_ids)))
                 } if snapshot_ids else {}
    return {"ticket_id": row.ticket_id, "tier": row.tier, "state": row.state, "assignee_id": row.assignee_id,
            "required_skills": row.required_skills, "queued_at": iso_utc(row.queued_at),
            "decisions": [decision_view(d, snapshots) for d in decisions]}


# --- queues ---------------------------------------------------------------------------------------

def queue_stats(session: Session) -> dict:
    """Per tier: depth, oldest queued time, agents online, their active tickets and capacity."""
    stats = {tier: {"tier": tier, "depth": 0, "oldest_queued_at": None, "agents_online": 0,
                    "active_tickets": 0, "capacity_online": 0} for tier in contract.TIERS}
    for tier, depth, oldest in session.execute(
            select(RoutedTicket.tier, func.count(), func.min(RoutedTicket.queued_at))
            .where(RoutedTicket.state == domain.QUEUED).group_by(RoutedTicket.tier)):
        if tier in stats:
            stats[tier]["depth"], stats[tier]["oldest_queued_at"] = depth, oldest
    for tiers, load, capacity in session.execute(
            select(Agent.tiers, Agent.active_load, Agent.capacity).where(Agent.presence == "online")):
        for tier in tiers:
            stats[tier]["agents_online"] += 1
            stats[tier]["active_tickets"] += load
            stats[tier]["capacity_online"] += capacity
    return stats


def queues_view(session: Session, actor) -> dict:
    require_role(actor, contract.READ_ROLES, "read queues")
    now = now_utc()
    tiers = []
    for entry in queue_stats(session).values():
        oldest = entry["oldest_queued_at"]
        tiers.append({**entry, "oldest_queued_at": iso_utc(oldest),
                      "oldest_age_seconds": round((now - oldest).total_seconds(), 3) if oldest else None})
    return {"as_of": iso_utc(now), "tiers": tiers}
