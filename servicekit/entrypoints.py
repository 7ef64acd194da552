"""Entrypoint decorators with our defaults.

RPC replies are transient and published without publisher confirms (nameko's default is
persistent and confirmed). A caller whose broker restarts loses its connection and its reply
queue anyway, so a persisted reply only serves a caller that is gone; a reply lost to a broker
failure surfaces as the caller's timeout, exactly like a lost connection. Events are not
affected: they stay persistent and confirmed through the outbox (``servicekit.outbox``).
"""
import sys
import time
from collections import deque

import eventlet
import kombu.serialization
from eventlet.event import Event
from kombu import Connection
from kombu.pools import producers
from nameko.constants import (
    AMQP_SSL_CONFIG_KEY, AMQP_URI_CONFIG_KEY, DEFAULT_RETRY_POLICY, DEFAULT_TRANSPORT_OPTIONS,
    LOGIN_METHOD_CONFIG_KEY, NON_PERSISTENT,
)
from nameko.containers import ContainerBeingKilled
from nameko.exceptions import MalformedRequest, UnserializableValueError, serialize
from nameko.extensions import DependencyProvider, SharedExtension
from nameko.messaging import QueueConsumer
from nameko.rpc import Rpc as _NamekoRpc, RpcConsumer as _NamekoRpcConsumer, get_rpc_exchange

from contracts.errors import TYPED_ERRORS


class ReplyPublisher:
    """Publishes RPC replies: transient, no confirms, serialized once.

    nameko's ``Responder`` builds a ``Publisher`` per reply, serializes the result twice (a
    ``dumps`` check, then the publish) and waits for a broker confirm of a persistent message.
    """

    def __init__(self, config):
        self.exchange = get_rpc_exchange(config)
        transport_options = DEFAULT_TRANSPORT_OPTIONS.copy()
        transport_options["confirm_publish"] = False
        # built once: the producer pool is keyed by the connection's parameters
        self.connection = Connection(
            config[AMQP_URI_CONFIG_KEY], transport_options=transport_options,
            ssl=config.get(AMQP_SSL_CONFIG_KEY), login_method=config.get(LOGIN_METHOD_CONFIG_KEY))

    def send_response(self, message, result, exc_info):
        """Same contract as ``nameko.rpc.Responder.send_response``: returns (result, exc_info),
        an unserializable result becoming an ``UnserializableValueError`` reply."""
        error = serialize(exc_info[1]) if exc_info is not None else None
        # reply encoded the same way as the request
        serializer = kombu.serialization.registry.type_to_name[message.properties["content_type"]]
        try:
            content_type, encoding, body = kombu.serialization.dumps(
                {"result": result, "error": error}, serializer)
        except Exception:
            exc_info = sys.exc_info()
            # guaranteed to serialize
            error = serialize(UnserializableValueError(result))
            result = None
            content_type, encoding, body = kombu.serialization.dumps(
                {"result": result, "error": error}, serializer)

        with producers[self.connection].acquire(block=True) as producer:
            producer.publish(
                body, content_type=content_type, content_encoding=encoding,
                exchange=self.exchange, routing_key=message.properties["reply_to"],
                correlation_id=message.properties.get("correlation_id"),
                delivery_mode=NON_PERSISTENT, headers={},
                retry=True, retry_policy=DEFAULT_RETRY_POLICY,
            )
        return result, exc_info


