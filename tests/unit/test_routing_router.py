"""The routing Router's orchestration without a broker (services/routing/router.py).

A real, migrated SQLite database per test; the tickets service is an in-memory fake that keeps
tickets, records every call and publishes each changed snapshot as the tickets service's event
would carry it. ``Routing.pump`` delivers those snapshots in order through
``operations.apply_snapshot`` + ``Router.follow_up``, as the service's event handlers do.
"""
import copy
import uuid
from datetime import datetime, timedelta, timezone

import eventlet
from types import SimpleNamespace
import pytest
from sqlalchemy import event as sqlalchemy_event, select, update
from sqlalchemy.exc import OperationalError

from contracts import routing as contract
from contracts.errors import Conflict, HelpdeskError, NotFound, PreconditionFailed, ValidationError, error_payload
from servicekit.tables import OUTBOX
from services.routing import domain, metrics, operations as ops, router as router_module
from services.routing.models import Agent, AgentSnapshot, Decision, RoutedTicket, Skill
from services.routing.router import Router, RoutingSettings
from services.routing.service import TicketsPort

SUPERVISOR = ops.Actor("sup-1", "supervisor")
ANN_ACTOR = ops.Actor("ann", "agent")


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


class FakeTickets:
    """The four tickets RPCs routing calls (get_ticket, assign_ticket, update_ticket,
    add_comment), in memory, with the real service's rules that matter here: assigning a new
    ticket opens it, a closed ticket cannot be reassigned, an assignment that changes nothing is
    answered without a new version."""

    def __init__(self):
        self.tickets = {}
        self.calls = []       # (method, ticket_id, *args)
        self.published = []   # snapshots, in the order the tickets service would publish them
        self.comments = []
        self.refusals = {}    # (method, ticket_id) -> [exception, ...] raised by the next calls
        self._created = 0

    # --- what people do in the tickets service ---

    def create(self, priority="normal", group=None, subject="VPN is down") -> dict:
        self._created += 1
        ticket_id = str(uuid.uuid4())
        # spaced a second apart, in creation order, a little in the past
        created = datetime.now(timezone.utc) - timedelta(minutes=30) + timedelta(seconds=self._created)
        self.tickets[ticket_id] = {
            "id": ticket_id, "number": 1000 + self._created, "subject": subject,
            "description": "Cannot connect since this morning", "status": "new", "priority": priority,
            "category": None, "tags": [], "channel": "web", "requester_id": "req-1", "organization_id": "acme",
            "assignee_id": None, "group": group, "created_at": iso(created), "updated_at": iso(created),
            "version": 1}
        return self._publish(ticket_id)

    def set_status(self, ticket_id, status) -> dict:
        return self._change(ticket_id, status=status)

    # --- the RPCs ---

    def get_ticket(self, actor, ticket_id):
        self._called("get_ticket", ticket_id)
        return copy.deepcopy(self._ticket(ticket_id))

    def assign_ticket(self, actor, ticket_id, assignee_id, group):
        self._called("assign_ticket", ticket_id, assignee_id, group)
        ticket = self._ticket(ticket_id)
        if ticket["status"] == "closed":
            raise Conflict("closed tickets cannot be reassigned", {"status": ["ticket is closed"]})
        if assignee_id == ticket["assignee_id"] and group in (None, ticket["group"]):
            return copy.deepcopy(ticket)
        changes = {"assignee_id": assignee_id}
        if group is not None:
            changes["group"] = group
        if assignee_id is not None and ticket["status"] == "new":
            changes["status"] = "open"
        return self._change(ticket_id, **changes)

    def assign_tickets(self, actor, assignments):
        """As the tickets service: each assignment on its own, a typed error per refusal; any
        other exception (a lost reply) fails the whole call."""
        answers = []
        for item in assignments:
            try:
                if {"assignee_id", "group", "status"} & set(item.get("changes") or {}):
                    raise ValidationError("changes carry the assignment's own fields", {"changes": ["no group"]})
                held_by = self._ticket(item["ticket_id"])["assignee_id"]
                if item.get("only_if_unassigned") and held_by not in (None, item["assignee_id"]):
                    raise Conflict("the ticket was assigned to someone else meanwhile",
                                   {"assignee_id": [f"assigned to {held_by}"]})
                if item.get("changes"):
                    view = self.update_ticket(actor, item["ticket_id"], {
                        **item["changes"], "assignee_id": item["assignee_id"], "group": item["group"]},
                        item.get("expected_version"))
                else:
                    view = self.assign_ticket(actor, item["ticket_id"], item["assignee_id"], item["group"])
                answers.append({"ticket": view})
            except HelpdeskError as exc:
                answers.append({"error": error_payload(exc)})
        return answers

    def update_ticket(self, actor, ticket_id, changes, expected_version=None):
        self._called("update_ticket", ticket_id, changes)
        ticket = self._ticket(ticket_id)
        if expected_version is not None and expected_version != ticket["version"]:
            raise PreconditionFailed(f"the ticket is at version {ticket['version']}, not {expected_version}")
        return self._change(ticket_id, **changes)

    def add_comment(self, actor, ticket_id, data):
        self._called("add_comment", ticket_id, data)
        self._ticket(ticket_id)
        self.comments.append((ticket_id, data))
        return {"id": str(uuid.uuid4()), **data}

    # --- helpers ---

    def assign_calls(self, ticket_id=None):
        return [call[1:] for call in self.calls
                if call[0] == "assign_ticket" and (ticket_id is None or call[1] == ticket_id)]

    def _called(self, method, ticket_id, *args):
        self.calls.append((method, ticket_id, *args))
        pending = self.refusals.get((method, ticket_id))
        if pending:
            raise pending.pop(0)

    def _ticket(self, ticket_id):
        if ticket_id not in self.tickets:
            raise NotFound("no such ticket")
        return self.tickets[ticket_id]

    def _change(self, ticket_id, **changes) -> dict:
        ticket = self.tickets[ticket_id]
        ticket.update(changes)
        ticket["version"] += 1
        ticket["updated_at"] = iso(datetime.now(timezone.utc))
        return self._publish(ticket_id)

    def _publish(self, ticket_id) -> dict:
        self.published.append(copy.deepcopy(self.tickets[ticket_id]))
        return copy.deepcopy(self.tickets[ticket_id])


class SilentProxy:
    """What nameko's RpcProxy is to ``TicketsPort``, over the fake: ``lose_replies(method, n)``
    lets the next n calls of ``method`` take effect in the tickets service while their answer
    never arrives (the caller's deadline fires)."""

    def __init__(self, tickets: FakeTickets):
        self._tickets = tickets
        self._lost = {}

    def lose_replies(self, method, count=1):
        self._lost[method] = count

    def __getattr__(self, method):
        return _FakeProxyMethod(self, method)


class _FakeProxyMethod:
    """``proxy.method(*args)`` and ``proxy.method.call_async(*args).result()``; the call takes
    effect when it is sent, its answer may be lost."""

    def __init__(self, proxy: "SilentProxy", method: str):
        self._proxy, self._method = proxy, method

    def __call__(self, *args):
        return self.call_async(*args).result()

    def call_async(self, *args):
        result = getattr(self._proxy._tickets, self._method)(*args)
        lost = bool(self._proxy._lost.get(self._method))
        if lost:
            self._proxy._lost[self._method] -= 1
        return SimpleNamespace(result=lambda: eventlet.sleep(5) if lost else result)  # the deadline fires first


class Routing:
    """The routing service's entrypoints as far as the Router goes: events, presence, sweeps."""

    def __init__(self, uow, tickets: FakeTickets, settings: RoutingSettings = RoutingSettings(), port=None):
        self.uow, self.tickets = uow, tickets
        self.router = Router(uow, port or tickets, settings)
        self._fed = 0

    def feed(self, snapshot):
        """One ticket event: mirror the snapshot, commit, then follow up (AfterCommit)."""
        with self.uow.transaction() as session:
            row, change = ops.apply_snapshot(session, snapshot)
            ticket_id = row.ticket_id
        self.router.follow_up(ticket_id, change)
        return change

    def pump(self):
        """Deliver every snapshot the tickets service published since the last pump, in order;
        follow-ups that change tickets publish more, which are delivered too."""
        while self._fed < len(self.tickets.published):
            snapshot = self.tickets.published[self._fed]
            self._fed += 1
            self.feed(snapshot)

    def agent(self, agent_id, tiers=("L1",), skills=(), capacity=3, presence="online"):
        with self.uow.transaction() as session:
            for skill in skills:
                if session.get(Skill, skill) is None:
                    ops.create_skill(session, SUPERVISOR, {"name": skill, "description": None})
            ops.create_agent(session, SUPERVISOR, contract.CreateAgentRequest().load({
                "id": agent_id, "display_name": agent_id, "tiers": list(tiers),
                "skills": [{"name": s} for s in skills], "capacity": capacity}))
        if presence != "offline":
            self.presence(agent_id, presence)

    def presence(self, agent_id, presence):
        with self.uow.transaction() as session:
            _view, previous = ops.set_presence(session, SUPERVISOR, agent_id, presence)
        self.router.presence_changed(agent_id, presence, previous)

    def row(self, ticket_id) -> dict:
        with self.uow.read() as session:
            row = session.get(RoutedTicket, ticket_id)
            return {"state": row.state, "assignee_id": row.assignee_id, "status": row.status, "tier": row.tier,
                    "version": row.ticket_version}

    def state(self, ticket_id) -> str:
        return self.row(ticket_id)["state"]

    def outcomes(self, ticket_id) -> list:
        with self.uow.read() as session:
            return [(d.outcome, d.agent_id) for d in session.scalars(
                select(Decision).where(Decision.ticket_id == ticket_id).order_by(Decision.decided_at, Decision.id))]

    def load(self, agent_id) -> int:
        with self.uow.read() as session:
            return ops.agent_load(session, agent_id)

    def events(self, event_type, ticket_id=None) -> list:
        with self.uow.read() as session:
            envelopes = [row.envelope for row in session.execute(
                select(OUTBOX).where(OUTBOX.c.event_type == event_type).order_by(OUTBOX.c.id))]
        return [e["payload"] for e in envelopes if ticket_id is None or e["payload"].get("ticket_id") == ticket_id]


