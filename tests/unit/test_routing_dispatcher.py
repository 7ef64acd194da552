"""The routing dispatcher (services/routing/dispatcher.py) in a real nameko container (it needs
no broker), and the event handler's in-memory staleness check (servicekit/events.py) that lets
routing ack the echoes of its own assignments without a worker."""
from unittest.mock import Mock

import eventlet
import pytest
from nameko.containers import ServiceContainer
from nameko.testing.utils import get_extension

from servicekit.events import ReliableEventHandler
from services.routing.dispatcher import DispatchRequests, DispatchSignal, dispatcher


class Recorder:
    name = "recorder"
    wake = DispatchRequests()
    rounds = []

    @dispatcher(poll_seconds=0.05)
    def dispatch(self, trigger):
        Recorder.rounds.append(trigger)
        eventlet.sleep(0.1)  # a round takes a while: wakes meanwhile are merged into one more


@pytest.fixture
def recorder():
    Recorder.rounds = []
    container = ServiceContainer(Recorder, {})
    container.start()
    yield container
    with eventlet.Timeout(2):  # stopping does not wait for a wake that never comes
        container.stop()


def test_wakes_while_a_round_runs_merge_into_one_more_round_with_the_most_telling_reason(recorder):
    signal = get_extension(recorder, DispatchSignal)
    signal.wake("created")
    eventlet.sleep(0.02)  # the first round is running
    for trigger in ("created", "capacity_freed", "agent_online"):
        signal.wake(trigger)
    eventlet.sleep(0.4)
    assert Recorder.rounds == ["created", "capacity_freed"]
    eventlet.sleep(0.2)
    assert len(Recorder.rounds) == 2, "no round without a wake"


def test_the_dependency_wakes_the_same_container(recorder):
    get_extension(recorder, DispatchRequests).get_dependency(Mock())("sweep")
    eventlet.sleep(0.2)
    assert Recorder.rounds == ["sweep"]


def _handler(check):
    handler = ReliableEventHandler("tickets", "ticket_updated", stale_without_worker=check)
    handler.container = Mock(service_name="routing")
    handler.method_name = "on_ticket_updated"
    handler.queue_consumer = Mock()
    handler._attempts = {}  # what setup() prepares
    return handler


def test_an_event_known_stale_in_memory_is_acked_without_a_worker():
    handler = _handler(lambda body: body["payload"]["ticket"]["version"] <= 3)
    message = Mock(headers={})
    handler.handle_message({"payload": {"ticket": {"version": 2}}}, message)
    handler.queue_consumer.ack_message.assert_called_once_with(message)
    handler.container.spawn_worker.assert_not_called()


def test_a_retry_that_became_stale_is_acked_and_forgets_its_attempts():
    handler = _handler(lambda body: body["payload"]["ticket"]["version"] <= 3)
    message = Mock(headers={})
    handler._attempts[id(message)] = 2  # failed twice, retry scheduled; the ticket moved on meanwhile
    handler.handle_message({"payload": {"ticket": {"version": 3}}}, message)
    handler.queue_consumer.ack_message.assert_called_once_with(message)
    assert handler._attempts == {}


def test_an_event_not_known_stale_or_unreadable_goes_to_a_worker():
    handler = _handler(lambda body: body["payload"]["ticket"]["version"] <= 3)
    for body in ({"payload": {"ticket": {"version": 4}}}, {"payload": "not a dict"}, {}):
        handler.handle_message(body, Mock(headers={}))
    assert handler.container.spawn_worker.call_count == 3
    handler.queue_consumer.ack_message.assert_not_called()


def test_merged_wakes_keep_the_most_telling_reason():
    signal = DispatchSignal()
    signal.setup()
    for trigger in ("sweep", "created", "capacity_freed", "created", "sweep"):
        signal.wake(trigger)
    assert signal.wait(0.1) == "capacity_freed"
    assert signal.wait(0.01) is None  # merged: one round
    signal.wake("sweep")
    assert signal.wait(0.1) == "sweep"
