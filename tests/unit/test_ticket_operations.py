"""services/tickets/operations.py against a real, migrated SQLite database file (no broker).

Each operation runs in its own committed transaction (``Desk``), as the service runs them.
"""
import base64
import json
from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import sessionmaker

from contracts.errors import Conflict, Forbidden, InvalidTransition, NotFound, PreconditionFailed, ValidationError
from contracts.events import EventEnvelopeSchema
from contracts.tickets import PAYLOAD_SCHEMAS, PRIORITIES
from servicekit.db import UnitOfWork, make_engine
from servicekit.tables import OUTBOX
from services.tickets import operations, store
from services.tickets.models import Comment, HistoryEntry, IdempotencyKey, Ticket
from services.tickets.schemas import SORTS
from tests.unit.support import (ACME_MANAGER, AGENT, AGENT_2, ALICE, BOB, MALLORY, T0, VIEWER, Clock,
                                 Desk, create_data, fresh_database, list_filters)

_envelope_schema = EventEnvelopeSchema()


def outbox(uow) -> list[dict]:
    """Every outbox envelope in order, each checked against the event contract."""
    with uow.read() as session:
        rows = session.execute(select(OUTBOX).order_by(OUTBOX.c.id)).all()
    envelopes = []
    for row in rows:
        envelope = row.envelope
        assert row.event_id == envelope["event_id"]
        assert (row.source, row.event_type) == (envelope["source"], envelope["event_type"])
        assert row.published_at is None and row.attempts == 0
        _envelope_schema.load(envelope)
        PAYLOAD_SCHEMAS[envelope["event_type"]]().load(envelope["payload"])
        envelopes.append(envelope)
    return envelopes


def event_types(uow) -> list[str]:
    return [e["event_type"] for e in outbox(uow)]


def count(uow, model) -> int:
    with uow.read() as session:
        return session.execute(select(func.count()).select_from(model)).scalar_one()


def history_actions(desk, ticket_id, actor=AGENT) -> list[str]:
    return [e["action"] for e in desk.history(actor, ticket_id)["items"]]


# --- create ---------------------------------------------------------------------------------

def test_ticket_numbers_are_sequential_starting_at_1001(desk):
    assert [desk.create()["number"] for _ in range(4)] == [1001, 1002, 1003, 1004]


def test_requester_creates_a_new_ticket_in_their_own_organization(desk):
    ticket = desk.create(ALICE, tags=["VPN", "  vpn ", "urgent"], priority="high", channel="web")
    assert ticket["status"] == "new" and ticket["version"] == 1
    assert (ticket["requester_id"], ticket["organization_id"]) == ("alice", "acme")
    assert ticket["tags"] == ["urgent", "vpn"], "tags are a set: normalised and sorted"
    assert ticket["created_at"] == ticket["updated_at"] == "2026-01-05T09:00:00Z"
    assert desk.get(ALICE, ticket["id"]) == ticket


def test_requester_cannot_file_into_another_organization(desk):
    with pytest.raises(ValidationError) as caught:
        desk.create(ALICE, organization_id="globex")
    assert caught.value.errors == {"organization_id": ["must match your organization"]}


def test_requester_cannot_file_for_someone_else(desk):
    with pytest.raises(Forbidden):
        desk.create(ALICE, requester_id="bob")


def test_staff_files_on_a_requesters_behalf(desk):
    ticket = desk.create(AGENT, requester_id="bob", organization_id="acme", channel="phone")
    assert (ticket["requester_id"], ticket["organization_id"], ticket["channel"]) == ("bob", "acme", "phone")
    desk.get(BOB, ticket["id"])


def test_viewer_cannot_create(desk, uow):
    with pytest.raises(Forbidden):
        desk.create(VIEWER)
    assert count(uow, Ticket) == 0 and outbox(uow) == []


def test_creation_is_recorded_in_history_and_announced(desk, uow):
    ticket = desk.create(ALICE, tags=["b", "a"], category="hardware")
    [entry] = desk.history(AGENT, ticket["id"])["items"]
    assert (entry["action"], entry["actor_id"], entry["actor_role"]) == ("created", "alice", "requester")
    assert entry["changes"]["status"] == [None, "new"]
    assert entry["changes"]["category"] == [None, "hardware"]
    [event] = outbox(uow)
    assert event["event_type"] == "ticket_created"
    assert event["subject_ids"] == {"ticket_id": ticket["id"]}
    assert event["payload"]["actor_id"] == "alice"
    assert event["payload"]["ticket"]["number"] == 1001
    assert "description" not in event["payload"]["ticket"], "events must not carry personal data"


# --- idempotency keys -----------------------------------------------------------------------

def test_replaying_a_create_with_the_same_key_and_body_returns_the_same_ticket(desk, uow):
    with uow.transaction() as session:
        first, replayed_first = operations.create_ticket(session, ALICE, create_data(), "key-1")
    with uow.transaction() as session:
        second, replayed_second = operations.create_ticket(session, ALICE, create_data(), "key-1")
    assert (replayed_first, replayed_second) == (False, True)
    assert second["id"] == first["id"] and second["number"] == first["number"]
    assert count(uow, Ticket) == 1
    assert event_types(uow) == ["ticket_created"], "a replay announces nothing"


