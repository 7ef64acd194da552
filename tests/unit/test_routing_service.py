"""RoutingService entrypoints via nameko's worker_factory: validation at the RPC edge, typed
errors, once-only event handling and malformed events. A real UnitOfWork over a migrated SQLite
routing database stands in for ``db``; a recording fake stands in for the tickets proxy."""
import uuid
from types import SimpleNamespace

import eventlet
import pytest
from nameko.testing.services import worker_factory
from sqlalchemy import func, select

from contracts.errors import Conflict, Forbidden, NotFound, ValidationError
from contracts.events import make_envelope
from servicekit.events import UnprocessableEvent
from servicekit.tables import OUTBOX
from services.routing.models import Decision, RoutedTicket
from services.routing.router import RoutingSettings
from services.routing.service import RoutingService

ADMIN = {"id": "admin-1", "role": "admin"}
SUPERVISOR = {"id": "sup-1", "role": "supervisor"}
REQUESTER = {"id": "alice", "role": "requester", "organization_id": "acme"}
VIEWER = {"id": "auditor", "role": "viewer"}


@pytest.fixture
def uow(routing_uow):
    return routing_uow


class FakeTickets:
    """The tickets RPCs routing calls; assign answers with a view whose version grows."""

    def __init__(self):
        self.calls = []
        self.versions = {}

    def assign_ticket(self, actor, ticket_id, assignee_id, group):
        self.calls.append(("assign_ticket", ticket_id, assignee_id, group))
        self.versions[ticket_id] = self.versions.get(ticket_id, 1) + 1
        return snapshot(ticket_id, version=self.versions[ticket_id], assignee_id=assignee_id,
                        status="open" if assignee_id else "new", group=group)

    def assign_tickets(self, actor, assignments):
        return [{"ticket": self.update_ticket(actor, a["ticket_id"], {**a["changes"], "group": a["group"]})
                 if a.get("changes") else self.assign_ticket(actor, a["ticket_id"], a["assignee_id"], a["group"])}
                for a in assignments]

    def get_ticket(self, actor, ticket_id):
        self.calls.append(("get_ticket", ticket_id))
        return {**snapshot(ticket_id), "description": "text"}

    def update_ticket(self, actor, ticket_id, changes, expected_version=None):
        self.calls.append(("update_ticket", ticket_id, changes))
        self.versions[ticket_id] = self.versions.get(ticket_id, 1) + 1
        return snapshot(ticket_id, version=self.versions[ticket_id], group=changes.get("group"))

    def add_comment(self, actor, ticket_id, data):
        self.calls.append(("add_comment", ticket_id, data))


class _Proxied:
    """``proxy.method(*args)`` and ``proxy.method.call_async(*args).result()`` over the fake, as
    nameko's RpcProxy offers them (routing sends its assignment batches with ``call_async``)."""

    def __init__(self, fake):
        self._fake = fake

    def __getattr__(self, method):
        return _Call(getattr(self._fake, method))


class _Call:
    def __init__(self, call):
        self._call = call

    def __call__(self, *args):
        return self._call(*args)

    def call_async(self, *args):
        try:
            result = self._call(*args)
        except Exception as exc:  # raised by result(), as nameko's reply does
            error = exc

            def fail():
                raise error
            return SimpleNamespace(result=fail)
        return SimpleNamespace(result=lambda: result)


@pytest.fixture
def tickets():
    return FakeTickets()


@pytest.fixture
def service(uow, tickets):
    policy = SimpleNamespace(settings=RoutingSettings(), rpc_timeout=1)
    service = worker_factory(RoutingService, db=uow, tickets=_Proxied(tickets), policy=policy)
    # the dispatcher entrypoint runs at once here, instead of in its own worker soon after
    # (and no wake comes while its deliveries are under way)
    service.wake_dispatcher = _InlineWake(service)
    return service


class _InlineWake:
    def __init__(self, service):
        self._service = service

    def __call__(self, trigger="sweep"):
        self._service.dispatch(trigger)

    @staticmethod
    def next_wake(timeout):
        eventlet.sleep(timeout)
        return None


