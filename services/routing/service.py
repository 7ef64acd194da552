"""nameko entrypoints of the routing service: validate input, call operations or the router."""
import logging

import eventlet
from nameko.constants import NON_PERSISTENT
from nameko.extensions import DependencyProvider
from nameko.rpc import RpcProxy
from nameko.timer import timer

from contracts import routing as contract
from contracts import tickets as tickets_contract
from servicekit.config import settings_from_container
from servicekit.context import RequestContext
from servicekit.inputs import actor as _actor, expected_version as _version, identifier as _id, load as _load
from servicekit.db import Database
from servicekit.entrypoints import rpc
from servicekit.events import AfterCommit, handles_event_once, handles_events_in_batches
from servicekit.metrics import EntrypointMetrics
from servicekit.probes import ServiceProbes
from services.routing import domain, operations as ops
from services.routing.dispatcher import DispatchRequests, dispatcher
from services.routing.router import Router, RoutingSettings

_skill_schema = contract.SkillRequest()
_create_agent_schema = contract.CreateAgentRequest()
_update_agent_schema = contract.UpdateAgentRequest()
_presence_schema = contract.PresenceRequest()
_list_agents_schema = contract.ListAgentsRequest()
_rule_schema = contract.RuleRequest()
_escalate_schema = contract.EscalateRequest()

# the system's own identity when the sla service asks for an escalation
SLA_ACTOR = ops.Actor("system:sla", "supervisor")
ROUTING_SETTINGS = RoutingSettings.load()
log = logging.getLogger(__name__)


def _snapshots_held(service, session, bodies) -> list:
    """A batch of ticket events: per event, whether routing already holds its snapshot or a
    newer one (it then changes nothing). Routing's own assignment confirmations apply the
    tickets service's answer before its events arrive, so most of them are acked without a
    write transaction; one read for the batch. A body this cannot read: False (the full
    validation decides)."""
    snapshots = []
    for body in bodies:
        try:
            snapshot = body["payload"]["ticket"]
            readable = isinstance(snapshot["id"], str) and type(snapshot["version"]) is int
        except (KeyError, TypeError):
            readable = False
        snapshots.append(snapshot if readable else None)
    held = ops.mirrored_versions(session, {s["id"] for s in snapshots if s is not None})
    return [s is not None and s["version"] <= held.get(s["id"], -1) for s in snapshots]


def _snapshot_known_stale(body) -> bool:
    """The same question from memory, before a worker is spawned: routing's own assignment
    confirmations remember the version they committed, and their echoes stop here."""
    snapshot = body["payload"]["ticket"]
    return type(snapshot["version"]) is int and ops.snapshot_known_stale(snapshot)


def _in_ticket_order(envelopes: list) -> list:
    """A batch's events in ticket id order (stable: one ticket's events keep theirs), the order
    claims and confirmations lock tickets in, so that on PostgreSQL a batch and a claim never
    wait on each other's rows in a cycle."""
    return sorted(envelopes, key=lambda envelope: envelope["payload"]["ticket"]["id"])


def _mirrored_in_batches(name: str, event_type: str, payload_schema):
    """A handler of one tickets event type that mirrors each event's snapshot, in batches.
    ``name`` is the service attribute it is bound to: its handled-event marks and metrics go
    by it."""

    def handler(self, session, envelopes):
        return [self._mirror(session, envelope) for envelope in _in_ticket_order(envelopes)]

    handler.__name__ = handler.__qualname__ = name
    return handles_events_in_batches(tickets_contract.SERVICE, event_type, already_applied=_snapshots_held,
                                     known_stale=_snapshot_known_stale, payload_schema=payload_schema)(handler)


class TicketsPort:
    """The tickets RPCs routing uses, each with a deadline (nameko's RpcProxy has none)."""

    def __init__(self, proxy, timeout: float):
        self._proxy, self._timeout = proxy, timeout

    def _deadline(self, method):
        # a TimeoutError, not eventlet's own Timeout: that is a BaseException, which the router's
        # ``except Exception`` around these calls would let escape
        return eventlet.Timeout(self._timeout, TimeoutError(f"tickets.{method}: no answer in {self._timeout} s"))

    def _call(self, method, *args):
        with self._deadline(method):
            return getattr(self._proxy, method)(*args)

    def get_ticket(self, actor, ticket_id):
        return self._call("get_ticket", actor, ticket_id)

    def assign_ticket(self, actor, ticket_id, assignee_id, group):
        return self._call("assign_ticket", actor, ticket_id, assignee_id, group)

    def send_assign_tickets(self, actor, assignments):
        """``assign_tickets``, published now; returns ``answer()``, which waits for the reply
        (with the deadline, counted from when the answer is asked for)."""
        reply = self._proxy.assign_tickets.call_async(actor, assignments)

        def answer():
            with self._deadline("assign_tickets"):
                return reply.result()
        return answer

    def update_ticket(self, actor, ticket_id, changes, expected_version=None):
        return self._call("update_ticket", actor, ticket_id, changes, expected_version)

    def add_comment(self, actor, ticket_id, data):
        return self._call("add_comment", actor, ticket_id, data)