@pytest.fixture
def tickets():
    return FakeTickets()


@pytest.fixture
def routing(routing_uow, tickets):
    return Routing(routing_uow, tickets)


# --- the ordinary path ---------------------------------------------------------------------------

def test_a_new_ticket_is_triaged_and_assigned_to_the_online_agent(routing, tickets):
    routing.agent("ann")
    ticket = tickets.create()
    routing.pump()
    assert tickets.tickets[ticket["id"]]["assignee_id"] == "ann"
    assert tickets.tickets[ticket["id"]]["status"] == "open"
    assert routing.row(ticket["id"]) == {"state": "assigned", "assignee_id": "ann", "status": "open",
                                         "tier": "L1", "version": 2}
    assert routing.outcomes(ticket["id"]) == [("assigned", "ann")]
    routed = routing.events(contract.TICKET_ROUTED, ticket["id"])
    assert len(routed) == 1 and routed[0]["trigger"] == "created" and routed[0]["agent_id"] == "ann"
    assert routing.load("ann") == 1


def test_pending_frees_the_slot_and_the_next_queued_ticket_takes_it(routing, tickets):
    routing.agent("ann", capacity=1)
    first, second = tickets.create(), tickets.create()
    routing.pump()
    assert routing.state(first["id"]) == "assigned" and routing.state(second["id"]) == "queued"
    tickets.set_status(first["id"], "pending")
    routing.pump()
    assert tickets.tickets[second["id"]]["assignee_id"] == "ann"
    assert routing.load("ann") == 1
    assert routing.events(contract.TICKET_ROUTED, second["id"])[0]["trigger"] == "capacity_freed"


# --- a refused claim -----------------------------------------------------------------------------

def test_a_claim_refused_because_the_ticket_closed_releases_the_slot_to_the_next_queued_ticket(routing, tickets):
    routing.agent("ann", capacity=1, presence="offline")
    first, second = tickets.create(), tickets.create()
    routing.pump()
    assert routing.state(first["id"]) == routing.state(second["id"]) == "queued"
    tickets.set_status(first["id"], "closed")  # routing has not seen this event yet

    routing.presence("ann", "online")

    assert tickets.assign_calls() == [(first["id"], "ann", "L1"), (second["id"], "ann", "L1")]
    assert tickets.tickets[second["id"]]["assignee_id"] == "ann"
    assert routing.row(first["id"])["state"] == "idle" and routing.row(first["id"])["assignee_id"] is None
    assert routing.outcomes(first["id"]) == [("queued", None), ("released", "ann")]
    assert routing.outcomes(second["id"]) == [("queued", None), ("assigned", "ann")]
    assert routing.load("ann") == 1
    routing.pump()  # the late events change nothing
    assert routing.state(first["id"]) == "idle" and routing.state(second["id"]) == "assigned"
    assert routing.load("ann") == 1


def test_a_claim_on_a_ticket_the_tickets_service_no_longer_has_is_released(routing, tickets):
    routing.agent("ann", capacity=1)
    ticket = tickets.create()
    tickets.refusals[("assign_ticket", ticket["id"])] = [NotFound("no such ticket")]
    routing.pump()
    assert routing.outcomes(ticket["id"]) == [("released", "ann")]
    assert routing.row(ticket["id"])["state"] == "idle" and routing.load("ann") == 0
    assert routing.events(contract.TICKET_ROUTED) == []


# --- an unanswered delivery ----------------------------------------------------------------------

def test_a_tickets_call_without_an_answer_raises_an_ordinary_timeout_error():
    # eventlet.Timeout is a BaseException: the Router's ``except Exception`` would let it escape
    tickets = FakeTickets()
    ticket = tickets.create()
    proxy = SilentProxy(tickets)
    proxy.lose_replies("get_ticket")
    with pytest.raises(TimeoutError):
        TicketsPort(proxy, timeout=0.02).get_ticket(ops.SYSTEM_ACTOR, ticket["id"])


def test_an_unanswered_delivery_stays_assigning_until_the_sweeper_delivers_it_again(routing_uow, tickets):
    proxy = SilentProxy(tickets)
    port = TicketsPort(proxy, timeout=0.05)
    routing = Routing(routing_uow, tickets, RoutingSettings(retry_after_seconds=0), port=port)
    routing.agent("ann")
    ticket = tickets.create()
    proxy.lose_replies("assign_tickets")

    routing.pump()  # the assignment happened in tickets, its answer never came; its event did

    assert routing.row(ticket["id"])["state"] == "assigning"
    assert routing.row(ticket["id"])["assignee_id"] == "ann"
    assert routing.load("ann") == 1, "the claim holds the slot meanwhile"
    assert routing.outcomes(ticket["id"]) == [("assigning", "ann")]
    assert routing.events(contract.TICKET_ROUTED) == []
    patient = Router(routing_uow, port, RoutingSettings(retry_after_seconds=3600))
    assert patient.sweep()["redelivered"] == 0, "not before retry_after_seconds"

    assert routing.router.sweep()["redelivered"] == 1

    assert tickets.assign_calls(ticket["id"]) == [(ticket["id"], "ann", "L1")] * 2
    assert routing.row(ticket["id"])["state"] == "assigned"
    assert routing.outcomes(ticket["id"]) == [("assigned", "ann")]
    assert len(routing.events(contract.TICKET_ROUTED, ticket["id"])) == 1
    assert routing.router.sweep()["redelivered"] == 0
    assert routing.load("ann") == 1


def _claim_of(routing, ticket_id) -> router_module.Claim:
    with routing.uow.read() as session:
        row = session.get(RoutedTicket, ticket_id)
        return router_module.Claim(row.ticket_id, row.assignee_id, row.claim_decision_id, row.tier, "created",
                                   row.ticket_created_at, row.pending_changes)


def _mirror_columns(routing, ticket_id) -> dict:
    with routing.uow.read() as session:
        row = session.get(RoutedTicket, ticket_id)
        return {column: getattr(row, column) for column in (
            "state", "tier", "assignee_id", "status", "priority", "subject", "category", "channel", "organization_id",
            "tags", "required_skills", "ticket_version", "queued_at", "queue_trigger", "queue_noted",
            "pending_changes")}


def test_a_plain_confirmation_writes_the_mirror_as_apply_snapshot_would(routing_uow, tickets, monkeypatch):
    proxy = SilentProxy(tickets)
    routing = Routing(routing_uow, tickets, port=TicketsPort(proxy, timeout=0.05))
    routing.agent("ann", skills=("network",), capacity=10)
    _rule(routing, set_category="network", require_skills=["network"])  # the claims carry the rules' changes
    by_orm, plainly = tickets.create(), tickets.create()
    proxy.lose_replies("assign_tickets", 2)
    for ticket in (by_orm, plainly):  # each claimed and delivered; the answers are lost
        routing.feed(copy.deepcopy(ticket))
    assert [routing.state(t["id"]) for t in (by_orm, plainly)] == ["assigning", "assigning"]
    answers = {t["id"]: copy.deepcopy(tickets.tickets[t["id"]]) for t in (by_orm, plainly)}
    assert {a["category"] for a in answers.values()} == {"network"} and {a["version"] for a in answers.values()} == {2}
    for answer in answers.values():  # every field the mirror copies differs from what it holds
        answer.update(status="open", priority="high", subject="VPN down again", channel="email", tags=["vip"],
                      organization_id="globex", category="vpn")
    written = []
    real_confirms_plainly, real_confirm_plainly = ops.confirms_plainly, ops.confirm_plainly
    monkeypatch.setattr(ops, "confirm_plainly", lambda session, plain: (written.extend(plain),
                                                                         real_confirm_plainly(session, plain)))

    monkeypatch.setattr(ops, "confirms_plainly", lambda *args: False)
    routing.router._confirm_all([(_claim_of(routing, by_orm["id"]), answers[by_orm["id"]])])
    monkeypatch.setattr(ops, "confirms_plainly", real_confirms_plainly)
    routing.router._confirm_all([(_claim_of(routing, plainly["id"]), answers[plainly["id"]])])

    assert [ticket_id for ticket_id, _view, _clears in written] == [plainly["id"]]
    assert _mirror_columns(routing, plainly["id"]) == _mirror_columns(routing, by_orm["id"])
    assert _mirror_columns(routing, plainly["id"]) | {"required_skills": None, "queue_noted": None} == {
        "state": "assigned", "tier": "L1", "assignee_id": "ann", "status": "open", "priority": "high",
        "subject": "VPN down again", "category": "vpn", "channel": "email", "organization_id": "globex",
        "tags": ["vip"], "required_skills": None, "ticket_version": 2, "queued_at": None, "queue_trigger": None,
        "queue_noted": None, "pending_changes": None}
    with routing.uow.read() as session:  # the number is each ticket's own
        assert [session.get(RoutedTicket, t["id"]).number for t in (by_orm, plainly)] == [
            answers[t["id"]]["number"] for t in (by_orm, plainly)]
    assert routing.load("ann") == 2
    assert [len(routing.events(contract.TICKET_ROUTED, t["id"])) for t in (by_orm, plainly)] == [1, 1]


