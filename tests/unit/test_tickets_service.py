"""TicketsService entrypoints via nameko's worker_factory: input validation at the RPC edge,
NotFound for unknown ids, and once-only event handling. A real UnitOfWork over a tmp SQLite
database stands in for the ``db`` dependency; no broker."""
import uuid

import pytest
from nameko.testing.services import worker_factory
from sqlalchemy import func, select

from contracts.errors import Forbidden, NotFound, ValidationError
from contracts.events import make_envelope
from servicekit.events import UnprocessableEvent
from servicekit.tables import HANDLED_EVENTS, OUTBOX
from services.tickets import operations
from services.tickets.models import HistoryEntry
from services.tickets.service import TicketsService

AGENT = {"id": "agent-1", "role": "agent"}
ALICE = {"id": "alice", "role": "requester", "organization_id": "acme"}
BOB = {"id": "bob", "role": "requester", "organization_id": "acme"}
VIEWER = {"id": "viewer-1", "role": "viewer"}
NEW = {"subject": "VPN drops every hour", "description": "Since Monday"}
MISSING = str(uuid.uuid4())


@pytest.fixture
def service(uow, clock):
    return worker_factory(TicketsService, db=uow)


@pytest.fixture
def ticket(service):
    return service.create_ticket(ALICE, NEW)["ticket"]


def invalid(call, *args, **kwargs) -> dict:
    """Run an RPC expected to refuse its input; returns the per-field errors."""
    with pytest.raises(ValidationError) as caught:
        call(*args, **kwargs)
    assert isinstance(caught.value.errors, dict) and caught.value.errors
    return caught.value.errors


def count(uow, table) -> int:
    with uow.read() as session:
        return session.execute(select(func.count()).select_from(table)).scalar_one()


# --- happy path through the entrypoints ------------------------------------------------------

def test_create_returns_the_ticket_and_whether_it_was_a_replay(service, uow):
    first = service.create_ticket(ALICE, NEW, idempotency_key="k-1")
    again = service.create_ticket(ALICE, NEW, idempotency_key="k-1")
    assert first["replayed"] is False and again["replayed"] is True
    assert again["ticket"] == first["ticket"] and first["ticket"]["number"] == 1001
    assert count(uow, OUTBOX) == 1


def test_entrypoints_round_trip_a_ticket(service, ticket):
    assert service.get_ticket(ALICE, ticket["id"]) == ticket
    updated = service.update_ticket(AGENT, ticket["id"], {"priority": "high"}, expected_version=1)
    assert updated["version"] == 2
    assert service.assign_ticket(AGENT, ticket["id"], "agent-1", "tier1")["status"] == "open"
    assert service.unassign_ticket(AGENT, ticket["id"])["assignee_id"] is None
    reply = service.add_comment(ALICE, ticket["id"], {"body": "any news?"})
    assert reply["replayed"] is False and reply["comment"]["public"] is True
    assert [c["body"] for c in service.list_comments(ALICE, ticket["id"])["items"]] == ["any news?"]
    assert [t["id"] for t in service.list_tickets(ALICE)["items"]] == [ticket["id"]]
    assert service.list_tickets(BOB, None)["items"] == []
    assert len(service.get_history(AGENT, ticket["id"])["items"]) == 5
    assert service.health_ping() == "pong"


def test_results_are_plain_json(service, ticket):
    import json

    for result in (ticket, service.list_tickets(AGENT), service.get_history(AGENT, ticket["id"])):
        assert json.loads(json.dumps(result)) == result


# --- bad input is a ValidationError with per-field errors ------------------------------------

@pytest.mark.parametrize("data,field", [
    ({"subject": 5, "description": "x"}, "subject"),
    ({"subject": "x", "description": ["x"]}, "description"),
    ({"subject": "x" * 251, "description": "x"}, "subject"),
    ({"subject": "   ", "description": "x"}, "subject"),
    ({"subject": "x", "description": "x" * 65537}, "description"),
    ({"description": "x"}, "subject"),
    ({"subject": "x", "description": "x", "priority": "urgent"}, "priority"),
    ({"subject": "x", "description": "x", "channel": "fax"}, "channel"),
    ({"subject": "x", "description": "x", "tags": "vpn"}, "tags"),
    ({"subject": "x", "description": "x", "tags": ["Not A Tag!"]}, "tags"),
    ({"subject": "x", "description": "x", "tags": [f"t{i}" for i in range(21)]}, "tags"),
    ({"subject": "x", "description": "x", "status": "open"}, "status"),          # unknown field
    ({"subject": "x", "description": "x", "is_admin": True}, "is_admin"),
])
def test_create_refuses_bad_fields_by_name(service, uow, data, field):
    assert field in invalid(service.create_ticket, ALICE, data)
    assert count(uow, OUTBOX) == 0