def test_reusing_a_key_with_a_different_body_is_refused(desk, uow):
    desk.create(ALICE, idempotency_key="key-1")
    with pytest.raises(ValidationError) as caught:
        desk.create(ALICE, idempotency_key="key-1", subject="Something else")
    assert set(caught.value.errors) == {"idempotency_key"}
    assert count(uow, Ticket) == 1


def test_idempotency_keys_are_scoped_to_the_caller(desk, uow):
    mine = desk.create(ALICE, idempotency_key="key-1")
    theirs = desk.create(BOB, idempotency_key="key-1")
    assert mine["id"] != theirs["id"]


def test_a_create_key_cannot_be_reused_for_a_comment(desk):
    ticket = desk.create(ALICE, idempotency_key="key-1")
    with pytest.raises(ValidationError):
        desk.comment(ALICE, ticket["id"], idempotency_key="key-1")


def test_create_that_loses_a_race_for_its_key_answers_with_the_winners_ticket(desk, uow, monkeypatch):
    winner = desk.create(ALICE, idempotency_key="key-1")
    # the loser checked for the key before the winner committed it
    real_find = store.find_idempotency_key
    calls = []

    def find_late(session, actor_id, key):
        calls.append(key)
        return None if len(calls) == 1 else real_find(session, actor_id, key)

    monkeypatch.setattr(store, "find_idempotency_key", find_late)
    with uow.transaction() as session:
        loser, replayed = operations.create_ticket(session, ALICE, create_data(), "key-1")
    assert replayed and loser["id"] == winner["id"]
    assert count(uow, Ticket) == 1 and event_types(uow) == ["ticket_created"]


def test_replaying_a_comment_with_the_same_key_posts_it_once(desk, uow):
    ticket = desk.create(ALICE)
    with uow.transaction() as session:
        first, replayed_first = operations.add_comment(session, AGENT, ticket["id"], "On it", True, "c-1")
    with uow.transaction() as session:
        second, replayed_second = operations.add_comment(session, AGENT, ticket["id"], "On it", True, "c-1")
    assert (replayed_first, replayed_second) == (False, True) and first == second
    assert count(uow, Comment) == 1
    assert event_types(uow).count("comment_added") == 1
    assert desk.get(AGENT, ticket["id"])["version"] == 2


# --- update ---------------------------------------------------------------------------------

def test_update_with_the_current_version_applies_and_bumps_it(desk):
    ticket = desk.create()
    updated = desk.update(AGENT, ticket["id"], expected_version=1, priority="critical")
    assert updated["priority"] == "critical" and updated["version"] == 2


def test_update_with_a_stale_version_is_refused(desk, uow):
    ticket = desk.create()
    desk.update(AGENT, ticket["id"], priority="high")
    with pytest.raises(PreconditionFailed) as caught:
        desk.update(AGENT, ticket["id"], expected_version=1, priority="low")
    assert caught.value.errors == {"version": ["current version is 2"]}
    assert desk.get(AGENT, ticket["id"])["priority"] == "high"


def test_stale_version_is_refused_even_when_nothing_would_change(desk):
    ticket = desk.create()
    desk.update(AGENT, ticket["id"], priority="high")
    with pytest.raises(PreconditionFailed):
        desk.update(AGENT, ticket["id"], expected_version=1, priority="high")


def test_version_step_is_a_compare_and_set(desk, uow):
    ticket = desk.create()
    with uow.transaction() as session:
        row = store.get_ticket(session, ticket["id"])
        assert store.bump_version(session, row, 1, T0) and row.version == 2
        assert not store.bump_version(session, row, 1, T0), "a second writer expecting 1 loses"
    assert desk.get(AGENT, ticket["id"])["version"] == 2


def test_update_racing_a_concurrent_writer_is_refused(desk, uow, monkeypatch):
    ticket = desk.create()
    real_get = store.get_ticket

    def read_then_lose_the_race(session, ticket_id, for_update=False):
        row = real_get(session, ticket_id, for_update)
        # another writer commits between our read and our version step
        session.execute(update(Ticket).where(Ticket.id == ticket_id).values(version=Ticket.version + 1)
                        .execution_options(synchronize_session=False))
        return row

    monkeypatch.setattr(store, "get_ticket", read_then_lose_the_race)
    with pytest.raises(PreconditionFailed):
        desk.update(AGENT, ticket["id"], expected_version=1, priority="high")
    monkeypatch.undo()
    assert desk.get(AGENT, ticket["id"])["priority"] == "normal"
    assert event_types(uow) == ["ticket_created"]


def test_update_that_changes_nothing_bumps_nothing_and_announces_nothing(desk, uow):
    ticket = desk.create(tags=["a"], category="hardware")
    same = desk.update(AGENT, ticket["id"], subject="Printer on fire", tags=["A"], category="hardware",
                       status="new")
    assert same["version"] == 1
    assert event_types(uow) == ["ticket_created"]
    assert history_actions(desk, ticket["id"]) == ["created"]


def test_reordering_tags_is_not_a_change(desk, uow):
    # tags are a set (one row each, read back sorted): a new order must not bump the version
    ticket = desk.create(tags=["a", "b"])
    same = desk.update(AGENT, ticket["id"], tags=["b", "a"])
    assert same["version"] == 1 and same["tags"] == ["a", "b"]
    assert event_types(uow) == ["ticket_created"]


