"""Routing over HTTP: rules, skills, capacity, escalation and presence, and every refusal of its routes.

The module shares one stack (tickets + routing + gateway, ``HELPDESK_ROUTING_OFFLINE_POLICY=requeue``),
and routing chooses among every agent of the stack, so each test names its skill, rule keyword and
agents with a fresh suffix, and the ``team`` / ``cleanup`` fixtures leave nothing behind: every
ticket a test made is solved and every agent it made goes offline, so no queued ticket or online
agent of one test can be routed in another.
"""
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from gateway.auth import mint_token
from tests.e2e.conftest import assert_problem, token_for, wait_until

pytestmark = pytest.mark.e2e

ROUTED_WITHIN = 15  # seconds; routing reacts to events at once, the sweep runs every 0.5 s
MISSING = "00000000-0000-4000-8000-000000000000"


def _suffix() -> str:
    return uuid.uuid4().hex[:8]


# --- small HTTP helpers --------------------------------------------------------------------------

def agent_token(agent_id: str) -> str:
    return mint_token(agent_id, "agent")


def put(api, path, **kwargs):
    return api.request("PUT", path, **kwargs)


def delete(api, path, **kwargs):
    return api.request("DELETE", path, **kwargs)


def ticket_of(api, ticket_id: str) -> dict:
    response = api.get(f"/v1/tickets/{ticket_id}", as_="admin")
    assert response.status_code == 200, response.text
    return response.json()


def routing_of(api, ticket_id: str) -> dict | None:
    """Routing's view of the ticket; None until routing has seen it."""
    response = api.get(f"/v1/tickets/{ticket_id}/routing", as_="supervisor")
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    return response.json()


def routing_state(api, ticket_id: str) -> str | None:
    view = routing_of(api, ticket_id)
    return view["state"] if view else None


def agent_of(api, agent_id: str) -> dict:
    response = api.get(f"/v1/agents/{agent_id}", as_="supervisor")
    assert response.status_code == 200, response.text
    return response.json()


def queue_depths(api) -> dict:
    response = api.get("/v1/routing/queues", as_="supervisor")
    assert response.status_code == 200, response.text
    return {entry["tier"]: entry["depth"] for entry in response.json()["tiers"]}


def wait_assigned(api, ticket_id: str, agent_id: str) -> dict:
    """The ticket is the agent's, and routing has confirmed it (its decision says assigned)."""
    wait_until(lambda: ticket_of(api, ticket_id)["assignee_id"] == agent_id, ROUTED_WITHIN,
               message=f"ticket {ticket_id} assigned to {agent_id} (now {ticket_of(api, ticket_id)['assignee_id']})")

    def confirmed():
        view = routing_of(api, ticket_id)
        return view is not None and (view["state"], view["assignee_id"]) == ("assigned", agent_id)

    wait_until(confirmed, ROUTED_WITHIN, message=f"routing confirmed {ticket_id} for {agent_id}")
    return ticket_of(api, ticket_id)


def wait_queued(api, ticket_id: str) -> dict:
    """The ticket waits in its tier's queue, and routing has recorded why (its last decision)."""
    def noted():
        view = routing_of(api, ticket_id)
        return view is not None and view["state"] == "queued" and view["decisions"][-1]["outcome"] == "queued"

    wait_until(noted, ROUTED_WITHIN, message=f"ticket {ticket_id} queued (now {routing_state(api, ticket_id)})")
    return routing_of(api, ticket_id)


def patch_ticket(api, ticket_id: str, token: str, **changes) -> dict:
    """PATCH with the ETag just read (routing may bump the version meanwhile: read, then write)."""
    for _ in range(5):
        current = api.get(f"/v1/tickets/{ticket_id}", token=token)
        assert current.status_code == 200, current.text
        response = api.patch(f"/v1/tickets/{ticket_id}", token=token, json=changes,
                             headers={"If-Match": current.headers["ETag"]})
        if response.status_code != 412:
            assert response.status_code == 200, response.text
            return response.json()
    raise AssertionError(f"PATCH of {ticket_id} kept losing to concurrent changes")


def set_presence(api, token: str, presence: str, agent_id: str = "me") -> dict:
    response = put(api, f"/v1/agents/{agent_id}/presence", token=token, json={"presence": presence})
    assert response.status_code == 200, response.text
    assert response.json()["presence"] == presence
    return response.json()


# --- fixtures ------------------------------------------------------------------------------------

