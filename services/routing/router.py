"""Routing's orchestration: triage, claim, deliver, dispatch, escalate, sweep.

Correctness under concurrency rests on the database, not on this process:

* a **claim** is one transaction for a batch of (ticket, agent) pairs: each ticket moves
  ``queued -> assigning`` by compare-and-set (still queued, same tier, unassigned, active),
  then each agent's slots are taken with one atomic ``UPDATE agents SET active_load =
  active_load + k WHERE ... active_load + k <= capacity``; an agent whose slots are gone
  keeps none of the batch (their tickets stay queued for the next round). Any
  number of routers may race: no agent passes capacity, exactly one claim wins a ticket.
  Every transaction locks tickets before agents (claims, confirmations and the mirror of
  ticket events alike), tickets and agents each in id order where there are several, so
  PostgreSQL has no lock cycle to break; a deadlock or lock timeout that happens anyway is
  a lost race for a claim and a retry for an event handler. ``active_load`` is kept equal to
  the mirrored tickets by ``operations.set_assignment``, the one place an assignee or status
  changes.
* the claims are then **delivered** through the tickets service's assign RPC (outside any
  transaction, a few at a time) and **confirmed** together (``assigning -> assigned``,
  ``ticket_routed`` event, once per claim, by a CAS on the decision row). A refused delivery
  releases the slot; a delivery that did not answer is re-driven by the sweeper (the assign
  RPC is idempotent).
* ticket event handlers only mirror and queue; the service's **dispatcher** (one worker at a
  time, ``dispatcher.py``) then drains the queues in batches, so many tickets arriving at
  once cost one agents read, one claim and one confirm transaction per batch.
* the **sweeper** (every few seconds, on every replica) re-drives stale claims and triages,
  and dispatches every tier, so a ticket never waits while an eligible agent is free once the
  system is quiet, whatever events were lost to a crash.
"""
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

import eventlet
from eventlet.event import Event
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from contracts import routing as contract
from contracts.errors import Conflict, HelpdeskError, ValidationError, error_from_payload
from servicekit.config import env
from servicekit.outbox import add_event, add_events
from services.routing import domain, metrics, operations as ops, rules
from services.routing.models import Agent, Decision, RoutedTicket

log = logging.getLogger(__name__)

MAX_CLAIM_ATTEMPTS = 5
MAX_DRAIN_ROUNDS = 20
# how long one dispatch round keeps taking the wakes that come while its deliveries are under
# way (then it ends, and the dispatcher starts the next one), and how often it looks at its
# deliveries meanwhile
DISPATCH_WAKES_SECONDS = 10.0
WAKE_POLL_SECONDS = 0.01
WAKE_WHEN_IN_FLIGHT = 1
# tickets claimed in one transaction by a drain round, and delivered in one assign_tickets call;
# this many batches are delivered at a time while the next ones are claimed
CLAIM_BATCH = 32
DELIVERY_CONCURRENCY = 4
# the rules' changes of waiting tickets, sent on their own: this many calls at a time
CHANGES_CONCURRENCY = 8
# how long a finished delivery waits for others to be confirmed with it in one transaction
CONFIRM_GATHER_SECONDS = 0.005
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


@dataclass(frozen=True)
class Claim:
    ticket_id: str
    agent_id: str
    decision_id: str
    tier: str
    trigger: str
    ticket_created_at: datetime
    # the rules' changes the tickets service does not have yet: they travel with the assignment
    changes: dict | None = None


@dataclass(frozen=True)
class _Planned:
    ticket: domain.QueuedTicket
    agent_id: str
    choice: domain.Choice
    trigger: str
    changes: dict | None
    plan_step: int | None = None  # its step in the round's plan (explained from the round's snapshot)


@dataclass
class _RoundSnapshot:
    """A dispatch round's agents as it read them and the agent its plan chose at each step:
    written with the round's first claims, and its decisions explained from it when read."""
    id: str
    planned_at: datetime
    agents: list  # those of the tiers the plan assigns in
    plan: list
    agents_not_listed: int
    written: bool = False


# what _deliver_batch answers for a claim the tickets service refused (its slot went back)
_RELEASED = object()