def test_a_round_takes_a_wake_that_came_while_its_last_deliveries_were_confirmed():
    deliveries = SimpleNamespace(busy=lambda: False, in_flight=lambda: 0)
    asked = []

    def next_wake(timeout):
        asked.append(timeout)
        return "created"

    assert Router._wait_for_deliveries(deliveries, next_wake) == "created"
    assert asked == [0]


def test_a_dispatcher_waiting_on_its_deliveries_hears_of_an_answer_at_once():
    answered = eventlet.event.Event()
    stub = SimpleNamespace(_send_assignments=lambda claims, with_changes: None,
                           _deliver_batch=lambda claims, sent: (answered.wait(), [None] * len(claims))[1])
    deliveries = router_module._Deliveries(stub, 4)
    deliveries.submit([object()])
    eventlet.sleep(0)
    assert deliveries.in_flight() == 1
    waiter = eventlet.spawn(deliveries.wait_for_answer, 5.0)
    eventlet.sleep(0.01)
    assert not waiter.dead
    began = eventlet.hubs.get_hub().clock()
    answered.send()
    waiter.wait()
    assert eventlet.hubs.get_hub().clock() - began < 0.05
    assert deliveries.wait() == (0, 0)


@pytest.mark.parametrize("answer, plain", [
    ({}, True),
    ({"assignee_id": "bob"}, False),  # someone else's meanwhile
    ({"status": "pending"}, False),  # the slot goes back
    ({"status": "solved"}, False),
    ({"version": 1}, False),  # not newer than the mirror
    ({"version": "2"}, False),
])
def test_only_the_plain_outcome_of_a_claim_is_confirmed_without_loading_the_row(answer, plain):
    state = ("assigning", "decision-1", "ann", "new", 1)
    view = {"version": 2, "assignee_id": "ann", "status": "open", **answer}
    assert ops.confirms_plainly(state, "decision-1", view) is plain
    assert ops.confirms_plainly(("assigned",) + state[1:], "decision-1", view) is False
    assert ops.confirms_plainly(state, "decision-2", view) is False


def test_a_stale_claim_the_tickets_service_now_refuses_is_released_by_the_sweeper(routing_uow, tickets):
    routing = Routing(routing_uow, tickets, RoutingSettings(retry_after_seconds=0))
    routing.agent("ann")
    ticket = tickets.create()
    tickets.refusals[("assign_ticket", ticket["id"])] = [TimeoutError("no answer"),
                                                         Conflict("closed tickets cannot be reassigned")]
    routing.pump()
    assert routing.state(ticket["id"]) == "assigning"
    routing.router.sweep()
    assert routing.state(ticket["id"]) == "idle" and routing.load("ann") == 0
    assert routing.outcomes(ticket["id"])[-1] == ("released", "ann")


# --- snapshots out of order and twice ---------------------------------------------------------

def test_an_older_snapshot_arriving_after_a_newer_one_is_ignored(routing, tickets):
    routing.agent("ann", capacity=1)
    ticket = tickets.create()
    routing.pump()
    assigned = copy.deepcopy(tickets.tickets[ticket["id"]])  # version 2, open, ann
    routing.feed(tickets.set_status(ticket["id"], "pending"))
    routing._fed = len(tickets.published)
    assert routing.load("ann") == 0

    assert routing.feed(assigned) is None
    assert routing.feed(ticket) is None  # and the very first one

    assert routing.row(ticket["id"]) == {"state": "assigned", "assignee_id": "ann", "status": "pending",
                                         "tier": "L1", "version": 3}
    assert routing.load("ann") == 0


def test_a_duplicate_snapshot_has_no_second_effect(routing, tickets):
    ticket = tickets.create()
    assert routing.feed(ticket) is not None
    assert routing.feed(ticket) is None
    assert routing.state(ticket["id"]) == "queued"
    assert routing.outcomes(ticket["id"]) == [("queued", None)]
    assert len(routing.events(contract.TICKET_QUEUED, ticket["id"])) == 1

    routing.agent("ann")
    assigned = tickets.tickets[ticket["id"]]
    assert assigned["assignee_id"] == "ann"
    calls = len(tickets.calls)
    routing.feed(copy.deepcopy(assigned))
    assert routing.feed(copy.deepcopy(assigned)) is None
    assert len(tickets.calls) == calls
    assert len(routing.events(contract.TICKET_ROUTED, ticket["id"])) == 1


# --- decision records -----------------------------------------------------------------------------

def test_a_decision_lists_every_candidate_as_an_object_whatever_the_stored_shape(routing, tickets):
    routing.agent("ann")
    routing.agent("bob", capacity=0)
    ticket = tickets.create()
    routing.pump()
    with routing.uow.read() as session:
        decision = session.scalars(select(Decision).where(Decision.ticket_id == ticket["id"],
                                                          Decision.outcome == "assigned")).one()
        # a dispatch round's decision points at the round's snapshot of the agents
        assert decision.candidates == [] and decision.agent_snapshot_id is not None and decision.plan_step == 0
        decision_id = decision.id
        view = ops.ticket_routing(session, SUPERVISOR, ticket["id"])["decisions"][-1]
    by_agent = {c["agent_id"]: c for c in view["candidates"]}
    assert by_agent["ann"]["rank"] == 1 and by_agent["ann"]["excluded"] is None
    assert by_agent["bob"]["excluded"] == "at_capacity" and by_agent["bob"]["capacity"] == 0
    assert set(by_agent["ann"]) == {"agent_id", "excluded", "missing_skills", "load", "capacity", "idle_since",
                                    "rank"}
    # records that list their candidates, as rows or (before rows) as objects, read back as objects
    as_rows = [[candidate[field] for field in ops.CANDIDATE_FIELDS] for candidate in view["candidates"]]
    old = {"agent_id": "cy", "excluded": "offline", "missing_skills": [], "load": 0, "capacity": 3,
           "idle_since": None, "rank": None}
    for stored, expected in ((as_rows, view["candidates"]), ([old], [old])):
        with routing.uow.transaction() as session:
            decision = session.get(Decision, decision_id)
            decision.candidates, decision.agent_snapshot_id, decision.plan_step = stored, None, None
        with routing.uow.read() as session:
            assert ops.ticket_routing(session, SUPERVISOR, ticket["id"])["decisions"][-1]["candidates"] == expected
    # a decision whose snapshot is gone, or whose step it does not have, says so instead of failing the read
    with routing.uow.read() as session:
        snapshot_id = session.scalars(select(AgentSnapshot.id)).one()
    for snapshot_id, step in (("gone", 0), (snapshot_id, 1), (snapshot_id, -1)):
        with routing.uow.transaction() as session:
            decision = session.get(Decision, decision_id)
            decision.candidates, decision.agent_snapshot_id, decision.plan_step = [], snapshot_id, step
        with routing.uow.read() as session:
            view = ops.ticket_routing(session, SUPERVISOR, ticket["id"])["decisions"][-1]
        assert view["candidates"] == [] and "not kept" in view["detail"], (snapshot_id, step)


def test_the_decisions_of_one_round_share_its_snapshot_each_explained_with_the_loads_at_its_step(routing, tickets):
    routing.agent("ann", presence="offline")
    routing.agent("bob", presence="offline")
    routing.agent("cy", tiers=("L2",))  # of no tier the round assigns in: counted, not listed
    created = [tickets.create() for _ in range(3)]
    routing.pump()  # nobody online: all three wait
    routing.presence("ann", "online")  # one round assigns the three to ann
    with routing.uow.read() as session:
        decisions = session.execute(select(Decision.ticket_id, Decision.plan_step, Decision.agent_snapshot_id)
                                    .where(Decision.outcome == "assigned").order_by(Decision.plan_step)).all()
        assert [d.plan_step for d in decisions] == [0, 1, 2]
        assert len({d.agent_snapshot_id for d in decisions}) == 1
        snapshot = session.scalars(select(AgentSnapshot)).one()
        assert [agent[0] for agent in snapshot.agents] == ["ann", "bob"] and snapshot.agents_not_listed == 1
        views = {t["id"]: ops.ticket_routing(session, SUPERVISOR, t["id"])["decisions"][-1] for t in created}
    for step, decision in enumerate(decisions):
        view = views[decision.ticket_id]
        by_agent = {c["agent_id"]: c for c in view["candidates"]}
        assert view["agent_id"] == "ann" and by_agent["ann"]["rank"] == 1
        assert by_agent["ann"]["load"] == step, "the loads as the plan had them at this step"
        assert (by_agent["ann"]["idle_since"] is None) == (step == 0)
        assert by_agent["bob"]["excluded"] == "offline"
        assert "cy" not in by_agent and view["detail"] == "1 agents outside tier L1 not listed"


