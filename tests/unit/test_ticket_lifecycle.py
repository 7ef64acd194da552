"""The ticket lifecycle state machine (services/tickets/domain.py): plain Python first, then the
same rules driven through services.tickets.operations on a real SQLite database."""
import itertools
import shutil

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from contracts.errors import Conflict, Forbidden, InvalidTransition
from contracts.tickets import STATUSES
from servicekit.db import UnitOfWork, make_engine
from servicekit.tables import OUTBOX
from services.tickets import domain
from services.tickets.domain import TRANSITIONS, check_transition
from services.tickets.models import Ticket
from tests.unit.support import AGENT, ALICE, Desk, scratch_database

ALL_PAIRS = list(itertools.product(STATUSES, STATUSES))
LEGAL = [(old, new) for old, new in ALL_PAIRS if new in TRANSITIONS[old]]
ILLEGAL = [(old, new) for old, new in ALL_PAIRS if old != new and new not in TRANSITIONS[old]]


def test_transition_table_covers_exactly_the_contract_statuses():
    assert set(TRANSITIONS) == set(STATUSES)
    for old, targets in TRANSITIONS.items():
        assert targets <= set(STATUSES), old
        assert old not in targets, "staying put is not a transition"


@pytest.mark.parametrize("old,new", LEGAL, ids=[f"{o}->{n}" for o, n in LEGAL])
def test_legal_transition_is_accepted(old, new):
    check_transition(old, new)


@pytest.mark.parametrize("old,new", ILLEGAL, ids=[f"{o}->{n}" for o, n in ILLEGAL])
def test_illegal_transition_is_refused_with_a_status_error(old, new):
    with pytest.raises(InvalidTransition) as caught:
        check_transition(old, new)
    assert caught.value.errors == {"status": [f"{old} -> {new} is not allowed"]}
    assert old in caught.value.detail and new in caught.value.detail


@pytest.mark.parametrize("status", STATUSES)
def test_staying_in_the_same_status_is_not_a_transition(status):
    check_transition(status, status)


def test_invalid_transition_is_a_conflict():
    # the gateway maps Conflict (and so InvalidTransition) to 409
    assert issubclass(InvalidTransition, Conflict)


@pytest.mark.parametrize("target", [s for s in STATUSES if s != "closed"])
def test_closed_is_final(target):
    with pytest.raises(InvalidTransition) as caught:
        check_transition("closed", target)
    assert "closed tickets are final" in caught.value.detail


def test_only_solved_tickets_can_be_closed():
    assert [old for old in STATUSES if "closed" in TRANSITIONS[old]] == ["solved"]


def test_nothing_goes_back_to_new():
    assert not any("new" in targets for targets in TRANSITIONS.values())


@pytest.mark.parametrize("status", ["pending", "solved"])
def test_requester_reply_reopens_waiting_or_solved_ticket(status):
    assert domain.status_after_requester_reply(status) == "open"


@pytest.mark.parametrize("status", ["new", "open", "on_hold"])
def test_requester_reply_leaves_other_statuses_alone(status):
    assert domain.status_after_requester_reply(status) == status


def test_requester_reply_to_closed_ticket_is_refused():
    with pytest.raises(Conflict) as caught:
        domain.status_after_requester_reply("closed")
    assert caught.value.errors == {"ticket": ["closed tickets accept no replies"]}


def test_reopening_by_reply_is_itself_a_legal_transition():
    for status in STATUSES:
        if status != "closed":
            check_transition(status, domain.status_after_requester_reply(status))


def test_assignment_opens_a_new_ticket():
    assert domain.status_after_assignment("new") == "open"


@pytest.mark.parametrize("status", [s for s in STATUSES if s != "new"])
def test_assignment_keeps_a_ticket_already_in_work_where_it_is(status):
    assert domain.status_after_assignment(status) == status


@pytest.mark.parametrize("role", ["agent", "supervisor", "admin"])
def test_first_public_staff_reply_is_the_first_response(role):
    assert domain.is_first_response(role, public=True, already_responded=False)


@pytest.mark.parametrize("role,public,already", [
    ("agent", False, False),      # internal notes are not a response to the customer
    ("agent", True, True),        # only the first one counts
    ("requester", True, False),
    ("viewer", True, False),
])
def test_other_comments_are_not_the_first_response(role, public, already):
    assert not domain.is_first_response(role, public, already)


def test_priority_rank_grows_with_urgency_so_descending_sort_lists_critical_first():
    assert sorted(domain.PRIORITY_RANK, key=domain.PRIORITY_RANK.get, reverse=True) == [
        "critical", "high", "normal", "low"]


# --- properties over random sequences of requested transitions ----------------------------

def _apply(start: str, requests: list[str]) -> list[str]:
    """Apply each requested status through check_transition; refused requests change nothing."""
    path, status = [start], start
    for wanted in requests:
        try:
            check_transition(status, wanted)
        except InvalidTransition:
            continue
        status = wanted
        path.append(status)
    return path


@given(st.sampled_from(STATUSES), st.lists(st.sampled_from(STATUSES), max_size=40))
def test_requested_transitions_never_leave_the_set_of_statuses(start, requests):
    assert set(_apply(start, requests)) <= set(STATUSES)


@given(st.lists(st.sampled_from(STATUSES), max_size=40))
def test_once_closed_a_ticket_stays_closed(requests):
    path = _apply("new", requests)
    if "closed" in path:
        assert set(path[path.index("closed"):]) == {"closed"}


@given(st.lists(st.sampled_from(STATUSES), max_size=40))
def test_every_step_taken_is_in_the_transition_table(requests):
    path = _apply("new", requests)
    for old, new in zip(path, path[1:]):
        assert new == old or new in TRANSITIONS[old]