class Cleanup:
    """What a test made: its tickets are solved and its agents sent offline afterwards."""

    def __init__(self, api):
        self.api = api
        self.tickets: list[str] = []
        self.agents: list[str] = []

    def ticket(self, as_: str = "alice", **fields) -> dict:
        ticket = self.api.create_ticket(as_, **fields)
        self.tickets.append(ticket["id"])
        return ticket

    def agent(self, agent_id: str, tiers=("L1",), skills=(), online=True, **fields) -> dict:
        body = {"id": agent_id, "display_name": f"Agent {agent_id}", "tiers": list(tiers),
                "skills": [{"name": skill} for skill in skills], **fields}
        response = self.api.post("/v1/agents", as_="supervisor", json=body)
        assert response.status_code == 201, response.text
        self.agents.append(agent_id)
        agent = response.json()
        assert response.headers["Location"] == f"/v1/agents/{agent_id}"
        assert response.headers["ETag"] == f'"{agent["version"]}"'
        assert agent["presence"] == "offline" and agent["active_tickets"] == 0
        if online:
            agent = set_presence(self.api, agent_token(agent_id), "online")
        return agent

    def finish(self) -> None:
        api = self.api
        for ticket_id in self.tickets:  # finished tickets hold no slot and wait in no queue
            if ticket_of(api, ticket_id)["status"] not in ("solved", "closed"):
                patch_ticket(api, ticket_id, token_for("admin"), status="solved")
        for agent_id in self.agents:
            wait_until(lambda a=agent_id: agent_of(api, a)["active_tickets"] == 0, ROUTED_WITHIN,
                       message=f"{agent_id} has no active ticket left")
            response = put(api, f"/v1/agents/{agent_id}/presence", as_="supervisor", json={"presence": "offline"})
            assert response.status_code == 200, response.text
        wait_until(lambda: all(depth == 0 for depth in queue_depths(api).values()), ROUTED_WITHIN,
                   message="every queue empty after the test")


@pytest.fixture
def cleanup(api):
    made = Cleanup(api)
    yield made
    made.finish()


class Team:
    """The issue's setup: a skill, a rule (subject keyword -> category + skill), three online agents."""

    def __init__(self, api, cleanup: Cleanup):
        suffix = _suffix()
        self.skill = f"vpn-{suffix}"
        self.keyword = f"vpn{suffix}"
        self.category = f"network-{suffix}"
        skill = api.post("/v1/routing/skills", as_="admin", json={"name": self.skill, "description": "VPN clients"})
        assert skill.status_code == 201, skill.text
        assert skill.json()["name"] == self.skill
        rule = api.post("/v1/routing/rules", as_="admin", json={
            "name": f"VPN tickets {suffix}",
            "conditions": [{"field": "subject", "operator": "contains_any", "value": [self.keyword]}],
            "actions": {"set_category": self.category, "require_skills": [self.skill]}})
        assert rule.status_code == 201, rule.text
        self.rule = rule.json()
        assert rule.headers["Location"] == f"/v1/routing/rules/{self.rule['id']}"
        assert self.rule["enabled"] is True and self.rule["actions"]["require_skills"] == [self.skill]
        # an L1 agent with the skill, one without it, and an L2 agent (with it: required skills
        # stay with an escalated ticket, so its L2 agent needs them too)
        self.l1 = f"l1-skilled-{suffix}"
        self.l1_plain = f"l1-plain-{suffix}"
        self.l2 = f"l2-{suffix}"
        self.tokens = {agent_id: agent_token(agent_id) for agent_id in (self.l1, self.l1_plain, self.l2)}
        created = cleanup.agent(self.l1, skills=[self.skill])
        assert created["capacity"] == 3  # the default
        cleanup.agent(self.l1_plain)
        cleanup.agent(self.l2, tiers=["L2"], skills=[self.skill])
        self.cleanup = cleanup

    def vpn_ticket(self, what: str = "drops every hour") -> dict:
        return self.cleanup.ticket(subject=f"{self.keyword.upper()} {what}", description="Since Monday.")


@pytest.fixture
def team(api, cleanup):
    assert all(depth == 0 for depth in queue_depths(api).values()), "a previous test left tickets queued"
    return Team(api, cleanup)


# --- the scenario ------------------------------------------------------------------------

def test_a_matching_ticket_is_categorized_and_goes_to_the_online_l1_agent_with_the_skill(api, team, cleanup):
    ticket = team.vpn_ticket()
    assert ticket["assignee_id"] is None and ticket["category"] is None

    assigned = wait_assigned(api, ticket["id"], team.l1)
    wait_until(lambda: ticket_of(api, ticket["id"])["category"] == team.category, ROUTED_WITHIN,
               message="the rule's category on the ticket")
    assigned = ticket_of(api, ticket["id"])
    assert assigned["status"] == "open" and assigned["group"] == "L1"
    assert assigned["category"] == team.category
    # the requester sees the same ticket, now assigned and categorized
    mine = api.get(f"/v1/tickets/{ticket['id']}", as_="alice").json()
    assert (mine["assignee_id"], mine["category"]) == (team.l1, team.category)

    history = api.get(f"/v1/tickets/{ticket['id']}/history", as_="agent").json()
    # the rule's category travels with the assignment: one "updated" entry by routing
    assignment = next(e for e in history["items"] if "assignee_id" in e["changes"])
    assert assignment["actor_id"] == "system:routing"
    assert assignment["changes"]["assignee_id"] == [None, team.l1]
    assert assignment["changes"]["category"] == [None, team.category]

    routing = routing_of(api, ticket["id"])
    assert routing["state"] == "assigned" and routing["assignee_id"] == team.l1
    assert routing["tier"] == "L1" and routing["required_skills"] == [team.skill]
    decision = [d for d in routing["decisions"] if d["outcome"] == "assigned"][-1]
    assert decision["trigger"] == "created" and decision["agent_id"] == team.l1
    by_agent = {c["agent_id"]: c for c in decision["candidates"]}
    assert by_agent[team.l1]["rank"] == 1 and by_agent[team.l1]["excluded"] is None
    assert by_agent[team.l1_plain]["excluded"] == "missing_skills"
    assert by_agent[team.l1_plain]["missing_skills"] == [team.skill]
    assert team.l2 not in by_agent  # another tier: counted in the detail, not listed
    assert agent_of(api, team.l1)["active_tickets"] == 1

    # a ticket no rule matches needs no skill: the least loaded L1 agent gets it
    other = cleanup.ticket(subject=f"Printer jam {_suffix()}")
    wait_assigned(api, other["id"], team.l1_plain)
    assert routing_of(api, other["id"])["required_skills"] == []
    assert ticket_of(api, other["id"])["category"] is None

    # the agents as a supervisor lists them
    listed = api.get("/v1/agents", as_="supervisor", params={"skill": team.skill}).json()["items"]
    assert [a["id"] for a in listed] == sorted([team.l1, team.l2])
    online_l2 = api.get("/v1/agents", as_="viewer", params={"tier": "L2", "presence": "online"}).json()["items"]
    assert team.l2 in [a["id"] for a in online_l2] and team.l1 not in [a["id"] for a in online_l2]


