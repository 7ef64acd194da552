"""The routing service with the real tickets service on a real broker (SQLite and PostgreSQL).

The concurrency test runs two routing instances on one database and broker, creates tickets
in bursts and flips presence meanwhile, then checks the invariants once the system is quiet.
"""
import random
import uuid
from collections import Counter

import eventlet
import pytest
from sqlalchemy import create_engine, text

from contracts.errors import Conflict, Forbidden, NotFound, ValidationError
from services.routing.router import RoutingSettings
from tests.integration.conftest import RoutingHarness, harness_factory, wait_for

pytestmark = pytest.mark.integration

ADMIN = {"id": "admin-1", "role": "admin"}
SUPERVISOR = {"id": "sup-1", "role": "supervisor"}
REQUESTER = {"id": "req-1", "role": "requester", "organization_id": "acme"}


def agent_actor(agent_id):
    return {"id": agent_id, "role": "agent"}


@pytest.fixture
def routing_db(database_factory):
    return database_factory("routing")


@pytest.fixture
def routing_factory(vhost, routing_db):
    def build(**settings) -> RoutingHarness:
        policy = RoutingSettings(**{"sweep_interval_seconds": 2.0, "retry_after_seconds": 3.0, **settings})
        return RoutingHarness(vhost, routing_db, extra_config={"HELPDESK_ROUTING": policy})

    with harness_factory(build) as make:
        yield make


@pytest.fixture
def routing(routing_factory):
    return routing_factory().start()


def create_ticket(cluster, subject="VPN is down", **extra):
    data = {"subject": subject, "description": "Cannot connect since this morning", **extra}
    return cluster.tickets.create_ticket({"id": "req-1", "role": "requester", "organization_id": "acme"},
                                         data)["ticket"]


def online_agent(cluster, agent_id, tiers=("L1",), skills=(), capacity=3, presence="online"):
    cluster.routing.create_agent(SUPERVISOR, {"id": agent_id, "display_name": agent_id, "tiers": list(tiers),
                                              "skills": [{"name": s} for s in skills], "capacity": capacity})
    if presence != "offline":
        cluster.routing.set_presence(agent_actor(agent_id), agent_id, presence)


def routing_state(cluster, ticket_id):
    """routing's state of the ticket (None until routing has seen it)."""
    try:
        return cluster.routing.get_ticket_routing(ADMIN, ticket_id)["state"]
    except NotFound:
        return None


def assignee_of(cluster, ticket_id):
    return cluster.tickets.get_ticket(ADMIN, ticket_id)["assignee_id"]


def test_a_new_ticket_goes_to_the_least_loaded_online_agent_with_the_skill(tickets, routing, rpc):
    rpc.routing.create_skill(ADMIN, {"name": "networking"})
    rpc.routing.create_rule(ADMIN, {"name": "vpn", "conditions": [
        {"field": "subject", "operator": "contains_any", "value": ["vpn"]}],
        "actions": {"require_skills": ["networking"], "set_category": "network"}})
    online_agent(rpc, "ann", skills=["networking"])
    online_agent(rpc, "bob")  # no skill
    online_agent(rpc, "cid", skills=["networking"], presence="away")

    ticket = create_ticket(rpc)
    wait_for(lambda: assignee_of(rpc, ticket["id"]) == "ann", timeout=10, message="assigned to ann")

    view = rpc.tickets.get_ticket(ADMIN, ticket["id"])
    assert view["status"] == "open" and view["group"] == "L1"
    wait_for(lambda: rpc.tickets.get_ticket(ADMIN, ticket["id"])["category"] == "network", timeout=5)
    routing_view = rpc.routing.get_ticket_routing(ADMIN, ticket["id"])
    assert routing_view["state"] == "assigned" and routing_view["required_skills"] == ["networking"]
    decision = [d for d in routing_view["decisions"] if d["outcome"] == "assigned"][-1]
    by_agent = {c["agent_id"]: c for c in decision["candidates"]}
    assert by_agent["ann"]["rank"] == 1 and by_agent["ann"]["excluded"] is None
    assert by_agent["bob"]["excluded"] == "missing_skills" and by_agent["bob"]["missing_skills"] == ["networking"]
    assert by_agent["cid"]["excluded"] == "away"
    assert rpc.routing.get_agent(ADMIN, "ann")["active_tickets"] == 1