class _Deliveries:
    """Batches of claims being delivered to the tickets service (one ``assign_tickets`` call
    per batch, a few batches at a time), confirmed in batches too: a delivery that finishes
    while a confirmation runs joins the next one (one transaction per batch), and the drain that
    submitted them goes on claiming meanwhile."""

    def __init__(self, router: "Router", size: int):
        self._router = router
        self._pool = eventlet.GreenPool(size)
        self._ready = []
        self._confirming = False
        self._answered = 0  # delivery threads past their call (confirming, or waiting to)
        self._answer = Event()  # sent (and replaced) each time a batch is answered
        self.delivered = self.released = 0

    def submit(self, claims) -> None:
        claims = list(claims)
        for first in range(0, len(claims), CLAIM_BATCH):  # the sweeper's re-drives can be many
            batch = claims[first:first + CLAIM_BATCH]
            # sent now, answered in the delivery's own thread: that thread starts only once the
            # round yields, which under load is tens of milliseconds later
            self._pool.spawn_n(self._deliver, batch, self._router._send_assignments(batch, with_changes=True))

    def _deliver(self, claims: list, sent) -> None:
        try:
            answers = self._router._deliver_batch(claims, sent)
        except Exception as exc:  # e.g. a release's transaction failed: the sweeper re-drives them
            log.warning("delivery of %d claims failed: %r", len(claims), exc)
            return
        self._answered += 1
        answered, self._answer = self._answer, Event()
        answered.send()
        try:
            self._take_answers(claims, answers)
        finally:
            self._answered -= 1

    def _take_answers(self, claims: list, answers: list) -> None:
        for claim, answer in zip(claims, answers):
            if answer is _RELEASED:
                self.released += 1
            elif answer is not None:
                self._ready.append((claim, answer))
                ops.remember_answered_version(claim.ticket_id, answer["version"])
        if self._ready and not self._confirming:
            self._confirming = True
            # a confirmation does not yield (SQLite, no I/O), so without a pause each batch would
            # be confirmed alone: the deliveries answered meanwhile join this one
            eventlet.sleep(CONFIRM_GATHER_SECONDS)
            self._confirm_ready()

    def _confirm_ready(self) -> None:
        try:
            while self._ready:
                batch, self._ready = self._ready, []
                try:
                    self._router._confirm_all(batch)
                except Exception as exc:
                    # one claim's failure must not hold the others back: each on its own, and
                    # what still fails stays "assigning" for the sweeper
                    log.warning("confirmation of %d delivered claims failed, one by one now: %r", len(batch), exc)
                    for delivered in batch:
                        try:
                            self._router._confirm_all([delivered])
                        except Exception as exc:
                            log.warning("confirmation of the claim on %s failed: %r", delivered[0].ticket_id, exc)
                            ops.forget_answered_version(delivered[0].ticket_id, delivered[1]["version"])
                            continue
                        self.delivered += 1
                    continue
                self.delivered += len(batch)
        finally:
            self._confirming = False

    def busy(self) -> bool:
        return self._pool.running() > 0

    def in_flight(self) -> int:
        """Batches not answered yet (a batch being confirmed no longer counts)."""
        return self._pool.running() - self._answered

    def wait_for_answer(self, timeout: float) -> None:
        """Until the next batch is answered, or ``timeout``."""
        with eventlet.Timeout(timeout, False):
            self._answer.wait()

    def wait(self) -> tuple:
        """Once every submitted claim is delivered and confirmed: (delivered, released)."""
        self._pool.waitall()
        return self.delivered, self.released