def test_the_fourth_active_ticket_waits_until_the_agent_sets_one_pending(api, team):
    assert agent_of(api, team.l1)["capacity"] == 3
    first = team.vpn_ticket("one")
    wait_assigned(api, first["id"], team.l1)
    for number in (2, 3):  # one at a time, so the next one is the agent's fourth
        wait_assigned(api, team.vpn_ticket(f"number {number}")["id"], team.l1)
    fourth = team.vpn_ticket("number 4")

    waiting = wait_queued(api, fourth["id"])
    assert waiting["assignee_id"] is None and waiting["tier"] == "L1"
    assert waiting["required_skills"] == [team.skill] and waiting["queued_at"]
    queued = [d for d in waiting["decisions"] if d["outcome"] == "queued"]
    assert len(queued) == 1
    by_agent = {c["agent_id"]: c for c in queued[0]["candidates"]}
    assert by_agent[team.l1]["excluded"] == "at_capacity"
    assert (by_agent[team.l1]["load"], by_agent[team.l1]["capacity"]) == (3, 3)
    assert by_agent[team.l1_plain]["excluded"] == "missing_skills"
    queues = {q["tier"]: q for q in api.get("/v1/routing/queues", as_="supervisor").json()["tiers"]}
    assert queues["L1"]["depth"] == 1 and queues["L1"]["oldest_queued_at"] is not None
    assert queues["L2"]["depth"] == 0 and queues["L3"]["depth"] == 0
    assert agent_of(api, team.l1)["active_tickets"] == 3
    assert ticket_of(api, fourth["id"])["assignee_id"] is None
    assert ticket_of(api, fourth["id"])["status"] == "new"

    # pending waits on the requester and holds no slot: the waiting ticket is pulled at once
    pending = patch_ticket(api, first["id"], team.tokens[team.l1], status="pending")
    assert pending["status"] == "pending" and pending["assignee_id"] == team.l1
    wait_assigned(api, fourth["id"], team.l1)
    assert agent_of(api, team.l1)["active_tickets"] == 3
    assert queue_depths(api)["L1"] == 0
    decision = [d for d in routing_of(api, fourth["id"])["decisions"] if d["outcome"] == "assigned"][-1]
    # pulled by the status change (or by the sweep, should it run first)
    assert decision["trigger"] in ("capacity_freed", "sweep") and decision["agent_id"] == team.l1


def test_an_escalated_ticket_moves_to_the_l2_agent_with_the_reason_recorded(api, team):
    ticket = team.vpn_ticket()
    wait_assigned(api, ticket["id"], team.l1)
    path = f"/v1/tickets/{ticket['id']}"
    reason = "needs a network engineer: the tunnel renegotiates every hour"

    escalated = api.post(f"{path}/escalate", token=team.tokens[team.l1], json={"reason": reason})
    assert escalated.status_code == 200, escalated.text
    body = escalated.json()
    assert body["ticket_id"] == ticket["id"]
    assert (body["from_tier"], body["to_tier"], body["reason"]) == ("L1", "L2", reason)
    assert body["decision"]["outcome"] == "escalated" and reason in body["decision"]["detail"]

    moved = wait_assigned(api, ticket["id"], team.l2)
    assert moved["group"] == "L2" and moved["status"] == "open"
    assert agent_of(api, team.l1)["active_tickets"] == 0
    assert agent_of(api, team.l2)["active_tickets"] == 1

    # the ticket's own record says who had it and why it moved
    history = api.get(f"{path}/history", as_="agent").json()
    actions = [(e["action"], e["actor_id"]) for e in history["items"]]
    assert ("unassigned", "system:routing") in actions and ("noted", "system:routing") in actions
    unassigned = next(e for e in history["items"] if e["action"] == "unassigned")
    assert unassigned["changes"]["assignee_id"] == [team.l1, None]
    assert unassigned["changes"]["group"] == ["L1", "L2"]
    assert [e["changes"]["assignee_id"][1] for e in history["items"]
            if (e["changes"].get("assignee_id") or [None, None])[1]] == [team.l1, team.l2]
    assert [p["assignee_id"] for p in history["assignment_periods"]] == [None, team.l1, None, team.l2]
    notes = api.get(f"{path}/comments", as_="agent").json()["items"]
    note = next(c for c in notes if reason in c["body"])
    assert note["public"] is False and note["author_id"] == "system:routing"
    assert "L1" in note["body"] and "L2" in note["body"] and team.l1 in note["body"]
    # an internal note: the requester sees neither the note nor the reason
    assert reason not in str(api.get(f"{path}/comments", as_="alice").json())
    assert reason not in str(api.get(f"{path}/history", as_="alice").json())

    # and routing's decision history explains each step
    routing = routing_of(api, ticket["id"])
    assert (routing["tier"], routing["state"], routing["assignee_id"]) == ("L2", "assigned", team.l2)
    outcomes = [(d["outcome"], d["tier"], d["agent_id"]) for d in routing["decisions"]]
    escalation = outcomes.index(("escalated", "L2", None))
    assert ("assigned", "L1", team.l1) in outcomes[:escalation]
    assert ("assigned", "L2", team.l2) in outcomes[escalation:]
    step = routing["decisions"][escalation]
    assert step["trigger"] == "escalated" and reason in step["detail"] and team.l1 in step["detail"]
    # routed by the escalation itself, by the handler of its unassignment, or by the sweep
    assert routing["decisions"][-1]["trigger"] in ("escalated", "unassigned", "sweep")