def test_the_fourth_active_ticket_waits_and_a_pending_one_frees_the_slot(tickets, routing, rpc):
    online_agent(rpc, "ann", capacity=3)
    first = [create_ticket(rpc, subject=f"issue {i}") for i in range(3)]
    for ticket in first:
        wait_for(lambda t=ticket: assignee_of(rpc, t["id"]) == "ann", timeout=10)
    fourth = create_ticket(rpc, subject="issue 4")
    wait_for(lambda: routing_state(rpc, fourth["id"]) == "queued", timeout=10)
    queues = {q["tier"]: q for q in rpc.routing.get_queues(ADMIN)["tiers"]}
    assert queues["L1"]["depth"] == 1 and queues["L1"]["active_tickets"] == 3
    eventlet.sleep(1)
    assert assignee_of(rpc, fourth["id"]) is None

    rpc.tickets.update_ticket(agent_actor("ann"), first[0]["id"], {"status": "pending"})
    wait_for(lambda: assignee_of(rpc, fourth["id"]) == "ann", timeout=10, message="pulled when a slot freed")
    assert rpc.routing.get_agent(ADMIN, "ann")["active_tickets"] == 3


def test_escalation_moves_the_ticket_to_the_next_tier_and_records_why(tickets, routing, rpc):
    online_agent(rpc, "ann", tiers=["L1"])
    online_agent(rpc, "lee", tiers=["L2"])
    ticket = create_ticket(rpc)
    wait_for(lambda: assignee_of(rpc, ticket["id"]) == "ann", timeout=10)

    result = rpc.routing.escalate_ticket(agent_actor("ann"), ticket["id"], {"reason": "needs a network engineer"})
    assert (result["from_tier"], result["to_tier"]) == ("L1", "L2")
    wait_for(lambda: assignee_of(rpc, ticket["id"]) == "lee", timeout=10)
    assert rpc.tickets.get_ticket(ADMIN, ticket["id"])["group"] == "L2"
    notes = rpc.tickets.list_comments(ADMIN, ticket["id"])["items"]
    assert any("needs a network engineer" in c["body"] and not c["public"] for c in notes)
    assert rpc.routing.get_agent(ADMIN, "ann")["active_tickets"] == 0

    rpc.routing.escalate_ticket(SUPERVISOR, ticket["id"], {"reason": "vendor bug"})
    with pytest.raises(Conflict):
        rpc.routing.escalate_ticket(SUPERVISOR, ticket["id"], {"reason": "higher?"})
    with pytest.raises(Forbidden):
        rpc.routing.escalate_ticket(REQUESTER, ticket["id"], {"reason": "hurry"})
    with pytest.raises(NotFound):
        rpc.routing.escalate_ticket(SUPERVISOR, str(uuid.uuid4()), {"reason": "ghost"})


def test_bad_input_is_refused_with_typed_errors_and_changes_nothing(tickets, routing, rpc):
    with pytest.raises(ValidationError) as unknown_skill:
        rpc.routing.create_agent(SUPERVISOR, {"id": "x", "display_name": "X", "skills": [{"name": "sap"}]})
    assert "skills" in unknown_skill.value.errors
    with pytest.raises(ValidationError) as bad_tier:
        rpc.routing.create_agent(SUPERVISOR, {"id": "x", "display_name": "X", "tiers": ["L4"], "capacity": -1})
    assert {"tiers", "capacity"} <= set(bad_tier.value.errors)
    with pytest.raises(ValidationError):
        rpc.routing.create_agent(SUPERVISOR, {"id": "x", "display_name": "X", "capacity": 10_000})
    with pytest.raises(Forbidden):
        rpc.routing.create_agent(agent_actor("x"), {"id": "x", "display_name": "X"})
    with pytest.raises(ValidationError):
        rpc.routing.create_rule(ADMIN, {"name": "bad", "conditions": [
            {"field": "subject", "operator": "matches", "value": "(unclosed"}], "actions": {"set_tier": "L2"}})
    with pytest.raises(Forbidden):
        rpc.routing.create_rule(SUPERVISOR, {"name": "ok", "conditions": [
            {"field": "subject", "operator": "equals", "value": "x"}], "actions": {"set_tier": "L2"}})
    online_agent(rpc, "ann")
    with pytest.raises(ValidationError):
        rpc.routing.set_presence(agent_actor("ann"), "ann", "sleeping")
    with pytest.raises(Forbidden):
        rpc.routing.set_presence(agent_actor("bob"), "ann", "offline")
    assert rpc.routing.list_agents(ADMIN)["items"][0]["presence"] == "online"
    assert rpc.routing.list_rules(ADMIN)["items"] == []


def test_offline_agent_gets_nothing_new_and_their_active_tickets_are_requeued(tickets, routing, rpc):
    online_agent(rpc, "ann")
    ticket = create_ticket(rpc)
    wait_for(lambda: assignee_of(rpc, ticket["id"]) == "ann", timeout=10)
    rpc.routing.set_presence(agent_actor("ann"), "ann", "offline")
    wait_for(lambda: routing_state(rpc, ticket["id"]) == "queued", timeout=10)
    assert assignee_of(rpc, ticket["id"]) is None
    online_agent(rpc, "bob")
    wait_for(lambda: assignee_of(rpc, ticket["id"]) == "bob", timeout=10)


