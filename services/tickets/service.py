"""nameko entrypoints of the tickets service. Each validates its input and calls operations."""

from nameko.constants import NON_PERSISTENT
from nameko.rpc import RpcProxy

from contracts import tickets as contract
import logging

from contracts.errors import UNAVAILABLE, HelpdeskError, ValidationError, error_payload
from servicekit.context import RequestContext
from servicekit.inputs import actor as _actor, expected_version as _version, load as _load
from servicekit.entrypoints import PriorityFirst, rpc
from servicekit.db import Database
from servicekit.events import handles_event_once
from servicekit.metrics import EntrypointMetrics
from servicekit.probes import ServiceProbes
from services.tickets import operations, schemas, store

_create_schema = schemas.CreateTicketSchema()
_update_schema = schemas.UpdateTicketSchema()
_assign_schema = schemas.AssignSchema()
_comment_schema = schemas.CommentSchema()
_list_schema = schemas.ListTicketsSchema()
_assignments_schema = contract.AssignmentRequest(many=True)
log = logging.getLogger(__name__)
_sla_schema = contract.TicketSlaUpdatedPayload


def _check_idempotency_key(key) -> None:
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 200):
        raise ValidationError("idempotency_key must be 1-200 characters",
                              {"idempotency_key": ["1-200 characters"]})


class _BatchAborted(Exception):
    """An assignment of a batch failed otherwise than by a refusal: the batch's transaction
    must not commit (``__cause__``: the failure)."""


def _abort_batch(exc: Exception):
    raise _BatchAborted() from exc


def _unavailable(exc: Exception) -> dict:
    return {"error": {"code": UNAVAILABLE, "detail": "not applied; try again later", "errors": {}}}


def _answer(apply, *args, unexpected=_unavailable, **kwargs) -> dict:
    """One assignment's answer: ``{"ticket": view}``, or its refusal as ``{"error": ...}``.
    Refusals (typed errors) are raised before the assignment writes anything. Any other failure
    goes to ``unexpected``; by default that assignment's own transaction rolled back and the
    others still get their answer."""
    item = args[-1]
    try:
        return {"ticket": apply(*args, **kwargs)}
    except HelpdeskError as exc:
        return {"error": error_payload(exc)}
    except Exception as exc:
        log.warning("assignment of %s failed: %r", item["ticket_id"], exc)
        return unexpected(exc)


