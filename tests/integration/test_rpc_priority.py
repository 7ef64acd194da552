"""``@rpc(priority=True)`` on a real broker: a priority call read off the connection goes before
the plain calls that have not started yet, even those sent before it, and never waits for a
worker; a plain call is never held for long, and a priority call that fails before its
worker starts releases the lane.
"""
import time

import eventlet
import pytest
from nameko.exceptions import IncorrectSignature

from servicekit.entrypoints import PriorityFirst, PriorityLane, rpc
from tests.integration.conftest import ServiceHarness, harness_factory, wait_for

pytestmark = pytest.mark.integration

started = []  # the calls' names, in the order their workers started
release_blocker = eventlet.event.Event()


class LaneProbeService:
    name = "laneprobe"
    priority_first = PriorityFirst()

    @rpc
    def plain(self, name, block=False):
        started.append(name)
        if block:
            release_blocker.wait()
        return name

    @rpc(priority=True)
    def urgent(self, name):
        started.append(name)
        return name


class LaneProbe(ServiceHarness):
    service = "laneprobe"

    def service_class(self):
        return LaneProbeService


@pytest.fixture
def probe(vhost):
    global release_blocker
    started.clear()
    release_blocker = eventlet.event.Event()
    # 3 workers: 1 for plain calls, the PriorityLane's 2 for priority calls
    with harness_factory(lambda **overrides: LaneProbe(vhost, "sqlite://", **overrides)) as make:
        yield make(max_workers=3).start()


def test_a_priority_call_starts_before_plain_calls_sent_before_it(probe, rpc_factory):
    with rpc_factory(timeout=10) as cluster:
        blocker = cluster.laneprobe.plain.call_async("blocker", block=True)  # holds the plain slot
        wait_for(lambda: started == ["blocker"], message="the blocking call to start")
        plain = [cluster.laneprobe.plain.call_async(f"plain-{i}") for i in range(5)]
        eventlet.sleep(0.1)  # read, and waiting for the plain slot
        assert cluster.laneprobe.urgent("urgent") == "urgent"  # answered while the slot is held
        assert started == ["blocker", "urgent"]
        release_blocker.send()
        assert [call.result() for call in [blocker, *plain]] == ["blocker", *[f"plain-{i}" for i in range(5)]]
    assert started == ["blocker", "urgent", *[f"plain-{i}" for i in range(5)]]


def test_plain_calls_read_after_a_priority_call_start_after_it(probe, rpc_factory):
    with rpc_factory(timeout=10) as cluster:
        blocker = cluster.laneprobe.plain.call_async("blocker", block=True)
        wait_for(lambda: started == ["blocker"], message="the blocking call to start")
        urgent = cluster.laneprobe.urgent.call_async("urgent")
        plain = cluster.laneprobe.plain.call_async("plain")
        release_blocker.send()
        assert (blocker.result(), urgent.result(), plain.result()) == ("blocker", "urgent", "plain")
    assert started == ["blocker", "urgent", "plain"]


def test_a_priority_call_refused_before_its_worker_starts_releases_the_lane(probe, rpc_factory):
    with rpc_factory(timeout=10) as cluster:
        with pytest.raises(IncorrectSignature):
            cluster.laneprobe.urgent("too", "many", "arguments")
        began = time.perf_counter()
        assert cluster.laneprobe.plain("after") == "after"
        assert time.perf_counter() - began < PriorityLane.MAX_WAIT_SECONDS / 2  # not held by a stale count
    assert started == ["after"]


def test_plain_calls_wait_for_a_stuck_priority_call_only_so_long(probe, rpc_factory):
    lane = next(e for e in probe.container.subextensions if isinstance(e, PriorityLane))
    lane.arrived(object())  # never answered: say its worker hung
    began = time.perf_counter()
    with rpc_factory(timeout=10) as cluster:
        assert [cluster.laneprobe.plain.call_async(f"plain-{i}") for i in range(3)][-1].result() == "plain-2"
    assert PriorityLane.MAX_WAIT_SECONDS <= time.perf_counter() - began < PriorityLane.MAX_WAIT_SECONDS + 1
    assert started == ["plain-0", "plain-1", "plain-2"]


def test_plain_calls_waiting_when_the_service_stops_run_once_on_the_next_instance(vhost, rpc_factory):
    global release_blocker
    started.clear()
    release_blocker = eventlet.event.Event()
    with harness_factory(lambda **overrides: LaneProbe(vhost, "sqlite://", **overrides)) as make:
        first = make(max_workers=3).start()
        with rpc_factory(timeout=15) as cluster:
            blocker = cluster.laneprobe.plain.call_async("blocker", block=True)
            wait_for(lambda: started == ["blocker"], message="the blocking call to start")
            waiting = [cluster.laneprobe.plain.call_async(f"plain-{i}") for i in range(2)]
            eventlet.sleep(0.1)  # read, and waiting for the plain slot
            stopping = eventlet.spawn(first.stop)
            eventlet.sleep(0.1)  # the entrypoints have stopped; the blocker's worker still runs
            release_blocker.send()
            stopping.wait()
            assert started == ["blocker"], "a waiting call ran while its service stopped"
            make(max_workers=3).start()
            assert [call.result() for call in [blocker, *waiting]] == ["blocker", "plain-0", "plain-1"]
    # the blocker may run again there: a call running while its service stops is not acked
    # (nameko's own behaviour, see NAMEKO-NOTES); the waiting ones ran once, on the new instance
    assert [name for name in started if name != "blocker"] == ["plain-0", "plain-1"]