def test_duplicate_ticket_events_have_one_effect(tickets, routing, rpc, amqp):
    online_agent(rpc, "ann", capacity=5)
    ticket = create_ticket(rpc)
    wait_for(lambda: assignee_of(rpc, ticket["id"]) == "ann", timeout=10)
    # replay the whole ticket_created event by hand: same event_id -> skipped
    envelope = {"event_id": str(uuid.uuid4()), "event_type": "ticket_created", "source": "tickets",
                "occurred_at": "2026-01-01T00:00:00Z", "schema_version": 1,
                "subject_ids": {"ticket_id": ticket["id"]},
                "payload": {"actor_id": "req-1", "ticket": {**{k: ticket[k] for k in (
                    "id", "number", "subject", "status", "priority", "category", "tags", "channel",
                    "requester_id", "organization_id", "assignee_id", "group", "created_at", "updated_at")},
                    "version": 1}}}
    amqp.publish_event("tickets", "ticket_created", envelope)
    amqp.publish_event("tickets", "ticket_created", envelope)
    eventlet.sleep(1.5)
    view = rpc.routing.get_ticket_routing(ADMIN, ticket["id"])
    assert view["state"] == "assigned" and view["assignee_id"] == "ann"
    assert [d["outcome"] for d in view["decisions"]].count("assigned") == 1
    assert rpc.routing.get_agent(ADMIN, "ann")["active_tickets"] == 1


def _active_loads(routing_db):
    engine = create_engine(routing_db.replace("postgresql://", "postgresql+psycopg2://"))
    try:
        with engine.connect() as connection:
            rows = connection.execute(text(
                "SELECT assignee_id, count(*) FROM routed_tickets WHERE assignee_id IS NOT NULL "
                "AND status IN ('new', 'open') GROUP BY assignee_id")).all()
            capacity = dict(connection.execute(text("SELECT id, capacity FROM agents")).all())
            counters = dict(connection.execute(text("SELECT id, active_load FROM agents")).all())
            # the counter the claims rely on equals the count from the mirror
            assert counters == {a: dict(rows).get(a, 0) for a in counters}, (counters, rows)
            queued = connection.execute(text(
                "SELECT count(*) FROM routed_tickets WHERE state = 'queued'")).scalar()
            return dict(rows), capacity, queued
    finally:
        engine.dispose()


def test_two_routers_never_exceed_capacity_nor_assign_twice(tickets_factory, routing_factory, routing_db, rpc,
                                                            rpc_factory):
    tickets_factory().start()
    routing_factory().start()
    routing_factory().start()
    agents = [f"agent-{i}" for i in range(6)]
    for agent_id in agents:
        online_agent(rpc, agent_id, capacity=2)
    rng = random.Random(7)
    created = []

    def flip_presence():
        for _ in range(12):
            agent_id = rng.choice(agents)
            rpc_presence = rng.choice(["online", "online", "away", "offline"])
            flipper.routing.set_presence(agent_actor(agent_id), agent_id, rpc_presence)
            eventlet.sleep(0.05)

    def creator(worker):
        with rpc_factory(timeout=10) as cluster:
            for burst in range(3):
                for i in range(4):
                    created.append(create_ticket(cluster, subject=f"burst {burst} {worker}-{i}"))
                eventlet.sleep(0.3)

    with rpc_factory(timeout=10) as flipper:
        flips = eventlet.spawn(flip_presence)
        creators = [eventlet.spawn(creator, worker) for worker in range(5)]
        for thread in creators:
            thread.wait()
        flips.wait()
    # quiet: everyone online again, then the sweepers settle the queues
    for agent_id in agents:
        rpc.routing.set_presence(agent_actor(agent_id), agent_id, "online")

    def settled():
        loads, capacity, queued = _active_loads(routing_db)
        return queued == 0 or sum(loads.values()) == sum(capacity.values())

    wait_for(settled, timeout=30, interval=0.5, message="queues settled")
    loads, capacity, queued = _active_loads(routing_db)
    assert all(loads.get(a, 0) <= capacity[a] for a in agents), loads
    # no ticket waits while somebody has room
    assert queued == 0 or all(loads.get(a, 0) == capacity[a] for a in agents), (loads, queued)
    # tickets agrees with routing, and nobody holds a ticket twice
    assignees = Counter(assignee_of(rpc, t["id"]) for t in created)
    assert sum(n for a, n in assignees.items() if a) == sum(loads.values())
    assert all(assignees.get(a, 0) <= capacity[a] for a in agents), assignees


