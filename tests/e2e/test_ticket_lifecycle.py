"""A ticket's whole life over HTTP, the views agents work from, and who may see what."""
import pytest

from tests.e2e.conftest import assert_problem

pytestmark = pytest.mark.e2e


def _statuses_in(history: dict) -> list[str]:
    return [entry["changes"]["status"][1] for entry in history["items"] if "status" in entry["changes"]]


def test_ticket_goes_from_new_to_closed_through_replies_notes_and_reopening(api):
    created = api.post("/v1/tickets", as_="alice", json={
        "subject": "VPN drops every hour", "description": "Since Monday.", "priority": "high",
        "category": "network", "tags": ["vpn"], "channel": "web"})
    assert created.status_code == 201, created.text
    ticket = created.json()
    assert ticket["status"] == "new"
    assert isinstance(ticket["number"], int) and ticket["number"] > 0
    assert ticket["requester_id"] == "alice@acme" and ticket["organization_id"] == "acme"
    assert ticket["assignee_id"] is None and ticket["tags"] == ["vpn"]
    assert created.headers["ETag"] == f'"{ticket["version"]}"'
    assert created.headers["Location"] == f"/v1/tickets/{ticket['id']}"
    path = created.headers["Location"]

    read = api.get(path, as_="alice")
    assert read.status_code == 200 and read.json() == ticket
    assert read.headers["ETag"] == created.headers["ETag"]

    # the agent takes it: assignment opens a new ticket
    assigned = api.patch(path, as_="agent", json={"assignee_id": "agent-1"},
                         headers={"If-Match": read.headers["ETag"]})
    assert assigned.status_code == 200, assigned.text
    assert assigned.json()["assignee_id"] == "agent-1"
    assert assigned.json()["status"] == "open"
    assert assigned.json()["version"] > ticket["version"]
    assert assigned.headers["ETag"] == f'"{assigned.json()["version"]}"'

    reply = api.comment(ticket["id"], "agent", "Can you send the VPN client log?")
    assert reply["public"] is True and reply["author_id"] == "agent-1"
    note = api.comment(ticket["id"], "agent", "Probably the MTU issue again", public=False)
    assert note["public"] is False
    assert api.get(path, as_="alice").json()["first_responded_at"] is not None

    assert api.update_ticket(ticket["id"], "agent", status="pending")["status"] == "pending"
    answer = api.comment(ticket["id"], "alice", "Log attached.")
    assert answer["author_role"] == "requester"
    assert api.get(path, as_="alice").json()["status"] == "open"  # the requester's reply reopened it

    solved = api.update_ticket(ticket["id"], "agent", status="solved")
    assert solved["status"] == "solved" and solved["solved_at"] is not None
    closed = api.update_ticket(ticket["id"], "agent", status="closed")
    assert closed["status"] == "closed" and closed["closed_at"] is not None

    # closed is final: no replies, no notes, no changes, from anyone
    for who, public in (("alice", True), ("agent", True), ("agent", False)):
        refused = api.post(f"{path}/comments", as_=who, json={"body": "one more thing", "public": public})
        assert_problem(refused, 409)
    etag = api.get(path, as_="agent").headers["ETag"]
    assert_problem(api.patch(path, as_="agent", json={"priority": "low"}, headers={"If-Match": etag}), 409)
    assert_problem(api.patch(path, as_="agent", json={"status": "open"}, headers={"If-Match": etag}), 409)
    assert_problem(api.patch(path, as_="alice", json={"subject": "again"}, headers={"If-Match": etag}), 409)
    assert api.get(path, as_="agent").json()["version"] == closed["version"]

    # the agent's view: every comment, every step
    comments = api.get(f"{path}/comments", as_="agent").json()["items"]
    assert [c["id"] for c in comments] == [reply["id"], note["id"], answer["id"]]
    history = api.get(f"{path}/history", as_="agent").json()
    assert [e["action"] for e in history["items"]] == [
        "created", "updated", "commented", "noted", "updated", "commented", "updated", "updated"]
    assert _statuses_in(history) == ["new", "open", "pending", "open", "solved", "closed"]
    assert set(history["time_in_status"]) == {"new", "open", "pending", "solved", "closed"}
    assert [p["assignee_id"] for p in history["assignment_periods"]] == [None, "agent-1"]

    # the requester's view: no internal note, in comments or in history
    comments = api.get(f"{path}/comments", as_="alice").json()["items"]
    assert [c["id"] for c in comments] == [reply["id"], answer["id"]]
    assert all(c["public"] for c in comments)
    history = api.get(f"{path}/history", as_="alice").json()
    assert "noted" not in [e["action"] for e in history["items"]]
    assert note["id"] not in str(history)
    # a comment's Location is readable; a note's is not, for the requester
    assert api.get(f"{path}/comments/{reply['id']}", as_="alice").json() == reply
    assert api.get(f"{path}/comments/{note['id']}", as_="agent").json() == note
    assert_problem(api.get(f"{path}/comments/{note['id']}", as_="alice"), 404)
    assert_problem(api.get(f"{path}/comments/not-a-uuid", as_="agent"), 404)


