"""The outbox relay's window of batches in flight, with a publisher whose confirms the test
hands out: it sends on without waiting for earlier confirms, marks rows published only once
confirmed and in order, and sends again everything not confirmed when a batch fails."""
import uuid

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from servicekit import outbox
from servicekit.outbox import OutboxRelay, UnconfirmedPublish, add_event
from servicekit.tables import OUTBOX


class HeldConfirms:
    """A BatchPublisher stand-in: ``send`` records the batch; the broker's confirms (and
    refusals) come only when the test says so."""

    confirm_timeout = 10.0

    def __init__(self):
        self.sent = []  # event ids per batch, in order
        self.confirmed_through = 0
        self.refuse = False

    def send(self, messages) -> int:
        self.sent.append([message_id for *_, message_id in messages])
        return sum(len(batch) for batch in self.sent)

    def confirmed(self, tag: int) -> bool:
        return self.confirmed_through >= tag

    def poll_confirms(self, timeout: float) -> None:
        if self.refuse:
            self.refuse = False
            raise UnconfirmedPublish("the broker refused (nack) a published event")

    def close(self):
        pass


@pytest.fixture
def relay(engine):
    relay = OutboxRelay(engine, "amqp://unused", "tickets")
    relay.publisher = HeldConfirms()
    return relay


def commit(engine, relay) -> str:
    with Session(engine) as session, session.begin():
        envelope = add_event(session, "tickets", "ticket_updated", {"ticket_id": str(uuid.uuid4())}, {})
    relay.wake()
    return envelope["event_id"]


def published(engine) -> set:
    with Session(engine) as session:
        return {row.event_id for row in session.execute(
            select(OUTBOX.c.event_id).where(OUTBOX.c.published_at.is_not(None)))}


def test_a_batch_goes_out_while_the_one_before_waits_for_its_confirm(engine, relay):
    first = commit(engine, relay)
    assert relay.relay_step() == 1
    second, third = commit(engine, relay), commit(engine, relay)
    assert relay.relay_step() == 2  # not held back by the first batch's confirm
    assert relay.publisher.sent == [[first], [second, third]]
    assert published(engine) == set()

    relay.publisher.confirmed_through = 1  # the first batch only
    assert relay.relay_step() == 0
    assert published(engine) == {first}
    relay.publisher.confirmed_through = 3
    relay.relay_step()
    assert published(engine) == {first, second, third}
    assert relay.relay_step() == 0 and relay.publisher.sent == [[first], [second, third]]  # nothing twice


def test_a_refused_batch_sends_again_everything_not_confirmed(engine, relay):
    first = commit(engine, relay)
    relay.relay_step()
    second = commit(engine, relay)
    relay.relay_step()
    relay.publisher.confirmed_through = 1
    relay.publisher.refuse = True  # the second batch is nacked
    with pytest.raises(UnconfirmedPublish):
        relay.relay_step()
    relay._abandon_sent()  # what the run loop does on a failure
    assert published(engine) == set()  # the first batch's confirm had not been taken yet either

    relay.relay_step()
    assert relay.publisher.sent[-1] == [first, second]  # both again, in order
    relay.publisher.confirmed_through = 10
    relay.relay_step()
    assert published(engine) == {first, second}


def test_a_batch_not_confirmed_in_time_is_sent_again(engine, relay, monkeypatch):
    event = commit(engine, relay)
    relay.relay_step()
    relay._sent[0].deadline = 0  # past
    with pytest.raises(UnconfirmedPublish):
        relay.relay_step()
    relay._abandon_sent()
    relay.relay_step()
    assert relay.publisher.sent == [[event], [event]]


def test_no_more_batches_in_flight_than_the_window(engine, relay, monkeypatch):
    monkeypatch.setattr(outbox, "BATCH_SIZE", 1)
    monkeypatch.setattr(outbox, "MAX_BATCHES_IN_FLIGHT", 2)
    events = [commit(engine, relay) for _ in range(3)]
    for _ in range(5):
        relay.relay_step()
    # BATCH_SIZE is read when the query is built: the batch is whatever one SELECT returned
    assert len(relay._sent) <= 2
    relay.publisher.confirmed_through = 10
    for _ in range(5):
        relay._look = True
        relay.relay_step()
    assert published(engine) == set(events)


def test_on_postgresql_a_lower_id_committed_late_is_still_sent(engine, relay):
    # PostgreSQL hands out ids from a sequence when rows are inserted, not when they commit: a
    # batch in flight must not make the relay skip a lower id that commits after it
    relay._ids_in_commit_order = False  # as for PostgreSQL
    early, late = commit(engine, relay), commit(engine, relay)
    with Session(engine) as session, session.begin():
        held = session.execute(select(OUTBOX).where(OUTBOX.c.event_id == early)).one()._asdict()
        session.execute(OUTBOX.delete().where(OUTBOX.c.event_id == early))  # "not committed yet"
    relay.relay_step()
    assert relay.publisher.sent == [[late]]  # in flight, not confirmed
    with Session(engine) as session, session.begin():
        session.execute(OUTBOX.insert(), held)  # the lower id commits now
    relay.wake()
    relay.relay_step()
    # sent (PostgreSQL would skip the batch in flight as locked; SQLite has no row locks)
    assert early in relay.publisher.sent[-1]