def test_an_agent_going_offline_has_their_active_tickets_requeued_for_the_next_eligible_agent(
        api, team, cleanup):
    waiting_on_requester, active = team.vpn_ticket("one"), team.vpn_ticket("two")
    wait_assigned(api, waiting_on_requester["id"], team.l1)
    wait_assigned(api, active["id"], team.l1)
    patch_ticket(api, waiting_on_requester["id"], team.tokens[team.l1], status="pending")
    wait_until(lambda: agent_of(api, team.l1)["active_tickets"] == 1, ROUTED_WITHIN,
               message="routing saw the ticket go pending")

    gone = set_presence(api, team.tokens[team.l1], "offline")
    assert gone["active_tickets"] == 0  # the answer shows the load after the re-queue
    requeued = wait_queued(api, active["id"])
    assert requeued["assignee_id"] is None
    assert ticket_of(api, active["id"])["assignee_id"] is None
    assert ticket_of(api, waiting_on_requester["id"])["assignee_id"] == team.l1  # pending stays
    history = api.get(f"/v1/tickets/{active['id']}/history", as_="agent").json()["items"]
    assert history[-1]["action"] == "unassigned" and history[-1]["actor_id"] == "system:routing"
    queued = [d for d in requeued["decisions"] if d["outcome"] == "queued"][-1]
    assert queued["trigger"] == "requeued"
    assert {c["agent_id"]: c["excluded"] for c in queued["candidates"]}[team.l1] == "offline"

    # an offline agent gets nothing new either; the one without the skill is no substitute
    newer = team.vpn_ticket("three")
    wait_queued(api, newer["id"])
    assert queue_depths(api)["L1"] == 2
    assert agent_of(api, team.l1_plain)["active_tickets"] == 0

    # once another eligible agent is online, both go to them
    stand_in = f"l1-standin-{_suffix()}"
    cleanup.agent(stand_in, skills=[team.skill], online=False)
    assert ticket_of(api, active["id"])["assignee_id"] is None
    set_presence(api, agent_token(stand_in), "online")
    wait_assigned(api, active["id"], stand_in)
    wait_assigned(api, newer["id"], stand_in)
    assert queue_depths(api)["L1"] == 0
    decision = [d for d in routing_of(api, active["id"])["decisions"] if d["outcome"] == "assigned"][-1]
    assert decision["trigger"] in ("agent_online", "sweep") and decision["agent_id"] == stand_in
    assert [p["assignee_id"] for p in api.get(f"/v1/tickets/{active['id']}/history", as_="agent").json()[
        "assignment_periods"]] == [None, team.l1, None, stand_in]


# --- refusals ------------------------------------------------------------------------------------

def test_unknown_tier_and_skill_names_are_refused_with_field_errors(api, cleanup):
    agent_id = f"bad-{_suffix()}"
    base = {"id": agent_id, "display_name": "Bad"}
    for body, field in (({**base, "tiers": ["L4"]}, "tiers"),
                        ({**base, "tiers": []}, "tiers"),
                        ({**base, "skills": [{"name": f"no-such-skill-{_suffix()}"}]}, "skills"),
                        ({**base, "skills": [{"name": "Not A Skill!"}]}, "skills")):
        body = assert_problem(api.post("/v1/agents", as_="supervisor", json=body), 422, field)
        assert body["type"].endswith("validation_error")
    assert_problem(api.get(f"/v1/agents/{agent_id}", as_="supervisor"), 404)  # nothing was created

    agent = cleanup.agent(f"known-{_suffix()}", online=False)
    path, etag = f"/v1/agents/{agent['id']}", f'"{agent["version"]}"'
    for changes, field in (({"tiers": ["L4"]}, "tiers"),
                           ({"skills": [{"name": f"no-such-skill-{_suffix()}"}]}, "skills")):
        assert_problem(api.patch(path, as_="supervisor", json=changes, headers={"If-Match": etag}), 422, field)
    assert agent_of(api, agent["id"]) == agent

    # the same names elsewhere: list filters, rules, escalation targets
    # a bad query string is 400, as on the ticket list
    assert_problem(api.get("/v1/agents", as_="supervisor", params={"tier": "L4"}), 400, "tier")
    assert_problem(api.get("/v1/agents", as_="supervisor", params={"presence": "asleep"}), 400, "presence")
    rules_before = api.get("/v1/routing/rules", as_="admin").json()
    condition = [{"field": "subject", "operator": "contains_any", "value": ["anything"]}]
    assert_problem(api.post("/v1/routing/rules", as_="admin", json={
        "name": "unknown skill", "conditions": condition,
        "actions": {"require_skills": [f"no-such-skill-{_suffix()}"]}}), 422, "actions.require_skills")
    assert_problem(api.post("/v1/routing/rules", as_="admin", json={
        "name": "unknown tier", "conditions": condition, "actions": {"set_tier": "L4"}}), 422, "actions")
    assert api.get("/v1/routing/rules", as_="admin").json() == rules_before
    ticket = cleanup.ticket()
    wait_queued(api, ticket["id"])
    before = ticket_of(api, ticket["id"])
    assert_problem(api.post(f"/v1/tickets/{ticket['id']}/escalate", as_="supervisor",
                            json={"reason": "higher", "to_tier": "L7"}), 422, "to_tier")
    assert ticket_of(api, ticket["id"]) == before