def test_changing_tags_replaces_them(desk, uow):
    ticket = desk.create(tags=["a", "b"])
    updated = desk.update(AGENT, ticket["id"], tags=["b", "c"])
    assert updated["tags"] == ["b", "c"] and desk.get(AGENT, ticket["id"])["tags"] == ["b", "c"]
    assert outbox(uow)[-1]["payload"]["changes"] == {"tags": [["a", "b"], ["b", "c"]]}
    assert desk.list_tickets(tag="a")["items"] == []


def test_empty_update_is_refused(desk, uow):
    ticket = desk.create()
    with pytest.raises(ValidationError):
        with uow.transaction() as session:
            operations.update_ticket(session, AGENT, ticket["id"], {})


@pytest.mark.parametrize("path,illegal", [
    ([], "closed"),
    (["solved"], "pending"),
    (["solved"], "on_hold"),
    (["open"], "new"),
])
def test_illegal_transition_is_refused_and_changes_nothing(desk, uow, path, illegal):
    ticket = desk.create()
    for status in path:
        desk.update(AGENT, ticket["id"], status=status)
    before = desk.get(AGENT, ticket["id"])
    events_before = len(outbox(uow))
    with pytest.raises(InvalidTransition):
        desk.update(AGENT, ticket["id"], status=illegal, priority="critical")
    assert desk.get(AGENT, ticket["id"]) == before
    assert len(outbox(uow)) == events_before


def test_closed_ticket_cannot_be_changed(desk):
    ticket = desk.create()
    desk.update(AGENT, ticket["id"], status="solved")
    closed = desk.update(AGENT, ticket["id"], status="closed")
    assert closed["closed_at"] is not None
    with pytest.raises(Conflict):
        desk.update(AGENT, ticket["id"], status="open")
    with pytest.raises(Conflict):
        desk.update(AGENT, ticket["id"], subject="still there?")
    with pytest.raises(Conflict):
        desk.assign(AGENT, ticket["id"], "agent-2")


@pytest.mark.parametrize("status", ["solved", "closed"])
def test_requester_edit_of_a_solved_or_closed_ticket_is_a_state_conflict(desk, status):
    ticket = desk.create(ALICE)
    desk.update(AGENT, ticket["id"], status="solved")
    if status == "closed":
        desk.update(AGENT, ticket["id"], status="closed")
    with pytest.raises(Conflict):
        desk.update(ALICE, ticket["id"], subject="typo fixed")


def test_requester_asking_for_a_staff_field_is_forbidden_whatever_the_state(desk):
    ticket = desk.create(ALICE)
    desk.update(AGENT, ticket["id"], status="solved")
    desk.update(AGENT, ticket["id"], status="closed")
    with pytest.raises(Forbidden):
        desk.update(ALICE, ticket["id"], status="open")


def test_solving_stamps_solved_at_and_reopening_clears_it(desk):
    ticket = desk.create()
    solved = desk.update(AGENT, ticket["id"], status="solved")
    assert solved["solved_at"] is not None
    assert desk.update(AGENT, ticket["id"], status="open")["solved_at"] is None


def test_status_change_is_announced_apart_from_field_changes(desk, uow):
    ticket = desk.create()
    desk.update(AGENT, ticket["id"], status="pending", priority="high", description="new text")
    events = outbox(uow)[1:]
    assert sorted(e["event_type"] for e in events) == ["ticket_status_changed", "ticket_updated"]
    by_type = {e["event_type"]: e["payload"] for e in events}
    assert by_type["ticket_status_changed"]["old_status"] == "new"
    assert by_type["ticket_status_changed"]["new_status"] == "pending"
    assert by_type["ticket_status_changed"]["reason"] == "agent"
    assert by_type["ticket_updated"]["changes"] == {
        "priority": ["normal", "high"], "description": ["(previous)", "(edited)"]}
    [_, entry] = desk.history(AGENT, ticket["id"])["items"]
    assert entry["changes"]["description"] == ["(previous)", "(edited)"], "bodies stay out of history"
    assert entry["changes"]["status"] == ["new", "pending"]


def test_requester_edits_own_subject_but_not_status_priority_or_assignee(desk):
    ticket = desk.create(ALICE)
    assert desk.update(ALICE, ticket["id"], subject="Printer still on fire")["version"] == 2
    for fields in ({"status": "solved"}, {"priority": "critical"}, {"assignee_id": "alice"}):
        with pytest.raises(Forbidden):
            desk.update(ALICE, ticket["id"], **fields)


def test_viewer_cannot_update(desk):
    ticket = desk.create()
    with pytest.raises(Forbidden):
        desk.update(VIEWER, ticket["id"], subject="x")


def test_someone_elses_ticket_is_not_found_for_a_requester(desk):
    ticket = desk.create(ALICE)
    for action in (lambda: desk.get(BOB, ticket["id"]),
                   lambda: desk.update(BOB, ticket["id"], subject="mine now"),
                   lambda: desk.comment(BOB, ticket["id"]),
                   lambda: desk.comments(BOB, ticket["id"]),
                   lambda: desk.history(BOB, ticket["id"]),
                   lambda: desk.get(MALLORY, ticket["id"])):
        with pytest.raises(NotFound):
            action()


