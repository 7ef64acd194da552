"""The dispatcher: one worker at a time routes what is queued, woken by the changes that may
have made something routable.

Ticket event handlers only mirror the change and queue the ticket; they wake the dispatcher
and return. Tickets arriving while a dispatch round runs are taken together by the next one,
so under load routing reads the agents and the queue once, and claims and confirms a batch of
tickets in one transaction each, instead of once per ticket.

    class RoutingService:
        wake_dispatcher = DispatchRequests()

        @dispatcher
        def dispatch(self, trigger): ...

``wake_dispatcher(trigger)`` never blocks; wakes while a round runs are merged into one more
round. A lost wake costs at most the sweeper's interval: the sweeper dispatches too.
"""
import logging

import eventlet
from eventlet.event import Event
from eventlet.queue import Empty, LightQueue
from nameko.extensions import DependencyProvider, Entrypoint, SharedExtension

log = logging.getLogger(__name__)

DEFAULT_TRIGGER = "sweep"
# why a dispatch runs when several wakes were merged: the most telling reason (it is recorded on
# the decisions of tickets that had been waiting); a slot that freed beats a new ticket, which
# beats the sweeper's routine wake
_TRIGGER_RANK = {"capacity_freed": 3, "agent_online": 3, "created": 1, DEFAULT_TRIGGER: 0}


class DispatchSignal(SharedExtension):
    """The wake-up shared by the entrypoint and the dependency of one container."""

    def setup(self):
        self._wakes = LightQueue(maxsize=1)
        self._trigger = None
        self.stopping = False

    def wake(self, trigger: str = DEFAULT_TRIGGER) -> None:
        if self._trigger is None or _TRIGGER_RANK.get(trigger, 2) > _TRIGGER_RANK.get(self._trigger, 2):
            self._trigger = trigger
        try:
            self._wakes.put_nowait(None)
        except Exception:  # Full: a round is already due, it will see this change too
            pass

    def wait(self, timeout: float) -> str | None:
        """The trigger of the next round, or None if nothing woke it within ``timeout``."""
        try:
            self._wakes.get(timeout=timeout)
        except Empty:
            return None
        trigger, self._trigger = self._trigger or DEFAULT_TRIGGER, None
        return trigger

    def next_wake(self, timeout: float) -> str | None:
        """For the round in progress: a wake that came while it waits for its deliveries is
        taken by it (its trigger), so that it claims what was queued meanwhile at once rather
        than after its last delivery. None after ``timeout`` without one, or once the container
        stops (the round then ends and the loop sees the stop)."""
        if self.stopping:
            eventlet.sleep(timeout)
            return None
        return self.wait(timeout)


class Dispatcher(Entrypoint):
    """Runs the decorated method (``trigger`` as its argument) in a worker each time the
    service is woken, never two at once."""

    signal = DispatchSignal()

    def __init__(self, poll_seconds: float = 1.0, **kwargs):
        # how often the loop looks at its stop flag while nobody wakes it
        self.poll_seconds = poll_seconds
        self.gt = None
        self._stopping = False
        super().__init__(**kwargs)

    def start(self):
        self.gt = self.container.spawn_managed_thread(self._run, identifier="routing_dispatcher")

    def stop(self):
        self._stopping = self.signal.stopping = True
        self.signal.wake()
        if self.gt is not None:
            self.gt.wait()

    def kill(self):
        if self.gt is not None:
            self.gt.kill()

    def _run(self):
        while not self._stopping:
            trigger = self.signal.wait(self.poll_seconds)
            if trigger is None or self._stopping:
                continue
            round_over = Event()

            def over(*_):
                if not round_over.ready():
                    round_over.send()

            def handle_result(worker_ctx, result, exc_info):
                # a failed round is logged by the container; the next wake or the sweeper tries again
                over()
                return result, exc_info

            worker_ctx = self.container.spawn_worker(self, (trigger,), {}, handle_result=handle_result)
            # a worker killed by a BaseException never reaches handle_result: the end of its
            # thread releases the loop too (nameko keeps the thread in _worker_threads)
            thread = getattr(self.container, "_worker_threads", {}).get(worker_ctx)
            if thread is not None:
                thread.link(over)
            round_over.wait()


class DispatchRequests(DependencyProvider):
    """``self.wake_dispatcher(trigger)`` in a service: ask for a dispatch round soon."""

    signal = DispatchSignal()

    def get_dependency(self, worker_ctx):
        return _Wake(self.signal)


class _Wake:
    """``wake(trigger)``: ask for a round; ``wake.next_wake(timeout)``: for the dispatch round
    itself, take a wake that came while it waits (see DispatchSignal.next_wake)."""

    def __init__(self, signal: DispatchSignal):
        self._signal = signal
        self.next_wake = signal.next_wake

    def __call__(self, trigger: str = DEFAULT_TRIGGER) -> None:
        self._signal.wake(trigger)


dispatcher = Dispatcher.decorator