@given(st.lists(st.sampled_from(STATUSES), max_size=40))
def test_closed_is_only_ever_reached_through_solved(requests):
    path = _apply("new", requests)
    steps = [(old, new) for old, new in zip(path, path[1:]) if old != new]
    assert all(old == "solved" for old, new in steps if new == "closed")


@given(st.lists(st.sampled_from(STATUSES), min_size=1, max_size=60))
def test_random_walks_stay_within_the_reachable_set(requests):
    reachable = _reachable_from("new")
    assert set(_apply("new", requests)) <= reachable


def _reachable_from(start: str) -> set[str]:
    seen, frontier = {start}, [start]
    while frontier:
        for target in TRANSITIONS[frontier.pop()]:
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    return seen


def test_every_status_is_reachable_from_new():
    assert _reachable_from("new") == set(STATUSES)


def test_every_status_but_closed_can_still_reach_closed():
    for status in STATUSES:
        assert "closed" in _reachable_from(status), status


def test_a_closing_path_is_found_by_requests():
    # the shortest request sequence that closes a new ticket goes through solved
    assert _apply("new", ["closed", "solved", "closed"]) == ["new", "solved", "closed"]


# --- the same rules through services.tickets.operations on a real SQLite database ----------

class TicketLifecycleMachine(RuleBasedStateMachine):
    """Random staff status requests, assignments and requester replies on a few tickets; the
    database must agree with a model built from the TRANSITIONS table after every step."""

    tickets = Bundle("tickets")

    def __init__(self):
        super().__init__()
        url, self.directory = scratch_database()
        self.engine = make_engine(url, pool_size=1)
        self.uow = UnitOfWork(sessionmaker(self.engine, expire_on_commit=False))
        self.desk = Desk(self.uow)
        self.model: dict[str, dict] = {}

    def teardown(self):
        self.engine.dispose()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _changed(self, ticket_id, status=None, assignee=...):
        state = self.model[ticket_id]
        state["version"] += 1
        if status is not None and status != state["status"]:
            state["status"] = status
            state["status_events"] += 1
        if assignee is not ...:
            state["assignee_id"] = assignee

    @rule(target=tickets)
    def create(self):
        ticket = self.desk.create(ALICE)
        self.model[ticket["id"]] = {"status": "new", "version": 1, "assignee_id": None, "status_events": 0}
        return ticket["id"]

    @rule(ticket_id=tickets, wanted=st.sampled_from(STATUSES))
    def staff_requests_status(self, ticket_id, wanted):
        current = self.model[ticket_id]["status"]
        if current == "closed":
            with pytest.raises(Conflict):
                self.desk.update(AGENT, ticket_id, status=wanted)
        elif wanted == current:
            self.desk.update(AGENT, ticket_id, status=wanted)  # no change, no version step
        elif wanted in TRANSITIONS[current]:
            self.desk.update(AGENT, ticket_id, status=wanted)
            self._changed(ticket_id, wanted)
        else:
            with pytest.raises(InvalidTransition):
                self.desk.update(AGENT, ticket_id, status=wanted)

    @rule(ticket_id=tickets)
    def requester_replies(self, ticket_id):
        current = self.model[ticket_id]["status"]
        if current == "closed":
            with pytest.raises(Conflict):
                self.desk.comment(ALICE, ticket_id)
        else:
            self.desk.comment(ALICE, ticket_id)
            self._changed(ticket_id, domain.status_after_requester_reply(current))

    @rule(ticket_id=tickets)
    def requester_tries_to_set_status(self, ticket_id):
        with pytest.raises(Forbidden):
            self.desk.update(ALICE, ticket_id, status="solved")

    @rule(ticket_id=tickets, assignee=st.sampled_from(["agent-1", "agent-2", None]))
    def staff_assigns(self, ticket_id, assignee):
        state = self.model[ticket_id]
        if state["status"] == "closed":
            with pytest.raises(Conflict):
                self.desk.assign(AGENT, ticket_id, assignee)
        elif assignee == state["assignee_id"]:
            self.desk.assign(AGENT, ticket_id, assignee)
        else:
            new_status = domain.status_after_assignment(state["status"]) if assignee else None
            self.desk.assign(AGENT, ticket_id, assignee)
            self._changed(ticket_id, new_status, assignee)

    @invariant()
    def database_agrees_with_the_model(self):
        with self.uow.read() as session:
            stored = {t.id: t for t in session.execute(
                select(Ticket.id, Ticket.status, Ticket.version, Ticket.assignee_id, Ticket.solved_at,
                       Ticket.closed_at))}
            envelopes = session.execute(select(OUTBOX.c.envelope)).scalars().all()
        assert set(stored) == set(self.model)
        for ticket_id, state in self.model.items():
            ticket = stored[ticket_id]
            assert (ticket.status, ticket.version, ticket.assignee_id) == (
                state["status"], state["version"], state["assignee_id"])
            assert (ticket.closed_at is not None) == (ticket.status == "closed")
            assert (ticket.solved_at is not None) == (ticket.status in ("solved", "closed"))
        # every status change was announced once, and only legal ones
        announced = {}
        for envelope in envelopes:
            if envelope["event_type"] == "ticket_status_changed":
                payload = envelope["payload"]
                assert payload["new_status"] in TRANSITIONS[payload["old_status"]]
                ticket_id = envelope["subject_ids"]["ticket_id"]
                announced[ticket_id] = announced.get(ticket_id, 0) + 1
        assert announced == {t: s["status_events"] for t, s in self.model.items() if s["status_events"]}


TicketLifecycleMachine.TestCase.settings = settings(
    max_examples=10, stateful_step_count=15, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_operations_follow_the_lifecycle_rules = TicketLifecycleMachine.TestCase