class PriorityLane(SharedExtension):
    """Calls of ``@rpc(priority=True)`` methods go before the other calls of their service.

    A service's calls share one queue, first come first served: a call waits behind every one
    that arrived before it, at the broker, for a worker, and for the CPU (routing's
    assignments behind ten ticket creates, at 10 creators: tens of milliseconds on the path
    from a new ticket to its agent). In a service with priority methods:

    * a priority call is counted the moment its message is read off the connection, and
      ``PRIORITY_SLOTS`` of the ``max_workers`` are kept for priority calls, so it never waits
      for a worker; the service reads ``max_workers`` plain calls more than it can run, so a
      priority call waits at the broker only behind more plain calls than that;
    * a plain call takes one of the other slots before it starts, and while a priority call
      is pending it waits: it starts after the priority calls read so far, even those read
      after it. Calls already running go on (nothing pre-empts them).

    * plain calls admitted before a priority call was read, whose workers have not started yet
      (each waits for the CPU behind the others, a few milliseconds each), wait for it too at
      their start: the service declares ``PriorityFirst``, which holds them there.

    A plain call waits for a pending priority call ``MAX_WAIT_SECONDS`` at most, so a stream of
    priority calls cannot starve the others. A service without priority methods is unchanged."""

    PRIORITY_SLOTS = 2
    MAX_WAIT_SECONDS = 0.5

    def setup(self):
        self.pending = 0  # priority calls read and not answered
        self._pending_since = 0.0
        self.plain_running = 0
        self._turns = deque()  # plain calls waiting for a slot, in the order they were read
        self._counted = set()  # id() of the deliveries counted and not handed to their worker yet
        self._enabled = None
        self._stopping = False
        self._released = Event()  # sent (and replaced) when plain workers held at their start may go
        self._holding = 0

    def enabled(self) -> bool:
        """Whether this container has a priority method (asked once the entrypoints exist)."""
        if self._enabled is None:
            self._enabled = any(getattr(e, "priority", False) for e in self.container.entrypoints)
        return self._enabled

    def plain_slots(self) -> int:
        return max(1, self.container.max_workers - self.PRIORITY_SLOTS)

    def arrived(self, message) -> None:
        if self.pending == 0:
            self._pending_since = time.monotonic()
            # plain calls are held back this long at most, however many priority calls follow
            eventlet.spawn_after(self.MAX_WAIT_SECONDS, self._grant)
        self.pending += 1
        self._counted.add(id(message))

    def counted(self, message) -> bool:
        """Whether this delivery was counted on arrival (asked once, by its entrypoint)."""
        if id(message) in self._counted:
            self._counted.discard(id(message))
            return True
        return False

    def done(self) -> None:
        self.pending = max(0, self.pending - 1)
        self._grant()

    def _held_back(self) -> bool:
        return bool(self.pending) and time.monotonic() - self._pending_since < self.MAX_WAIT_SECONDS

    def _grant(self) -> None:
        """Free plain slots to the plain calls waiting, first read first."""
        while self._turns and self.plain_running < self.plain_slots() and not self._held_back():
            self.plain_running += 1
            self._turns.popleft().send(True)
        if self._holding and not self._held_back():
            released, self._released = self._released, Event()
            released.send()

    def wait_behind_priority(self) -> None:
        """A plain call's worker about to run its method (see ``PriorityFirst``): while a
        priority call is pending, it waits too, at most until ``MAX_WAIT_SECONDS`` after the
        first of those pending when it began to wait: a priority call read after another was
        answered (routing sends batch after batch) may hold it again, never past that."""
        if not self._held_back():
            return
        deadline = self._pending_since + self.MAX_WAIT_SECONDS
        while self._held_back() and time.monotonic() < deadline:
            self._holding += 1
            try:
                with eventlet.Timeout(deadline - time.monotonic(), False):
                    self._released.wait()
            finally:
                self._holding -= 1

    def admit_plain(self) -> bool:
        """Before a plain call takes a worker: wait for a plain slot, and while a priority call
        is pending; then hold the slot until ``plain_done``. False once the service stops:
        the call is not started (its caller requeues it for another instance)."""
        if self._stopping:
            return False
        if not self._turns and self.plain_running < self.plain_slots() and not self._held_back():
            self.plain_running += 1
            return True
        turn = Event()
        self._turns.append(turn)
        try:
            admitted = turn.wait()
            if admitted and self._stopping:  # given its slot just before the stop: not started
                self.plain_done()
                return False
            return admitted
        except BaseException:  # killed while waiting: its turn (and a slot it was given) goes on
            if turn.ready():
                if turn.wait():
                    self.plain_done()
            else:
                self._turns.remove(turn)
            raise

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop_admitting(self) -> None:
        """The service is stopping: plain calls still waiting are not started (nameko waits
        only for workers, so one admitted now would run while the service's dependencies stop
        and its ack could be lost: it would run twice)."""
        self._stopping = True
        while self._turns:
            self._turns.popleft().send(False)

    def plain_done(self) -> None:
        self.plain_running -= 1
        self._grant()


class LaneQueueConsumer(QueueConsumer):
    """The RPC queue's consumer: counts a priority call as it is read, before the thread that
    hands it to its worker (which runs after the threads of the calls that came before it)."""

    lane = PriorityLane()

    @property
    def prefetch_count(self):
        # a priority call overtakes only the plain calls the service has read: with priority
        # methods it reads up to max_workers more than it can run (and its own slots' worth),
        # so that one waits at the broker only behind that many plain calls
        if not self.lane.enabled():
            return self.container.max_workers
        return 2 * self.container.max_workers + self.lane.PRIORITY_SLOTS

    def handle_message(self, provider, body, message):
        try:
            method = provider.get_provider_for_method(message.delivery_info["routing_key"])
        except Exception:  # an unknown method: answered with an error by the provider
            method = None
        if getattr(method, "priority", False):
            self.lane.arrived(message)
        super().handle_message(provider, body, message)