def test_a_rule_can_start_a_ticket_in_a_higher_tier_as_an_escalation_by_rule(tickets, routing, rpc, amqp):
    escalations = amqp.bind("routing", "ticket_escalated")
    rule = rpc.routing.create_rule(ADMIN, {"name": "outages to L2", "conditions": [
        {"field": "subject", "operator": "contains_any", "value": ["outage"]}],
        "actions": {"set_tier": "L2", "raise_priority": "high"}})
    online_agent(rpc, "ann", tiers=["L1"])
    online_agent(rpc, "lee", tiers=["L2"])

    ticket = create_ticket(rpc, subject="Total outage in Madrid")
    wait_for(lambda: assignee_of(rpc, ticket["id"]) == "lee", timeout=10)
    wait_for(lambda: rpc.tickets.get_ticket(ADMIN, ticket["id"])["priority"] == "high", timeout=5)
    assert rpc.tickets.get_ticket(ADMIN, ticket["id"])["group"] == "L2"
    payload = amqp.wait_message(escalations, timeout=5).payload["payload"]
    assert payload["trigger"] == "rule" and payload["actor_id"] == f"rule:{rule['id']}"
    assert (payload["from_tier"], payload["to_tier"]) == ("L1", "L2")


def test_routing_metrics_show_assignments_queues_and_load_per_tier_without_ids(tickets, routing, rpc):
    from prometheus_client.parser import text_string_to_metric_families

    def assigned_count():
        return routing.metric("helpdesk_routing_assignments_total", tier="L1", reason="created")

    before = assigned_count()
    before_timed = routing.metric("helpdesk_routing_time_to_assignment_seconds_count", tier="L1")
    before_batches = routing.metric("helpdesk_routing_claim_batch_size_count")
    online_agent(rpc, "ann", capacity=1)
    first = create_ticket(rpc)
    wait_for(lambda: assignee_of(rpc, first["id"]) == "ann", timeout=10)
    waiting = create_ticket(rpc, subject="second")
    wait_for(lambda: routing_state(rpc, waiting["id"]) == "queued", timeout=10)
    assert assigned_count() == before + 1
    assert routing.metric("helpdesk_routing_time_to_assignment_seconds_count", tier="L1") == before_timed + 1
    assert routing.metric("helpdesk_routing_claim_batch_size_count") == before_batches + 1  # one claim, one batch
    # the per-tier gauges come from the sweeper's snapshot (every 2 s here)
    wait_for(lambda: routing.metric("helpdesk_routing_queue_depth", tier="L1") == 1, timeout=10)
    assert routing.metric("helpdesk_routing_agents_online", tier="L1") == 1
    assert routing.metric("helpdesk_routing_active_tickets", tier="L1") == 1
    assert routing.metric("helpdesk_routing_capacity_online", tier="L1") == 1
    assert routing.metric("helpdesk_routing_queue_oldest_age_seconds", tier="L1") >= 0
    allowed = {"tier", "reason", "from_tier", "to_tier", "trigger", "le"}
    for family in text_string_to_metric_families(routing.get("/metrics").text):
        if family.name.startswith("helpdesk_routing"):
            for sample in family.samples:
                assert set(sample.labels) <= allowed, sample  # aggregates only: no agent or ticket ids


def test_tickets_filed_while_routing_is_down_are_routed_when_it_returns(tickets, routing_factory, rpc):
    routing = routing_factory().start()  # declares its queues: events wait there while it is down
    online_agent(rpc, "ann", capacity=5)
    routing.stop()
    filed = [create_ticket(rpc, subject=f"while down {i}") for i in range(3)]
    eventlet.sleep(0.5)
    assert all(assignee_of(rpc, t["id"]) is None for t in filed)
    routing.start()
    for ticket in filed:
        wait_for(lambda t=ticket: assignee_of(rpc, t["id"]) == "ann", timeout=15,
                 message="routed after the restart")
    assert rpc.routing.get_agent(ADMIN, "ann")["active_tickets"] == 3


def test_a_routing_instance_killed_mid_flow_leaves_nothing_unrouted(tickets, routing_factory, rpc):
    first = routing_factory().start()
    online_agent(rpc, "ann", capacity=20)
    filed = [create_ticket(rpc, subject=f"burst {i}") for i in range(10)]
    first.kill()  # a crash: whatever was in flight is redelivered or re-driven by the sweeper
    routing_factory(retry_after_seconds=1.0).start()
    for ticket in filed:
        wait_for(lambda t=ticket: assignee_of(rpc, t["id"]) == "ann", timeout=20,
                 message="every ticket routed after the crash")
    assert rpc.routing.get_agent(ADMIN, "ann")["active_tickets"] == 10