def snapshot(ticket_id, version=1, status="new", assignee_id=None, group=None, priority="normal"):
    return {"id": ticket_id, "number": 1001, "subject": "VPN down", "status": status, "priority": priority,
            "category": None, "tags": [], "channel": "web", "requester_id": "alice", "organization_id": "acme",
            "assignee_id": assignee_id, "group": group, "version": version,
            "created_at": "2026-11-26T00:00:00Z", "updated_at": "2026-11-26T00:00:00Z"}


def created_event(ticket_id, **fields):
    return make_envelope("tickets", "ticket_created", {"ticket_id": ticket_id},
                         {"ticket": snapshot(ticket_id, **fields), "actor_id": "alice"})


def count(uow, table) -> int:
    with uow.read() as session:
        return session.execute(select(func.count()).select_from(table)).scalar_one()


def invalid(call, *args) -> dict:
    with pytest.raises(ValidationError) as caught:
        call(*args)
    assert isinstance(caught.value.errors, dict) and caught.value.errors
    return caught.value.errors


# --- the RPC edge --------------------------------------------------------------------------------

@pytest.mark.parametrize("data, field", [
    ({"display_name": "No id"}, "id"),
    ({"id": "x", "display_name": "X", "capacity": "3"}, "capacity"),
    ({"id": "x", "display_name": "X", "capacity": 3.5}, "capacity"),
    ({"id": "x", "display_name": "X", "capacity": True}, "capacity"),
    ({"id": "x", "display_name": "X", "capacity": 51}, "capacity"),
    ({"id": "x", "display_name": "X", "tiers": []}, "tiers"),
    ({"id": "x", "display_name": "X", "tiers": ["l1"]}, "tiers"),
    ({"id": "x", "display_name": "X", "skills": ["networking"]}, "skills"),
    ({"id": "x", "display_name": "X", "skills": [{"name": "Net Working"}]}, "skills"),
    ({"id": "x", "display_name": "X", "skills": [{"name": "net"}, {"name": "net"}]}, "skills"),
    ({"id": "x", "display_name": "X", "skills": [{"name": "net", "proficiency": 9}]}, "skills"),
    ({"id": "x", "display_name": "X", "languages": ["english"]}, "languages"),
    ({"id": "x", "display_name": "   "}, "display_name"),
    ({"id": "x", "display_name": "X", "presence": "online"}, "presence"),
])
def test_create_agent_refuses_malformed_fields(service, data, field):
    assert field in invalid(service.create_agent, SUPERVISOR, data)


def test_a_malformed_actor_or_id_is_a_validation_error_not_a_crash(service):
    assert "role" in invalid(service.list_agents, {"id": "x", "role": "root"})
    assert "id" in invalid(service.list_agents, {"role": "admin"})
    invalid(service.get_agent, ADMIN, "x" * 201)
    invalid(service.get_agent, ADMIN, 42)
    invalid(service.list_agents, ADMIN, {"tier": "L9"})
    invalid(service.update_agent, ADMIN, "a", {"capacity": 2}, "3")


def test_unknown_ids_are_not_found(service):
    with pytest.raises(NotFound):
        service.get_agent(ADMIN, "ghost")
    with pytest.raises(NotFound):
        service.set_presence({"id": "ghost", "role": "agent"}, "ghost", "online")
    with pytest.raises(NotFound):
        service.get_rule(ADMIN, "not-a-uuid")
    with pytest.raises(NotFound):
        service.delete_rule(ADMIN, str(uuid.uuid4()))
    with pytest.raises(NotFound):
        service.get_ticket_routing(ADMIN, str(uuid.uuid4()))


def test_roles_are_enforced_by_the_service_itself(service):
    with pytest.raises(Forbidden):
        service.list_agents(REQUESTER)
    with pytest.raises(Forbidden):
        service.create_skill(VIEWER, {"name": "sap"})
    with pytest.raises(Forbidden):
        service.create_agent({"id": "a", "role": "agent"}, {"id": "a", "display_name": "A"})
    with pytest.raises(Forbidden):
        service.set_presence(VIEWER, "auditor", "online")
    service.list_agents(VIEWER)  # viewers read