@pytest.mark.parametrize("data", [None, [], "subject=x", 42])
def test_create_refuses_a_body_that_is_not_an_object(service, data):
    errors = invalid(service.create_ticket, ALICE, data)
    assert set(errors) <= {"_schema", "subject", "description"}


@pytest.mark.parametrize("actor,field", [
    ({"id": "x", "role": "root"}, "role"),
    ({"id": "x"}, "role"),
    ({"role": "agent"}, "id"),
    ({"id": "", "role": "agent"}, "id"),
    ({"id": "x", "role": "agent", "scopes": ["all"]}, "scopes"),
    ({"id": "x", "role": "requester", "org_wide": "very"}, "org_wide"),
    ({"id": 7, "role": "agent"}, "id"),
])
def test_a_bad_actor_is_refused_by_every_entrypoint(service, ticket, actor, field):
    calls = [
        lambda: service.create_ticket(actor, NEW),
        lambda: service.get_ticket(actor, ticket["id"]),
        lambda: service.list_tickets(actor, {}),
        lambda: service.update_ticket(actor, ticket["id"], {"subject": "x"}),
        lambda: service.assign_ticket(actor, ticket["id"], "agent-1"),
        lambda: service.add_comment(actor, ticket["id"], {"body": "x"}),
        lambda: service.list_comments(actor, ticket["id"]),
        lambda: service.get_history(actor, ticket["id"]),
    ]
    for call in calls:
        assert field in invalid(call)


def test_missing_actor_is_refused(service):
    assert {"id", "role"} <= set(invalid(service.list_tickets, None, {}))


@pytest.mark.parametrize("key", ["", "k" * 201, 123, ["k"], True])
def test_a_bad_idempotency_key_is_refused(service, ticket, uow, key):
    assert set(invalid(service.create_ticket, ALICE, NEW, idempotency_key=key)) == {"idempotency_key"}
    assert set(invalid(service.add_comment, ALICE, ticket["id"], {"body": "x"}, key)) == {"idempotency_key"}
    assert count(uow, OUTBOX) == 1


@pytest.mark.parametrize("version", ["1", 1.0, 0, -3, True, [1]])
def test_expected_version_must_be_a_positive_integer(service, ticket, version):
    assert set(invalid(service.update_ticket, AGENT, ticket["id"], {"priority": "low"}, version)) == {
        "expected_version"}
    assert set(invalid(service.assign_ticket, AGENT, ticket["id"], "agent-2", None, version)) == {
        "expected_version"}
    assert service.get_ticket(AGENT, ticket["id"])["version"] == 1


@pytest.mark.parametrize("changes,field", [
    ({"priority": 3}, "priority"),
    ({"status": "reopened"}, "status"),
    ({"subject": "x" * 251}, "subject"),
    ({"subject": " "}, "subject"),
    ({"version": 2}, "version"),
    ({"requester_id": "bob"}, "requester_id"),
    ({"tags": [None]}, "tags"),
    ({"assignee_id": ""}, "assignee_id"),
])
def test_update_refuses_bad_fields_by_name(service, ticket, changes, field):
    assert field in invalid(service.update_ticket, AGENT, ticket["id"], changes)


def test_update_with_nothing_to_change_is_refused(service, ticket):
    assert invalid(service.update_ticket, AGENT, ticket["id"], {}) == {"_schema": ["send at least one field"]}


@pytest.mark.parametrize("data,field", [
    ({}, "body"),
    ({"body": ""}, "body"),
    ({"body": "  \n "}, "body"),
    ({"body": "x", "public": "maybe"}, "public"),
    ({"body": "x", "internal": True}, "internal"),
])
def test_add_comment_refuses_bad_fields_by_name(service, ticket, data, field):
    assert field in invalid(service.add_comment, AGENT, ticket["id"], data)


