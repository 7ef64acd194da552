"""Routing's orchestration: triage, claim, deliver, drain, escalate, sweep.

Correctness under concurrency rests on the database, not on this process:

* a **claim** is one transaction: ``UPDATE agents SET active_load = active_load + 1 WHERE
  ... active_load < capacity`` takes a slot atomically (and the agent's row lock on
  PostgreSQL, the write lock on SQLite), then the ticket moves ``queued -> assigning`` by
  compare-and-set; if the ticket was taken the transaction rolls the slot back. Any number of
  routers may race: no agent passes capacity, exactly one claim wins a ticket. Claims lock
  agent then ticket; mirroring a ticket event locks ticket then agent, so PostgreSQL may pick a
  deadlock victim: a claim takes that as a lost race, an event handler is retried (its
  transaction, handled mark included, rolled back). ``active_load`` is kept equal to
  the mirrored tickets by ``operations.set_assignment``, the one place an assignee or status
  changes.
* the claim is then **delivered** through the tickets service's assign RPC (outside any
  transaction) and **confirmed** (``assigning -> assigned``, ``ticket_routed`` event, once, by
  a CAS on the decision row). A refused delivery releases the slot; a delivery that did not
  answer is re-driven by the sweeper (the assign RPC is idempotent).
* the **sweeper** (every few seconds, on every replica) re-drives stale claims and triages,
  and drains every tier, so a ticket never waits while an eligible agent is free once the
  system is quiet, whatever events were lost to a crash.
"""
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from contracts import routing as contract
from contracts.errors import Conflict, HelpdeskError, ValidationError
from servicekit.config import env
from servicekit.outbox import add_event
from services.routing import domain, metrics, operations as ops, rules
from services.routing.models import Agent, Decision, RoutedTicket

log = logging.getLogger(__name__)

MAX_CLAIM_ATTEMPTS = 5
MAX_DRAIN_ROUNDS = 20
# how often the sweeper checks every agent's active_load against a recount of the mirror
RECONCILE_EVERY_SECONDS = 30.0
_last_reconcile = float("-inf")


def _optional_seconds(value) -> float | None:
    if value in (None, "", "0", "off", "none"):
        return None
    seconds = float(value)
    return seconds if seconds > 0 else None


@dataclass(frozen=True)
class RoutingSettings:
    # queued this long, a ticket's required skills are dropped (any agent of the tier); None: never
    relax_skills_after_seconds: float | None = None
    # each this long in the queue raises a ticket's effective priority one level; None: no aging
    aging_seconds: float | None = 1800.0
    # when an agent goes offline: "requeue" their active tickets, or "keep" them
    offline_policy: str = "requeue"
    sweep_interval_seconds: float = 2.0
    # a claim or triage not finished after this long is re-driven by the sweeper
    retry_after_seconds: float = 10.0

    @classmethod
    def load(cls) -> "RoutingSettings":
        policy = env("routing", "OFFLINE_POLICY", "requeue")
        if policy not in ("requeue", "keep"):
            raise ValueError(f"HELPDESK_ROUTING_OFFLINE_POLICY must be requeue or keep, not {policy!r}")
        return cls(
            relax_skills_after_seconds=_optional_seconds(env("routing", "RELAX_SKILLS_AFTER_SECONDS")),
            aging_seconds=_optional_seconds(env("routing", "AGING_SECONDS", "1800")),
            offline_policy=policy,
            sweep_interval_seconds=float(env("routing", "SWEEP_INTERVAL_SECONDS", "2")),
            retry_after_seconds=float(env("routing", "RETRY_AFTER_SECONDS", "10")),
        )


def _rule_input(row) -> dict:
    return {"subject": row.subject, "description": None, "category": row.category, "channel": row.channel,
            "organization_id": row.organization_id, "priority": row.priority, "tags": list(row.tags or [])}


class _LostRace(Exception):
    """Another router took the agent's last slot or the ticket first; the claim rolls back."""


