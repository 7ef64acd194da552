"""Events handled in batches (``servicekit.events.handles_events_in_batches``) on a real broker:
what arrives while a batch runs is taken by the next one, each event has one effect whatever
its batch did, and a bad event is retried or parked on its own, never at the others' cost.

A probe service stands in for routing: its handler writes one outbox row per event (the
effect the tests count) and fails on the events the test marks as poisonous.
"""
import eventlet
import pytest
from kombu import Exchange, Queue
from sqlalchemy import select

from contracts.events import make_envelope
from servicekit.db import Database
from servicekit.events import handles_events_in_batches
from servicekit.metrics import EntrypointMetrics
from servicekit.outbox import add_event
from servicekit.probes import ServiceProbes
from servicekit.tables import HANDLED_EVENTS, OUTBOX
from tests.integration.conftest import ServiceHarness, harness_factory, wait_for

pytestmark = pytest.mark.integration

SOURCE, EVENT_TYPE, HANDLER = "probe_source", "probe_happened", "on_probe"
QUEUE = f"evt-{SOURCE}-{EVENT_TYPE}--batchprobe.{HANDLER}"
DLQ = Queue(f"dlq.{QUEUE}", exchange=Exchange("helpdesk.dead-letter", type="direct", durable=True),
            routing_key=f"dlq.{QUEUE}", durable=True)

batches = []  # the event ids of every batch the handler was given, in order
hold_first_batch = eventlet.event.Event()


class BatchProbeService(ServiceProbes):
    name = "batchprobe"

    db = Database()
    metrics = EntrypointMetrics()

    @handles_events_in_batches(SOURCE, EVENT_TYPE, max_batch=50)
    def on_probe(self, session, envelopes):
        batches.append([envelope["payload"]["n"] for envelope in envelopes])
        if len(batches) == 1 and envelopes[0]["payload"].get("hold"):
            hold_first_batch.wait()  # the others arrive meanwhile
        for envelope in envelopes:
            add_event(session, "batchprobe", "probe_seen", {"n": envelope["payload"]["n"]},
                      {"n": envelope["payload"]["n"]})
            if envelope["payload"].get("poison"):
                raise RuntimeError(f"event {envelope['payload']['n']} cannot be handled")


class BatchProbe(ServiceHarness):
    service = "batchprobe"

    def service_class(self):
        return BatchProbeService


@pytest.fixture
def probe(vhost, database_url):
    batches.clear()
    global hold_first_batch
    hold_first_batch = eventlet.event.Event()
    with harness_factory(lambda **overrides: BatchProbe(vhost, database_url, **overrides)) as make:
        yield make(event_max_attempts=3).start()


def envelope(n, **payload):
    return make_envelope(SOURCE, EVENT_TYPE, {"n": n}, {"n": n, **payload})


def effects(engine) -> dict:
    """n -> how many outbox rows (effects) the handler committed for event n."""
    counts = {}
    with engine.connect() as connection:
        for (row,) in connection.execute(select(OUTBOX.c.envelope)):
            n = row["payload"]["n"]
            counts[n] = counts.get(n, 0) + 1
    return counts


def marks(engine) -> int:
    with engine.connect() as connection:
        return len(connection.execute(select(HANDLED_EVENTS.c.event_id)
                                      .where(HANDLED_EVENTS.c.handler == HANDLER)).all())


def counter(probe, name, **labels) -> float:
    return probe.metric(name, service="batchprobe", method=HANDLER, **labels)


def test_events_arriving_while_a_batch_runs_are_handled_together_once_each(probe, amqp, engine):
    # the metrics are the process's own: the tests before this one counted too
    successes, batch_count = counter(probe, "helpdesk_event_requests_total", outcome="success"), \
        counter(probe, "helpdesk_event_batch_size_count")
    amqp.publish_event(SOURCE, EVENT_TYPE, envelope(0, hold=True))
    wait_for(lambda: len(batches) == 1, message="the first batch to start")
    for n in range(1, 31):
        amqp.publish_event(SOURCE, EVENT_TYPE, envelope(n))
    eventlet.sleep(0.3)  # all of them delivered while the first batch still runs
    hold_first_batch.send()

    wait_for(lambda: len(effects(engine)) == 31, message="every event handled")
    assert batches[0] == [0]
    assert sorted(n for batch in batches[1:] for n in batch) == list(range(1, 31))
    assert len(batches) <= 3  # taken together, not one worker per event (prefetch allows 50)
    assert set(effects(engine).values()) == {1} and marks(engine) == 31
    assert counter(probe, "helpdesk_event_requests_total", outcome="success") == successes + 31
    assert counter(probe, "helpdesk_event_batch_size_count") == batch_count + len(batches)