def test_requester_reply_reopens_a_solved_ticket(api):
    ticket = api.create_ticket("alice")
    api.update_ticket(ticket["id"], "agent", assignee_id="agent-1")
    api.update_ticket(ticket["id"], "agent", status="solved")
    api.comment(ticket["id"], "alice", "Still broken, sorry.")
    reopened = api.get(f"/v1/tickets/{ticket['id']}", as_="agent").json()
    assert reopened["status"] == "open" and reopened["solved_at"] is None


def test_agent_views_filter_sort_and_paginate(api, tag):
    alice = [api.create_ticket("alice", subject=f"alice {i}", priority=p, tags=[tag], category=c)
             for i, (p, c) in enumerate([("high", "billing"), ("low", None), ("critical", None)])]
    carol = [api.create_ticket("carol", subject=f"carol {i}", priority="normal", tags=[tag, "vip"],
                               category="network") for i in range(2)]
    everyone = alice + carol
    api.update_ticket(alice[1]["id"], "agent", assignee_id="agent-1")

    def ids(as_="agent", **params):
        response = api.get("/v1/tickets", as_=as_, params={"tag": tag, "limit": 100, **params})
        assert response.status_code == 200, response.text
        assert response.json()["next_cursor"] is None
        return [t["id"] for t in response.json()["items"]]

    def same(found, expected):
        assert sorted(found) == sorted(t["id"] for t in expected)

    same(ids(), everyone)
    same(ids(status="open"), [alice[1]])
    same(ids(status="new,open"), everyone)
    same(ids(status=["new", "pending"]), [alice[0], alice[2]] + carol)
    same(ids(priority="high,critical"), [alice[0], alice[2]])
    same(ids(assignee="me"), [alice[1]])
    same(ids(assignee="agent-1"), [alice[1]])
    same(ids(unassigned="true"), [alice[0], alice[2]] + carol)
    same(ids(unassigned="false"), [alice[1]])
    same(ids(unassigned="t"), [alice[0], alice[2]] + carol)  # parsed exactly as validated
    same(ids(category="network"), carol)
    same(ids(category="billing"), [alice[0]])
    same(ids(requester="carol@globex"), carol)
    same(ids(organization="acme"), alice)
    same(ids(created_after=carol[0]["created_at"]), carol)
    same(ids(created_before=carol[0]["created_at"]), alice)
    assert ids(tag="vip", requester="alice@acme") == []

    # sorting (default: newest first)
    assert ids() == [t["id"] for t in reversed(everyone)]
    assert ids(sort="number") == [t["id"] for t in everyone]
    # "-priority": most urgent first; ties in number order
    by_priority_desc = api.get("/v1/tickets", as_="agent", params={"tag": tag, "sort": "-priority"}).json()["items"]
    assert [t["id"] for t in by_priority_desc] == [alice[2]["id"], alice[0]["id"], carol[1]["id"],
                                                   carol[0]["id"], alice[1]["id"]]
    by_priority = api.get("/v1/tickets", as_="agent", params={"tag": tag, "sort": "priority"}).json()["items"]
    assert [t["id"] for t in by_priority] == [alice[1]["id"], carol[0]["id"], carol[1]["id"],
                                              alice[0]["id"], alice[2]["id"]]

    # cursor pagination walks every ticket exactly once, in order, for several sorts
    for sort in ("number", "-created_at", "priority", "-updated_at"):
        seen, cursor, pages = [], None, 0
        while True:
            params = {"tag": tag, "limit": 2, "sort": sort, **({"cursor": cursor} if cursor else {})}
            page = api.get("/v1/tickets", as_="agent", params=params)
            assert page.status_code == 200, page.text
            pages += 1
            items = page.json()["items"]
            assert len(items) <= 2
            seen += [t["id"] for t in items]
            cursor = page.json()["next_cursor"]
            if not cursor:
                break
        assert pages == 3, sort
        full = api.get("/v1/tickets", as_="agent", params={"tag": tag, "sort": sort}).json()["items"]
        assert seen == [t["id"] for t in full], sort

    # requesters see their own; the org-wide requester sees the organization's
    same(ids(as_="alice"), alice)
    same(ids(as_="carol"), carol)
    same(ids(as_="acme_lead"), alice)
    same(ids(as_="viewer"), everyone)
    assert ids(as_="carol", requester="alice@acme") == []
    assert ids(as_="carol", organization="acme") == []