def test_capacity_must_be_between_0_and_50(api, cleanup):
    for capacity in (-1, 10000, 51, "3", 2.5):
        agent_id = f"cap-{_suffix()}"
        response = api.post("/v1/agents", as_="supervisor",
                            json={"id": agent_id, "display_name": "Cap", "capacity": capacity})
        assert_problem(response, 422, "capacity")
        assert_problem(api.get(f"/v1/agents/{agent_id}", as_="supervisor"), 404)

    agent = cleanup.agent(f"cap-{_suffix()}", online=False)
    path, etag = f"/v1/agents/{agent['id']}", f'"{agent["version"]}"'
    for capacity in (-1, 10000):
        assert_problem(api.patch(path, as_="supervisor", json={"capacity": capacity}, headers={"If-Match": etag}),
                       422, "capacity")
    assert agent_of(api, agent["id"]) == agent
    # the edges are fine
    changed = api.patch(path, as_="supervisor", json={"capacity": 50}, headers={"If-Match": etag})
    assert changed.status_code == 200 and changed.json()["capacity"] == 50
    changed = api.patch(path, as_="supervisor", json={"capacity": 0}, headers={"If-Match": changed.headers["ETag"]})
    assert changed.status_code == 200 and changed.json()["capacity"] == 0


def test_presence_is_online_away_or_offline(api, cleanup):
    agent = cleanup.agent(f"presence-{_suffix()}", online=False)
    token = agent_token(agent["id"])
    for presence in ("sleeping", "", "ONLINE", None, 1):
        assert_problem(put(api, "/v1/agents/me/presence", token=token, json={"presence": presence}), 422, "presence")
        assert_problem(put(api, f"/v1/agents/{agent['id']}/presence", as_="supervisor",
                           json={"presence": presence}), 422, "presence")
    assert_problem(put(api, "/v1/agents/me/presence", token=token, json={}), 422, "presence")
    assert_problem(put(api, "/v1/agents/me/presence", token=token,
                       json={"presence": "online", "mood": "great"}), 422, "mood")
    assert agent_of(api, agent["id"]) == agent
    away = set_presence(api, token, "away")
    assert away["version"] == agent["version"] + 1
    # another agent may not set it; a supervisor may
    assert_problem(put(api, f"/v1/agents/{agent['id']}/presence", token=agent_token(f"other-{_suffix()}"),
                       json={"presence": "offline"}), 403)
    assert agent_of(api, agent["id"])["presence"] == "away"
    set_presence(api, token_for("supervisor"), "offline", agent_id=agent["id"])


def test_escalating_a_finished_ticket_or_past_l3_conflicts(api, cleanup):
    finished = cleanup.ticket()
    path = f"/v1/tickets/{finished['id']}"
    wait_queued(api, finished["id"])  # routing has seen it (nobody is online for it)
    patch_ticket(api, finished["id"], token_for("admin"), status="solved")
    solved = ticket_of(api, finished["id"])
    assert_problem(api.post(f"{path}/escalate", as_="agent", json={"reason": "still broken"}), 409)
    patch_ticket(api, finished["id"], token_for("admin"), status="closed")
    closed = ticket_of(api, finished["id"])
    body = assert_problem(api.post(f"{path}/escalate", as_="agent", json={"reason": "still broken"}), 409, "status")
    assert "closed" in body["detail"]
    assert ticket_of(api, finished["id"]) == closed and closed["version"] == solved["version"] + 1
    assert "escalated" not in [d["outcome"] for d in routing_of(api, finished["id"])["decisions"]]

    top = cleanup.ticket()
    path = f"/v1/tickets/{top['id']}"
    wait_queued(api, top["id"])  # nobody online for it in L1: it waits there
    straight_up = api.post(f"{path}/escalate", as_="supervisor", json={"reason": "vendor bug", "to_tier": "L3"})
    assert straight_up.status_code == 200, straight_up.text
    assert (straight_up.json()["from_tier"], straight_up.json()["to_tier"]) == ("L1", "L3")
    wait_until(lambda: ticket_of(api, top["id"])["group"] == "L3", ROUTED_WITHIN, message="group L3")
    wait_queued(api, top["id"])
    before, routing_before = ticket_of(api, top["id"]), routing_of(api, top["id"])
    body = assert_problem(api.post(f"{path}/escalate", as_="supervisor", json={"reason": "higher?"}), 409, "tier")
    assert "L3" in body["detail"]
    assert_problem(api.post(f"{path}/escalate", as_="supervisor", json={"reason": "down", "to_tier": "L2"}),
                   422, "to_tier")
    assert_problem(api.post(f"{path}/escalate", as_="supervisor", json={"reason": "same", "to_tier": "L3"}),
                   422, "to_tier")
    assert ticket_of(api, top["id"]) == before
    assert routing_of(api, top["id"]) == routing_before
    assert queue_depths(api)["L3"] == 1

    # the body itself
    for body, field in (({}, "reason"), ({"reason": "   "}, "reason"), ({"reason": "x" * 1001}, "reason"),
                        ({"reason": "ok", "urgent": True}, "urgent")):
        assert_problem(api.post(f"{path}/escalate", as_="supervisor", json=body), 422, field)
    assert_problem(api.post(f"/v1/tickets/{MISSING}/escalate", as_="supervisor", json={"reason": "ghost"}), 404)
    assert_problem(api.get(f"/v1/tickets/{MISSING}/routing", as_="supervisor"), 404)
    assert ticket_of(api, top["id"]) == before