@pytest.mark.parametrize("ticket_id", ["nope", "", "00000000-0000-0000-0000-000000000000", 42, None])
def test_unknown_ticket_is_not_found(desk, ticket_id):
    with pytest.raises(NotFound):
        desk.get(AGENT, ticket_id)
    with pytest.raises(NotFound):
        desk.update(AGENT, ticket_id, subject="x")


def test_update_can_assign_and_set_status_in_one_version_step(desk, uow):
    ticket = desk.create()
    updated = desk.update(AGENT, ticket["id"], expected_version=1, assignee_id="agent-2", group="tier2",
                          status="pending")
    assert (updated["assignee_id"], updated["group"], updated["status"], updated["version"]) == (
        "agent-2", "tier2", "pending", 2)
    types = event_types(uow)
    assert types == ["ticket_created", "ticket_assigned", "ticket_status_changed", "ticket_status_changed"]
    [_, entry] = desk.history(AGENT, ticket["id"])["items"]
    assert entry["changes"]["status"] == ["new", "pending"]
    assert entry["changes"]["assignee_id"] == [None, "agent-2"]


# --- assignment -----------------------------------------------------------------------------

def test_assigning_a_new_ticket_opens_it(desk, uow):
    ticket = desk.create()
    assigned = desk.assign(AGENT, ticket["id"], "agent-2", group="tier1")
    assert (assigned["assignee_id"], assigned["group"], assigned["status"]) == ("agent-2", "tier1", "open")
    events = outbox(uow)[1:]
    assert [e["event_type"] for e in events] == ["ticket_assigned", "ticket_status_changed"]
    assert events[0]["payload"]["new_assignee_id"] == "agent-2"
    assert events[1]["payload"]["reason"] == "assignment"


def test_assigning_again_to_the_same_agent_changes_nothing(desk, uow):
    ticket = desk.create()
    desk.assign(AGENT, ticket["id"], "agent-2")
    again = desk.assign(AGENT, ticket["id"], "agent-2")
    assert again["version"] == 2 and len(outbox(uow)) == 3


def test_reassigning_a_pending_ticket_leaves_its_status(desk, uow):
    ticket = desk.create()
    desk.update(AGENT, ticket["id"], status="pending")
    assert desk.assign(AGENT, ticket["id"], "agent-2")["status"] == "pending"


def test_unassigning_puts_the_ticket_back_in_the_queue(desk):
    ticket = desk.create()
    desk.assign(AGENT, ticket["id"], "agent-2")
    unassigned = desk.assign(AGENT, ticket["id"], None)
    assert unassigned["assignee_id"] is None and unassigned["status"] == "open"
    assert history_actions(desk, ticket["id"]) == ["created", "assigned", "unassigned"]


def test_assign_with_a_stale_version_is_refused(desk):
    ticket = desk.create()
    desk.update(AGENT, ticket["id"], priority="high")
    with pytest.raises(PreconditionFailed):
        desk.assign(AGENT, ticket["id"], "agent-2", expected_version=1)


@pytest.mark.parametrize("actor", [ALICE, VIEWER])
def test_only_staff_assign(desk, actor):
    ticket = desk.create(ALICE)
    with pytest.raises(Forbidden):
        desk.assign(actor, ticket["id"], "agent-2")


# --- comments -------------------------------------------------------------------------------

@pytest.mark.parametrize("status", ["pending", "solved"])
def test_requester_reply_reopens_waiting_or_solved_ticket(desk, uow, status):
    ticket = desk.create(ALICE)
    desk.update(AGENT, ticket["id"], status=status)
    desk.comment(ALICE, ticket["id"], "Still broken")
    reopened = desk.get(ALICE, ticket["id"])
    assert reopened["status"] == "open" and reopened["solved_at"] is None
    last = outbox(uow)[-1]
    assert last["event_type"] == "ticket_status_changed"
    assert (last["payload"]["old_status"], last["payload"]["reason"]) == (status, "requester_reply")


@pytest.mark.parametrize("status", ["new", "on_hold"])
def test_requester_reply_does_not_move_other_statuses(desk, status):
    ticket = desk.create(ALICE)
    if status != "new":
        desk.update(AGENT, ticket["id"], status=status)
    desk.comment(ALICE, ticket["id"])
    assert desk.get(ALICE, ticket["id"])["status"] == status


def test_colleague_with_org_wide_access_replies_and_reopens(desk):
    ticket = desk.create(ALICE)
    desk.update(AGENT, ticket["id"], status="pending")
    desk.comment(ACME_MANAGER, ticket["id"])
    assert desk.get(AGENT, ticket["id"])["status"] == "open"


def test_one_comment_is_readable_but_a_note_is_not_found_for_requesters(desk, uow):
    ticket = desk.create(ALICE)
    reply = desk.comment(AGENT, ticket["id"], "public answer")
    note = desk.comment(AGENT, ticket["id"], "internal", public=False)
    with uow.read() as session:
        assert operations.get_comment(session, ALICE, ticket["id"], reply["id"]) == reply
        assert operations.get_comment(session, AGENT, ticket["id"], note["id"]) == note
        with pytest.raises(NotFound):
            operations.get_comment(session, ALICE, ticket["id"], note["id"])
        with pytest.raises(NotFound):
            operations.get_comment(session, AGENT, ticket["id"], "not-a-uuid")
        other = desk.create(ALICE)
        with pytest.raises(NotFound):  # a comment is found only under its own ticket
            operations.get_comment(session, AGENT, other["id"], reply["id"])


