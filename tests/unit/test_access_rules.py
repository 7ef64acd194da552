"""Who may see and do what (services/tickets/access.py). Deny by default; hidden is NotFound."""
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from contracts.errors import Forbidden, NotFound
from services.tickets import access
from services.tickets.access import Actor
from services.tickets.models import Ticket
from tests.unit.support import (ACME_MANAGER, ADMIN, AGENT, ALICE, BOB, MALLORY, SUPERVISOR, VIEWER,
                                 Desk)

STAFF = [AGENT, SUPERVISOR, ADMIN]
STAFF_IDS = ["agent", "supervisor", "admin"]
ROBOT = Actor("robot", "robot", "acme", org_wide=True)  # a role this service does not know


def ticket(requester_id="alice", organization_id="acme", status="open"):
    return SimpleNamespace(requester_id=requester_id, organization_id=organization_id, status=status)


# --- reading ---------------------------------------------------------------------------------

def test_requester_sees_own_ticket():
    assert access.can_read(ALICE, "alice", "acme")
    access.ensure_readable(ALICE, ticket("alice"))


def test_requester_does_not_see_a_colleagues_ticket_without_org_wide_access():
    assert not access.can_read(BOB, "alice", "acme")
    with pytest.raises(NotFound):
        access.ensure_readable(BOB, ticket("alice"))


def test_org_wide_requester_sees_every_ticket_of_their_organization():
    assert access.can_read(ACME_MANAGER, "alice", "acme")
    assert access.can_read(ACME_MANAGER, "carol", "acme")


def test_org_wide_requester_never_sees_another_organizations_tickets():
    assert not access.can_read(MALLORY, "alice", "acme")
    assert not access.can_read(ACME_MANAGER, "mallory", "globex")


def test_org_wide_requester_without_an_organization_sees_only_own_tickets():
    lone = Actor("lone", "requester", None, org_wide=True)
    assert access.can_read(lone, "lone", None)
    assert not access.can_read(lone, "alice", None), "None must not match None"


def test_requesters_own_ticket_is_visible_even_when_filed_in_another_organization():
    assert access.can_read(ALICE, "alice", "globex")


@pytest.mark.parametrize("actor", STAFF + [VIEWER], ids=STAFF_IDS + ["viewer"])
def test_staff_and_viewers_read_every_ticket(actor):
    assert access.can_read(actor, "mallory", "globex")
    assert access.can_read(actor, "alice", None)


def test_unknown_role_reads_nothing():
    assert not access.can_read(ROBOT, "robot", "acme")
    with pytest.raises(NotFound):
        access.ensure_readable(ROBOT, ticket("robot"))


def test_a_missing_ticket_and_a_hidden_one_look_the_same():
    with pytest.raises(NotFound) as missing:
        access.ensure_readable(AGENT, None)
    with pytest.raises(NotFound) as hidden:
        access.ensure_readable(BOB, ticket("alice"))
    assert str(missing.value) == str(hidden.value)


@pytest.mark.parametrize("actor,sees", [(VIEWER, True), (AGENT, True), (SUPERVISOR, True), (ADMIN, True),
                                        (ALICE, False), (ACME_MANAGER, False), (ROBOT, False)])
def test_only_staff_and_viewers_see_internal_notes(actor, sees):
    assert access.sees_internal_notes(actor) is sees


# --- writing ---------------------------------------------------------------------------------

def test_viewer_cannot_edit_comment_create_or_assign():
    with pytest.raises(Forbidden):
        access.ensure_can_edit(VIEWER, {"subject"}, ticket())
    with pytest.raises(Forbidden):
        access.ensure_can_comment(VIEWER, public=True)
    with pytest.raises(Forbidden):
        access.ensure_can_comment(VIEWER, public=False)
    with pytest.raises(Forbidden):
        access.ensure_can_create(VIEWER, None)
    with pytest.raises(Forbidden):
        access.ensure_can_assign(VIEWER)


def test_requester_may_edit_subject_and_description():
    access.ensure_can_edit(ALICE, {"subject", "description"}, ticket())


@pytest.mark.parametrize("field", ["status", "assignee_id", "priority", "category", "tags", "group"])
def test_requester_cannot_set_staff_fields(field):
    with pytest.raises(Forbidden) as caught:
        access.ensure_can_edit(ALICE, {"subject", field}, ticket())
    assert caught.value.errors == {field: ["not allowed for your role"]}