def test_requesters_have_no_access_to_agents_or_routing(api, cleanup):
    agent = cleanup.agent(f"req-{_suffix()}", online=False)
    ticket = cleanup.ticket()
    rule = {"name": "mine", "conditions": [{"field": "subject", "operator": "equals", "value": "x"}],
            "actions": {"set_tier": "L2"}}
    some_rule = MISSING
    calls = [
        ("GET", "/v1/agents", None), ("POST", "/v1/agents", {"id": "alice@acme", "display_name": "Me"}),
        ("GET", f"/v1/agents/{agent['id']}", None), ("GET", "/v1/agents/me", None),
        ("PATCH", f"/v1/agents/{agent['id']}", {"capacity": 50}),
        ("PUT", "/v1/agents/me/presence", {"presence": "online"}),
        ("PUT", f"/v1/agents/{agent['id']}/presence", {"presence": "online"}),
        ("GET", "/v1/routing/skills", None), ("POST", "/v1/routing/skills", {"name": "hacking"}),
        ("GET", "/v1/routing/rules", None), ("POST", "/v1/routing/rules", rule),
        ("GET", f"/v1/routing/rules/{some_rule}", None), ("PUT", f"/v1/routing/rules/{some_rule}", rule),
        ("DELETE", f"/v1/routing/rules/{some_rule}", None),
        ("GET", "/v1/routing/queues", None),
        ("POST", f"/v1/tickets/{ticket['id']}/escalate", {"reason": "I am in a hurry"}),
        ("GET", f"/v1/tickets/{ticket['id']}/routing", None),
    ]
    for method, path, body in calls:
        for who in ("alice", "acme_lead"):
            response = api.request(method, path, as_=who, json=body, headers={"If-Match": '"1"'})
            assert_problem(response, 403)
    assert agent_of(api, agent["id"]) == agent
    assert ticket_of(api, ticket["id"])["group"] in (None, "L1")
    assert "escalated" not in [d["outcome"] for d in wait_queued(api, ticket["id"])["decisions"]]
    assert_problem(api.get("/v1/agents/alice@acme", as_="supervisor"), 404)


def test_viewers_read_routing_but_write_nothing(api, cleanup):
    agent = cleanup.agent(f"viewed-{_suffix()}", online=False)
    ticket = cleanup.ticket()
    skill = f"viewed-{_suffix()}"
    created = api.post("/v1/routing/skills", as_="admin", json={"name": skill})
    assert created.status_code == 201, created.text
    rule_body = {"name": f"viewed {skill}", "conditions": [{"field": "subject", "operator": "equals",
                                                           "value": f"never {skill}"}],
                 "actions": {"set_tier": "L2"}}
    rule = api.post("/v1/routing/rules", as_="admin", json=rule_body).json()
    try:
        for path in ("/v1/agents", f"/v1/agents/{agent['id']}", "/v1/routing/skills", "/v1/routing/rules",
                     f"/v1/routing/rules/{rule['id']}", "/v1/routing/queues"):
            assert api.get(path, as_="viewer").status_code == 200, path
        etag = {"If-Match": f'"{agent["version"]}"'}
        writes = [
            ("POST", "/v1/agents", {"id": f"v-{_suffix()}", "display_name": "V"}, {}),
            ("PATCH", f"/v1/agents/{agent['id']}", {"capacity": 5}, etag),
            ("PUT", f"/v1/agents/{agent['id']}/presence", {"presence": "online"}, {}),
            ("PUT", "/v1/agents/me/presence", {"presence": "online"}, {}),
            ("POST", "/v1/routing/skills", {"name": f"v-{_suffix()}"}, {}),
            ("POST", "/v1/routing/rules", rule_body, {}),
            ("PUT", f"/v1/routing/rules/{rule['id']}", {**rule_body, "enabled": False},
             {"If-Match": f'"{rule["version"]}"'}),
            ("DELETE", f"/v1/routing/rules/{rule['id']}", None, {"If-Match": f'"{rule["version"]}"'}),
            ("POST", f"/v1/tickets/{ticket['id']}/escalate", {"reason": "looks bad"}, {}),
        ]
        for method, path, body, headers in writes:
            assert_problem(api.request(method, path, as_="viewer", json=body, headers=headers), 403)
        assert agent_of(api, agent["id"]) == agent
        assert api.get(f"/v1/routing/rules/{rule['id']}", as_="admin").json() == rule
        assert [s["name"] for s in api.get("/v1/routing/skills", as_="viewer").json()["items"]].count(skill) == 1
        assert ticket_of(api, ticket["id"])["group"] in (None, "L1")
    finally:
        delete(api, f"/v1/routing/rules/{rule['id']}", as_="admin")