def _spy_on_plans(monkeypatch) -> list:
    """Each dispatch round's (agents, now, relax, plan), as the round planned."""
    plans, plan_drain = [], router_module.domain.plan_drain

    def spy(queue, agents, now, aging, relax=None):
        plan = plan_drain(queue, agents, now, aging, relax)
        plans.append((agents, now, relax, plan))
        return plan

    monkeypatch.setattr(router_module.domain, "plan_drain", spy)
    return plans


def _as_recorded_before_snapshots(agents, now, relax, plan) -> dict:
    """ticket id -> (candidates, detail), as a round recorded them in each decision before
    snapshots: the chooser at each step, with the loads the plan had raised by then."""
    states, recorded = {a.id: a for a in agents}, {}
    for step in plan.assignments:
        values = ops.decision_values(step.ticket.ticket_id, step.ticket.tier, sorted(step.ticket.required_skills),
                                     "created", "assigning", domain.choose_agent(step.ticket, states.values(), now, relax),
                                     step.agent_id)
        recorded[step.ticket.ticket_id] = ([ops._candidate_view(c) for c in values["candidates"]], values["detail"])
        chosen = states[step.agent_id]
        states[chosen.id] = domain.AgentState(chosen.id, chosen.tiers, chosen.skills, chosen.presence,
                                              chosen.capacity, chosen.load + 1, now)
    return recorded


def _assert_read_back_as_recorded_before(routing, plans) -> int:
    compared = 0
    with routing.uow.read() as session:
        for agents, now, relax, plan in plans:
            for ticket_id, (candidates, detail) in _as_recorded_before_snapshots(agents, now, relax, plan).items():
                decision = session.scalars(select(Decision).where(Decision.ticket_id == ticket_id,
                                                                  Decision.outcome == "assigned")).one_or_none()
                snapshot = decision and session.get(AgentSnapshot, decision.agent_snapshot_id)
                if snapshot is None or snapshot.planned_at != now:
                    continue  # this round lost the ticket; the round that won it is compared
                view = next(d for d in ops.ticket_routing(session, SUPERVISOR, ticket_id)["decisions"]
                            if d["id"] == decision.id)
                assert (view["candidates"], view["detail"]) == (candidates, detail), ticket_id
                compared += 1
    return compared


def test_a_round_over_several_tiers_and_claim_batches_reads_back_as_each_decision_was_made(routing, tickets,
                                                                                          monkeypatch):
    monkeypatch.setattr(router_module, "CLAIM_BATCH", 2)  # seven tickets: four claim transactions
    for agent_id, tiers in (("ann", ("L1",)), ("bob", ("L1", "L2")), ("cy", ("L2",)), ("dan", ("L3",)),
                            ("eve", ("L1",))):
        routing.agent(agent_id, tiers=tiers, capacity=4, presence="offline")
    with routing.uow.transaction() as session:
        session.get(Agent, "eve").last_assigned_at = ops.now_utc() - timedelta(minutes=5)
    for index in range(7):
        tickets.create(group="L1" if index % 2 else "L2")
    routing.pump()
    plans = _spy_on_plans(monkeypatch)
    with routing.uow.transaction() as session:
        session.execute(update(Agent).values(presence="online"))
    routing.router.dispatch("agent_online")
    assert _assert_read_back_as_recorded_before(routing, plans) == 7
    with routing.uow.read() as session:
        snapshot = session.scalars(select(AgentSnapshot)).one()  # one round, written once
        assert sorted(agent[0] for agent in snapshot.agents) == ["ann", "bob", "cy", "eve"]
        assert snapshot.agents_not_listed == 1 and len(snapshot.plan) == 7


def test_a_claim_transaction_that_fails_leaves_no_snapshot_and_the_next_round_explains_itself(routing, tickets,
                                                                                             monkeypatch):
    monkeypatch.setattr(router_module, "CLAIM_BATCH", 2)
    routing.agent("ann", capacity=5, presence="offline")
    for _ in range(5):
        tickets.create()
    routing.pump()
    insert_decisions, failed = ops.insert_decisions, []

    def first_claim_fails(session, rows):  # after the round's snapshot was inserted
        if rows and rows[0]["plan_step"] is not None and not failed:
            failed.append(rows)
            raise OperationalError("INSERT INTO routing_decisions", {}, Exception("database is locked"))
        return insert_decisions(session, rows)

    monkeypatch.setattr(ops, "insert_decisions", first_claim_fails)
    plans = _spy_on_plans(monkeypatch)
    routing.presence("ann", "online")
    assert failed, "the first claim transaction failed"
    with routing.uow.read() as session:
        snapshots = set(session.scalars(select(AgentSnapshot.id)))
        used = set(session.scalars(select(Decision.agent_snapshot_id).where(Decision.agent_snapshot_id.is_not(None))))
    assert snapshots == used, "every snapshot has decisions, every decision its snapshot"
    assert _assert_read_back_as_recorded_before(routing, plans) == 5


def test_a_transaction_writes_its_agents_counts_last_and_in_agent_id_order(routing, tickets):
    # tickets are locked in id order, then agents in id order, in every transaction (as claims
    # do): updating each ticket's agents as it went locked them in ticket order, and two such
    # batches on PostgreSQL could deadlock
    routing.agent("amy", presence="offline")
    routing.agent("zed", presence="offline")
    first, second = sorted((tickets.create(), tickets.create()), key=lambda t: t["id"])
    routing.pump()
    assigned = [dict(first, assignee_id="zed", status="open", version=2),
                dict(second, assignee_id="amy", status="open", version=2)]
    statements = []

    def record(conn, cursor, statement, parameters, context, executemany):
        statements.append((statement, parameters))

    with routing.uow.transaction() as session:
        engine = session.get_bind()
        sqlalchemy_event.listen(engine, "before_cursor_execute", record)
        try:
            for snapshot in assigned:  # in ticket id order, as a batch applies them
                ops.apply_snapshot(session, snapshot)
        finally:
            session.commit()
            sqlalchemy_event.remove(engine, "before_cursor_execute", record)
    agents_updated = [i for i, (sql, _) in enumerate(statements) if sql.startswith("UPDATE agents")]
    tickets_touched = [i for i, (sql, _) in enumerate(statements) if "routed_tickets" in sql]
    assert agents_updated and min(agents_updated) > max(tickets_touched), "agents after tickets"
    assert [statements[i][1][-1] for i in agents_updated] == ["amy", "zed"], "agents in id order"
    assert (routing.load("amy"), routing.load("zed")) == (1, 1)


def test_a_rolled_back_change_of_assignee_leaves_the_counts_as_they_were(routing, tickets):
    routing.agent("amy", presence="offline")
    ticket = tickets.create()
    routing.pump()
    with routing.uow.transaction() as session:
        ops.apply_snapshot(session, dict(ticket, assignee_id="amy", status="open", version=2))
        session.rollback()  # the transaction goes on, and commits nothing of the above
    assert routing.load("amy") == 0 and routing.row(ticket["id"])["assignee_id"] is None


# --- the waiting decision is recorded once per queue entry -----------------------------------

def test_routing_a_waiting_ticket_again_records_the_queued_decision_once(routing, tickets):
    ticket = tickets.create()
    routing.pump()
    routing.router.route(ticket["id"], "sweep")
    routing.router.route(ticket["id"], "sweep")
    routing.router.sweep()
    assert routing.outcomes(ticket["id"]) == [("queued", None)]
    assert len(routing.events(contract.TICKET_QUEUED, ticket["id"])) == 1


def test_each_time_a_ticket_is_queued_anew_one_queued_decision_is_recorded(routing, tickets):
    routing.agent("ann", capacity=1)
    blocker = tickets.create()
    routing.pump()
    ticket = tickets.create()
    routing.pump()
    assert routing.outcomes(ticket["id"]) == [("queued", None)]
    tickets.set_status(blocker["id"], "pending")
    routing.pump()  # ann's slot is free: the ticket goes to ann
    assert routing.state(ticket["id"]) == "assigned"
    tickets.set_status(blocker["id"], "open")  # the requester answered: ann is full again
    tickets.assign_ticket(ops.SYSTEM_ACTOR, ticket["id"], None, None)  # and the ticket goes back
    routing.pump()
    routing.router.route(ticket["id"], "sweep")
    assert [o for o, _ in routing.outcomes(ticket["id"])] == ["queued", "assigned", "queued"]
    assert len(routing.events(contract.TICKET_QUEUED, ticket["id"])) == 2


# --- escalation ----------------------------------------------------------------------------------