class Router:
    """``uow``: servicekit UnitOfWork; ``tickets``: an object with the tickets RPCs
    (get_ticket, assign_ticket, assign_tickets or send_assign_tickets, update_ticket, add_comment) that raise
    contracts errors;
    ``wake(trigger)``: asks the service's dispatcher to route what is queued, after the caller
    is done (the service's handlers use it, so that tickets are assigned in batches by one
    worker); without it, queued tickets are dispatched inline (tests, tools)."""

    def __init__(self, uow, tickets, settings: RoutingSettings, wake=None):
        self.uow = uow
        self.tickets = tickets
        self.settings = settings
        self._wake = wake

    def request_dispatch(self, trigger: str) -> None:
        if self._wake is not None:
            self._wake(trigger)
        else:
            self.dispatch(trigger)

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
            self.request_dispatch(change.trigger)
        if change.freed_agent:
            self.request_dispatch("capacity_freed")

    @staticmethod
    def triage_rules(session) -> list:
        """The enabled rules, for ``triage_in`` (read once for many tickets)."""
        with session.no_autoflush:  # a new row is written once, at the commit, with the rules' outcome
            return ops.enabled_rules(session)

    def triage_in(self, session, row, active_rules=None, decisions=None) -> dict | None:
        """Run the rules inside the transaction that first saw the ticket (the usual path: one
        transaction less per ticket). None: a rule reads the description, which events do not
        carry, so ``triage`` must fetch it after the commit. ``active_rules``: from
        ``triage_rules``, if the caller read them already; ``decisions``: see ``_apply_triage``."""
        if active_rules is None:
            active_rules = self.triage_rules(session)
        if active_rules and rules.uses_description(active_rules):
            return None
        outcome = rules.evaluate(active_rules, _rule_input(row)) if active_rules else None
        return self._apply_triage(session, row, outcome, decisions)

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

    def _apply_triage(self, session, row, outcome, decisions=None) -> dict:
        """The rules' outcome on the row (tier, skills, category, priority), queued; what the
        tickets service must be told waits on the row (``pending_changes``) until it is delivered
        with the assignment, or on its own if the ticket has to wait. ``decisions``: a list the
        "triaged" decision row goes to (the caller inserts many together), instead of being
        inserted here."""
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
            decision = ops.decision_values(row.ticket_id, row.tier, row.required_skills, "created", "triaged",
                                           detail=detail)
            if decisions is None:
                ops.insert_decisions(session, [decision])
            else:
                decisions.append(decision)
            if escalated_from:  # a rule's starting tier above L1 is an escalation by rule
                add_event(session, contract.SERVICE, contract.TICKET_ESCALATED, {"ticket_id": row.ticket_id}, {
                    "ticket_id": row.ticket_id, "from_tier": escalated_from, "to_tier": row.tier,
                    "reason": detail, "actor_id": "rule:" + outcome.matched_rule_ids[-1], "trigger": "rule"})
        row.state, row.queued_at, row.queue_noted = domain.QUEUED, ops.now_utc(), False
        row.queue_trigger = "created"
        # sent compare-and-set against the version the rules saw: whoever changes the ticket
        # first (an agent, an escalation) wins over them, and a repeated send changes nothing
        row.pending_changes = {"fields": ticket_changes, "if_version": row.ticket_version} if ticket_changes else None
        return {"ticket_changes": ticket_changes, "escalated_from": escalated_from, "tier": row.tier}

    def after_triage(self, ticket_id: str, triaged: dict) -> None:
        if triaged["escalated_from"]:
            metrics.ESCALATIONS.labels(triaged["escalated_from"], triaged["tier"], "rule").inc()
        self.request_dispatch("created")

    # --- one ticket ----------------------------------------------------------------------------

    def route(self, ticket_id: str, trigger: str) -> bool:
        """Assign a queued ticket to the best free agent now, or leave it queued (noted once).
        True when an assignment was delivered to the tickets service."""
        for _ in range(MAX_CLAIM_ATTEMPTS):
            with self.uow.read() as session:
                entries = ops.queue_entries(session, ticket_ids=[ticket_id])
                if not entries:
                    return False
                agents = ops.agent_states(session)
            entry = entries[0]
            started = time.perf_counter()
            choice = domain.choose_agent(entry.ticket, agents, ops.now_utc(), self.settings.relax_skills_after_seconds)
            metrics.DECISION_SECONDS.observe(time.perf_counter() - started)
            if choice.winner is None:
                self._note_waiting([(entry, choice, trigger)])
                return False
            claims = self._claim_all([_Planned(entry.ticket, choice.winner, choice, trigger, entry.changes)])
            if claims:
                delivered, released = self._deliver_all(claims)
                if released:
                    self.request_dispatch("capacity_freed")
                return delivered == 1
        return False

    def _note_waiting(self, waiting: list) -> int:
        """Record, once per queue entry, that nobody could take the ticket (a ``queued``
        decision with every candidate, and ``ticket_queued``); then tell the tickets service
        what the rules changed on those tickets, which no assignment carries for now.
        ``waiting``: (QueueEntry, Choice, trigger) triples."""
        noted = []
        with self.uow.transaction() as session:
            for entry, choice, trigger in sorted(waiting, key=lambda w: w[0].ticket.ticket_id):
                ticket = entry.ticket
                if not session.execute(
                        update(RoutedTicket).where(RoutedTicket.ticket_id == ticket.ticket_id,
                                                   RoutedTicket.state == domain.QUEUED,
                                                   RoutedTicket.tier == ticket.tier,
                                                   RoutedTicket.queue_noted.is_(False))
                        .values(queue_noted=True)).rowcount:
                    continue  # taken, noted or escalated meanwhile
                decision = ops.new_decision(ticket.ticket_id, ticket.tier, sorted(ticket.required_skills), trigger,
                                            "queued", choice, detail="no eligible agent is free: waiting in the queue")
                session.add(decision)
                add_event(session, contract.SERVICE, contract.TICKET_QUEUED, {"ticket_id": ticket.ticket_id}, {
                    "ticket_id": ticket.ticket_id, "tier": ticket.tier, "trigger": trigger,
                    "decision_id": decision.id, "required_skills": sorted(ticket.required_skills)})
                noted.append((entry, trigger))
        for entry, trigger in noted:
            metrics.QUEUED.labels(entry.ticket.tier, trigger).inc()
        self._send_pending_changes([(entry.ticket.ticket_id, entry.changes) for entry, _ in noted if entry.changes])
        return len(noted)

    def _send_pending_changes(self, pending: list) -> None:
        """The rules' changes of tickets no assignment will carry soon, on their own (a few calls
        at a time), each compare-and-set against the version the rules saw; cleared once the
        tickets service applied them or refused them (changed since, closed, gone). No answer:
        kept for the sweeper. ``pending``: (ticket_id, pending_changes) pairs."""
        if not pending:
            return

        def send(item):
            ticket_id, changes = item
            try:
                self.tickets.update_ticket(ops.SYSTEM_ACTOR, ticket_id, changes["fields"], changes["if_version"])
            except HelpdeskError as refusal:  # changed since the rules ran, closed or gone: dropped
                log.info("rules' changes %s not applied to %s: %s", changes["fields"], ticket_id, refusal)
            except Exception as exc:
                log.warning("rules' changes %s not delivered to %s yet: %r", changes["fields"], ticket_id, exc)
                return None
            return ticket_id

        done = [ticket_id for ticket_id in eventlet.GreenPool(CHANGES_CONCURRENCY).imap(send, pending) if ticket_id]
        if done:
            with self.uow.transaction() as session:
                session.execute(update(RoutedTicket).where(RoutedTicket.ticket_id.in_(done))
                                .values(pending_changes=None))

    def _claim_all(self, planned: list, snapshot: _RoundSnapshot | None = None) -> list:
        """Claim each planned (ticket, agent) pair, all in one transaction: lock the tickets
        (id order) and keep those still claimable (queued in the planned tier, unassigned,
        active); take each agent's slots with one atomic UPDATE (``active_load + k <=
        capacity``, online; agents in id order) and drop the tickets of an agent whose slots
        are gone (another router, an assignment by hand, offline: they stay queued for the next
        round); then mark the rest ``assigning`` and record the decisions. Locks are taken
        ticket before agent, as the mirror does. ``snapshot``: the round's, for decisions
        planned as its steps (written with the first claims that win). Returns the claims
        that won."""
        if not planned:
            return []
        now = ops.now_utc()
        by_ticket = {step.ticket.ticket_id: step for step in planned}
        claims = []
        try:
            with self.uow.transaction() as session:
                claimable = [ticket_id for ticket_id, tier in ops.lock_claimable(session, by_ticket)
                             if tier == by_ticket[ticket_id].ticket.tier]  # not escalated meanwhile
                by_agent = defaultdict(list)
                for ticket_id in claimable:
                    by_agent[by_ticket[ticket_id].agent_id].append(ticket_id)
                won = []
                for agent_id in sorted(by_agent):
                    if ops.take_slots(session, agent_id, len(by_agent[agent_id]), now):
                        won.extend(by_ticket[ticket_id] for ticket_id in by_agent[agent_id])
                if won:
                    claims = [Claim(step.ticket.ticket_id, step.agent_id, ops.new_id(), step.ticket.tier,
                                    step.trigger, step.ticket.created_at, step.changes) for step in won]
                    ops.mark_claimed(session, [(c.ticket_id, c.agent_id, c.decision_id) for c in claims], now)
                    if snapshot is not None and not snapshot.written:
                        ops.insert_agent_snapshot(session, snapshot.id, snapshot.planned_at, snapshot.agents,
                                                  snapshot.plan, snapshot.agents_not_listed)
                    # the ticket as the plan read it: the lock proved it is still queued in that tier
                    # (skills change only in triage, before a ticket is queued)
                    ops.insert_decisions(session, [
                        ops.decision_values(step.ticket.ticket_id, step.ticket.tier,
                                            sorted(step.ticket.required_skills), step.trigger, "assigning",
                                            step.choice, step.agent_id, decision_id=claim.decision_id,
                                            agent_snapshot_id=snapshot.id if snapshot is not None else None,
                                            plan_step=step.plan_step)
                        for step, claim in zip(won, claims)])
            if claims and snapshot is not None:
                snapshot.written = True
        except OperationalError as exc:  # a deadlock or lock timeout: the transaction rolled back
            log.info("claim of %d tickets lost to database contention: %s", len(planned), exc)
            claims = []
        if len(claims) < len(planned):
            metrics.CLAIM_CONFLICTS.inc(len(planned) - len(claims))
        if claims:
            metrics.CLAIM_BATCH_SIZE.observe(len(claims))
        return claims

    def _deliver_all(self, claims: list) -> tuple:
        """Tell the tickets service about each claim and confirm them. Returns (delivered,
        released)."""
        deliveries = _Deliveries(self, DELIVERY_CONCURRENCY)
        deliveries.submit(claims)
        return deliveries.wait()

    def _deliver_batch(self, claims: list, sent=None) -> list:
        """Tell the tickets service about these claims in one call. Per claim, in order: the
        tickets service's view after the assignment; _RELEASED when it refused (the slot went
        back); None when it did not answer (the sweeper re-drives the claim: an assignment is
        idempotent, and the rules' changes go compare-and-set, so a repeat undoes nothing)."""
        answers = self._assign(claims, with_changes=True, sent=sent)
        # the rules' changes refused (the ticket changed since they ran): the assignment alone
        alone = [i for i, (claim, answer) in enumerate(zip(claims, answers))
                 if claim.changes and isinstance(answer, HelpdeskError)]
        for i in alone:
            log.info("rules' changes %s not applied to %s: %s", claims[i].changes["fields"], claims[i].ticket_id,
                     answers[i])
        for i, answer in zip(alone, self._assign([claims[i] for i in alone], with_changes=False)):
            answers[i] = answer
        for i, (claim, answer) in enumerate(zip(claims, answers)):
            if isinstance(answer, ValidationError):
                # our request refused, not the ticket (a tickets service older than this routing,
                # during an upgrade): released, the ticket would wait unrouted for good; kept for
                # the sweeper, which delivers it once tickets takes the request
                log.error("the tickets service refused routing's assignment of %s as invalid: %s",
                          claim.ticket_id, answer)
                metrics.REFUSED_AS_INVALID.inc()
                answers[i] = None
                continue
            if isinstance(answer, HelpdeskError):  # closed, gone, someone else's: the slot goes back
                try:
                    self._release(claim, f"the tickets service refused the assignment: {answer}")
                except Exception as exc:  # still assigning: the sweeper delivers it again
                    log.warning("release of the claim on %s failed: %r", claim.ticket_id, exc)
                    answers[i] = None
                    continue
                answers[i] = _RELEASED
        return answers

    def _send_assignments(self, claims: list, with_changes: bool):
        """Start one ``assign_tickets`` call for these claims; returns ``answer()``, which waits
        for its result (raising what the call raised). A tickets port without
        ``send_assign_tickets`` is called only when the answer is asked for."""
        assignments = []
        for claim in claims:
            # only while nobody else has the ticket: a person's assignment made while the claim
            # was in flight (or before a re-sent delivery lands) stands, and the claim is released
            assignment = {"ticket_id": claim.ticket_id, "assignee_id": claim.agent_id, "group": claim.tier,
                          "only_if_unassigned": True}
            # the rules' group is the claim's tier, which the assignment sets itself
            changes = {k: v for k, v in (claim.changes or {}).get("fields", {}).items() if k != "group"}
            if with_changes and changes:
                assignment.update(changes=changes, expected_version=claim.changes["if_version"])
            assignments.append(assignment)
        send = getattr(self.tickets, "send_assign_tickets", None)
        if send is None:
            return lambda: self.tickets.assign_tickets(ops.SYSTEM_ACTOR, assignments)
        try:
            return send(ops.SYSTEM_ACTOR, assignments)
        except Exception as exc:  # not sent (broker down): the answer is that failure
            error = exc

            def failed():
                raise error
            return failed

    def _assign(self, claims: list, with_changes: bool, sent=None) -> list:
        """One ``assign_tickets`` call (``sent``: one ``_send_assignments`` already started for
        these claims): per claim its view, its typed error, or None (no answer)."""
        if not claims:
            return []
        answer = sent if sent is not None else self._send_assignments(claims, with_changes)
        try:
            results = answer()
        except HelpdeskError as refusal:
            if len(claims) == 1:
                return [refusal]
            # the batch refused whole (one malformed assignment): each on its own, so that the
            # others are not re-driven with it forever
            log.warning("a batch of %d assignments was refused whole, one by one now: %s", len(claims), refusal)
            return [answer for claim in claims for answer in self._assign([claim], with_changes)]
        except Exception as exc:
            log.warning("assignment of %d tickets not delivered yet: %r", len(claims), exc)
            return [None] * len(claims)
        if not isinstance(results, list) or len(results) != len(claims):
            log.error("assign_tickets answered %r for %d assignments: left for the sweeper", results, len(claims))
            return [None] * len(claims)
        # per assignment: its view; its typed refusal; or None (not applied for another reason,
        # an answer this side cannot read): left "assigning" for the sweeper to deliver again
        return [result["ticket"] if isinstance(result, dict) and isinstance(result.get("ticket"), dict)
                else error_from_payload(result.get("error")) if isinstance(result, dict) else None
                for result in results]

    def _confirm_all(self, delivered: list) -> None:
        """``assigning -> assigned`` for each delivered claim, once (a compare-and-set on its
        decision row), with the tickets service's answer mirrored and ``ticket_routed``."""
        if not delivered:
            return
        confirmed, versions, overtaken, mirrored, routed, plain = [], {}, [], [], [], []
        with self.uow.transaction() as session:
            states = ops.lock_claim_states(session, [claim.ticket_id for claim, _ in delivered])
            # once per claim: a re-delivery by the sweeper, or a release meanwhile, confirms nothing
            won = ops.confirm_decisions(session, [claim.decision_id for claim, _ in delivered])
            for claim, view in sorted(delivered, key=lambda d: d[0].ticket_id):
                state = states.get(claim.ticket_id)
                if state is None:
                    continue
                # the usual answer: written with one statement for all of them, no row loaded
                if claim.decision_id in won and ops.confirms_plainly(state, claim.decision_id, view):
                    plain.append((claim.ticket_id, view, bool(claim.changes)))
                    row = None
                else:
                    row = ops.get_routed(session, claim.ticket_id)
                if row is not None and claim.decision_id not in won:
                    # the answer is still the ticket as it is: mirrored as an event would be (its
                    # events may have been acked from memory on this answer's version)
                    _row, change = ops.apply_snapshot(session, view, row, flush=False)
                    mirrored.append((claim.ticket_id, change))
                    versions[claim.ticket_id] = row.ticket_version
                    continue
                if row is not None:
                    if row.ticket_version > view["version"]:
                        overtaken.append(claim.ticket_id)
                    if row.claim_decision_id == claim.decision_id and row.state == domain.ASSIGNING:
                        row.state = domain.IDLE if row.status in domain.FINISHED_STATUSES else domain.ASSIGNED
                        row.queued_at = row.queue_trigger = None
                        if claim.changes:
                            row.pending_changes = None
                    ops.apply_snapshot(session, view, row, flush=False)
                waited = max(0.0, (ops.now_utc() - claim.ticket_created_at).total_seconds())
                routed.append(({"ticket_id": claim.ticket_id}, {
                    "ticket_id": claim.ticket_id, "agent_id": claim.agent_id, "tier": claim.tier,
                    "trigger": claim.trigger, "decision_id": claim.decision_id, "waited_seconds": round(waited, 3)}))
                confirmed.append((claim, waited))
                versions[claim.ticket_id] = row.ticket_version if row is not None else view["version"]
            ops.confirm_plainly(session, plain)
            add_events(session, contract.SERVICE, contract.TICKET_ROUTED, routed)
        for ticket_id, version in versions.items():
            ops.remember_committed_version(ticket_id, version)
        for claim, waited in confirmed:
            metrics.ASSIGNMENTS.labels(claim.tier, claim.trigger).inc()
            metrics.TIME_TO_ASSIGNMENT.labels(claim.tier).observe(waited)
        for ticket_id in overtaken:
            self._resync(ticket_id)
        for ticket_id, change in mirrored:
            self.follow_up(ticket_id, change)

    def _resync(self, ticket_id: str) -> None:
        """The mirror took newer snapshots while the claim was in flight and kept the claimed
        agent meanwhile (someone may have unassigned or reassigned the ticket right after the
        assignment landed): mirror the ticket as it is now, and route it if it needs it."""
        try:
            view = self.tickets.get_ticket(ops.SYSTEM_ACTOR, ticket_id)
        except Exception as exc:
            log.warning("could not re-read %s after its assignment was overtaken: %r", ticket_id, exc)
            return
        with self.uow.transaction() as session:
            ops.lock_ticket(session, ticket_id)
            _row, change = ops.apply_snapshot(session, view, resync=True)
        self.follow_up(ticket_id, change)

    def _release(self, claim: Claim, reason: str) -> None:
        """A refused claim gives its slot back; the caller drains again."""
        with self.uow.transaction() as session:
            ops.lock_ticket(session, claim.ticket_id)
            released = session.execute(update(Decision).where(Decision.id == claim.decision_id,
                                                              Decision.outcome == "assigning")
                                       .values(outcome="released", detail=reason[:1000])).rowcount
            if not released:
                return
            row = ops.get_routed(session, claim.ticket_id, for_update=True)
            if row.claim_decision_id == claim.decision_id and row.state == domain.ASSIGNING:
                ops.set_assignment(session, row, None, row.status)
                row.state, row.queued_at, row.queue_trigger = domain.IDLE, None, None
                row.pending_changes = None  # closed or gone: nothing left to tell
        metrics.RELEASED.inc()
        log.info("claim of %s for %s released: %s", claim.ticket_id, claim.agent_id, reason)

    # --- many tickets --------------------------------------------------------------------------

    def dispatch(self, trigger: str = "sweep", next_wake=None) -> int:
        """Route what waits: assign queued tickets to free agents in queue order (in batches),
        then record, once each, the tickets nobody can take. The service's dispatcher runs this
        whenever a change may have made something routable; the sweeper as a safety net.
        ``trigger``: why, for tickets that had already waited; ``next_wake(timeout)``: the
        dispatcher's wakes, taken while the deliveries are under way (see ``drain``). Returns
        how many were assigned."""
        assigned = self.drain(contract.TIERS, trigger, next_wake)
        self.note_waiting()
        return assigned

    def note_waiting(self) -> int:
        with self.uow.read() as session:
            entries = ops.queue_entries(session, unnoted_only=True)
            if not entries:
                return 0
            agents = ops.agent_states(session)
        now = ops.now_utc()
        relax = self.settings.relax_skills_after_seconds
        waiting = []
        for entry in entries:
            # someone can take it now (it arrived during the round, or a slot freed meanwhile):
            # the wake that queued it brings another round; the explanation only for the others
            if domain.choose_agent(entry.ticket, agents, now, relax, record=False).winner is not None:
                continue
            waiting.append((entry, domain.choose_agent(entry.ticket, agents, now, relax), entry.trigger or "sweep"))
        return self._note_waiting(waiting) if waiting else 0

    def drain_for_agent(self, agent_id: str, trigger: str) -> int:
        with self.uow.read() as session:
            tiers = ops.agent_tiers(session, agent_id)
        return self.drain(tiers, trigger) if tiers else 0

    def drain(self, tiers, trigger: str, next_wake=None) -> int:
        """Assign queued tickets of ``tiers`` to free agents, in queue order, until one of the
        two runs out. Each round plans from one read of the agents and the queue and claims the
        plan CLAIM_BATCH tickets per transaction; the claims are delivered (a few at a time)
        and confirmed (in batches) while the next round plans, as a claimed ticket is no longer
        queued and its slot is already taken. A ticket's decision carries its own queue
        trigger (created, reopened, escalated...) the first time it is tried, ``trigger`` once
        it has waited. Returns how many were assigned.

        ``next_wake(timeout) -> trigger | None`` (the dispatcher's own round only): once nothing
        is left to claim, the round waits for its deliveries while taking the wakes that come
        meanwhile, each starting another round at once (every tier), for at most
        DISPATCH_WAKES_SECONDS; without it, tickets queued during the last deliveries (tens of
        milliseconds when the tickets service is busy) would wait for all of them to end."""
        deliveries = _Deliveries(self, DELIVERY_CONCURRENCY)
        wakes_until = time.monotonic() + DISPATCH_WAKES_SECONDS
        rounds = 0
        while rounds < MAX_DRAIN_ROUNDS:
            rounds += 1
            released = deliveries.released  # before the round reads: a slot given back during it counts
            if self._drain_round(tiers, trigger, deliveries):
                continue  # read again: what arrived meanwhile, or what a lost race left
            if next_wake is not None and time.monotonic() < wakes_until:
                try:  # those nobody can take are recorded now, not when the round ends
                    self.note_waiting()
                except Exception as exc:  # the end of the round, or the sweeper, tries again
                    log.warning("recording the waiting tickets failed: %r", exc)
                woken = self._wait_for_deliveries(deliveries, next_wake)
                if woken is not None:
                    tiers, trigger, rounds = contract.TIERS, woken, 0
                    continue
            deliveries.wait()
            if deliveries.released == released:
                break  # nothing to claim, and no refused delivery gave a slot back meanwhile
        return deliveries.wait()[0]

    @staticmethod
    def _wait_for_deliveries(deliveries: "_Deliveries", next_wake) -> str | None:
        """Until every delivery is confirmed, or a wake's trigger if one comes first while at
        most WAKE_WHEN_IN_FLIGHT batches are still under way: claiming more while the tickets
        service works through a queue of batches would only make it longer, and one round per
        wake would make each round small (it reads the agents and the queue). Once they are
        all confirmed: the trigger of a wake that came meanwhile (the round goes on rather than
        end and have the dispatcher start the next one for it), or None."""
        while deliveries.busy():
            if deliveries.in_flight() <= WAKE_WHEN_IN_FLIGHT:
                woken = next_wake(WAKE_POLL_SECONDS)
                if woken is not None:
                    return woken
            else:  # woken by the answer that brings it down to WAKE_WHEN_IN_FLIGHT, not a poll later
                deliveries.wait_for_answer(WAKE_POLL_SECONDS)
            eventlet.sleep(0)  # the deliveries run even if next_wake answered without waiting
        return next_wake(0)

    def _drain_round(self, tiers, trigger: str, deliveries: "_Deliveries") -> bool:
        """One read, one plan, its claims handed to ``deliveries``. True when it claimed
        something or lost a race (another round may find more)."""
        relax = self.settings.relax_skills_after_seconds
        with self.uow.read() as session:
            agents = ops.agent_states(session)
            # nobody free in these tiers (the usual case with a long queue): skip reading it
            if not any(a.presence == "online" and a.load < a.capacity and a.tiers & set(tiers) for a in agents):
                return False
            entries = ops.queue_entries(session, tiers)
        if not entries:
            return False
        now = ops.now_utc()
        started = time.perf_counter()
        plan = domain.plan_drain([entry.ticket for entry in entries], agents, now, self.settings.aging_seconds, relax)
        if not plan.assignments:
            return False
        per_decision = (time.perf_counter() - started) / len(plan.assignments)
        by_ticket = {entry.ticket.ticket_id: entry for entry in entries}
        # each decision is explained when read, from the agents as this round read them and the
        # loads its plan had raised before that step: the round writes them once, instead of
        # every decision listing every agent of its tier
        planned_tiers = {step.ticket.tier for step in plan.assignments}
        listed = [agent for agent in agents if agent.tiers & planned_tiers]
        snapshot = _RoundSnapshot(ops.new_id(), now, listed, [step.agent_id for step in plan.assignments],
                                  len(agents) - len(listed))
        # the whole plan, a batch at a time, without reading the queue again: claims are
        # compare-and-set, so a ticket or a slot taken meanwhile only ends the plan early
        for first in range(0, len(plan.assignments), CLAIM_BATCH):
            planned = []
            for index, step in enumerate(plan.assignments[first:first + CLAIM_BATCH], start=first):
                metrics.DECISION_SECONDS.observe(per_decision)
                entry = by_ticket[step.ticket.ticket_id]
                choice = domain.Choice(step.agent_id, (), domain.skills_relaxed(step.ticket, now, relax))
                planned.append(_Planned(step.ticket, step.agent_id, choice,
                                        entry.trigger if entry.trigger and not entry.noted else trigger,
                                        entry.changes, plan_step=index))
            claims = self._claim_all(planned, snapshot)
            deliveries.submit(claims)
            if len(claims) < len(planned):
                return True
        return True

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
        """Finish what crashes or lost races left: stale claims and triages, rules' changes not
        delivered, tickets held by offline agents; then dispatch every tier. Safe on any number
        of replicas at once."""
        stale_before = ops.now_utc() - timedelta(seconds=self.settings.retry_after_seconds)
        with self.uow.read() as session:
            stale_claims = [Claim(ticket_id, agent_id, decision_id, tier, trigger, created_at, changes or None)
                            for ticket_id, agent_id, decision_id, tier, created_at, trigger, changes
                            in session.execute(
                select(RoutedTicket.ticket_id, RoutedTicket.assignee_id, RoutedTicket.claim_decision_id,
                       RoutedTicket.tier, RoutedTicket.ticket_created_at, Decision.trigger,
                       RoutedTicket.pending_changes)
                .join(Decision, Decision.id == RoutedTicket.claim_decision_id)
                .where(RoutedTicket.state == domain.ASSIGNING, RoutedTicket.claimed_at < stale_before))]
            stale_triage = list(session.scalars(select(RoutedTicket.ticket_id).where(
                RoutedTicket.state == domain.TRIAGE, RoutedTicket.queued_at < stale_before)))
            # rules' changes no assignment carried and no send delivered (no answer, a crash)
            undelivered = ops.pending_changes_before(session, stale_before)
            # held by an agent who went offline, where the requeue did not reach tickets
            orphaned = [] if self.settings.offline_policy != "requeue" else list(session.scalars(
                select(RoutedTicket.ticket_id).join(Agent, Agent.id == RoutedTicket.assignee_id).where(
                    RoutedTicket.state == domain.ASSIGNED, Agent.presence == "offline",
                    RoutedTicket.status.in_(contract.ACTIVE_STATUSES),
                    RoutedTicket.updated_at < stale_before)))
        for ticket_id in orphaned:
            self.unassign_and_route(ticket_id, "requeued")
        self._reconcile_loads_now_and_then()
        self._deliver_all(stale_claims)
        for ticket_id in stale_triage:
            self.triage(ticket_id)
        self._send_pending_changes(undelivered)
        # the dispatcher's own round (never two at once in this process); inline without one
        self.request_dispatch("sweep")
        self.refresh_metrics()
        return {"redelivered": len(stale_claims), "triaged": len(stale_triage), "requeued": len(orphaned)}

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