def test_each_role_does_only_its_part(api, cleanup):
    """Supervisors manage agents and skills, admins rules; agents escalate and set their own presence."""
    agent = cleanup.agent(f"role-{_suffix()}", online=False)
    token = agent_token(agent["id"])
    assert_problem(api.post("/v1/agents", token=token, json={"id": f"x-{_suffix()}", "display_name": "X"}), 403)
    assert_problem(api.patch(f"/v1/agents/{agent['id']}", token=token, json={"capacity": 50},
                             headers={"If-Match": f'"{agent["version"]}"'}), 403)
    assert_problem(api.post("/v1/routing/skills", token=token, json={"name": f"x-{_suffix()}"}), 403)
    rule = {"name": "x", "conditions": [{"field": "subject", "operator": "equals", "value": "x"}],
            "actions": {"set_tier": "L2"}}
    assert_problem(api.post("/v1/routing/rules", token=token, json=rule), 403)
    assert_problem(api.post("/v1/routing/rules", as_="supervisor", json=rule), 403)
    assert agent_of(api, agent["id"]) == agent
    # an agent reads its own record through "me"
    me = api.get("/v1/agents/me", token=token)
    assert me.status_code == 200 and me.json()["id"] == agent["id"]


def test_unknown_agents_and_rules_are_not_found(api):
    nobody = f"nobody-{_suffix()}"
    assert_problem(api.get(f"/v1/agents/{nobody}", as_="supervisor"), 404)
    assert_problem(api.patch(f"/v1/agents/{nobody}", as_="supervisor", json={"capacity": 5},
                             headers={"If-Match": '"1"'}), 404)
    assert_problem(put(api, f"/v1/agents/{nobody}/presence", as_="supervisor", json={"presence": "online"}), 404)
    # a staff token whose subject is no agent has no "me"
    assert_problem(put(api, "/v1/agents/me/presence", token=agent_token(nobody), json={"presence": "online"}), 404)
    assert_problem(api.get("/v1/agents/me", token=agent_token(nobody)), 404)
    assert_problem(api.get(f"/v1/agents/{nobody}", as_="supervisor"), 404)  # still nobody

    rule = {"name": "ghost", "conditions": [{"field": "subject", "operator": "equals", "value": "boo"}],
            "actions": {"set_tier": "L2"}}
    rules_before = api.get("/v1/routing/rules", as_="admin").json()
    for rule_id in (str(uuid.uuid4()), "not-a-uuid"):
        path = f"/v1/routing/rules/{rule_id}"
        assert_problem(api.get(path, as_="admin"), 404)
        assert_problem(put(api, path, as_="admin", json=rule), 404)
        assert_problem(delete(api, path, as_="admin"), 404)
    assert api.get("/v1/routing/rules", as_="admin").json() == rules_before


def test_updating_an_agent_needs_the_current_etag(api, cleanup):
    agent = cleanup.agent(f"etag-{_suffix()}", online=False)
    path = f"/v1/agents/{agent['id']}"
    assert_problem(api.patch(path, as_="supervisor", json={"capacity": 5}), 428)
    assert agent_of(api, agent["id"]) == agent

    updated = api.patch(path, as_="supervisor", json={"display_name": "Renamed"},
                        headers={"If-Match": f'"{agent["version"]}"'})
    assert updated.status_code == 200, updated.text
    assert updated.json()["version"] == agent["version"] + 1
    assert updated.headers["ETag"] == f'"{updated.json()["version"]}"'
    current = agent_of(api, agent["id"])
    stale = api.patch(path, as_="supervisor", json={"capacity": 5}, headers={"If-Match": f'"{agent["version"]}"'})
    assert_problem(stale, 412)
    assert_problem(api.patch(path, as_="supervisor", json={"capacity": 5}, headers={"If-Match": '"abc"'}), 412)
    assert agent_of(api, agent["id"]) == current and current["capacity"] == 3
    # presence changes bump the version too: an ETag read before them is stale
    set_presence(api, agent_token(agent["id"]), "away")
    assert_problem(api.patch(path, as_="supervisor", json={"capacity": 5},
                             headers={"If-Match": updated.headers["ETag"]}), 412)
    assert agent_of(api, agent["id"])["capacity"] == 3
    # conditional reads
    fresh = api.get(path, as_="supervisor")
    assert api.get(path, as_="supervisor", headers={"If-None-Match": fresh.headers["ETag"]}).status_code == 304
    # nothing to change, or something unknown
    etag = {"If-Match": fresh.headers["ETag"]}
    assert_problem(api.patch(path, as_="supervisor", json={}, headers=etag), 422, "_schema")
    assert_problem(api.patch(path, as_="supervisor", json={"presence": "online"}, headers=etag), 422, "presence")
    assert_problem(api.patch(path, as_="supervisor", json={"id": "renamed"}, headers=etag), 422, "id")