@pytest.mark.parametrize("filters,field", [
    ({"status": "open"}, "status"),
    ({"status": ["reopened"]}, "status"),
    ({"limit": 0}, "limit"),
    ({"limit": 101}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"sort": "subject"}, "sort"),
    ({"created_after": "2026-01-05T09:00:00"}, "created_after"),   # naive
    ({"created_after": "yesterday"}, "created_after"),
    ({"cursor": "x" * 501}, "cursor"),
    ({"cursor": "garbage"}, "cursor"),
    ({"page": 2}, "page"),
])
def test_list_refuses_bad_filters_by_name(service, filters, field):
    assert field in invalid(service.list_tickets, AGENT, filters)


@pytest.mark.parametrize("assignee,group,field", [
    (123, None, "assignee_id"),
    ("", None, "assignee_id"),
    ("a" * 201, None, "assignee_id"),
    ("agent-1", "g" * 51, "group"),
])
def test_assign_refuses_bad_arguments_by_name(service, ticket, assignee, group, field):
    assert field in invalid(service.assign_ticket, AGENT, ticket["id"], assignee, group)


# --- unknown ids ----------------------------------------------------------------------------

@pytest.mark.parametrize("ticket_id", [MISSING, "not-a-uuid", "", "1001", 1001, None, {"id": 1},
                                       MISSING.upper(), "'; DROP TABLE tickets; --"])
def test_unknown_ticket_ids_are_not_found_everywhere(service, ticket, ticket_id):
    calls = [
        lambda: service.get_ticket(AGENT, ticket_id),
        lambda: service.update_ticket(AGENT, ticket_id, {"subject": "x"}),
        lambda: service.assign_ticket(AGENT, ticket_id, "agent-1"),
        lambda: service.unassign_ticket(AGENT, ticket_id),
        lambda: service.add_comment(AGENT, ticket_id, {"body": "x"}),
        lambda: service.list_comments(AGENT, ticket_id),
        lambda: service.get_history(AGENT, ticket_id),
    ]
    for call in calls:
        with pytest.raises(NotFound):
            call()


def test_someone_elses_ticket_is_not_found_and_a_viewer_may_not_write(service, ticket):
    with pytest.raises(NotFound):
        service.get_ticket(BOB, ticket["id"])
    assert service.get_ticket(VIEWER, ticket["id"])["id"] == ticket["id"]
    with pytest.raises(Forbidden):
        service.add_comment(VIEWER, ticket["id"], {"body": "x"})


# --- ("sla", "ticket_sla_updated"), handled once --------------------------------------------

def sla_event(ticket_id, first="2026-01-05T10:00:00Z", resolution="2026-01-05T17:00:00Z", **extra):
    payload = {"ticket_id": ticket_id, "first_response_due_at": first, "resolution_due_at": resolution}
    return make_envelope("sla", "ticket_sla_updated", {"ticket_id": ticket_id}, {**payload, **extra})


def sla_entries(uow) -> int:
    with uow.read() as session:
        return session.execute(select(func.count()).select_from(HistoryEntry)
                               .where(HistoryEntry.action == "sla_updated")).scalar_one()


def test_sla_event_mirrors_the_due_dates(service, ticket):
    service.on_ticket_sla_updated(sla_event(ticket["id"]))
    mirrored = service.get_ticket(AGENT, ticket["id"])
    assert mirrored["first_response_due_at"] == "2026-01-05T10:00:00Z"
    assert mirrored["resolution_due_at"] == "2026-01-05T17:00:00Z"


def test_the_same_event_twice_has_one_effect(service, ticket, uow):
    event = sla_event(ticket["id"])
    service.on_ticket_sla_updated(event)
    service.on_ticket_sla_updated(event)
    assert sla_entries(uow) == 1 and count(uow, HANDLED_EVENTS) == 1
    assert service.get_ticket(AGENT, ticket["id"])["version"] == 2


def test_a_redelivered_event_does_not_undo_a_later_one(service, ticket):
    first = sla_event(ticket["id"], resolution="2026-01-05T17:00:00Z")
    second = sla_event(ticket["id"], resolution="2026-01-06T17:00:00Z")
    service.on_ticket_sla_updated(first)
    service.on_ticket_sla_updated(second)
    service.on_ticket_sla_updated(first)  # redelivered late
    assert service.get_ticket(AGENT, ticket["id"])["resolution_due_at"] == "2026-01-06T17:00:00Z"