def test_escalation_moves_the_ticket_to_the_next_tier_and_an_agent_there(routing, tickets):
    routing.agent("ann", tiers=("L1",))
    routing.agent("bob", tiers=("L2",))
    ticket = tickets.create()
    routing.pump()
    assert tickets.tickets[ticket["id"]]["assignee_id"] == "ann"

    escalation = routing.router.escalate(ANN_ACTOR, ticket["id"], "needs a network engineer")

    assert (escalation["from_tier"], escalation["to_tier"]) == ("L1", "L2")
    assert tickets.tickets[ticket["id"]]["group"] == "L2"
    assert tickets.tickets[ticket["id"]]["assignee_id"] == "bob"
    assert routing.load("ann") == 0 and routing.load("bob") == 1
    assert routing.row(ticket["id"])["tier"] == "L2"
    event = routing.events(contract.TICKET_ESCALATED, ticket["id"])
    assert event == [{"ticket_id": ticket["id"], "from_tier": "L1", "to_tier": "L2",
                      "reason": "needs a network engineer", "actor_id": "ann", "trigger": "agent"}]
    assert len(tickets.comments) == 1 and "L1 → L2" in tickets.comments[0][1]["body"]


def test_escalating_past_l3_is_a_conflict(routing, tickets):
    ticket = tickets.create(group="L3")
    routing.pump()
    with pytest.raises(Conflict) as caught:
        routing.router.escalate(ANN_ACTOR, ticket["id"], "even higher")
    assert caught.value.errors == {"tier": ["at L3"]}
    assert tickets.assign_calls() == []


def test_escalating_to_a_lower_or_the_same_tier_is_invalid(routing, tickets):
    ticket = tickets.create(group="L2")
    routing.pump()
    for target in ("L1", "L2"):
        with pytest.raises(ValidationError) as caught:
            routing.router.escalate(ANN_ACTOR, ticket["id"], "wrong way", to_tier=target)
        assert caught.value.errors == {"to_tier": ["must be above L2"]}
    assert tickets.assign_calls() == [] and routing.row(ticket["id"])["tier"] == "L2"


def test_escalating_a_closed_ticket_is_a_conflict(routing, tickets):
    ticket = tickets.create()
    routing.pump()
    tickets.set_status(ticket["id"], "closed")
    with pytest.raises(Conflict) as caught:
        routing.router.escalate(ANN_ACTOR, ticket["id"], "too late")
    assert caught.value.errors == {"status": ["ticket is closed"]}
    assert tickets.assign_calls() == [] and tickets.comments == []


def test_escalating_an_unknown_ticket_is_not_found(routing, tickets):
    with pytest.raises(NotFound):
        routing.router.escalate(ANN_ACTOR, str(uuid.uuid4()), "who?")


# --- agents going offline ------------------------------------------------------------------------

def _ann_has_a_ticket_and_bob_is_free(routing, tickets):
    routing.agent("ann")
    routing.agent("bob", presence="offline")
    ticket = tickets.create()
    routing.pump()
    routing.presence("bob", "online")
    assert tickets.tickets[ticket["id"]]["assignee_id"] == "ann"
    return ticket


def test_with_the_keep_policy_an_agent_going_offline_keeps_their_tickets(routing_uow, tickets):
    routing = Routing(routing_uow, tickets, RoutingSettings(offline_policy="keep"))
    ticket = _ann_has_a_ticket_and_bob_is_free(routing, tickets)
    calls = len(tickets.assign_calls())

    routing.presence("ann", "offline")
    routing.pump()

    assert len(tickets.assign_calls()) == calls
    assert tickets.tickets[ticket["id"]]["assignee_id"] == "ann"
    assert routing.row(ticket["id"])["state"] == "assigned" and routing.load("ann") == 1


def test_with_the_requeue_policy_an_agent_going_offline_hands_their_tickets_back(routing_uow, tickets):
    routing = Routing(routing_uow, tickets, RoutingSettings(offline_policy="requeue"))
    ticket = _ann_has_a_ticket_and_bob_is_free(routing, tickets)

    routing.presence("ann", "offline")
    routing.pump()

    assert tickets.assign_calls(ticket["id"])[-2:] == [(ticket["id"], None, None), (ticket["id"], "bob", "L1")]
    assert tickets.tickets[ticket["id"]]["assignee_id"] == "bob"
    assert routing.row(ticket["id"])["assignee_id"] == "bob"
    assert routing.load("ann") == 0 and routing.load("bob") == 1


def test_going_away_hands_nothing_back_even_with_the_requeue_policy(routing, tickets):
    ticket = _ann_has_a_ticket_and_bob_is_free(routing, tickets)
    routing.presence("ann", "away")
    assert tickets.tickets[ticket["id"]]["assignee_id"] == "ann"


def test_a_ticket_reopened_while_its_assignee_is_offline_goes_to_someone_online(routing_uow, tickets):
    routing = Routing(routing_uow, tickets, RoutingSettings(offline_policy="keep"))
    ticket = _ann_has_a_ticket_and_bob_is_free(routing, tickets)
    tickets.set_status(ticket["id"], "solved")
    routing.pump()
    routing.presence("ann", "offline")
    tickets.set_status(ticket["id"], "open")
    routing.pump()
    assert tickets.tickets[ticket["id"]]["assignee_id"] == "bob"
    assert routing.load("ann") == 0 and routing.load("bob") == 1


# --- regressions found in review -------------------------------------------------------------

def test_an_escalated_pending_ticket_does_not_block_its_new_tiers_queue(routing, tickets):
    routing.agent("ann", tiers=("L1",), capacity=1)
    routing.agent("bob", tiers=("L2",), capacity=1, presence="away")
    waiting = tickets.create(priority="high")
    routing.pump()
    tickets.set_status(waiting["id"], "pending")
    routing.pump()
    routing.router.escalate(ANN_ACTOR, waiting["id"], "needs L2")
    routing.pump()
    assert routing.row(waiting["id"])["state"] == "idle"  # waits for its requester, in L2
    queued = tickets.create(group="L2", priority="low")
    routing.pump()
    routing.presence("bob", "online")
    routing.pump()
    routing.router.sweep()
    routing.pump()
    assert routing.row(queued["id"])["assignee_id"] == "bob"


def test_a_manual_reassignment_during_a_claim_wins_and_moves_the_count(routing, tickets):
    routing.agent("ann", capacity=3)
    routing.agent("xav", capacity=3, presence="away")
    deliver = tickets.assign_ticket

    def assign_then_reassign_by_hand(actor, ticket_id, assignee_id, group):
        view = deliver(actor, ticket_id, assignee_id, group)
        if assignee_id == "ann":  # a supervisor's reassignment is consumed before the confirmation
            tickets._change(ticket_id, assignee_id="xav")
            routing.pump()
        return view

    tickets.assign_ticket = assign_then_reassign_by_hand
    ticket = tickets.create()
    routing.pump()
    assert routing.row(ticket["id"])["assignee_id"] == tickets.tickets[ticket["id"]]["assignee_id"] == "xav"
    assert (routing.load("ann"), routing.load("xav")) == (0, 1)


def test_the_sweeper_does_not_redeliver_a_claim_someone_else_overtook(routing_uow, tickets):
    port = SilentProxy(tickets)
    routing = Routing(routing_uow, tickets, RoutingSettings(retry_after_seconds=0.0), port=TicketsPort(port, 0.2))
    routing.agent("ann", capacity=3)
    routing.agent("xav", capacity=3, presence="away")
    port.lose_replies("assign_tickets")
    ticket = tickets.create()
    routing.pump()
    tickets._change(ticket["id"], assignee_id="xav")  # a supervisor assigns by hand
    routing.pump()
    routing.router.sweep()
    routing.pump()
    assert tickets.tickets[ticket["id"]]["assignee_id"] == "xav"
    assert (routing.load("ann"), routing.load("xav")) == (0, 1)


def test_the_sweeper_corrects_a_drifted_agent_load(routing, tickets, routing_uow):
    from sqlalchemy import update
    from services.routing.models import Agent

    routing.agent("ann", capacity=3)
    ticket = tickets.create()
    routing.pump()
    with routing_uow.transaction() as session:
        session.execute(update(Agent).where(Agent.id == "ann").values(active_load=0))  # drift
    router_module._last_reconcile = float("-inf")
    routing.router.sweep()
    assert routing.load("ann") == 1 and routing.row(ticket["id"])["assignee_id"] == "ann"


def test_escalating_a_ticket_whose_claim_is_in_flight_asks_to_retry(routing_uow, tickets):
    port = SilentProxy(tickets)
    routing = Routing(routing_uow, tickets, RoutingSettings(retry_after_seconds=60.0), port=TicketsPort(port, 0.2))
    routing.agent("ann", tiers=("L1",), capacity=3)
    port.lose_replies("assign_tickets")  # the claim's delivery gets no answer: it stays assigning
    ticket = tickets.create()
    routing.pump()
    assert routing.row(ticket["id"])["state"] == "assigning"
    with pytest.raises(Conflict):
        routing.router.escalate(SUPERVISOR, ticket["id"], "needs L2")
    assert routing.row(ticket["id"])["tier"] == "L1"


def test_escalating_a_queued_ticket_changes_only_its_group_at_tickets(routing, tickets):
    routing.agent("lee", tiers=("L2",), capacity=3)
    ticket = tickets.create()  # no L1 agent: it waits in L1
    routing.pump()
    assert routing.row(ticket["id"])["state"] == "queued"
    routing.router.escalate(SUPERVISOR, ticket["id"], "needs L2")
    routing.pump()
    assert tickets.tickets[ticket["id"]]["assignee_id"] == "lee"
    assert tickets.tickets[ticket["id"]]["group"] == "L2"
    assert routing.row(ticket["id"])["tier"] == "L2" and routing.load("lee") == 1