def test_duplicates_and_stale_versions_conflict(service):
    service.create_skill(ADMIN, {"name": "sap"})
    with pytest.raises(Conflict):
        service.create_skill(ADMIN, {"name": "sap"})
    agent = service.create_agent(SUPERVISOR, {"id": "ann", "display_name": "Ann"})
    with pytest.raises(Conflict):
        service.create_agent(SUPERVISOR, {"id": "ann", "display_name": "Ann again"})
    service.update_agent(SUPERVISOR, "ann", {"capacity": 5}, agent["version"])
    from contracts.errors import PreconditionFailed

    with pytest.raises(PreconditionFailed):
        service.update_agent(SUPERVISOR, "ann", {"capacity": 1}, agent["version"])
    assert service.get_agent(ADMIN, "ann")["capacity"] == 5


def test_setting_the_same_presence_twice_announces_it_once(service, uow):
    service.create_agent(SUPERVISOR, {"id": "ann", "display_name": "Ann"})
    service.set_presence({"id": "ann", "role": "agent"}, "ann", "online")
    service.set_presence({"id": "ann", "role": "agent"}, "ann", "online")
    assert count(uow, OUTBOX) == 1


# --- events --------------------------------------------------------------------------------------

def handle(handler, *bodies):
    """The ticket events are handled in batches: the method takes a list of bodies and answers,
    per body, None or the exception it failed with."""
    outcomes = handler(list(bodies))
    assert len(outcomes) == len(bodies)
    for outcome in outcomes:
        if outcome is not None:
            raise outcome


def test_a_redelivered_ticket_created_event_has_one_effect(service, uow, tickets):
    ticket_id = str(uuid.uuid4())
    event = created_event(ticket_id)
    handle(service.on_ticket_created, event)
    handle(service.on_ticket_created, event)
    assert count(uow, RoutedTicket) == 1
    queued = [d for d in _decisions(uow, ticket_id) if d.outcome == "queued"]
    assert len(queued) == 1  # nobody online: noted once


def test_an_older_snapshot_after_a_newer_one_changes_nothing(service, uow):
    service.create_agent(SUPERVISOR, {"id": "ann", "display_name": "Ann"})
    ticket_id = str(uuid.uuid4())
    handle(service.on_ticket_created, created_event(ticket_id))
    assigned = make_envelope("tickets", "ticket_assigned", {"ticket_id": ticket_id}, {
        "ticket": snapshot(ticket_id, version=3, status="open", assignee_id="ann"), "actor_id": "sup-1",
        "old_assignee_id": None, "new_assignee_id": "ann", "group": None})
    handle(service.on_ticket_assigned, assigned)
    stale = make_envelope("tickets", "ticket_updated", {"ticket_id": ticket_id}, {
        "ticket": snapshot(ticket_id, version=2, priority="high"), "actor_id": "sup-1",
        "changes": {"priority": ["normal", "high"]}})
    handle(service.on_ticket_updated, stale)
    with uow.read() as session:
        row = session.get(RoutedTicket, ticket_id)
        assert (row.ticket_version, row.assignee_id, row.priority, row.state) == (3, "ann", "normal", "assigned")


def test_an_assignment_heard_of_before_the_ticket_itself_is_mirrored_with_its_agent(service, uow):
    # each event type has its own queue: ticket_assigned can be handled before ticket_created
    service.create_agent(SUPERVISOR, {"id": "ann", "display_name": "Ann"})
    ticket_id = str(uuid.uuid4())
    handle(service.on_ticket_assigned, make_envelope("tickets", "ticket_assigned", {"ticket_id": ticket_id}, {
        "ticket": snapshot(ticket_id, version=2, status="open", assignee_id="ann"), "actor_id": "sup-1",
        "old_assignee_id": None, "new_assignee_id": "ann", "group": None}))
    handle(service.on_ticket_created, created_event(ticket_id))  # older: changes nothing
    with uow.read() as session:
        row = session.get(RoutedTicket, ticket_id)
        assert (row.ticket_version, row.assignee_id, row.status, row.state) == (2, "ann", "open", "assigned")
    assert service.get_agent(SUPERVISOR, "ann")["active_tickets"] == 1