def test_reply_to_a_closed_ticket_is_refused(desk, uow):
    ticket = desk.create(ALICE)
    desk.update(AGENT, ticket["id"], status="solved")
    desk.update(AGENT, ticket["id"], status="closed")
    events = len(outbox(uow))
    with pytest.raises(Conflict):
        desk.comment(ALICE, ticket["id"])
    with pytest.raises(Conflict):
        desk.comment(AGENT, ticket["id"], public=False)
    assert count(uow, Comment) == 0 and len(outbox(uow)) == events


def test_requester_cannot_add_internal_notes(desk, uow):
    ticket = desk.create(ALICE)
    with pytest.raises(Forbidden):
        desk.comment(ALICE, ticket["id"], public=False)
    assert count(uow, Comment) == 0


def test_viewer_cannot_comment(desk):
    ticket = desk.create(ALICE)
    with pytest.raises(Forbidden):
        desk.comment(VIEWER, ticket["id"])


def test_requesters_never_see_internal_notes(desk):
    ticket = desk.create(ALICE)
    desk.comment(AGENT, ticket["id"], "Looking", public=True)
    note = desk.comment(AGENT, ticket["id"], "Customer is on the naughty list", public=False)
    desk.comment(ALICE, ticket["id"], "Thanks", public=True)

    for requester in (ALICE, ACME_MANAGER):
        bodies = [c["body"] for c in desk.comments(requester, ticket["id"])]
        assert bodies == ["Looking", "Thanks"]
        history = desk.history(requester, ticket["id"])["items"]
        assert [e["action"] for e in history] == ["created", "commented", "commented"]
        assert note["id"] not in json.dumps(history)

    for insider in (AGENT, VIEWER):
        assert len(desk.comments(insider, ticket["id"])) == 3
        assert history_actions(desk, ticket["id"], insider) == ["created", "commented", "noted", "commented"]


def test_first_public_staff_reply_stamps_the_first_response(desk):
    ticket = desk.create(ALICE)
    desk.comment(AGENT, ticket["id"], public=False)
    desk.comment(ALICE, ticket["id"])
    assert desk.get(AGENT, ticket["id"])["first_responded_at"] is None
    desk.comment(AGENT, ticket["id"])
    first = desk.get(AGENT, ticket["id"])["first_responded_at"]
    desk.comment(AGENT_2, ticket["id"])
    assert first is not None and desk.get(AGENT, ticket["id"])["first_responded_at"] == first


def test_every_comment_is_announced_without_its_body(desk, uow):
    ticket = desk.create(ALICE)
    desk.comment(AGENT, ticket["id"], "secret", public=False)
    event = outbox(uow)[-1]
    assert event["event_type"] == "comment_added"
    assert event["payload"]["public"] is False and event["payload"]["author_role"] == "agent"
    assert "secret" not in json.dumps(event)


def test_each_comment_bumps_the_version(desk):
    ticket = desk.create(ALICE)
    desk.comment(AGENT, ticket["id"])
    desk.comment(ALICE, ticket["id"])
    assert desk.get(AGENT, ticket["id"])["version"] == 3


# --- history --------------------------------------------------------------------------------

def test_history_tells_time_in_status_and_who_had_the_ticket(desk, clock):
    clock.tick = timedelta(0)
    ticket = desk.create(ALICE)
    clock.advance(minutes=10)
    desk.assign(AGENT, ticket["id"], "agent-1")
    clock.advance(minutes=20)
    desk.update(AGENT, ticket["id"], status="pending")
    clock.advance(minutes=5)
    desk.comment(ALICE, ticket["id"])  # reopens
    clock.advance(minutes=15)
    history = desk.history(AGENT, ticket["id"])
    assert [e["action"] for e in history["items"]] == ["created", "assigned", "updated", "commented"]
    assert history["time_in_status"] == {"new": 600, "open": 1200 + 900, "pending": 300}
    assert history["assignment_periods"] == [
        {"assignee_id": None, "started_at": "2026-01-05T09:00:00Z", "ended_at": "2026-01-05T09:10:00Z",
         "seconds": 600},
        {"assignee_id": "agent-1", "started_at": "2026-01-05T09:10:00Z", "ended_at": None, "seconds": 2400},
    ]


def test_history_entries_say_who_did_what_and_when(desk):
    ticket = desk.create(ALICE)
    desk.update(AGENT, ticket["id"], priority="critical")
    entry = desk.history(ALICE, ticket["id"])["items"][-1]
    assert (entry["actor_id"], entry["actor_role"], entry["action"]) == ("agent-1", "agent", "updated")
    assert entry["changes"] == {"priority": ["normal", "critical"]}
    assert entry["occurred_at"].endswith("Z")


# --- lists, filters and cursors -------------------------------------------------------------

def numbers(page) -> list[int]:
    return [t["number"] for t in page["items"]]