class RpcConsumer(_NamekoRpcConsumer):
    """nameko's RPC consumer, replying through a ``ReplyPublisher``."""

    queue_consumer = LaneQueueConsumer()
    reply_publisher = None

    def setup(self):
        super().setup()
        self.reply_publisher = ReplyPublisher(self.container.config)

    def handle_result(self, message, result, exc_info):
        result, exc_info = self.reply_publisher.send_response(message, result, exc_info)
        self.queue_consumer.ack_message(message)
        return result, exc_info


class PriorityFirst(DependencyProvider):
    """Declared by a service with ``@rpc(priority=True)`` methods (``priority_first =
    PriorityFirst()``): before a plain call's worker runs its method, it waits while a priority
    call is pending (``PriorityLane.wait_behind_priority``). Without it, the plain calls already
    admitted when a priority call is read (their workers scheduled, not started) all run before
    it: at 10 creators in tickets, up to eight creates, 17 ms at the median and 58 ms at the 99th
    percentile between an assignment batch being read and its worker starting."""

    lane = PriorityLane()

    def worker_setup(self, worker_ctx):
        entrypoint = worker_ctx.entrypoint
        if isinstance(entrypoint, Rpc) and not entrypoint.priority and self.lane.enabled():
            worker_ctx.held_from = time.perf_counter()  # the call's duration counts the hold (EntrypointMetrics)
            self.lane.wait_behind_priority()


class Rpc(_NamekoRpc):
    rpc_consumer = RpcConsumer()
    lane = PriorityLane()

    def __init__(self, *args, priority: bool = False, **kwargs):
        self.priority = priority
        super().__init__(*args, **kwargs)

    def setup(self):
        super().setup()
        if self.priority and not any(isinstance(d, PriorityFirst) for d in self.container.dependencies):
            raise TypeError(f"{self.container.service_name}.{self.method_name} is a priority method: "
                            "the service must declare a PriorityFirst() dependency")

    def stop(self):
        self.lane.stop_admitting()
        super().stop()

    def handle_message(self, body, message):
        priority = self.lane.counted(message)
        if not priority and not self.lane.enabled():
            super().handle_message(body, message)
            return
        if priority and self.lane.stopping:  # read before the consumer stopped: for another instance
            self.lane.done()
            self.rpc_consumer.requeue_message(message)
            return
        if not priority and not self.lane.admit_plain():
            self.rpc_consumer.requeue_message(message)  # stopping: another instance takes it
            return
        # the lane is left once, whichever way the call ends: answered, refused before its
        # worker started (a malformed request), requeued, or its worker killed
        left = []

        def leave(*_):
            if not left:
                left.append(True)
                if priority:
                    self.lane.done()
                else:
                    self.lane.plain_done()

        try:
            # a priority call is done once answered; a plain one frees its slot when its
            # worker has ended (the pool's slot with it)
            worker_ctx = self._spawn(body, message, leave if priority else None)
        except BaseException:
            leave()
            raise
        if worker_ctx is None:
            leave()
            return
        thread = getattr(self.container, "_worker_threads", {}).get(worker_ctx)
        if thread is not None:
            thread.link(leave)

    def _spawn(self, body, message, on_answer):
        """nameko's ``Rpc.handle_message``, calling ``on_answer`` (if any) once the answer is
        sent; the worker's context, or None if the container is being killed (the call is
        requeued)."""
        try:
            args, kwargs = body["args"], body["kwargs"]
        except KeyError:
            raise MalformedRequest("Message missing `args` or `kwargs`")
        self.check_signature(args, kwargs)

        def handle_result(worker_ctx, result, exc_info):
            try:
                return self.handle_result(message, worker_ctx, result, exc_info)
            finally:
                if on_answer is not None:
                    on_answer()

        try:
            return self.container.spawn_worker(self, args, kwargs, context_data=self.unpack_message_headers(message),
                                               handle_result=handle_result)
        except ContainerBeingKilled:
            self.rpc_consumer.requeue_message(message)
            return None


def rpc(fn=None, **options):
    """``@rpc`` whose typed domain errors are answers, not crashes, and whose replies are
    transient (see the module docstring). ``@rpc(priority=True)``: see ``PriorityLane``.

    nameko logs exceptions listed in ``expected_exceptions`` as expected instead of as
    worker errors. Usable as ``@rpc`` or ``@rpc(...)``.
    """
    options.setdefault("expected_exceptions", TYPED_ERRORS)
    if fn is None:
        return Rpc.decorator(**options)
    return Rpc.decorator(**options)(fn)