# --- batches: the dispatcher's drain ---------------------------------------------------------------

ADMIN_ACTOR = ops.Actor("admin-1", "admin")


def _rule(routing, **actions):
    with routing.uow.transaction() as session:
        ops.create_rule(session, ADMIN_ACTOR, contract.RuleRequest().load({
            "name": "VPN", "conditions": [{"field": "subject", "operator": "contains_any", "value": ["vpn"]}],
            "actions": actions}))


def test_a_burst_waiting_for_agents_is_assigned_in_queue_order_within_capacity(routing, tickets):
    routing.agent("ann", capacity=3, presence="offline")
    routing.agent("bob", capacity=3, presence="offline")
    burst = [tickets.create() for _ in range(8)]
    routing.pump()
    assert {routing.state(t["id"]) for t in burst} == {"queued"}
    routing.presence("ann", "online")
    routing.presence("bob", "online")
    routing.pump()
    assigned = [t for t in burst if tickets.tickets[t["id"]]["assignee_id"]]
    # the six oldest, three each; the two newest wait
    assert [t["id"] for t in assigned] == [t["id"] for t in burst[:6]]
    assert routing.load("ann") == routing.load("bob") == 3
    assert [routing.state(t["id"]) for t in burst[6:]] == ["queued", "queued"]
    for ticket in assigned:  # one claim, one confirmation, one event each
        assert [o for o, _ in routing.outcomes(ticket["id"])] == ["queued", "assigned"]
        assert len(routing.events(contract.TICKET_ROUTED, ticket["id"])) == 1
        assert len(tickets.assign_calls(ticket["id"])) == 1


def test_an_agent_whose_slots_went_meanwhile_keeps_none_of_the_batch(routing, tickets, routing_uow):
    from sqlalchemy import update
    from services.routing import domain
    from services.routing.models import Agent
    from services.routing.router import _Planned

    routing.agent("ann", capacity=3, presence="offline")
    routing.agent("bob", capacity=3, presence="offline")
    first, second, third = tickets.create(), tickets.create(), tickets.create()
    routing.pump()
    with routing_uow.transaction() as session:
        session.execute(update(Agent).values(presence="online"))
        entries = {e.ticket.ticket_id: e for e in ops.queue_entries(session)}
        # ann takes two slots elsewhere after the plan was made: only one is left for two claims
        session.execute(update(Agent).where(Agent.id == "ann").values(active_load=2))
    choice = domain.Choice(winner=None, candidates=(), skills_relaxed=False, not_in_tier=0)
    plan = [_Planned(entries[first["id"]].ticket, "ann", choice, "created", None),
            _Planned(entries[second["id"]].ticket, "ann", choice, "created", None),
            _Planned(entries[third["id"]].ticket, "bob", choice, "created", None)]
    claims = routing.router._claim_all(plan)
    assert [(c.ticket_id, c.agent_id) for c in claims] == [(third["id"], "bob")]
    assert routing.state(first["id"]) == routing.state(second["id"]) == "queued"
    assert routing.state(third["id"]) == "assigning"
    assert routing.load("ann") == 2 and routing.load("bob") == 1


def test_a_claim_never_takes_a_ticket_that_left_the_queue_after_the_plan(routing, tickets, routing_uow):
    from sqlalchemy import update
    from services.routing import domain
    from services.routing.router import _Planned

    routing.agent("ann", capacity=3, presence="offline")
    first, second = tickets.create(), tickets.create()
    routing.pump()
    with routing_uow.transaction() as session:
        entries = {e.ticket.ticket_id: e for e in ops.queue_entries(session)}
        session.execute(update(RoutedTicket).where(RoutedTicket.ticket_id == second["id"]).values(tier="L2"))
    routing.presence("ann", "online")  # drains the first
    choice = domain.Choice(winner=None, candidates=(), skills_relaxed=False, not_in_tier=0)
    stale_plan = [_Planned(entries[t["id"]].ticket, "ann", choice, "created", None) for t in (first, second)]
    assert routing.router._claim_all(stale_plan) == []  # one assigned already, one escalated
    assert routing.load("ann") == 1


def test_the_rules_changes_ride_with_the_assignment_in_one_call(routing, tickets):
    _rule(routing, set_category="network", raise_priority="high")
    routing.agent("ann")
    ticket = tickets.create(subject="VPN down")
    routing.pump()
    calls = [c for c in tickets.calls if c[0] in ("assign_ticket", "update_ticket")]
    assert calls == [("update_ticket", ticket["id"], {"category": "network", "priority": "high",
                                                      "assignee_id": "ann", "group": "L1"})]
    with routing.uow.read() as session:
        assert session.get(RoutedTicket, ticket["id"]).pending_changes is None


def test_the_rules_changes_of_a_ticket_that_waits_reach_tickets_on_their_own(routing, tickets):
    _rule(routing, set_category="network")
    ticket = tickets.create(subject="VPN down")  # nobody online
    routing.pump()
    assert tickets.tickets[ticket["id"]]["category"] == "network"
    assert routing.state(ticket["id"]) == "queued"
    with routing.uow.read() as session:
        assert session.get(RoutedTicket, ticket["id"]).pending_changes is None
    routing.agent("ann")
    routing.pump()
    assert tickets.assign_calls(ticket["id"]) == [(ticket["id"], "ann", "L1")]


def test_rules_changes_not_delivered_while_waiting_are_delivered_by_the_sweeper(routing_uow, tickets):
    routing = Routing(routing_uow, tickets, RoutingSettings(retry_after_seconds=0.0))
    _rule(routing, set_category="network")
    ticket = tickets.create(subject="VPN down")
    tickets.refusals[("update_ticket", ticket["id"])] = [TimeoutError("no answer")]
    routing.pump()
    assert tickets.tickets[ticket["id"]]["category"] is None
    with routing_uow.read() as session:
        assert session.get(RoutedTicket, ticket["id"]).pending_changes == {"fields": {"category": "network"},
                                                                            "if_version": 1}
    routing.router.sweep()
    assert tickets.tickets[ticket["id"]]["category"] == "network"
    with routing_uow.read() as session:
        assert session.get(RoutedTicket, ticket["id"]).pending_changes is None


def test_a_rule_changed_applies_to_the_next_ticket(routing, tickets):
    _rule(routing, set_category="network")
    first = tickets.create(subject="VPN down")
    routing.pump()
    with routing.uow.transaction() as session:
        rule = ops.list_rules(session, ADMIN_ACTOR)["items"][0]
        ops.update_rule(session, ADMIN_ACTOR, rule["id"], contract.RuleRequest().load({
            "name": "VPN", "conditions": [{"field": "subject", "operator": "contains_any", "value": ["vpn"]}],
            "actions": {"set_category": "remote-access"}}), rule["version"])
    second = tickets.create(subject="VPN again")
    routing.pump()
    assert tickets.tickets[first["id"]]["category"] == "network"
    assert tickets.tickets[second["id"]]["category"] == "remote-access"


# --- the rules' changes never undo what people did since (compare-and-set on the triaged version) ---

def _pending(uow, ticket_id):
    with uow.read() as session:
        return session.get(RoutedTicket, ticket_id).pending_changes


def test_rules_changes_overtaken_by_a_hand_assignment_are_dropped_not_applied_later(routing_uow, tickets):
    routing = Routing(routing_uow, tickets, RoutingSettings(retry_after_seconds=0.0))
    routing.router = Router(routing_uow, tickets, RoutingSettings(retry_after_seconds=0.0),
                            wake=lambda trigger: None)  # the dispatcher's round has not run yet
    _rule(routing, set_category="network", raise_priority="high")
    routing.agent("ann", presence="offline")
    ticket = tickets.create(subject="VPN down")
    routing.pump()
    assert _pending(routing_uow, ticket["id"])["fields"] == {"category": "network", "priority": "high"}
    tickets.assign_ticket(SUPERVISOR, ticket["id"], "bob", None)  # a person was faster than the rules
    routing.pump()
    routing.router.dispatch("created")
    routing.router.sweep()
    assert _pending(routing_uow, ticket["id"]) is None  # dropped: the ticket changed since triage
    assert tickets.tickets[ticket["id"]]["category"] is None
    # later bob re-prioritises and hands it back: the old rules' changes do not come back with it
    tickets.update_ticket(SUPERVISOR, ticket["id"], {"priority": "low", "category": "billing"})
    tickets.assign_ticket(SUPERVISOR, ticket["id"], None, None)
    routing.pump()
    routing.presence("ann", "online")
    assert tickets.tickets[ticket["id"]]["assignee_id"] == "ann"
    assert (tickets.tickets[ticket["id"]]["priority"], tickets.tickets[ticket["id"]]["category"]) == ("low", "billing")