def test_duplicate_agent_ids_and_skill_names_conflict(api, cleanup):
    agent = cleanup.agent(f"dup-{_suffix()}", online=False)
    again = api.post("/v1/agents", as_="supervisor",
                     json={"id": agent["id"], "display_name": "Impostor", "tiers": ["L3"], "capacity": 50})
    assert_problem(again, 409, "id")
    assert agent_of(api, agent["id"]) == agent

    skill = f"dup-{_suffix()}"
    first = api.post("/v1/routing/skills", as_="supervisor", json={"name": skill, "description": "first"})
    assert first.status_code == 201, first.text
    assert_problem(api.post("/v1/routing/skills", as_="admin", json={"name": skill, "description": "second"}),
                   409, "name")
    skills = [s for s in api.get("/v1/routing/skills", as_="agent").json()["items"] if s["name"] == skill]
    assert skills == [first.json()]


def test_rules_with_invalid_patterns_or_bodies_are_refused(api):
    rules_before = api.get("/v1/routing/rules", as_="admin").json()

    def rule(**overrides):
        return {"name": "r", "conditions": [{"field": "subject", "operator": "matches", "value": "vpn|tunnel"}],
                "actions": {"set_category": "network"}, **overrides}

    bad = [
        (rule(conditions=[{"field": "subject", "operator": "matches", "value": "(unclosed"}]), "conditions"),
        (rule(conditions=[{"field": "subject", "operator": "matches", "value": "a{2,1}"}]), "conditions"),
        (rule(conditions=[{"field": "subject", "operator": "contains_any", "value": "vpn"}]), "conditions"),
        (rule(conditions=[{"field": "mood", "operator": "equals", "value": "x"}]), "conditions"),
        (rule(conditions=[{"field": "priority", "operator": "equals", "value": "urgent"}]), "conditions"),
        (rule(conditions=[]), "conditions"),
        (rule(actions={}), "actions"),
        (rule(match="most"), "match"),
        (rule(name=""), "name"),
        (rule(colour="red"), "colour"),
    ]
    for body, field in bad:
        refused = assert_problem(api.post("/v1/routing/rules", as_="admin", json=body), 422, field)
        assert refused["type"].endswith("validation_error")
    body = assert_problem(api.post("/v1/routing/rules", as_="admin", json=bad[0][0]), 422, "conditions")
    assert "regular expression" in str(body["errors"]["conditions"])
    assert api.get("/v1/routing/rules", as_="admin").json() == rules_before

    # an existing rule is not changed by an invalid replacement, nor by a stale one
    created = api.post("/v1/routing/rules", as_="admin", json=rule(name=f"valid {_suffix()}",
                                                                     enabled=False))
    assert created.status_code == 201, created.text
    path = created.headers["Location"]
    try:
        etag = {"If-Match": created.headers["ETag"]}
        assert_problem(put(api, path, as_="admin", json=bad[0][0], headers=etag), 422, "conditions")
        updated = put(api, path, as_="admin", json=rule(name="renamed", enabled=False), headers=etag)
        assert updated.status_code == 200 and updated.json()["version"] == created.json()["version"] + 1
        assert_problem(put(api, path, as_="admin", json=rule(name="stale", enabled=False), headers=etag), 412)
        assert_problem(delete(api, path, as_="admin", headers=etag), 412)
        assert api.get(path, as_="admin").json() == updated.json()
    finally:
        deleted = delete(api, path, as_="admin", headers={"If-Match": '*'})
        assert deleted.status_code == 204, deleted.text
    assert_problem(api.get(path, as_="admin"), 404)
    assert api.get("/v1/routing/rules", as_="admin").json() == rules_before


def test_tickets_escalated_right_after_their_assignment_stay_escalated(api, cleanup):
    """Escalating unassigns the ticket in the tickets service, which announces the unassignment;
    routing must not take that announcement for a plain unassignment and hand the ticket back
    to an agent of the old tier before it has recorded the new one (escalations at once make
    the race likely)."""
    suffix = _suffix()
    l1, l2 = f"race-l1-{suffix}", f"race-l2-{suffix}"
    cleanup.agent(l1, capacity=30)
    cleanup.agent(l2, tiers=["L2"], capacity=30)
    tickets = [cleanup.ticket(subject=f"Race {suffix} {number}")["id"] for number in range(24)]
    for ticket_id in tickets:
        wait_assigned(api, ticket_id, l1)

    def escalate(ticket_id):
        session = requests.Session()
        try:
            return session.post(f"{api.base_url}/v1/tickets/{ticket_id}/escalate", timeout=30,
                                headers={"Authorization": f"Bearer {agent_token(l1)}"},
                                json={"reason": "needs L2"})
        finally:
            session.close()

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(escalate, tickets))
    assert [a.status_code for a in answers] == [200] * len(tickets), [a.text for a in answers if a.status_code != 200]
    for ticket_id in tickets:
        moved = wait_assigned(api, ticket_id, l2)
        assert moved["group"] == "L2"
        routing = routing_of(api, ticket_id)
        assert (routing["tier"], routing["state"], routing["assignee_id"]) == ("L2", "assigned", l2)
        periods = api.get(f"/v1/tickets/{ticket_id}/history", as_="agent").json()["assignment_periods"]
        assert [p["assignee_id"] for p in periods] == [None, l1, None, l2]  # never back to L1
    assert agent_of(api, l1)["active_tickets"] == 0