def test_requester_is_told_every_refused_field():
    with pytest.raises(Forbidden) as caught:
        access.ensure_can_edit(ALICE, {"status", "priority", "subject"}, ticket())
    assert set(caught.value.errors) == {"status", "priority"}


@pytest.mark.parametrize("actor", STAFF, ids=STAFF_IDS)
def test_staff_may_edit_every_field(actor):
    access.ensure_can_edit(actor, {"subject", "description", "priority", "category", "tags", "status",
                                   "assignee_id", "group"}, ticket())


def test_org_wide_requester_cannot_edit_a_colleagues_ticket():
    with pytest.raises(Forbidden):
        access.ensure_can_edit(ACME_MANAGER, {"subject"}, ticket("alice"))


def test_unknown_role_may_edit_nothing():
    with pytest.raises(Forbidden):
        access.ensure_can_edit(ROBOT, {"subject"}, ticket())


def test_requester_cannot_add_internal_notes():
    with pytest.raises(Forbidden) as caught:
        access.ensure_can_comment(ALICE, public=False)
    assert caught.value.errors == {"public": ["must be true for requesters"]}


def test_requester_may_reply_publicly():
    access.ensure_can_comment(ALICE, public=True)


@pytest.mark.parametrize("actor", STAFF, ids=STAFF_IDS)
def test_staff_may_add_internal_notes_and_replies(actor):
    access.ensure_can_comment(actor, public=False)
    access.ensure_can_comment(actor, public=True)


def test_requester_cannot_assign():
    with pytest.raises(Forbidden):
        access.ensure_can_assign(ALICE)


@pytest.mark.parametrize("actor", STAFF, ids=STAFF_IDS)
def test_staff_may_assign(actor):
    access.ensure_can_assign(actor)


def test_requester_creates_tickets_for_themselves_only():
    access.ensure_can_create(ALICE, None)
    access.ensure_can_create(ALICE, "alice")
    with pytest.raises(Forbidden) as caught:
        access.ensure_can_create(ALICE, "bob")
    assert caught.value.errors == {"requester_id": ["not allowed for your role"]}


@pytest.mark.parametrize("actor", STAFF, ids=STAFF_IDS)
def test_staff_may_create_on_someones_behalf(actor):
    access.ensure_can_create(actor, "alice")


def test_actor_from_dict_defaults_to_no_organization_and_no_org_wide_access():
    assert Actor.from_dict({"id": "x", "role": "requester"}) == Actor("x", "requester", None, False)


# --- visibility_condition against a real database -------------------------------------------

FILED = [  # (requester, organization)
    ("alice", "acme"), ("bob", "acme"), ("carol", "acme"), ("alice", None),
    ("mallory", "globex"), ("dave", None), ("erin", "initech"),
]
ACTORS = [AGENT, SUPERVISOR, ADMIN, VIEWER, ALICE, BOB, ACME_MANAGER, MALLORY, ROBOT,
          Actor("lone", "requester", None, org_wide=True), Actor("dave", "requester"),
          Actor("zed", "requester", "acme")]


@pytest.fixture
def filed(uow, clock):
    desk = Desk(uow)
    return [desk.create(AGENT, requester_id=who, organization_id=org) for who, org in FILED]


def _visible(session, actor) -> set[str]:
    query = select(Ticket.id)
    condition = access.visibility_condition(actor, Ticket)
    if condition is not None:
        query = query.where(condition)
    return set(session.execute(query).scalars())


@pytest.mark.parametrize("actor", ACTORS, ids=[f"{a.role}:{a.id}" for a in ACTORS])
def test_visibility_condition_selects_exactly_the_readable_tickets(session, filed, actor):
    readable = {t["id"] for t in filed if access.can_read(actor, t["requester_id"], t["organization_id"])}
    assert _visible(session, actor) == readable


def test_visibility_condition_in_numbers(session, filed):
    by_number = {t["id"]: t["number"] for t in filed}
    numbers = lambda actor: sorted(by_number[i] for i in _visible(session, actor))  # noqa: E731
    assert numbers(ALICE) == [1001, 1004]
    assert numbers(ACME_MANAGER) == [1001, 1002, 1003]
    assert numbers(MALLORY) == [1005]
    assert numbers(VIEWER) == numbers(AGENT) == list(range(1001, 1008))
    assert numbers(ROBOT) == []


def test_staff_and_viewers_query_without_a_condition():
    for actor in STAFF + [VIEWER]:
        assert access.visibility_condition(actor, Ticket) is None