def test_rules_changes_of_a_ticket_put_on_pending_first_do_not_linger(routing_uow, tickets):
    routing = Routing(routing_uow, tickets)
    routing.router = Router(routing_uow, tickets, RoutingSettings(retry_after_seconds=0.0), wake=lambda t: None)
    _rule(routing, set_category="network")
    ticket = tickets.create(subject="VPN down")
    routing.pump()
    tickets.set_status(ticket["id"], "pending")  # before the dispatcher's round
    routing.pump()
    routing.router.dispatch("created")
    routing.router.sweep()
    assert routing.state(ticket["id"]) == "idle"
    assert _pending(routing_uow, ticket["id"]) is None


def test_a_rules_group_sent_late_does_not_undo_an_escalation(routing_uow, tickets):
    routing = Routing(routing_uow, tickets, RoutingSettings(retry_after_seconds=0.0))
    _rule(routing, set_tier="L2")
    ticket = tickets.create(subject="VPN down")  # nobody online in L2: it waits
    tickets.refusals[("update_ticket", ticket["id"])] = [TimeoutError("no answer")]
    routing.pump()
    assert _pending(routing_uow, ticket["id"])["fields"] == {"group": "L2"}
    routing.router.escalate(SUPERVISOR, ticket["id"], "needs L3")
    routing.pump()
    routing.router.sweep()
    routing.pump()
    assert routing.row(ticket["id"])["tier"] == "L3"
    assert tickets.tickets[ticket["id"]]["group"] == "L3"
    assert _pending(routing_uow, ticket["id"]) is None


class _SlowTickets(FakeTickets):
    """Each assignment takes a moment, as an RPC does."""

    def assign_ticket(self, actor, ticket_id, assignee_id, group):
        eventlet.sleep(0.01)
        return super().assign_ticket(actor, ticket_id, assignee_id, group)


def test_a_slot_given_back_while_the_next_round_reads_is_drained_at_once(routing_uow, monkeypatch):
    tickets = _SlowTickets()
    routing = Routing(routing_uow, tickets)
    routing.agent("ann", capacity=1, presence="offline")
    first, second = tickets.create(), tickets.create()
    routing.pump()
    tickets.set_status(first["id"], "closed")  # routing has not seen it: the claim will be refused
    real, reads = ops.agent_states, []

    def agent_states(session):  # PostgreSQL yields on every query: round 2's read waits a moment
        reads.append(1)
        states = real(session)
        if len(reads) == 2:
            eventlet.sleep(0.05)  # the refused delivery is released meanwhile
        return states

    monkeypatch.setattr(ops, "agent_states", agent_states)
    with routing_uow.transaction() as session:
        ops.set_presence(session, SUPERVISOR, "ann", "online")
    assert routing.router.drain(contract.TIERS, "agent_online") == 1
    assert routing.outcomes(first["id"])[-1][0] == "released"
    assert tickets.tickets[second["id"]]["assignee_id"] == "ann"


class _SlowBatches(FakeTickets):
    """Each assign_tickets call takes 200 ms, as a busy tickets service might; calls are logged."""

    def __init__(self):
        super().__init__()
        self.batches = []  # ("start" | "end", ticket ids)

    def assign_tickets(self, actor, assignments):
        ids = tuple(item["ticket_id"] for item in assignments)
        self.batches.append(("start", ids))
        eventlet.sleep(0.2)
        answers = super().assign_tickets(actor, assignments)
        self.batches.append(("end", ids))
        return answers


def test_the_dispatch_round_claims_what_is_queued_while_its_last_delivery_is_under_way(routing_uow):
    tickets = _SlowBatches()
    wakes = eventlet.queue.LightQueue()

    def next_wake(timeout):
        try:
            return wakes.get(timeout=timeout)
        except eventlet.queue.Empty:
            return None

    routing = Routing(routing_uow, tickets)
    routing.router = Router(routing_uow, tickets, RoutingSettings(), wake=wakes.put)
    routing.agent("ann", capacity=5)
    first = tickets.create()
    routing.pump()  # queued; its wake is for the round below
    wakes.get_nowait()
    round_ = eventlet.spawn(routing.router.dispatch, "created", next_wake)
    eventlet.sleep(0.01)  # the first delivery is under way
    second = tickets.create()
    routing.pump()  # queued and woken meanwhile
    assert round_.wait() == 2
    assert tickets.batches == [("start", (first["id"],)), ("start", (second["id"],)),
                               ("end", (first["id"],)), ("end", (second["id"],))], \
        "the second ticket was claimed and sent without waiting for the first delivery"
    assert routing.state(first["id"]) == routing.state(second["id"]) == "assigned"
    assert routing.load("ann") == 2


class _SendsAndAnswersLater(FakeTickets):
    """A tickets port that can publish a call before its answer is asked for (TicketsPort's
    ``send_assign_tickets``): records when each was sent and when its answer was asked."""

    def __init__(self):
        super().__init__()
        self.log = []

    def send_assign_tickets(self, actor, assignments):
        ids = tuple(a["ticket_id"] for a in assignments)
        self.log.append(("sent", ids))
        view = self.assign_tickets(actor, assignments)

        def answer():
            self.log.append(("answer asked", ids))
            return view
        return answer


def test_a_claimed_batch_is_sent_in_the_round_not_when_its_delivery_thread_first_runs(routing_uow):
    tickets = _SendsAndAnswersLater()
    routing = Routing(routing_uow, tickets)
    routing.router = Router(routing_uow, tickets, RoutingSettings(), wake=lambda trigger: None)
    routing.agent("ann", capacity=5)
    created = [tickets.create() for _ in range(3)]
    routing.pump()
    deliveries = router_module._Deliveries(routing.router, 4)
    assert routing.router._drain_round(contract.TIERS, "created", deliveries)
    ids = tuple(sorted(t["id"] for t in created))
    # no switch yet: the delivery thread has not run, the call is out already
    assert [(what, tuple(sorted(i))) for what, i in tickets.log] == [("sent", ids)]
    assert deliveries.wait() == (3, 0)
    assert [what for what, _ in tickets.log] == ["sent", "answer asked"]
    assert all(routing.state(t["id"]) == "assigned" for t in created)


def test_the_events_of_an_answered_assignment_are_known_stale_before_its_confirmation(routing_uow, monkeypatch):
    tickets = _SendsAndAnswersLater()
    routing = Routing(routing_uow, tickets)
    routing.router = Router(routing_uow, tickets, RoutingSettings(), wake=lambda trigger: None)
    routing.agent("ann", capacity=5)
    ticket = tickets.create()
    routing.pump()
    seen_at_confirmation = []
    confirm = routing.router._confirm_all

    def confirm_all(delivered):
        # what the echo of the assignment (same version as the answer) meets meanwhile
        seen_at_confirmation.extend(ops.snapshot_known_stale(view) for _claim, view in delivered)
        assert routing.state(ticket["id"]) == "assigning"
        return confirm(delivered)

    monkeypatch.setattr(routing.router, "_confirm_all", confirm_all)
    deliveries = router_module._Deliveries(routing.router, 4)
    routing.router._drain_round(contract.TIERS, "created", deliveries)
    assert deliveries.wait() == (1, 0)
    assert seen_at_confirmation == [True]
    assert routing.row(ticket["id"])["version"] == tickets.tickets[ticket["id"]]["version"]


def test_an_answer_to_a_claim_confirmed_meanwhile_is_still_mirrored(routing, tickets, routing_uow):
    # a re-delivery of a claim another delivery confirmed meanwhile: its decision is not won,
    # but its answer (a newer version) is mirrored, since the events of that version may have
    # been acked from memory on it
    routing.agent("ann")
    ticket = tickets.create()
    routing.pump()
    with routing_uow.read() as session:
        row = session.get(RoutedTicket, ticket["id"])
        claim = router_module.Claim(ticket["id"], "ann", row.claim_decision_id, row.tier, "created",
                                    row.ticket_created_at, None)
    assert routing.state(ticket["id"]) == "assigned"
    newer = tickets.update_ticket(SUPERVISOR, ticket["id"], {"priority": "high"})
    ops.remember_answered_version(ticket["id"], newer["version"])  # the re-delivery's answer
    routing.router._confirm_all([(claim, newer)])
    assert routing.row(ticket["id"])["version"] == newer["version"]
    with routing_uow.read() as session:
        assert session.get(RoutedTicket, ticket["id"]).priority == "high"
    assert [o for o, _ in routing.outcomes(ticket["id"])].count("assigned") == 1  # confirmed once


class _UnassignedRightAfter(FakeTickets):
    """A supervisor unassigns the ticket the moment routing's assignment lands, and routing
    mirrors both events before its claim is confirmed."""

    routing = None

    def assign_ticket(self, actor, ticket_id, assignee_id, group):
        view = super().assign_ticket(actor, ticket_id, assignee_id, group)
        if assignee_id is not None and actor is ops.SYSTEM_ACTOR:
            super().assign_ticket(SUPERVISOR, ticket_id, None, None)
            self.routing.pump()
        return view


def test_an_assignment_undone_before_its_confirmation_is_not_kept(routing_uow):
    tickets = _UnassignedRightAfter()
    routing = Routing(routing_uow, tickets)
    routing.router = Router(routing_uow, tickets, RoutingSettings(), wake=lambda trigger: None)
    tickets.routing = routing
    routing.agent("ann", presence="offline")
    ticket = tickets.create()
    routing.pump()
    routing.presence("ann", "online")
    routing.router.drain(contract.TIERS, "agent_online")
    assert tickets.tickets[ticket["id"]]["assignee_id"] is None
    assert routing.row(ticket["id"])["assignee_id"] is None
    assert routing.state(ticket["id"]) == "queued"  # unassigned and active: back in the queue
    assert routing.load("ann") == 0