class TicketsService(ServiceProbes):
    name = contract.SERVICE

    db = Database()
    metrics = EntrypointMetrics()
    request_id = RequestContext()
    self_rpc = RpcProxy(contract.SERVICE, delivery_mode=NON_PERSISTENT)
    priority_first = PriorityFirst()  # assign_tickets before the creates read ahead of it

    @rpc
    def create_ticket(self, actor, data, idempotency_key=None):
        actor, data = _actor(actor), _load(_create_schema, data)
        _check_idempotency_key(idempotency_key)
        with self.db.transaction() as session:
            ticket, replayed = operations.create_ticket(session, actor, data, idempotency_key)
        return {"ticket": ticket, "replayed": replayed}

    @rpc
    def get_ticket(self, actor, ticket_id):
        with self.db.read() as session:
            return operations.get_ticket(session, _actor(actor), ticket_id)

    @rpc
    def list_tickets(self, actor, filters=None):
        actor, filters = _actor(actor), _load(_list_schema, filters)
        with self.db.read() as session:
            return operations.list_tickets(session, actor, filters)

    @rpc
    def update_ticket(self, actor, ticket_id, changes, expected_version=None):
        actor, changes = _actor(actor), _load(_update_schema, changes)
        with self.db.transaction() as session:
            return operations.update_ticket(session, actor, ticket_id, changes, _version(expected_version))

    @rpc
    def assign_ticket(self, actor, ticket_id, assignee_id, group=None, expected_version=None):
        actor = _actor(actor)
        data = _load(_assign_schema, {"assignee_id": assignee_id, "group": group})
        with self.db.transaction() as session:
            return operations.assign_ticket(session, actor, ticket_id, data["assignee_id"], data["group"],
                                            _version(expected_version))

    # before the calls queued ahead of it (ticket creates, mostly): it is on the path from a new
    # ticket to its agent, and it is short (servicekit.entrypoints.PriorityLane)
    @rpc(priority=True)
    def assign_tickets(self, actor, assignments):
        """Many assignments in one call (routing delivers its batches so: one message and one
        worker instead of one per ticket). Each is applied exactly as ``assign_ticket`` or, when
        it carries other ``changes``, ``update_ticket`` would apply it; the answer lists, in
        order, ``{"ticket": view}`` or ``{"error": {code, detail, errors}}``.

        All of them in one transaction, the tickets locked up front: a commit and two SELECTs
        per assignment were most of the work. A refused assignment (its typed error) has
        written nothing when it is refused, so the others still commit. Any other failure
        rolls the whole batch back, and it is applied again one assignment per transaction,
        each then with its own answer."""
        actor = _actor(actor)
        if not isinstance(assignments, list) or not 1 <= len(assignments) <= contract.MAX_ASSIGNMENTS_PER_CALL:
            raise ValidationError(f"assignments must be a list of 1-{contract.MAX_ASSIGNMENTS_PER_CALL}",
                                  {"assignments": [f"1-{contract.MAX_ASSIGNMENTS_PER_CALL} items"]})
        items = _load(_assignments_schema, assignments)
        try:
            with self.db.transaction() as session:
                store.lock_tickets(session, [item["ticket_id"] for item in items])
                return [_answer(self._assign_one, session, actor, item, unexpected=_abort_batch) for item in items]
        except Exception as exc:  # nothing of the batch committed (the commit itself may have failed)
            log.warning("a batch of %d assignments failed (%r); applying them one at a time", len(items),
                        exc.__cause__ if isinstance(exc, _BatchAborted) else exc)
        return [_answer(self._assign_one_alone, actor, item) for item in items]

    def _assign_one_alone(self, actor, item):
        with self.db.transaction() as session:
            return self._assign_one(session, actor, item)

    @staticmethod
    def _assign_one(session, actor, item):
        if item["changes"] and {"assignee_id", "group", "status"} & set(item["changes"]):
            raise ValidationError("changes carry other fields than the assignment's own",
                                  {"changes": ["no assignee_id, group or status: the assignment sets those"]})
        if item["changes"]:
            fields = {**item["changes"], "assignee_id": item["assignee_id"]}
            if item["group"] is not None:  # as in assign_ticket, no group keeps the ticket's group
                fields["group"] = item["group"]
            changes = _load(_update_schema, fields)
            return operations.update_ticket(session, actor, item["ticket_id"], changes, item["expected_version"],
                                            only_if_unassigned=item["only_if_unassigned"])
        return operations.assign_ticket(session, actor, item["ticket_id"], item["assignee_id"], item["group"],
                                        item["expected_version"], only_if_unassigned=item["only_if_unassigned"])

    @rpc
    def unassign_ticket(self, actor, ticket_id, expected_version=None):
        return self.assign_ticket(actor, ticket_id, None, None, expected_version)

    @rpc
    def add_comment(self, actor, ticket_id, data, idempotency_key=None):
        actor, data = _actor(actor), _load(_comment_schema, data)
        _check_idempotency_key(idempotency_key)
        with self.db.transaction() as session:
            comment, replayed = operations.add_comment(session, actor, ticket_id, data["body"],
                                                       data["public"], idempotency_key)
        return {"comment": comment, "replayed": replayed}

    @rpc
    def list_comments(self, actor, ticket_id):
        with self.db.read() as session:
            return operations.list_comments(session, _actor(actor), ticket_id)

    @rpc
    def get_comment(self, actor, ticket_id, comment_id):
        with self.db.read() as session:
            return operations.get_comment(session, _actor(actor), ticket_id, comment_id)

    @rpc
    def get_history(self, actor, ticket_id):
        with self.db.read() as session:
            return operations.get_history(session, _actor(actor), ticket_id)

    @handles_event_once(contract.SLA_SOURCE, contract.TICKET_SLA_UPDATED, payload_schema=_sla_schema)
    def on_ticket_sla_updated(self, session, envelope):
        payload = envelope["payload"]
        operations.apply_sla_due_dates(session, payload["ticket_id"], payload)