def test_new_tickets_are_assigned_through_the_entrypoints_in_one_batch(service, uow, tickets):
    service.create_agent(SUPERVISOR, {"id": "ann", "display_name": "Ann", "capacity": 5})
    service.set_presence({"id": "ann", "role": "agent"}, "ann", "online")
    ticket_ids = sorted(str(uuid.uuid4()) for _ in range(3))
    handle(service.on_ticket_created, *[created_event(ticket_id) for ticket_id in ticket_ids])
    assert sorted(call[1] for call in tickets.calls if call[0] == "assign_ticket") == ticket_ids
    with uow.read() as session:
        rows = [session.get(RoutedTicket, ticket_id) for ticket_id in ticket_ids]
        assert {(row.state, row.assignee_id, row.status, row.ticket_version) for row in rows} == {
            ("assigned", "ann", "open", 2)}
        assert session.execute(select(func.count()).select_from(Decision)
                               .where(Decision.outcome == "assigned")).scalar_one() == 3
    assert service.get_agent(SUPERVISOR, "ann")["active_tickets"] == 3


@pytest.mark.parametrize("body", [
    {"event_id": "nope"},
    {**created_event("t"), "payload": {"ticket": {"id": "t"}}},
    {**created_event("t"), "occurred_at": "yesterday"},
])
def test_a_malformed_event_is_unprocessable(service, body):
    with pytest.raises(UnprocessableEvent):
        handle(service.on_ticket_created, body)


def test_an_sla_breach_escalates_one_tier_and_notes_why(service, uow, tickets):
    ticket_id = str(uuid.uuid4())
    handle(service.on_ticket_created, created_event(ticket_id))
    breach = make_envelope("sla", "sla_breached", {"ticket_id": ticket_id},
                           {"ticket_id": ticket_id, "target": "first_response", "policy_id": "p-1"})
    service.on_sla_breached(breach)
    with uow.read() as session:
        assert session.get(RoutedTicket, ticket_id).tier == "L2"
    # nobody had it: only its group changes (an assignment made meanwhile in L2 would stand)
    assert ("update_ticket", ticket_id, {"group": "L2"}) in tickets.calls
    notes = [c for c in tickets.calls if c[0] == "add_comment"]
    assert notes and "first_response" in notes[0][2]["body"] and notes[0][2]["public"] is False


def _decisions(uow, ticket_id):
    with uow.read() as session:
        return [SimpleNamespace(outcome=d.outcome, trigger=d.trigger)
                for d in session.scalars(select(Decision).where(Decision.ticket_id == ticket_id))]


def test_a_superseded_ticket_event_is_acked_without_a_write(service, uow):
    from servicekit.tables import HANDLED_EVENTS

    ticket_id = str(uuid.uuid4())
    handle(service.on_ticket_created, created_event(ticket_id, version=2))
    marks = count(uow, HANDLED_EVENTS)
    older = make_envelope("tickets", "ticket_updated", {"ticket_id": ticket_id}, {
        "ticket": snapshot(ticket_id, version=1, priority="high"), "actor_id": "sup-1",
        "changes": {"priority": ["normal", "high"]}})
    handle(service.on_ticket_updated, older)
    assert count(uow, HANDLED_EVENTS) == marks  # no transaction, no mark
    with uow.read() as session:
        assert session.get(RoutedTicket, ticket_id).priority == "normal"
    # a body the check cannot read still meets the full validation
    broken = {**older, "payload": {"ticket": {"id": ticket_id, "version": "1"}}}
    with pytest.raises(UnprocessableEvent):
        handle(service.on_ticket_updated, broken)


def test_sla_due_times_order_the_queue_from_the_earliest_target(service, uow):
    ticket_id = str(uuid.uuid4())
    handle(service.on_ticket_created, created_event(ticket_id))
    due = make_envelope("sla", "ticket_sla_updated", {"ticket_id": ticket_id}, {
        "ticket_id": ticket_id, "first_response_due_at": "2026-11-26T10:00:00Z",
        "resolution_due_at": "2026-11-26T08:30:00+00:00"})
    service.on_ticket_sla_updated(due)
    with uow.read() as session:
        assert session.get(RoutedTicket, ticket_id).sla_due_at.isoformat() == "2026-11-26T08:30:00+00:00"
    cleared = make_envelope("sla", "ticket_sla_updated", {"ticket_id": ticket_id}, {
        "ticket_id": ticket_id, "first_response_due_at": None, "resolution_due_at": None})
    service.on_ticket_sla_updated(cleared)
    with uow.read() as session:
        assert session.get(RoutedTicket, ticket_id).sla_due_at is None