@contextmanager
def shared_desk(tmp_path_factory, template_dir, tick: timedelta):
    """A desk over its own database for fixtures several read-only tests share."""
    engine = make_engine(fresh_database(tmp_path_factory.mktemp("shared"), template_dir), pool_size=2)
    try:
        with pytest.MonkeyPatch.context() as patch:
            clock = Clock(T0, tick=tick)
            patch.setattr(operations, "_now", clock)
            yield Desk(UnitOfWork(sessionmaker(engine, expire_on_commit=False))), clock
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, template_dir):
    """Six tickets with distinct attributes, created a minute apart from 09:00."""
    with shared_desk(tmp_path_factory, template_dir, timedelta(minutes=1)) as (desk, _):
        specs = [
            dict(actor=ALICE, priority="low", tags=["vpn"], category="network"),          # 1001 09:00
            dict(actor=BOB, priority="high", tags=["vpn", "mac"]),                        # 1002 09:01
            dict(actor=AGENT, requester_id="mallory", organization_id="globex",
                 priority="critical", category="billing"),                               # 1003 09:02
            dict(actor=ALICE, priority="normal", tags=["printer"], category="hardware"),  # 1004 09:03
            dict(actor=BOB, priority="high", category="network"),                         # 1005 09:04
            dict(actor=AGENT, requester_id="dave", priority="normal"),                    # 1006 09:05
        ]
        tickets = [desk.create(**spec) for spec in specs]
        desk.assign(AGENT, tickets[1]["id"], "agent-1")                                  # 09:06
        desk.assign(AGENT, tickets[4]["id"], "agent-2")                                  # 09:07
        desk.update(AGENT, tickets[3]["id"], status="pending")                           # 09:08
        yield desk


@pytest.mark.parametrize("filters,expected", [
    ({}, [1006, 1005, 1004, 1003, 1002, 1001]),
    ({"status": ["new"]}, [1006, 1003, 1001]),
    ({"status": ["open", "pending"]}, [1005, 1004, 1002]),
    ({"priority": ["high", "critical"]}, [1005, 1003, 1002]),
    ({"assignee_id": "agent-1"}, [1002]),
    ({"unassigned": True}, [1006, 1004, 1003, 1001]),
    ({"unassigned": False}, [1005, 1002]),
    ({"tag": "vpn"}, [1002, 1001]),
    ({"tag": "nothing"}, []),
    ({"category": "network"}, [1005, 1001]),
    ({"requester_id": "alice"}, [1004, 1001]),
    ({"organization_id": "acme"}, [1005, 1004, 1002, 1001]),
    ({"organization_id": "globex"}, [1003]),
    ({"created_after": "2026-01-05T09:02:00Z"}, [1006, 1005, 1004, 1003]),   # inclusive
    ({"created_before": "2026-01-05T09:02:00Z"}, [1002, 1001]),              # exclusive
    ({"created_after": "2026-01-05T09:01:00Z", "created_before": "2026-01-05T09:03:00Z"}, [1003, 1002]),
    ({"created_after": "2026-01-05T10:01:00+01:00"}, [1006, 1005, 1004, 1003, 1002]),  # any offset
    ({"updated_after": "2026-01-05T09:06:00Z"}, [1005, 1004, 1002]),
    ({"updated_before": "2026-01-05T09:06:00Z"}, [1006, 1003, 1001]),
    ({"status": ["open"], "priority": ["high"], "tag": "mac"}, [1002]),
])
def test_list_filters(catalogue, filters, expected):
    assert numbers(catalogue.list_tickets(AGENT, **filters)) == expected


def test_requester_lists_only_what_they_may_read(catalogue):
    desk = catalogue
    assert numbers(desk.list_tickets(ALICE)) == [1004, 1001]
    assert numbers(desk.list_tickets(ALICE, requester_id="bob")) == []
    assert numbers(desk.list_tickets(ACME_MANAGER)) == [1005, 1004, 1002, 1001]
    assert numbers(desk.list_tickets(MALLORY)) == [1003]
    assert numbers(desk.list_tickets(MALLORY, organization_id="acme")) == []
    assert numbers(desk.list_tickets(VIEWER)) == [1006, 1005, 1004, 1003, 1002, 1001]


def test_last_page_has_no_next_cursor(catalogue):
    desk = catalogue
    assert desk.list_tickets(AGENT, limit=6)["next_cursor"] is None
    assert desk.list_tickets(AGENT, limit=5)["next_cursor"] is not None


@pytest.fixture(scope="module")
def crowd(tmp_path_factory, template_dir):
    """Seventeen tickets with many ties: created in batches at the same instant, repeated
    priorities, updates at the same instant."""
    with shared_desk(tmp_path_factory, template_dir, timedelta(0)) as (desk, clock):
        tickets = []
        for index in range(17):
            if index % 4 == 0:
                clock.advance(seconds=30)
            tickets.append(desk.create(AGENT, priority=PRIORITIES[index % 3 if index % 5 else 3]))
        clock.advance(minutes=5)
        for ticket in tickets[::3]:
            desk.update(AGENT, ticket["id"], subject=f"touched {ticket['number']}")
        yield desk, {t["number"]: t for t in desk.list_tickets(AGENT, limit=100)["items"]}