def test_a_duplicate_in_a_batch_or_after_it_has_one_effect(probe, amqp, engine):
    duplicates = counter(probe, "helpdesk_events_duplicate_total")
    first, second = envelope(1, hold=True), envelope(2)
    amqp.publish_event(SOURCE, EVENT_TYPE, first)
    wait_for(lambda: len(batches) == 1, message="the first batch to start")
    for body in (second, second, first):
        amqp.publish_event(SOURCE, EVENT_TYPE, body)
    eventlet.sleep(0.2)
    hold_first_batch.send()

    wait_for(lambda: counter(probe, "helpdesk_events_duplicate_total") == duplicates + 2,
             message="both repeats recognised")
    assert effects(engine) == {1: 1, 2: 1} and marks(engine) == 2
    assert batches[1] == [2]  # the repeat within the batch and the one handled before: left out


def test_a_poisonous_event_is_parked_alone_and_its_batch_is_applied_once(probe, amqp, engine):
    parked_before, errors = counter(probe, "helpdesk_events_dead_lettered_total"), \
        counter(probe, "helpdesk_event_requests_total", outcome="error")
    amqp.publish_event(SOURCE, EVENT_TYPE, envelope(0, hold=True))
    wait_for(lambda: len(batches) == 1, message="the first batch to start")
    poison = envelope(3, poison=True)
    for body in (envelope(1), envelope(2), poison, envelope(4), {"event_id": "not-an-envelope"}):
        amqp.publish_event(SOURCE, EVENT_TYPE, body)
    eventlet.sleep(0.2)
    hold_first_batch.send()

    wait_for(lambda: counter(probe, "helpdesk_events_dead_lettered_total") == parked_before + 2,
             message="the two bad events parked")
    # the batch of 1-4 failed as a whole (nothing of it committed), then each went on its own
    assert effects(engine) == {0: 1, 1: 1, 2: 1, 4: 1} and marks(engine) == 4
    assert batches[1] == [1, 2, 3, 4] and [1] in batches and [4] in batches
    assert sum(batch == [3] for batch in batches) == 3  # alone in the fallback, then 2 retries
    parked = {m.headers["x-dead-letter-reason"]: m for m in (amqp.get(amqp.declare(DLQ)) for _ in range(2))}
    assert parked["retries_exhausted"].payload == poison
    assert parked["retries_exhausted"].headers["x-attempts"] == 3
    assert parked["unprocessable"].payload == {"event_id": "not-an-envelope"}
    # the poison's three attempts and the malformed body
    assert counter(probe, "helpdesk_event_requests_total", outcome="error") == errors + 4


def test_events_waiting_for_a_batch_are_not_lost_when_the_service_stops(vhost, database_url, amqp, engine):
    with harness_factory(lambda **overrides: BatchProbe(vhost, database_url, **overrides)) as make:
        batches.clear()
        global hold_first_batch
        hold_first_batch = eventlet.event.Event()
        first = make().start()
        amqp.publish_event(SOURCE, EVENT_TYPE, envelope(0, hold=True))
        wait_for(lambda: len(batches) == 1, message="the first batch to start")
        for n in range(1, 6):
            amqp.publish_event(SOURCE, EVENT_TYPE, envelope(n))
        eventlet.sleep(0.2)
        first.kill()  # a crash: the held batch and the waiting events are not acked
        hold_first_batch.send()
        assert effects(engine) == {}

        make().start()
        wait_for(lambda: len(effects(engine)) == 6, message="every event handled after the restart")
        assert set(effects(engine).values()) == {1}


def test_the_probe_consumes_the_queue_nameko_derives(probe):
    # the dead-letter queue above is named after it
    assert any(getattr(e, "queue", None) is not None and e.queue.name == QUEUE for e in probe.container.entrypoints)