def test_a_failed_handling_is_not_remembered_so_a_retry_applies_it(service, ticket, uow, monkeypatch):
    real_apply = operations.apply_sla_due_dates
    failures = []

    def flaky(session, ticket_id, due):
        if not failures:
            failures.append(True)
            raise RuntimeError("database went away")
        return real_apply(session, ticket_id, due)

    monkeypatch.setattr(operations, "apply_sla_due_dates", flaky)
    event = sla_event(ticket["id"])
    with pytest.raises(RuntimeError):
        service.on_ticket_sla_updated(event)
    assert count(uow, HANDLED_EVENTS) == 0, "the mark must roll back with the failed handler"
    service.on_ticket_sla_updated(event)  # the retry
    assert sla_entries(uow) == 1
    assert service.get_ticket(AGENT, ticket["id"])["resolution_due_at"] == "2026-01-05T17:00:00Z"


def test_an_event_for_an_unknown_ticket_is_not_found_and_not_remembered(service, uow):
    with pytest.raises(NotFound):
        service.on_ticket_sla_updated(sla_event(MISSING))
    assert count(uow, HANDLED_EVENTS) == 0


def _without(envelope, key):
    return {k: v for k, v in envelope.items() if k != key}


@pytest.mark.parametrize("mangle", [
    lambda e: _without(e, "event_id"),
    lambda e: {**e, "event_id": "not-a-uuid"},
    lambda e: {**e, "occurred_at": "2026-01-05T09:00:00"},           # naive
    lambda e: {**e, "schema_version": 0},
    lambda e: {**e, "subject_ids": "ticket"},
    lambda e: {**e, "unexpected": 1},
    lambda e: {**e, "payload": "not an object"},
    lambda e: {**e, "payload": _without(e["payload"], "ticket_id")},
    lambda e: {**e, "payload": {**e["payload"], "resolution_due_at": "tomorrow"}},
    lambda e: {**e, "payload": {**e["payload"], "first_response_due_at": "2026-01-05T10:00:00"}},
    lambda e: {**e, "payload": {**e["payload"], "priority": "high"}},
    lambda e: "just a string",
    lambda e: None,
    lambda e: [e],
], ids=["no-event-id", "bad-event-id", "naive-occurred-at", "schema-version-0", "subject-ids-not-map",
        "unknown-field", "payload-not-object", "payload-no-ticket-id", "payload-bad-date",
        "payload-naive-date", "payload-unknown-field", "string", "none", "list"])
def test_a_malformed_event_is_unprocessable_and_changes_nothing(service, ticket, uow, mangle):
    with pytest.raises(UnprocessableEvent):
        service.on_ticket_sla_updated(mangle(sla_event(ticket["id"])))
    assert count(uow, HANDLED_EVENTS) == 0 and sla_entries(uow) == 0


# --- assign_tickets: routing's batches -------------------------------------------------------------

def test_assign_tickets_applies_each_assignment_on_its_own_and_answers_in_order(service):
    first, second, third = (service.create_ticket(ALICE, NEW)["ticket"] for _ in range(3))
    service.update_ticket(AGENT, second["id"], {"subject": "edited meanwhile"})  # now at version 2
    answers = service.assign_tickets(AGENT, [
        {"ticket_id": first["id"], "assignee_id": "agent-1", "group": "L1"},
        # the rules' changes, compare-and-set on the version they saw: refused, nothing applied
        {"ticket_id": second["id"], "assignee_id": "agent-1", "group": "L1",
         "changes": {"category": "network"}, "expected_version": 1},
        {"ticket_id": MISSING, "assignee_id": "agent-1"},
        {"ticket_id": third["id"], "assignee_id": "agent-2", "group": "L2",
         "changes": {"category": "network", "priority": "high"}, "expected_version": 1},
    ])
    assert [sorted(a) for a in answers] == [["ticket"], ["error"], ["error"], ["ticket"]]
    assert answers[0]["ticket"]["assignee_id"] == "agent-1" and answers[0]["ticket"]["status"] == "open"
    assert answers[1]["error"]["code"] == "precondition_failed"
    assert answers[2]["error"]["code"] == "not_found"
    assert (answers[3]["ticket"]["category"], answers[3]["ticket"]["priority"], answers[3]["ticket"]["group"],
            answers[3]["ticket"]["version"]) == ("network", "high", "L2", 2)  # one version step
    assert service.get_ticket(AGENT, second["id"])["assignee_id"] is None