def test_other_organizations_tickets_are_not_found(api):
    ticket = api.create_ticket("alice", subject="alice's secret")
    path = f"/v1/tickets/{ticket['id']}"
    etag = f'"{ticket["version"]}"'
    assert_problem(api.get(path, as_="carol"), 404)
    assert_problem(api.patch(path, as_="carol", json={"subject": "mine now"}, headers={"If-Match": etag}), 404)
    assert_problem(api.post(f"{path}/comments", as_="carol", json={"body": "hello"}), 404)
    assert_problem(api.get(f"{path}/comments", as_="carol"), 404)
    assert_problem(api.get(f"{path}/history", as_="carol"), 404)
    listed = api.get("/v1/tickets", as_="carol", params={"limit": 100}).json()["items"]
    assert ticket["id"] not in [t["id"] for t in listed]
    # the same answer as for a ticket that does not exist: nothing leaks
    missing = api.get("/v1/tickets/00000000-0000-4000-8000-000000000000", as_="carol")
    assert_problem(missing, 404)
    assert missing.json()["detail"] == api.get(path, as_="carol").json()["detail"]
    assert api.get(path, as_="alice").json()["version"] == ticket["version"]


def test_org_wide_requester_sees_the_organizations_tickets_but_no_notes(api):
    ticket = api.create_ticket("alice")
    path = f"/v1/tickets/{ticket['id']}"
    api.comment(ticket["id"], "agent", "internal: check the contract", public=False)
    public = api.comment(ticket["id"], "agent", "We are on it.")
    assert api.get(path, as_="acme_lead").status_code == 200
    listed = api.get("/v1/tickets", as_="acme_lead", params={"limit": 100}).json()["items"]
    assert ticket["id"] in [t["id"] for t in listed]
    comments = api.get(f"{path}/comments", as_="acme_lead").json()["items"]
    assert [c["id"] for c in comments] == [public["id"]]
    history = api.get(f"{path}/history", as_="acme_lead").json()["items"]
    assert [e["action"] for e in history] == ["created", "commented"]
    # following a colleague's ticket is not owning it
    etag = api.get(path, as_="acme_lead").headers["ETag"]
    assert_problem(api.patch(path, as_="acme_lead", json={"subject": "mine"}, headers={"If-Match": etag}), 403)


def test_viewer_reads_everything_and_writes_nothing(api):
    ticket = api.create_ticket("alice")
    path = f"/v1/tickets/{ticket['id']}"
    note = api.comment(ticket["id"], "agent", "internal", public=False)
    assert api.get(path, as_="viewer").status_code == 200
    assert note["id"] in [c["id"] for c in api.get(f"{path}/comments", as_="viewer").json()["items"]]
    assert api.get(f"{path}/history", as_="viewer").status_code == 200
    assert ticket["id"] in [t["id"] for t in api.get("/v1/tickets", as_="viewer", params={"limit": 100}).json()["items"]]

    before = api.get(path, as_="viewer")
    etag = before.headers["ETag"]
    assert_problem(api.post("/v1/tickets", as_="viewer", json={"subject": "x", "description": "y"}), 403)
    for changes in ({"subject": "x"}, {"status": "solved"}, {"priority": "low"}, {"assignee_id": "auditor-1"}):
        assert_problem(api.patch(path, as_="viewer", json=changes, headers={"If-Match": etag}), 403)
    assert_problem(api.post(f"{path}/comments", as_="viewer", json={"body": "hi"}), 403)
    assert_problem(api.post(f"{path}/comments", as_="viewer", json={"body": "hi", "public": False}), 403)
    assert api.get(path, as_="agent").json() == before.json()


@pytest.mark.parametrize("field, value", [("status", "solved"), ("assignee_id", "alice@acme"),
                                          ("priority", "critical"), ("tags", ["x"]), ("group", "L2")])
def test_requester_cannot_set_staff_fields_on_update(api, field, value):
    ticket = api.create_ticket("alice")
    response = api.patch(f"/v1/tickets/{ticket['id']}", as_="alice", json={field: value},
                         headers={"If-Match": f'"{ticket["version"]}"'})
    assert_problem(response, 422, field)
    assert api.get(f"/v1/tickets/{ticket['id']}", as_="alice").json()["version"] == ticket["version"]


@pytest.mark.parametrize("field, value", [("status", "open"), ("requester_id", "carol@globex"),
                                          ("organization_id", "globex"), ("assignee_id", "agent-1")])
def test_requester_cannot_set_staff_fields_on_create(api, field, value):
    response = api.post("/v1/tickets", as_="alice", json={"subject": "s", "description": "d", field: value})
    assert_problem(response, 422, field)


def test_requester_cannot_add_internal_notes(api):
    ticket = api.create_ticket("alice")
    response = api.post(f"/v1/tickets/{ticket['id']}/comments", as_="alice",
                        json={"body": "psst", "public": False})
    assert_problem(response, 403)
    assert api.get(f"/v1/tickets/{ticket['id']}/comments", as_="agent").json()["items"] == []


def test_requester_edits_own_subject_and_agent_sees_it(api):
    ticket = api.create_ticket("alice")
    edited = api.update_ticket(ticket["id"], "alice", subject="Printer on fire (3rd floor)")
    assert edited["subject"] == "Printer on fire (3rd floor)" and edited["status"] == "new"
    assert api.get(f"/v1/tickets/{ticket['id']}", as_="agent").json()["subject"] == edited["subject"]