def _expected_order(tickets: dict, sort: str) -> list[int]:
    key = sort.lstrip("-")
    rank = {p: -i for i, p in enumerate(PRIORITIES)}  # PRIORITIES runs critical..low; urgency ranks up
    value = {
        "created_at": lambda t: t["created_at"],
        "updated_at": lambda t: t["updated_at"],
        "priority": lambda t: rank[t["priority"]],
        "number": lambda t: t["number"],
    }[key]
    ordered = sorted(tickets.values(), key=lambda t: (value(t), t["number"]), reverse=sort.startswith("-"))
    return [t["number"] for t in ordered]


@pytest.mark.parametrize("limit", [1, 4, 5])
@pytest.mark.parametrize("sort", SORTS)
def test_cursor_pagination_visits_every_ticket_once_in_order(crowd, sort, limit):
    desk, crowd = crowd
    seen, cursor_text, pages = [], None, 0
    while True:
        page = desk.list_tickets(AGENT, sort=sort, limit=limit, cursor=cursor_text)
        assert len(page["items"]) <= limit
        seen += numbers(page)
        pages += 1
        cursor_text = page["next_cursor"]
        if cursor_text is None:
            break
        assert len(page["items"]) == limit
    assert seen == _expected_order(crowd, sort)  # no duplicates, no gaps, in order
    assert pages == -(-len(crowd) // limit)  # a full last page has no cursor to an empty one


def test_cursor_pagination_respects_filters_across_pages(crowd):
    desk, crowd = crowd
    expected = [n for n in _expected_order(crowd, "priority") if crowd[n]["priority"] in ("high", "low")]
    seen, cursor_text = [], None
    while True:
        page = desk.list_tickets(AGENT, sort="priority", limit=2, cursor=cursor_text, priority=["high", "low"])
        seen += numbers(page)
        cursor_text = page["next_cursor"]
        if cursor_text is None:
            break
    assert seen == expected


def test_cursor_issued_for_one_sort_is_refused_for_another(crowd):
    desk, _ = crowd
    issued = desk.list_tickets(AGENT, sort="priority", limit=2)["next_cursor"]
    with pytest.raises(ValidationError):
        desk.list_tickets(AGENT, sort="-created_at", cursor=issued)


def _crafted(data) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


@pytest.mark.parametrize("sort,data", [
    ("-number", {"s": "-number", "v": 1, "n": 10**20}),
    ("priority", {"s": "priority", "v": 10**20, "n": 1001}),
    ("priority", {"s": "priority", "v": float("inf"), "n": 1001}),
    ("-created_at", {"s": "-created_at", "v": "2026-01-05T09:00:00+00:00", "n": True}),
    ("-created_at", {"s": "-created_at", "v": "2026-01-05T09:00:00", "n": 1001}),  # naive
    ("updated_at", {"s": "updated_at", "v": "yesterday", "n": 1001}),
    ("priority", {"s": "priority", "v": "high", "n": 1001}),
])
def test_crafted_cursor_is_a_validation_error_not_a_crash(crowd, sort, data):
    desk, _ = crowd
    with pytest.raises(ValidationError) as caught:
        desk.list_tickets(AGENT, sort=sort, cursor=_crafted(data))
    assert set(caught.value.errors) == {"cursor"}


# --- SLA due dates (mirrored from the sla service) ------------------------------------------

def test_sla_due_dates_are_mirrored_with_a_history_entry(desk, uow):
    ticket = desk.create(ALICE)
    due = {"first_response_due_at": T0 + timedelta(hours=1), "resolution_due_at": T0 + timedelta(hours=8)}
    with uow.transaction() as session:
        operations.apply_sla_due_dates(session, ticket["id"], due)
    mirrored = desk.get(ALICE, ticket["id"])
    assert mirrored["first_response_due_at"] == "2026-01-05T10:00:00Z"
    assert mirrored["resolution_due_at"] == "2026-01-05T17:00:00Z"
    assert mirrored["version"] == 2
    entry = desk.history(AGENT, ticket["id"])["items"][-1]
    assert entry["action"] == "sla_updated"
    assert entry["changes"]["resolution_due_at"] == [None, "2026-01-05T17:00:00Z"]


def test_same_sla_due_dates_again_change_nothing(desk, uow):
    ticket = desk.create(ALICE)
    due = {"first_response_due_at": T0 + timedelta(hours=1), "resolution_due_at": None}
    for _ in range(2):
        with uow.transaction() as session:
            operations.apply_sla_due_dates(session, ticket["id"], due)
    assert desk.get(AGENT, ticket["id"])["version"] == 2
    assert history_actions(desk, ticket["id"]) == ["created", "sla_updated"]


def test_sla_event_without_a_target_leaves_that_target_unchanged(desk, uow):
    from contracts.tickets import TicketSlaUpdatedPayload

    ticket = desk.create(ALICE)
    first = TicketSlaUpdatedPayload().load({"ticket_id": ticket["id"],
                                           "first_response_due_at": "2026-01-05T10:00:00Z",
                                           "resolution_due_at": "2026-01-05T17:00:00Z"})
    only_resolution = TicketSlaUpdatedPayload().load({"ticket_id": ticket["id"],
                                                     "resolution_due_at": "2026-01-06T17:00:00Z"})
    for due in (first, only_resolution):
        with uow.transaction() as session:
            operations.apply_sla_due_dates(session, ticket["id"], due)
    mirrored = desk.get(AGENT, ticket["id"])
    assert mirrored["first_response_due_at"] == "2026-01-05T10:00:00Z"
    assert mirrored["resolution_due_at"] == "2026-01-06T17:00:00Z"


def test_changing_only_the_group_of_an_unassigned_ticket_is_recorded_as_regrouped(desk):
    ticket = desk.create(ALICE)
    desk.assign(AGENT, ticket["id"], None, group="tier2")
    assert history_actions(desk, ticket["id"]) == ["created", "regrouped"]


def test_a_group_can_be_set_and_cleared_by_update(desk):
    ticket = desk.create(ALICE)
    assert desk.update(AGENT, ticket["id"], group="billing")["group"] == "billing"
    cleared = desk.update(AGENT, ticket["id"], group=None)
    assert cleared["group"] is None and cleared["version"] == 3


def test_assign_rpc_without_a_group_keeps_the_group(desk):
    ticket = desk.create(ALICE)
    desk.assign(AGENT, ticket["id"], "agent-1", group="tier2")
    assert desk.assign(AGENT, ticket["id"], "agent-2")["group"] == "tier2"


@pytest.mark.parametrize("field", ["created_after", "created_before", "updated_after", "updated_before"])
def test_dates_that_overflow_in_utc_are_invalid_not_a_crash(field):
    from contracts.tickets import ListTicketsRequest
    from marshmallow import ValidationError as SchemaError

    with pytest.raises(SchemaError) as caught:
        ListTicketsRequest().load({field: "9999-12-31T23:59:59-01:00"})
    assert field in caught.value.normalized_messages()


def test_cursor_with_a_date_that_overflows_in_utc_is_malformed(desk, uow):
    from services.tickets import cursor

    forged = cursor.encode("-created_at", "0001-01-01T00:00:00+01:00", 5)
    with pytest.raises(ValidationError):
        with uow.read() as session:
            operations.list_tickets(session, AGENT, {"sort": "-created_at", "limit": 5, "cursor": forged})


def test_sla_due_dates_for_an_unknown_ticket_are_not_found(uow):
    with pytest.raises(NotFound):
        with uow.transaction() as session:
            operations.apply_sla_due_dates(session, "00000000-0000-0000-0000-000000000000", {})


# --- the outbox -----------------------------------------------------------------------------

def test_every_change_writes_contract_valid_events_in_its_transaction(desk, uow):
    ticket = desk.create(ALICE, tags=["vpn"])
    desk.update(AGENT, ticket["id"], priority="high", tags=["vpn", "mac"])
    desk.assign(AGENT, ticket["id"], "agent-1", group="tier1")
    desk.comment(AGENT, ticket["id"], "note", public=False)
    desk.update(AGENT, ticket["id"], status="pending")
    desk.comment(ALICE, ticket["id"], "reply")
    desk.update(AGENT, ticket["id"], status="solved")
    desk.update(AGENT, ticket["id"], status="closed")
    events = outbox(uow)  # validates every envelope and payload
    assert [e["event_type"] for e in events] == [
        "ticket_created", "ticket_updated", "ticket_assigned", "ticket_status_changed", "comment_added",
        "ticket_status_changed", "comment_added", "ticket_status_changed", "ticket_status_changed",
        "ticket_status_changed"]
    assert len({e["event_id"] for e in events}) == len(events)
    assert all(e["subject_ids"] == {"ticket_id": ticket["id"]} for e in events)
    assert all(e["occurred_at"].endswith("Z") for e in events)
    versions = [e["payload"]["ticket"]["version"] for e in events]
    assert versions == sorted(versions) and versions[-1] == desk.get(AGENT, ticket["id"])["version"]
    assert events[-1]["payload"]["ticket"]["status"] == "closed"


def test_a_refused_change_leaves_no_event_and_no_history(desk, uow):
    ticket = desk.create(ALICE)
    for refused in (lambda: desk.update(AGENT, ticket["id"], status="closed"),
                    lambda: desk.update(ALICE, ticket["id"], status="solved"),
                    lambda: desk.comment(ALICE, ticket["id"], public=False),
                    lambda: desk.assign(VIEWER, ticket["id"], "agent-1")):
        with pytest.raises((InvalidTransition, Forbidden)):
            refused()
    assert event_types(uow) == ["ticket_created"]
    assert count(uow, HistoryEntry) == 1 and count(uow, IdempotencyKey) == 0


def test_outbox_rows_roll_back_with_the_transaction(desk, uow):
    ticket = desk.create(ALICE)
    with pytest.raises(RuntimeError):
        with uow.transaction() as session:
            operations.update_ticket(session, AGENT, ticket["id"], {"priority": "critical"})
            raise RuntimeError("crash before commit")
    assert event_types(uow) == ["ticket_created"]
    assert desk.get(AGENT, ticket["id"])["priority"] == "normal"


def test_a_successful_transaction_marks_the_outbox_dirty_for_the_relay(session_factory, clock):
    woken = []
    uow = UnitOfWork(session_factory, on_events_committed=lambda: woken.append(True))
    with uow.transaction() as session:
        operations.create_ticket(session, ALICE, create_data())
    with uow.read() as session:
        operations.list_tickets(session, ALICE, list_filters())
    assert woken == [True]