class _AssignedByHandFirst(FakeTickets):
    """A supervisor assigns the ticket to bob just before routing's assignment lands."""

    def assign_tickets(self, actor, assignments):
        for item in assignments:
            if self.tickets[item["ticket_id"]]["assignee_id"] is None:
                self.assign_ticket(SUPERVISOR, item["ticket_id"], "bob", None)
        return super().assign_tickets(actor, assignments)


def test_a_ticket_assigned_by_hand_while_the_claim_is_in_flight_stays_with_that_person(routing_uow):
    tickets = _AssignedByHandFirst()
    routing = Routing(routing_uow, tickets)
    routing.agent("ann")
    routing.agent("bob")
    ticket = tickets.create()
    routing.pump()  # routing claims it for ann (least loaded, longest idle) and delivers it
    assert tickets.tickets[ticket["id"]]["assignee_id"] == "bob", "the person's assignment stands"
    assert routing.outcomes(ticket["id"])[-1][0] == "released"
    routing.pump()  # the hand assignment's event
    assert routing.row(ticket["id"])["assignee_id"] == "bob" and routing.state(ticket["id"]) == "assigned"
    assert routing.load("ann") == 0 and routing.load("bob") == 1


class _OlderTickets(FakeTickets):
    """A tickets service from before only_if_unassigned: its strict schema refuses the field."""

    upgraded = False

    def assign_tickets(self, actor, assignments):
        if not self.upgraded and any("only_if_unassigned" in item for item in assignments):
            raise ValidationError("invalid request", {"0": {"only_if_unassigned": ["Unknown field."]}})
        return super().assign_tickets(actor, assignments)


def test_an_assignment_refused_as_invalid_is_kept_for_the_sweeper_not_released(routing_uow):
    tickets = _OlderTickets()
    refused_before = metrics.REFUSED_AS_INVALID._value.get()
    settings = RoutingSettings(retry_after_seconds=0)
    routing = Routing(routing_uow, tickets, settings)
    routing.agent("ann")
    ticket = tickets.create()
    routing.pump()
    assert tickets.tickets[ticket["id"]]["assignee_id"] is None
    assert routing.state(ticket["id"]) == "assigning" and routing.load("ann") == 1, "claim kept, not parked"
    assert metrics.REFUSED_AS_INVALID._value.get() > refused_before
    tickets.upgraded = True  # the tickets service is upgraded: the sweeper delivers the claim
    routing.router.sweep()
    assert tickets.tickets[ticket["id"]]["assignee_id"] == "ann"
    assert routing.state(ticket["id"]) == "assigned" and routing.load("ann") == 1


def test_a_claim_whose_rules_changes_were_overtaken_is_delivered_as_a_plain_assignment(routing_uow, tickets):
    routing = Routing(routing_uow, tickets)
    routing.router = Router(routing_uow, tickets, RoutingSettings(), wake=lambda trigger: None)
    _rule(routing, set_category="network")
    routing.agent("ann")
    ticket = tickets.create(subject="VPN down")
    routing.pump()  # triaged and queued; the dispatcher's round has not run yet
    tickets._change(ticket["id"], subject="VPN down at the branch")  # the requester edits it first
    routing.pump()
    routing.router.dispatch("created")
    assert tickets.tickets[ticket["id"]]["assignee_id"] == "ann"
    assert tickets.tickets[ticket["id"]]["category"] is None  # the rules' change lost to the edit
    assert routing.state(ticket["id"]) == "assigned" and routing.load("ann") == 1
    assert _pending(routing_uow, ticket["id"]) is None
    assert [c[0] for c in tickets.calls if c[0] in ("update_ticket", "assign_ticket")] == [
        "update_ticket", "assign_ticket"]  # refused compare-and-set, then the assignment alone


class _WholeBatchRefused(FakeTickets):
    """A tickets service that refuses any batch of more than one assignment as malformed."""

    def assign_tickets(self, actor, assignments):
        if len(assignments) > 1:
            raise ValidationError("invalid request", {"0": {"colour": ["Unknown field."]}})
        return super().assign_tickets(actor, assignments)


def test_a_batch_refused_whole_is_delivered_one_assignment_at_a_time(routing_uow):
    tickets = _WholeBatchRefused()
    routing = Routing(routing_uow, tickets)
    routing.agent("ann", capacity=3, presence="offline")
    burst = [tickets.create() for _ in range(3)]
    routing.pump()
    routing.presence("ann", "online")
    assert [tickets.tickets[t["id"]]["assignee_id"] for t in burst] == ["ann"] * 3
    assert [routing.state(t["id"]) for t in burst] == ["assigned"] * 3 and routing.load("ann") == 3


# --- batched delivery: partial failures ----------------------------------------------------------

class _Batches(FakeTickets):
    """Records each assign_tickets call; ``unavailable``: ticket ids answered "not applied, try
    again later" (what the tickets service answers for an item that failed unexpectedly);
    ``short``: drop the last answer of each call."""

    def __init__(self):
        super().__init__()
        self.batches, self.unavailable, self.short = [], set(), False

    def assign_tickets(self, actor, assignments):
        self.batches.append(len(assignments))
        answers = [{"error": {"code": "unavailable", "detail": "not applied", "errors": {}}}
                   if item["ticket_id"] in self.unavailable else FakeTickets.assign_tickets(self, actor, [item])[0]
                   for item in assignments]
        return answers[:-1] if self.short else answers


def test_an_assignment_not_applied_for_a_transient_reason_stays_claimed_and_is_redelivered(routing_uow):
    tickets = _Batches()
    routing = Routing(routing_uow, tickets, RoutingSettings(retry_after_seconds=0.0))
    routing.agent("ann", capacity=3, presence="offline")
    first, second, third = (tickets.create() for _ in range(3))
    routing.pump()
    tickets.unavailable = {second["id"]}
    routing.presence("ann", "online")
    assert [routing.state(t["id"]) for t in (first, second, third)] == ["assigned", "assigning", "assigned"]
    assert routing.load("ann") == 3  # the transient failure keeps its slot, it is not released
    tickets.unavailable = set()
    routing.router.sweep()
    assert routing.state(second["id"]) == "assigned" and tickets.tickets[second["id"]]["assignee_id"] == "ann"


def test_the_sweeper_redelivers_many_stale_claims_in_batches(routing_uow):
    tickets = _Batches()
    routing = Routing(routing_uow, tickets, RoutingSettings(retry_after_seconds=0.0))
    routing.agent("ann", capacity=50)
    created = [tickets.create() for _ in range(40)]
    tickets.unavailable = {t["id"] for t in created}
    routing.pump()
    assert {routing.state(t["id"]) for t in created} == {"assigning"}
    tickets.unavailable, tickets.batches = set(), []
    routing.router.sweep()
    assert {routing.state(t["id"]) for t in created} == {"assigned"}
    assert max(tickets.batches) <= 32 and sum(tickets.batches) == 40


def test_an_answer_that_does_not_match_the_batch_confirms_nothing_of_it(routing_uow):
    tickets = _Batches()
    routing = Routing(routing_uow, tickets, RoutingSettings(retry_after_seconds=0.0))
    routing.agent("ann", capacity=3, presence="offline")
    burst = [tickets.create() for _ in range(3)]
    routing.pump()
    tickets.short = True
    routing.presence("ann", "online")
    assert {routing.state(t["id"]) for t in burst} == {"assigning"}  # none half-confirmed
    tickets.short = False
    routing.router.sweep()
    assert {routing.state(t["id"]) for t in burst} == {"assigned"} and routing.load("ann") == 3


def test_a_failed_release_does_not_hold_back_the_rest_of_its_batch(routing_uow, monkeypatch):
    from sqlalchemy.exc import OperationalError

    tickets = FakeTickets()
    routing = Routing(routing_uow, tickets, RoutingSettings(retry_after_seconds=60.0))
    routing.agent("ann", capacity=3, presence="offline")
    closed, fine = tickets.create(), tickets.create()
    routing.pump()
    tickets.set_status(closed["id"], "closed")  # routing has not seen it: its assignment is refused

    def release(claim, reason):
        raise OperationalError("UPDATE routing_decisions", {}, Exception("database is locked"))

    monkeypatch.setattr(routing.router, "_release", release)
    routing.presence("ann", "online")
    assert routing.state(fine["id"]) == "assigned"
    assert routing.state(closed["id"]) == "assigning"  # left for the sweeper


def test_a_rules_tier_and_priority_ride_with_the_assignment_in_that_tier(routing, tickets):
    _rule(routing, set_tier="L2", raise_priority="high")
    routing.agent("lee", tiers=("L2",))
    ticket = tickets.create(subject="VPN down")
    routing.pump()
    record = tickets.tickets[ticket["id"]]
    assert (record["assignee_id"], record["group"], record["priority"]) == ("lee", "L2", "high")
    assert [c for c in tickets.calls if c[0] == "update_ticket"] == [
        ("update_ticket", ticket["id"], {"priority": "high", "assignee_id": "lee", "group": "L2"})]