@dataclass(frozen=True)
class Claim:
    ticket_id: str
    agent_id: str
    decision_id: str
    tier: str
    trigger: str
    ticket_created_at: datetime


class Router:
    """``uow``: servicekit UnitOfWork; ``tickets``: an object with the tickets RPCs
    (get_ticket, assign_ticket, update_ticket, add_comment) that raise contracts errors."""

    def __init__(self, uow, tickets, settings: RoutingSettings):
        self.uow = uow
        self.tickets = tickets
        self.settings = settings

    # --- following ticket changes --------------------------------------------------------------

    def follow_up(self, ticket_id: str, change: domain.MirrorChange | None) -> None:
        """What a mirrored change asks for, once its transaction committed."""
        if change is None:
            return
        if change.unassign_first:
            self.unassign_and_route(ticket_id, change.trigger)
        elif change.state == domain.TRIAGE:
            self.triage(ticket_id)
        elif change.state == domain.QUEUED and change.trigger:
            self.route(ticket_id, change.trigger)
        if change.freed_agent:
            self.drain_for_agent(change.freed_agent, "capacity_freed")

    def triage_in(self, session, row) -> dict | None:
        """Run the rules inside the transaction that first saw the ticket (the usual path: one
        transaction less per ticket). None: a rule reads the description, which events do not
        carry, so ``triage`` must fetch it after the commit."""
        active_rules = ops.enabled_rules(session)
        if active_rules and rules.uses_description(active_rules):
            return None
        outcome = rules.evaluate(active_rules, _rule_input(row)) if active_rules else None
        return self._apply_triage(session, row, outcome)

    def triage(self, ticket_id: str) -> None:
        """Run the rules on a ticket seen for the first time, then queue and route it."""
        with self.uow.read() as session:
            row = ops.get_routed(session, ticket_id)
            if row is None or row.state != domain.TRIAGE:
                return
            active_rules = ops.enabled_rules(session)
            ticket = _rule_input(row)
        if active_rules and rules.uses_description(active_rules):
            try:
                ticket["description"] = self.tickets.get_ticket(ops.SYSTEM_ACTOR, ticket_id).get("description")
            except Exception as exc:  # rules on other fields still run
                log.warning("could not read the description of %s for the rules: %s", ticket_id, exc)
        outcome = rules.evaluate(active_rules, ticket) if active_rules else None
        with self.uow.transaction() as session:
            ops.lock_ticket(session, ticket_id)
            row = ops.get_routed(session, ticket_id, for_update=True)
            if row is None or row.state != domain.TRIAGE:
                return
            triaged = self._apply_triage(session, row, outcome)
        self.after_triage(ticket_id, triaged)

    def _apply_triage(self, session, row, outcome) -> dict:
        """The rules' outcome on the row (tier, skills, category, priority), queued; returns what
        the tickets service must be told after the commit."""
        ticket_changes, escalated_from = {}, None
        if outcome is not None and outcome.matched_rule_ids:
            if outcome.tier and outcome.tier != row.tier:
                if contract.TIERS.index(outcome.tier) > contract.TIERS.index(row.tier):
                    escalated_from = row.tier
                row.tier = ticket_changes["group"] = outcome.tier
            row.required_skills = list(outcome.required_skills)
            if outcome.category and outcome.category != row.category:
                ticket_changes["category"] = row.category = outcome.category
            if outcome.priority and outcome.priority != row.priority:
                ticket_changes["priority"] = row.priority = outcome.priority
            detail = "rules matched: " + ", ".join(outcome.matched_rule_ids)
            ops.record_decision(session, row, "created", "triaged", detail=detail)
            if escalated_from:  # a rule's starting tier above L1 is an escalation by rule
                add_event(session, contract.SERVICE, contract.TICKET_ESCALATED, {"ticket_id": row.ticket_id}, {
                    "ticket_id": row.ticket_id, "from_tier": escalated_from, "to_tier": row.tier,
                    "reason": detail, "actor_id": "rule:" + outcome.matched_rule_ids[-1], "trigger": "rule"})
        row.state, row.queued_at, row.queue_noted = domain.QUEUED, ops.now_utc(), False
        row.queue_trigger = "created"
        return {"ticket_changes": ticket_changes, "escalated_from": escalated_from, "tier": row.tier}

    def after_triage(self, ticket_id: str, triaged: dict) -> None:
        ticket_changes = triaged["ticket_changes"]
        if triaged["escalated_from"]:
            metrics.ESCALATIONS.labels(triaged["escalated_from"], triaged["tier"], "rule").inc()
        # the ticket record shows what the rules decided: with the assignment in one call when an
        # agent is free (one version, one round trip), else on its own
        delivered = self.route(ticket_id, "created", ticket_changes)
        if ticket_changes and not delivered:
            try:
                self.tickets.update_ticket(ops.SYSTEM_ACTOR, ticket_id, ticket_changes)
            except Exception as exc:
                log.warning("rules' changes %s not applied to ticket %s: %s", ticket_changes, ticket_id, exc)

    # --- one ticket ----------------------------------------------------------------------------

    def route(self, ticket_id: str, trigger: str, ticket_changes: dict | None = None) -> bool:
        """Assign a queued ticket to the best free agent now, or leave it queued (noted once).
        ``ticket_changes`` (the rules' category, priority, group) travel with the assignment.
        True when an assignment was delivered to the tickets service."""
        for _ in range(MAX_CLAIM_ATTEMPTS):
            with self.uow.read() as session:
                row = ops.get_routed(session, ticket_id)
                if row is None or row.state != domain.QUEUED:
                    return None
                ticket = ops.queued_ticket(row)
                agents = ops.agent_states(session)
            started = time.perf_counter()
            choice = domain.choose_agent(ticket, agents, ops.now_utc(), self.settings.relax_skills_after_seconds)
            metrics.DECISION_SECONDS.observe(time.perf_counter() - started)
            if choice.winner is None:
                self._note_queued(ticket_id, trigger, choice)
                return False
            claim = self._claim(ticket, choice.winner, choice, trigger)
            if claim is not None:
                return self._deliver(claim, ticket_changes)
            metrics.CLAIM_CONFLICTS.inc()
        return False

    def _note_queued(self, ticket_id: str, trigger: str, choice: domain.Choice) -> None:
        with self.uow.transaction() as session:
            ops.lock_ticket(session, ticket_id)
            row = ops.get_routed(session, ticket_id, for_update=True)
            if row is None or row.state != domain.QUEUED or row.queue_noted:
                return
            row.queue_noted = True
            decision = ops.record_decision(session, row, trigger, "queued", choice,
                                           detail="no eligible agent is free: waiting in the queue")
            add_event(session, contract.SERVICE, contract.TICKET_QUEUED, {"ticket_id": ticket_id}, {
                "ticket_id": ticket_id, "tier": row.tier, "trigger": trigger, "decision_id": decision.id,
                "required_skills": list(row.required_skills)})
            tier = row.tier
        metrics.QUEUED.labels(tier, trigger).inc()

    def _claim(self, ticket: domain.QueuedTicket, agent_id: str, choice: domain.Choice,
               trigger: str) -> Claim | None:
        ticket_id = ticket.ticket_id
        now = ops.now_utc()
        decision_id = ops.new_id()
        try:
            with self.uow.transaction() as session:
                # agent first: one atomic UPDATE takes a slot only if there is one (it holds the
                # agent's row lock, or SQLite's write lock, until commit)
                if not session.execute(
                        update(Agent).where(Agent.id == agent_id, Agent.presence == "online",
                                            Agent.active_load < Agent.capacity)
                        .values(active_load=Agent.active_load + 1, claim_seq=Agent.claim_seq + 1,
                                last_assigned_at=now)).rowcount:
                    raise _LostRace()
                # then the ticket, by compare-and-set: only a queued (hence active) ticket is taken
                if not session.execute(
                        update(RoutedTicket).where(RoutedTicket.ticket_id == ticket_id,
                                                   RoutedTicket.state == domain.QUEUED,
                                                   RoutedTicket.tier == ticket.tier,  # not escalated meanwhile
                                                   RoutedTicket.assignee_id.is_(None),
                                                   RoutedTicket.status.in_(contract.ACTIVE_STATUSES))
                        .values(state=domain.ASSIGNING, assignee_id=agent_id, claim_decision_id=decision_id,
                                claimed_at=now, updated_at=now)).rowcount:
                    raise _LostRace()  # rolls the slot back too
                # the row as route() read it: the compare-and-set above proved it is still queued in
                # that tier (skills change only in triage, before a ticket is queued)
                session.add(ops.new_decision(ticket_id, ticket.tier, sorted(ticket.required_skills), trigger,
                                             "assigning", choice, agent_id, decision_id=decision_id))
                claim = Claim(ticket_id, agent_id, decision_id, ticket.tier, trigger, ticket.created_at)
        except _LostRace:
            return None
        except OperationalError as exc:  # a deadlock or lock timeout: the transaction rolled back
            log.info("claim of %s for %s lost to database contention: %s", ticket_id, agent_id, exc)
            return None
        return claim

    def _deliver(self, claim: Claim, ticket_changes: dict | None = None) -> bool:
        try:
            if ticket_changes:
                view = self.tickets.update_ticket(ops.SYSTEM_ACTOR, claim.ticket_id, {
                    **ticket_changes, "assignee_id": claim.agent_id, "group": claim.tier})
            else:
                view = self.tickets.assign_ticket(ops.SYSTEM_ACTOR, claim.ticket_id, claim.agent_id, claim.tier)
        except HelpdeskError as refusal:  # closed, gone: the slot goes back
            self._release(claim, f"the tickets service refused the assignment: {refusal}")
            return False
        except Exception as exc:  # no answer: the sweeper re-drives the claim
            log.warning("assignment of %s to %s not delivered yet: %r", claim.ticket_id, claim.agent_id, exc)
            return False
        self._confirm(claim, view)
        return True

    def _confirm(self, claim: Claim, view: dict) -> None:
        with self.uow.transaction() as session:
            confirmed = session.execute(update(Decision).where(Decision.id == claim.decision_id,
                                                               Decision.outcome == "assigning")
                                        .values(outcome="assigned")).rowcount
            if not confirmed:
                return
            row = ops.get_routed(session, claim.ticket_id, for_update=True)
            if row.claim_decision_id == claim.decision_id and row.state == domain.ASSIGNING:
                row.state = domain.IDLE if row.status in domain.FINISHED_STATUSES else domain.ASSIGNED
                row.queued_at = row.queue_trigger = None
            ops.apply_snapshot(session, view, row)
            waited = max(0.0, (ops.now_utc() - claim.ticket_created_at).total_seconds())
            add_event(session, contract.SERVICE, contract.TICKET_ROUTED, {"ticket_id": claim.ticket_id}, {
                "ticket_id": claim.ticket_id, "agent_id": claim.agent_id, "tier": claim.tier,
                "trigger": claim.trigger, "decision_id": claim.decision_id, "waited_seconds": round(waited, 3)})
        metrics.ASSIGNMENTS.labels(claim.tier, claim.trigger).inc()
        metrics.TIME_TO_ASSIGNMENT.labels(claim.tier).observe(waited)

    def _release(self, claim: Claim, reason: str) -> None:
        with self.uow.transaction() as session:
            released = session.execute(update(Decision).where(Decision.id == claim.decision_id,
                                                              Decision.outcome == "assigning")
                                       .values(outcome="released", detail=reason[:1000])).rowcount
            if not released:
                return
            row = ops.get_routed(session, claim.ticket_id, for_update=True)
            if row.claim_decision_id == claim.decision_id and row.state == domain.ASSIGNING:
                ops.set_assignment(session, row, None, row.status)
                row.state, row.queued_at, row.queue_trigger = domain.IDLE, None, None
        metrics.RELEASED.inc()
        log.info("claim of %s for %s released: %s", claim.ticket_id, claim.agent_id, reason)
        self.drain_for_agent(claim.agent_id, "capacity_freed")

    # --- many tickets --------------------------------------------------------------------------

    def drain_for_agent(self, agent_id: str, trigger: str) -> int:
        with self.uow.read() as session:
            tiers = ops.agent_tiers(session, agent_id)
        return self.drain(tiers, trigger) if tiers else 0

    def drain(self, tiers, trigger: str) -> int:
        """Assign queued tickets of ``tiers`` to free agents, in queue order, until one of the
        two runs out. Returns how many were assigned."""
        assigned = 0
        lost = set()  # tickets another router (or a change) took from under this drain
        for _ in range(MAX_DRAIN_ROUNDS):
            with self.uow.read() as session:
                agents = ops.agent_states(session)
                # nobody free in these tiers (the usual case with a long queue): skip reading it
                if not any(a.presence == "online" and a.load < a.capacity and a.tiers & set(tiers)
                           for a in agents):
                    return assigned
                queue = [t for t in ops.queued_tickets(session, tiers) if t.ticket_id not in lost]
                if not queue:
                    return assigned
            now = ops.now_utc()
            plan = domain.plan_drain(queue, agents, now, self.settings.aging_seconds,
                                     self.settings.relax_skills_after_seconds)
            if not plan.assignments:
                return assigned
            by_id = {agent.id: agent for agent in agents}
            lost_a_race = False
            for planned in plan.assignments:
                # the recorded explanation uses the loads as the plan had them at this step
                choice = domain.choose_agent(planned.ticket, by_id.values(), now,
                                             self.settings.relax_skills_after_seconds)
                if choice.winner != planned.agent_id:  # cannot happen unless the plan and chooser disagree
                    log.error("drain plan chose %s, chooser %s", planned.agent_id, choice.winner)
                claim = self._claim(planned.ticket, planned.agent_id, choice, trigger)
                if claim is None:
                    metrics.CLAIM_CONFLICTS.inc()
                    lost.add(planned.ticket.ticket_id)
                    lost_a_race = True
                    break
                agent = by_id[planned.agent_id]
                by_id[agent.id] = domain.AgentState(agent.id, agent.tiers, agent.skills, agent.presence,
                                                    agent.capacity, agent.load + 1, now)
                if self._deliver(claim):
                    assigned += 1
            if not lost_a_race:
                return assigned
        return assigned

    # --- agents --------------------------------------------------------------------------------

    def presence_changed(self, agent_id: str, presence: str, previous: str) -> None:
        if presence == previous:
            return
        if presence == "online":
            self.drain_for_agent(agent_id, "agent_online")
        elif presence == "offline" and self.settings.offline_policy == "requeue":
            self.requeue_agent_tickets(agent_id)

    def requeue_agent_tickets(self, agent_id: str) -> int:
        with self.uow.read() as session:
            ticket_ids = ops.active_tickets_of(session, agent_id)
        for ticket_id in ticket_ids:
            self.unassign_and_route(ticket_id, "requeued")
        return len(ticket_ids)

    def unassign_and_route(self, ticket_id: str, trigger: str) -> None:
        """Take a ticket from its assignee (through tickets, so the record agrees) and route it."""
        try:
            view = self.tickets.assign_ticket(ops.SYSTEM_ACTOR, ticket_id, None, None)
        except Exception as exc:
            log.warning("could not unassign %s for re-routing: %r", ticket_id, exc)
            return
        with self.uow.transaction() as session:
            ops.lock_ticket(session, ticket_id)
            row, change = ops.apply_snapshot(session, view)
            if row.state == domain.QUEUED:
                row.queue_trigger = trigger
        if change is not None and change.freed_agent:
            self.drain_for_agent(change.freed_agent, "capacity_freed")
        self.route(ticket_id, trigger)

    # --- escalation ----------------------------------------------------------------------------

    def escalate(self, actor: ops.Actor, ticket_id: str, reason: str, to_tier: str | None = None,
                 trigger: str = "agent") -> dict:
        if trigger == "agent":
            ops.require_role(actor, contract.ESCALATE_ROLES, "escalate tickets")
        # the caller's own read: what they may not see is 404, as everywhere
        current_view = self.tickets.get_ticket(actor.as_dict() if trigger == "agent" else ops.SYSTEM_ACTOR, ticket_id)
        if current_view["status"] in domain.FINISHED_STATUSES:
            raise Conflict(f"the ticket is {current_view['status']}; only unresolved tickets are escalated",
                           {"status": [f"ticket is {current_view['status']}"]})
        with self.uow.read() as session:
            row = ops.get_routed(session, ticket_id)
            group = current_view.get("group")
            from_tier = row.tier if row is not None else (group if group in contract.TIERS else contract.TIERS[0])
        target = to_tier or domain.next_tier(from_tier)
        if target is None:
            raise Conflict(f"the ticket is already at {from_tier}, the highest tier", {"tier": [f"at {from_tier}"]})
        if contract.TIERS.index(target) <= contract.TIERS.index(from_tier):
            raise ValidationError(f"{target} is not above the ticket's tier {from_tier}",
                                  {"to_tier": [f"must be above {from_tier}"]})
        started = ops.now_utc()
        # the new tier first, so that no claim in the old tier can start any more (a claim checks
        # the tier) and this service's own handler of the change below routes in the new tier
        with self.uow.transaction() as session:
            ops.lock_ticket(session, ticket_id)
            row = ops.get_routed(session, ticket_id, for_update=True)
            if row is not None and row.state in (domain.ASSIGNING, domain.TRIAGE):
                # milliseconds: a claim's delivery in flight would land after the escalation
                raise Conflict("the ticket is being routed at this moment; retry in a second",
                               {"ticket": ["being routed"]})
            has_assignee = bool(row.assignee_id if row is not None else current_view.get("assignee_id"))
            moved_early = row is not None and row.tier == from_tier
            if moved_early:
                row.tier = target
        try:
            if has_assignee:  # take it from its old-tier assignee, into the new tier
                view = self.tickets.assign_ticket(ops.SYSTEM_ACTOR, ticket_id, None, target)
            else:  # only the group: an assignment routing makes in the new tier meanwhile stands
                view = self.tickets.update_ticket(ops.SYSTEM_ACTOR, ticket_id, {"group": target})
        except HelpdeskError:  # refused (closed meanwhile, gone): the ticket stays where it was
            if moved_early:
                with self.uow.transaction() as session:
                    ops.lock_ticket(session, ticket_id)
                    row = ops.get_routed(session, ticket_id, for_update=True)
                    if row.tier == target and row.state != domain.ASSIGNING:
                        row.tier = from_tier
            raise
        detail = f"{from_tier} -> {target} by {actor.id}: {reason}"
        with self.uow.transaction() as session:
            ops.lock_ticket(session, ticket_id)
            row, change = ops.apply_snapshot(session, view)
            # assigned in the new tier meanwhile (by routing's handler, or by hand): that stands
            requeue = row.assignee_id is None
            if requeue:
                # a pending or on-hold ticket waits in the new tier for its requester, not in its queue
                row.state = domain.QUEUED if domain.counts_against_capacity(row.status) else domain.IDLE
                row.queued_at, row.queue_trigger, row.queue_noted = ops.now_utc(), "escalated", False
                row.claim_decision_id = row.claimed_at = None
            row.tier = target
            decision = ops.record_decision(session, row, "escalated", "escalated", detail=detail, tier=target)
            decision.decided_at = started  # before any assignment in the new tier, in the history
            add_event(session, contract.SERVICE, contract.TICKET_ESCALATED, {"ticket_id": ticket_id}, {
                "ticket_id": ticket_id, "from_tier": from_tier, "to_tier": target, "reason": reason,
                "actor_id": actor.id, "trigger": trigger})
            escalation = {"ticket_id": ticket_id, "from_tier": from_tier, "to_tier": target, "reason": reason,
                          "decision": ops.decision_view(decision)}
        metrics.ESCALATIONS.labels(from_tier, target, trigger).inc()
        try:  # the agents working the ticket read why in its own record
            self.tickets.add_comment(ops.SYSTEM_ACTOR, ticket_id, {
                "body": f"Escalated {from_tier} → {target} by {actor.id}: {reason}", "public": False})
        except Exception as exc:
            log.warning("escalation note not added to %s: %r", ticket_id, exc)
        if change is not None and change.freed_agent:
            self.drain_for_agent(change.freed_agent, "capacity_freed")
        if requeue:
            self.route(ticket_id, "escalated")
        return escalation

    # --- the safety net ------------------------------------------------------------------------

    def sweep(self) -> dict:
        """Finish what crashes or lost races left: stale claims and triages, unnoted queue
        entries, then drain every tier. Safe on any number of replicas at once."""
        stale_before = ops.now_utc() - timedelta(seconds=self.settings.retry_after_seconds)
        with self.uow.read() as session:
            stale_claims = list(session.execute(
                select(RoutedTicket.ticket_id, RoutedTicket.assignee_id, RoutedTicket.claim_decision_id,
                       RoutedTicket.tier, RoutedTicket.ticket_created_at, Decision.trigger)
                .join(Decision, Decision.id == RoutedTicket.claim_decision_id)
                .where(RoutedTicket.state == domain.ASSIGNING, RoutedTicket.claimed_at < stale_before)).all())
            stale_triage = list(session.scalars(select(RoutedTicket.ticket_id).where(
                RoutedTicket.state == domain.TRIAGE, RoutedTicket.queued_at < stale_before)))
            unnoted = list(session.execute(select(RoutedTicket.ticket_id, RoutedTicket.queue_trigger).where(
                RoutedTicket.state == domain.QUEUED, RoutedTicket.queue_noted.is_(False))).all())
            # held by an agent who went offline, where the requeue did not reach tickets
            orphaned = [] if self.settings.offline_policy != "requeue" else list(session.scalars(
                select(RoutedTicket.ticket_id).join(Agent, Agent.id == RoutedTicket.assignee_id).where(
                    RoutedTicket.state == domain.ASSIGNED, Agent.presence == "offline",
                    RoutedTicket.status.in_(contract.ACTIVE_STATUSES),
                    RoutedTicket.updated_at < stale_before)))
        for ticket_id in orphaned:
            self.unassign_and_route(ticket_id, "requeued")
        self._reconcile_loads_now_and_then()
        for ticket_id, agent_id, decision_id, tier, created_at, trigger in stale_claims:
            self._deliver(Claim(ticket_id, agent_id, decision_id, tier, trigger, created_at))
        for ticket_id in stale_triage:
            self.triage(ticket_id)
        for ticket_id, trigger in unnoted:
            self.route(ticket_id, trigger or "sweep")
        assigned = self.drain(contract.TIERS, "sweep")
        self.refresh_metrics()
        return {"redelivered": len(stale_claims), "triaged": len(stale_triage), "requeued": len(orphaned),
                "assigned": assigned}

    def _reconcile_loads_now_and_then(self) -> None:
        global _last_reconcile
        if time.monotonic() - _last_reconcile < RECONCILE_EVERY_SECONDS:
            return
        _last_reconcile = time.monotonic()
        with self.uow.transaction() as session:
            fixed = ops.reconcile_loads(session)
        for agent_id, (was, now) in fixed.items():
            metrics.LOADS_RECONCILED.inc()
            log.warning("active_load of agent %s was %s, the mirror counts %s: corrected", agent_id, was, now)

    def refresh_metrics(self) -> None:
        with self.uow.read() as session:
            metrics.TIER_SNAPSHOT.update(ops.queue_stats(session))