def test_assign_tickets_refuses_a_malformed_batch_whole(service, ticket):
    assert "assignments" in invalid(service.assign_tickets, AGENT, [])
    assert "assignments" in invalid(service.assign_tickets, AGENT, {"ticket_id": ticket["id"]})
    too_many = [{"ticket_id": ticket["id"], "assignee_id": "a"}] * 101
    assert "assignments" in invalid(service.assign_tickets, AGENT, too_many)
    errors = invalid(service.assign_tickets, AGENT, [{"ticket_id": ticket["id"], "assignee_id": "a", "colour": "red"}])
    assert list(errors.values()) == [{"colour": ["Unknown field."]}]  # keyed by the assignment's index
    invalid(service.assign_tickets, AGENT, [{"ticket_id": ticket["id"], "assignee_id": "a", "expected_version": "1"}])
    assert service.get_ticket(AGENT, ticket["id"])["assignee_id"] is None


def test_assign_tickets_answers_a_changes_field_error_for_that_assignment_only(service):
    first, second = (service.create_ticket(ALICE, NEW)["ticket"] for _ in range(2))
    answers = service.assign_tickets(AGENT, [
        {"ticket_id": first["id"], "assignee_id": "agent-1", "changes": {"priority": "whenever"}},
        {"ticket_id": second["id"], "assignee_id": "agent-1"},
    ])
    assert answers[0]["error"]["code"] == "validation_error" and "priority" in answers[0]["error"]["errors"]
    assert answers[1]["ticket"]["assignee_id"] == "agent-1"


def test_a_requester_cannot_assign_through_a_batch(service, ticket):
    answers = service.assign_tickets(ALICE, [{"ticket_id": ticket["id"], "assignee_id": "alice"}])
    assert answers[0]["error"]["code"] in ("forbidden", "not_found")
    assert service.get_ticket(AGENT, ticket["id"])["assignee_id"] is None


def test_assign_tickets_answers_an_unexpected_failure_for_that_assignment_only(service, monkeypatch):
    first, second, third = (service.create_ticket(ALICE, NEW)["ticket"] for _ in range(3))
    real = operations.assign_ticket

    def assign_ticket(session, actor, ticket_id, *args, **kwargs):
        if ticket_id == second["id"]:
            raise RuntimeError("database is locked")
        return real(session, actor, ticket_id, *args, **kwargs)

    monkeypatch.setattr(operations, "assign_ticket", assign_ticket)
    answers = service.assign_tickets(AGENT, [{"ticket_id": t["id"], "assignee_id": "agent-1"}
                                             for t in (first, second, third)])
    assert [sorted(a) for a in answers] == [["ticket"], ["error"], ["ticket"]]
    assert answers[1]["error"]["code"] == "unavailable"
    assert service.get_ticket(AGENT, second["id"])["assignee_id"] is None
    assert service.get_ticket(AGENT, third["id"])["assignee_id"] == "agent-1"


def events_of(uow, ticket_id) -> list:
    with uow.read() as session:
        return [row.event_type for row in session.execute(select(OUTBOX).order_by(OUTBOX.c.id))
                if row.envelope["subject_ids"]["ticket_id"] == ticket_id]


def test_a_refused_assignment_in_a_batch_writes_nothing_and_the_others_commit(service, uow):
    first, second = (service.create_ticket(ALICE, NEW)["ticket"] for _ in range(2))
    service.update_ticket(AGENT, second["id"], {"subject": "edited meanwhile"})
    answers = service.assign_tickets(AGENT, [
        {"ticket_id": first["id"], "assignee_id": "agent-1"},
        {"ticket_id": second["id"], "assignee_id": "agent-1", "expected_version": 1},  # refused
        {"ticket_id": first["id"], "assignee_id": "agent-1"},  # the same again: changes nothing
    ])
    assert [sorted(a) for a in answers] == [["ticket"], ["error"], ["ticket"]]
    assert answers[2]["ticket"] == answers[0]["ticket"] and answers[0]["ticket"]["version"] == 2
    assert events_of(uow, first["id"]) == ["ticket_created", "ticket_assigned", "ticket_status_changed"]
    assert events_of(uow, second["id"]) == ["ticket_created", "ticket_updated"]
    assert [e["action"] for e in service.get_history(AGENT, second["id"])["items"]] == ["created", "updated"]


