"""``PriorityFirst``: a plain call's worker that was admitted before a priority call was read
waits for it at its start, for at most ``MAX_WAIT_SECONDS``; nothing else is held.

No broker: the lane and the dependency are driven as nameko would (``tests/integration/
test_rpc_priority.py`` runs the lane on a real one).
"""
from types import SimpleNamespace

import eventlet
import pytest
from nameko.containers import ServiceContainer

from servicekit.entrypoints import PriorityFirst, PriorityLane, Rpc, rpc


def _lane(max_wait: float = PriorityLane.MAX_WAIT_SECONDS) -> PriorityLane:
    lane = PriorityLane()
    lane.container = SimpleNamespace(max_workers=10, entrypoints=[SimpleNamespace(priority=True)])
    lane.MAX_WAIT_SECONDS = max_wait
    lane.setup()
    return lane


def _gate(lane: PriorityLane) -> PriorityFirst:
    gate = PriorityFirst()
    gate.lane = lane
    return gate


def _worker(priority: bool | None):
    """A worker context of an RPC entrypoint (``priority`` True/False) or, with None, of
    another kind of entrypoint (an event handler, a timer)."""
    if priority is None:
        return SimpleNamespace(entrypoint=SimpleNamespace(method_name="on_event"))
    entrypoint = object.__new__(Rpc)
    entrypoint.priority = priority
    return SimpleNamespace(entrypoint=entrypoint)


def _start(gate: PriorityFirst, worker_ctx):
    """The worker's start in its own green thread; returns it (``dead`` once it went on)."""
    thread = eventlet.spawn(gate.worker_setup, worker_ctx)
    eventlet.sleep(0.01)
    return thread


def test_a_plain_worker_starts_at_once_when_no_priority_call_is_pending():
    lane = _lane()
    assert _start(_gate(lane), _worker(priority=False)).dead


def test_a_plain_worker_admitted_before_a_priority_call_was_read_waits_for_its_answer():
    lane = _lane()
    gate = _gate(lane)
    assert lane.admit_plain()  # admitted: its worker is scheduled, not started
    lane.arrived(object())  # then the priority call is read
    plain = _start(gate, _worker(priority=False))
    assert not plain.dead, "the plain worker ran before the priority call"
    assert _start(gate, _worker(priority=True)).dead, "the priority worker itself was held"
    lane.done()  # answered
    eventlet.sleep(0.01)
    assert plain.dead


def test_a_plain_worker_waits_for_every_pending_priority_call():
    lane = _lane()
    gate = _gate(lane)
    lane.arrived(object())
    lane.arrived(object())
    plain = _start(gate, _worker(priority=False))
    lane.done()
    eventlet.sleep(0.01)
    assert not plain.dead
    lane.done()
    eventlet.sleep(0.01)
    assert plain.dead


def test_a_plain_worker_is_held_at_most_max_wait_seconds():
    lane = _lane(max_wait=0.1)
    lane.arrived(object())  # never answered: say its worker hung
    began = eventlet.hubs.get_hub().clock()
    plain = _start(_gate(lane), _worker(priority=False))
    plain.wait()
    assert 0.08 <= eventlet.hubs.get_hub().clock() - began < 0.5


def test_back_to_back_priority_calls_hold_a_plain_worker_no_longer_than_max_wait_seconds():
    lane = _lane(max_wait=0.1)
    lane.arrived(object())
    began = eventlet.hubs.get_hub().clock()
    plain = _start(_gate(lane), _worker(priority=False))
    for _ in range(10):  # each answered, and the next one read before the held worker runs again
        eventlet.sleep(0.05)
        lane.done()
        lane.arrived(object())
        if plain.dead:
            break
    assert plain.dead
    assert eventlet.hubs.get_hub().clock() - began < 0.25


def test_workers_of_other_entrypoints_are_never_held():
    lane = _lane()
    lane.arrived(object())
    assert _start(_gate(lane), _worker(priority=None)).dead


def test_a_service_with_a_priority_method_and_no_priority_first_does_not_start():
    class Forgetful:
        name = "forgetful"

        @rpc(priority=True)
        def urgent(self):
            return None

    container = ServiceContainer(Forgetful, {"AMQP_URI": "memory://"})
    with pytest.raises(TypeError, match="PriorityFirst"):
        container.start()
