"""Prometheus metrics: RED for every entrypoint (RPC, event handler, HTTP route) and the outbox.

``EntrypointMetrics`` is a dependency provider: declare it on a service and every worker is
counted and timed without touching entrypoint code. ``/metrics`` is served by each service's
own ``@http`` route through ``metrics_response``.
"""
import time

from nameko.events import EventHandler
from nameko.extensions import DependencyProvider
from nameko.rpc import Rpc
from nameko.web.handlers import HttpRequestHandler
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from werkzeug.wrappers import Response

from contracts.errors import HelpdeskError

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

RPC_REQUESTS = Counter("helpdesk_rpc_requests_total", "RPC calls handled",
                       ["service", "method", "outcome"])
RPC_DURATION = Histogram("helpdesk_rpc_duration_seconds", "RPC handling time",
                         ["service", "method"], buckets=LATENCY_BUCKETS)
EVENT_REQUESTS = Counter("helpdesk_event_requests_total", "Event deliveries handled",
                         ["service", "method", "outcome"])
EVENT_DURATION = Histogram("helpdesk_event_duration_seconds", "Event handling time (a batching handler's: per batch)",
                           ["service", "method"], buckets=LATENCY_BUCKETS)
EVENT_BATCH_SIZE = Histogram("helpdesk_event_batch_size", "Events handled together by a batching event handler",
                             ["service", "method"], buckets=(1, 2, 5, 10, 20, 50, 100))
HTTP_REQUESTS = Counter("helpdesk_http_requests_total", "HTTP requests served",
                        ["service", "route", "verb", "status_class"])
HTTP_DURATION = Histogram("helpdesk_http_duration_seconds", "HTTP request time",
                          ["service", "route", "verb"], buckets=LATENCY_BUCKETS)

EVENTS_DEAD_LETTERED = Counter("helpdesk_events_dead_lettered_total",
                               "Event deliveries parked in a dead-letter queue after the last retry",
                               ["service", "method"])
EVENTS_DUPLICATE = Counter("helpdesk_events_duplicate_total",
                           "Redelivered events skipped because their event_id was handled",
                           ["service", "method"])
EVENTS_SUPERSEDED = Counter("helpdesk_events_superseded_total",
                            "Events acked without effect because the service already holds newer state",
                            ["service", "method"])
OUTBOX_PUBLISHED = Counter("helpdesk_outbox_published_total", "Outbox events published", ["service"])
OUTBOX_PUBLISH_FAILURES = Counter("helpdesk_outbox_publish_failures_total",
                                  "Outbox relay attempts that failed (broker or database down)",
                                  ["service"])
OUTBOX_PENDING = Gauge("helpdesk_outbox_pending_events", "Outbox events not yet published", ["service"])
OUTBOX_LAG = Gauge("helpdesk_outbox_lag_seconds", "Age of the oldest unpublished outbox event",
                   ["service"])


def outcome_of(exc_info) -> str:
    if exc_info is None:
        return "success"
    exc = exc_info[1]
    if isinstance(exc, HelpdeskError):
        return exc.code  # a small, known set
    return "error"


def _status_of(result) -> int:
    status = getattr(result, "status_code", None)
    if status is None and isinstance(result, tuple):
        status = result[0]
    return int(status or 200)


class EntrypointMetrics(DependencyProvider):
    def setup(self):
        self.service = self.container.service_name
        self._started = {}

    def worker_setup(self, worker_ctx):
        self._started[worker_ctx] = time.perf_counter()

    def worker_result(self, worker_ctx, result=None, exc_info=None):
        started = self._started.pop(worker_ctx, None)
        if started is None:
            return
        # a call held behind a priority call (servicekit.entrypoints.PriorityFirst) counts the
        # hold, whichever of the two dependencies' worker_setup ran first
        started = min(started, getattr(worker_ctx, "held_from", started))
        elapsed = time.perf_counter() - started
        entrypoint = worker_ctx.entrypoint
        name = entrypoint.method_name
        if isinstance(entrypoint, Rpc):
            RPC_REQUESTS.labels(self.service, name, outcome_of(exc_info)).inc()
            RPC_DURATION.labels(self.service, name).observe(elapsed)
        elif isinstance(entrypoint, EventHandler) and getattr(entrypoint, "max_batch", None) and exc_info is None \
                and isinstance(result, list):
            # a batch (servicekit.events.BatchingEventHandler): each event with its own outcome,
            # the batch's time once, and its size
            for failure in result:
                EVENT_REQUESTS.labels(self.service, name, outcome_of(
                    None if failure is None else (type(failure), failure, None))).inc()
            EVENT_DURATION.labels(self.service, name).observe(elapsed)
            EVENT_BATCH_SIZE.labels(self.service, name).observe(len(result))
        elif isinstance(entrypoint, EventHandler):
            EVENT_REQUESTS.labels(self.service, name, outcome_of(exc_info)).inc()
            EVENT_DURATION.labels(self.service, name).observe(elapsed)
        elif isinstance(entrypoint, HttpRequestHandler):
            status = 500 if exc_info else _status_of(result)
            HTTP_REQUESTS.labels(self.service, entrypoint.url, entrypoint.method,
                                 f"{status // 100}xx").inc()
            HTTP_DURATION.labels(self.service, entrypoint.url, entrypoint.method).observe(elapsed)

    def worker_teardown(self, worker_ctx):
        self._started.pop(worker_ctx, None)


def metrics_response() -> Response:
    return Response(generate_latest(), status=200, content_type=CONTENT_TYPE_LATEST)