class RoutingPolicy(DependencyProvider):
    """``self.policy``: the RoutingSettings of this container (tests pass their own in the
    config under ``HELPDESK_ROUTING``), and the deadline of calls to tickets."""

    def setup(self):
        self.settings = self.container.config.get("HELPDESK_ROUTING") or ROUTING_SETTINGS
        self.rpc_timeout = settings_from_container(self.container).rpc_timeout_seconds

    def get_dependency(self, worker_ctx):
        return self


class RoutingService(ServiceProbes):
    name = contract.SERVICE

    db = Database()
    metrics = EntrypointMetrics()
    request_id = RequestContext()
    tickets = RpcProxy(tickets_contract.SERVICE, expiration=30, delivery_mode=NON_PERSISTENT)
    self_rpc = RpcProxy(contract.SERVICE, delivery_mode=NON_PERSISTENT)
    policy = RoutingPolicy()
    wake_dispatcher = DispatchRequests()

    @property
    def router(self) -> Router:
        return Router(self.db, TicketsPort(self.tickets, self.policy.rpc_timeout), self.policy.settings,
                      wake=self.wake_dispatcher)

    # --- skills ---------------------------------------------------------------------------------

    @rpc
    def create_skill(self, actor, data):
        actor, data = _actor(actor), _load(_skill_schema, data)
        with self.db.transaction() as session:
            return ops.create_skill(session, actor, data)

    @rpc
    def list_skills(self, actor):
        with self.db.read() as session:
            return ops.list_skills(session, _actor(actor))

    # --- agents ---------------------------------------------------------------------------------

    @rpc
    def create_agent(self, actor, data):
        actor, data = _actor(actor), _load(_create_agent_schema, data)
        with self.db.transaction() as session:
            return ops.create_agent(session, actor, data)

    @rpc
    def get_agent(self, actor, agent_id):
        actor, agent_id = _actor(actor), _id(agent_id, "agent_id")
        with self.db.read() as session:
            return ops.get_agent(session, actor, agent_id)

    @rpc
    def list_agents(self, actor, filters=None):
        actor, filters = _actor(actor), _load(_list_agents_schema, filters)
        with self.db.read() as session:
            return ops.list_agents(session, actor, filters)

    @rpc
    def update_agent(self, actor, agent_id, changes, expected_version=None):
        actor, agent_id = _actor(actor), _id(agent_id, "agent_id")
        changes = _load(_update_agent_schema, changes)
        with self.db.transaction() as session:
            agent = ops.update_agent(session, actor, agent_id, changes, _version(expected_version))
        if agent["presence"] == "online":  # more capacity, a new tier or skill may take queued work
            self.router.drain(agent["tiers"], "capacity_freed")
        return agent

    @rpc
    def set_presence(self, actor, agent_id, presence):
        actor, agent_id = _actor(actor), _id(agent_id, "agent_id")
        presence = _load(_presence_schema, {"presence": presence})["presence"]
        with self.db.transaction() as session:
            agent, previous = ops.set_presence(session, actor, agent_id, presence)
        self.router.presence_changed(agent_id, presence, previous)
        if presence != previous:  # the answer shows the load after any re-queue
            with self.db.read() as session:
                agent = ops.get_agent(session, actor, agent_id)
        return agent

    # --- rules ----------------------------------------------------------------------------------

    @rpc
    def create_rule(self, actor, data):
        actor, data = _actor(actor), _load(_rule_schema, data)
        with self.db.transaction() as session:
            return ops.create_rule(session, actor, data)

    @rpc
    def get_rule(self, actor, rule_id):
        actor, rule_id = _actor(actor), _id(rule_id, "rule_id")
        with self.db.read() as session:
            return ops.get_rule(session, actor, rule_id)

    @rpc
    def list_rules(self, actor):
        with self.db.read() as session:
            return ops.list_rules(session, _actor(actor))

    @rpc
    def update_rule(self, actor, rule_id, data, expected_version=None):
        actor, rule_id, data = _actor(actor), _id(rule_id, "rule_id"), _load(_rule_schema, data)
        with self.db.transaction() as session:
            return ops.update_rule(session, actor, rule_id, data, _version(expected_version))

    @rpc
    def delete_rule(self, actor, rule_id, expected_version=None):
        actor, rule_id = _actor(actor), _id(rule_id, "rule_id")
        with self.db.transaction() as session:
            ops.delete_rule(session, actor, rule_id, _version(expected_version))

    # --- tickets --------------------------------------------------------------------------------

    @rpc
    def get_queues(self, actor):
        with self.db.read() as session:
            return ops.queues_view(session, _actor(actor))

    @rpc
    def escalate_ticket(self, actor, ticket_id, data):
        actor, ticket_id, data = _actor(actor), _id(ticket_id, "ticket_id"), _load(_escalate_schema, data)
        return self.router.escalate(actor, ticket_id, data["reason"], data["to_tier"])

    @rpc
    def get_ticket_routing(self, actor, ticket_id):
        actor, ticket_id = _actor(actor), _id(ticket_id, "ticket_id")
        with self.db.read() as session:
            return ops.ticket_routing(session, actor, ticket_id)

    # --- events from tickets: one handler per type, each mirrors the snapshot ----------------

    def _mirror(self, session, envelope, created: bool = False, rules=None, new_rows=None, mirrored=None,
                decisions=None):
        """``created``, ``mirrored``: see ``ops.apply_snapshot``; a new row goes to ``new_rows``
        and a triage decision to ``decisions`` (the caller INSERTs them together), or they are
        written here. ``rules``: the enabled rules, if the caller read them already."""
        # not flushed here: the rules change a new row before it is written (one INSERT)
        row, change = ops.apply_snapshot(session, envelope["payload"]["ticket"], flush=False, created=created,
                                         mirrored=mirrored)
        after = AfterCommit(self.router.follow_up, row.ticket_id, change)
        if change is not None and change.state == domain.TRIAGE:
            triaged = self.router.triage_in(session, row, rules, decisions)
            if triaged is not None:
                after = AfterCommit(self.router.after_triage, row.ticket_id, triaged)
        if created and ops.is_unsaved(row):
            if new_rows is None:
                ops.insert_routed(session, [row])
            else:
                new_rows.append(row)
        return after

    # in batches: the busiest event type (one per ticket), and under load many arrive together.
    # No read-only pre-check: a ticket_created is nearly always new to routing (a redelivery is
    # caught by the handled-event mark, and its snapshot is then not newer anyway)
    @handles_events_in_batches(tickets_contract.SERVICE, tickets_contract.TICKET_CREATED,
                               known_stale=_snapshot_known_stale, payload_schema=tickets_contract.TicketCreatedPayload)
    def on_ticket_created(self, session, envelopes):
        # read once per batch: the rules, and which of the tickets routing mirrors already
        rules, new_rows, decisions = self.router.triage_rules(session), [], []
        with session.no_autoflush:
            mirrored = ops.mirrored_ids(session, {envelope["payload"]["ticket"]["id"] for envelope in envelopes})
        after = [self._mirror(session, envelope, created=True, rules=rules, new_rows=new_rows,
                              mirrored=envelope["payload"]["ticket"]["id"] in mirrored, decisions=decisions)
                 for envelope in _in_ticket_order(envelopes)]
        ops.insert_routed(session, new_rows)
        ops.insert_decisions(session, decisions)
        return after

    # the other ticket events in batches too: most of them echo routing's own assignments
    on_ticket_updated = _mirrored_in_batches("on_ticket_updated", tickets_contract.TICKET_UPDATED,
                                             tickets_contract.TicketUpdatedPayload)
    on_ticket_status_changed = _mirrored_in_batches("on_ticket_status_changed", tickets_contract.TICKET_STATUS_CHANGED,
                                                    tickets_contract.TicketStatusChangedPayload)
    on_ticket_assigned = _mirrored_in_batches("on_ticket_assigned", tickets_contract.TICKET_ASSIGNED,
                                              tickets_contract.TicketAssignedPayload)

    @handles_event_once(tickets_contract.SLA_SOURCE, tickets_contract.TICKET_SLA_UPDATED,
                        payload_schema=tickets_contract.TicketSlaUpdatedPayload)
    def on_ticket_sla_updated(self, session, envelope):
        payload = envelope["payload"]
        dues = [payload.get(k) for k in ("first_response_due_at", "resolution_due_at") if payload.get(k)]
        ops.set_sla_due(session, payload["ticket_id"], min(dues) if dues else None)

    @handles_event_once(contract.SLA_SOURCE, contract.SLA_BREACHED, payload_schema=contract.SlaBreachedPayload)
    def on_sla_breached(self, session, envelope):
        payload = envelope["payload"]
        return AfterCommit(self._escalate_on_breach, payload["ticket_id"], payload["target"])

    def _escalate_on_breach(self, ticket_id, target):
        try:
            self.router.escalate(SLA_ACTOR, ticket_id, f"SLA {target} target breached", trigger="sla_breach")
        except Exception as exc:  # at L3 already, closed, unknown: nothing to do
            log.info("no escalation of %s on SLA breach: %s", ticket_id, exc)

    # --- assignment: queued tickets to free agents, one round at a time -------------------------

    @dispatcher
    def dispatch(self, trigger):
        self.router.dispatch(trigger, next_wake=self.wake_dispatcher.next_wake)

    # --- the safety net -------------------------------------------------------------------------

    @timer(interval=ROUTING_SETTINGS.sweep_interval_seconds)
    def sweep(self):
        self.router.sweep()