def test_a_batch_that_fails_midway_is_rolled_back_and_applied_once_one_at_a_time(service, uow, monkeypatch):
    tickets = [service.create_ticket(ALICE, NEW)["ticket"] for _ in range(3)]
    real, calls = operations.assign_ticket, []

    def assign_ticket(session, actor, ticket_id, *args, **kwargs):
        calls.append(ticket_id)
        answer = real(session, actor, ticket_id, *args, **kwargs)
        if len(calls) == 2:  # the second assignment of the batch, after it wrote
            raise RuntimeError("disk I/O error")
        return answer

    monkeypatch.setattr(operations, "assign_ticket", assign_ticket)
    answers = service.assign_tickets(AGENT, [{"ticket_id": t["id"], "assignee_id": "agent-1"} for t in tickets])
    assert calls == [tickets[0]["id"], tickets[1]["id"]] + [t["id"] for t in tickets]
    assert [a["ticket"]["version"] for a in answers] == [2, 2, 2]  # one version step each, not two
    for t in tickets:
        assert events_of(uow, t["id"]) == ["ticket_created", "ticket_assigned", "ticket_status_changed"]
        assert [e["action"] for e in service.get_history(AGENT, t["id"])["items"]] == ["created", "assigned"]


def test_a_batch_reads_its_tickets_with_two_selects_not_two_per_assignment(service, uow):
    from sqlalchemy import event

    tickets = [service.create_ticket(ALICE, NEW | {"tags": ["vpn"]})["ticket"] for _ in range(5)]
    selects = []

    def before(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    engine = uow._session_factory.kw["bind"]
    event.listen(engine, "before_cursor_execute", before)
    try:
        answers = service.assign_tickets(AGENT, [{"ticket_id": t["id"], "assignee_id": "agent-1"} for t in tickets])
    finally:
        event.remove(engine, "before_cursor_execute", before)
    assert [a["ticket"]["tags"] for a in answers] == [["vpn"]] * 5
    assert len(selects) == 2, selects  # the tickets, locked, and their tags


def test_assign_tickets_refuses_changes_that_are_the_assignments_own_fields(service, ticket):
    for changes in ({"assignee_id": "someone-else"}, {"group": "L3"}, {"status": "solved"}):
        answers = service.assign_tickets(AGENT, [{"ticket_id": ticket["id"], "assignee_id": "agent-1",
                                                  "changes": changes}])
        assert answers[0]["error"]["code"] == "validation_error" and "changes" in answers[0]["error"]["errors"]
    assert service.get_ticket(AGENT, ticket["id"])["assignee_id"] is None


def test_an_assignment_only_if_unassigned_never_takes_a_ticket_from_someone_else(service):
    free, mine, theirs = (service.create_ticket(ALICE, NEW)["ticket"] for _ in range(3))
    service.assign_ticket(AGENT, mine["id"], "agent-1")
    held = service.assign_ticket(AGENT, theirs["id"], "agent-2")
    answers = service.assign_tickets(AGENT, [
        {"ticket_id": t["id"], "assignee_id": "agent-1", "only_if_unassigned": True} for t in (free, mine, theirs)])
    assert answers[0]["ticket"]["assignee_id"] == "agent-1"
    assert answers[1]["ticket"]["assignee_id"] == "agent-1"  # already this agent's: nothing changes
    assert answers[1]["ticket"]["version"] == service.get_ticket(AGENT, mine["id"])["version"]
    assert answers[2]["error"]["code"] == "conflict"
    assert answers[2]["error"]["errors"] == {"assignee_id": ["assigned to agent-2"]}
    after = service.get_ticket(AGENT, theirs["id"])
    assert after["assignee_id"] == "agent-2" and after["version"] == held["version"]
    # with other changes too (the update path): the same precondition, nothing applied
    answers = service.assign_tickets(AGENT, [{"ticket_id": theirs["id"], "assignee_id": "agent-1",
                                              "changes": {"priority": "high"}, "only_if_unassigned": True}])
    assert answers[0]["error"]["code"] == "conflict"
    assert service.get_ticket(AGENT, theirs["id"])["priority"] == NEW.get("priority", "normal")
    # without it, as assign_ticket: a reassignment
    answers = service.assign_tickets(AGENT, [{"ticket_id": theirs["id"], "assignee_id": "agent-1"}])
    assert answers[0]["ticket"]["assignee_id"] == "agent-1"
