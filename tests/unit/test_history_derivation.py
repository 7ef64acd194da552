"""What the history tells: periods of one field, time in status, who had the ticket."""
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, strategies as st

from services.tickets.domain import Period, assignment_periods, periods_of, time_in_status

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=timezone.utc)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def test_a_ticket_without_changes_has_one_running_period():
    assert periods_of("status", "new", T0, []) == [Period("new", T0, None)]


def test_each_change_of_the_field_closes_a_period_and_opens_the_next():
    entries = [
        (at(10), {"status": ["new", "open"]}),
        (at(30), {"status": ["open", "pending"]}),
    ]
    assert periods_of("status", "new", T0, entries) == [
        Period("new", T0, at(10)),
        Period("open", at(10), at(30)),
        Period("pending", at(30), None),
    ]


def test_changes_of_other_fields_do_not_split_periods():
    entries = [
        (at(5), {"priority": ["normal", "high"]}),
        (at(7), {"comment_id": [None, "c1"], "public": [None, True]}),
        (at(9), {"status": ["new", "open"], "priority": ["high", "low"]}),
    ]
    assert periods_of("status", "new", T0, entries) == [
        Period("new", T0, at(9)), Period("open", at(9), None)]


def test_a_change_to_the_current_value_does_not_split_a_period():
    # the creation entry records status [None, "new"]: the ticket is already new
    entries = [(T0, {"status": [None, "new"]}), (at(3), {"status": ["new", "new"]})]
    assert periods_of("status", "new", T0, entries) == [Period("new", T0, None)]


def test_an_empty_change_is_ignored():
    assert periods_of("status", "new", T0, [(at(1), {"status": []})]) == [Period("new", T0, None)]


def test_running_period_is_measured_up_to_now():
    assert Period("open", T0, None).seconds(at(2)) == 120
    assert Period("open", T0, at(1)).seconds(at(60)) == 60


def test_time_in_status_adds_up_repeated_stays():
    periods = periods_of("status", "new", T0, [
        (at(1), {"status": ["new", "open"]}),
        (at(3), {"status": ["open", "pending"]}),
        (at(10), {"status": ["pending", "open"]}),
    ])
    assert time_in_status(periods, now=at(15)) == {"new": 60, "open": 120 + 300, "pending": 420}


def test_assignment_periods_include_unassigned_waiting_time():
    periods = periods_of("assignee_id", None, T0, [
        (at(4), {"assignee_id": [None, "agent-1"], "status": ["new", "open"]}),
        (at(9), {"assignee_id": ["agent-1", "agent-2"]}),
    ])
    assert assignment_periods(periods, now=at(10)) == [
        {"assignee_id": None, "started_at": T0, "ended_at": at(4), "seconds": 240},
        {"assignee_id": "agent-1", "started_at": at(4), "ended_at": at(9), "seconds": 300},
        {"assignee_id": "agent-2", "started_at": at(9), "ended_at": None, "seconds": 60},
    ]


def test_unassigning_starts_a_new_waiting_period():
    periods = periods_of("assignee_id", None, T0, [
        (at(1), {"assignee_id": [None, "agent-1"]}),
        (at(2), {"assignee_id": ["agent-1", None]}),
    ])
    assert [p.value for p in periods] == [None, "agent-1", None]
    assert time_in_status(periods, now=at(5)) == {None: 60 + 180, "agent-1": 60}


# --- properties -------------------------------------------------------------------------

VALUES = st.sampled_from(["new", "open", "pending", "on_hold", "solved", "closed"])
# (minutes after the previous entry, the field's new value or None when the entry is about
# another field)
STEPS = st.lists(st.tuples(st.integers(min_value=0, max_value=600), st.one_of(st.none(), VALUES)),
                 max_size=30)


def _history(initial: str, steps) -> list[tuple[datetime, dict]]:
    entries, moment, current = [], T0, initial
    for gap, value in steps:
        moment += timedelta(minutes=gap)
        if value is None:
            entries.append((moment, {"priority": ["normal", "high"]}))
        else:
            entries.append((moment, {"status": [current, value]}))
            current = value
    return entries


@given(VALUES, STEPS, st.integers(min_value=0, max_value=10_000))
def test_total_time_across_periods_equals_the_ticket_age(initial, steps, extra_minutes):
    entries = _history(initial, steps)
    last = entries[-1][0] if entries else T0
    now = last + timedelta(minutes=extra_minutes)
    periods = periods_of("status", initial, T0, entries)
    assert sum(p.seconds(now) for p in periods) == (now - T0).total_seconds()
    assert sum(time_in_status(periods, now).values()) == (now - T0).total_seconds()
    assert sum(p["seconds"] for p in assignment_periods(periods, now)) == (now - T0).total_seconds()


@given(VALUES, STEPS)
def test_periods_are_contiguous_and_only_the_last_is_running(initial, steps):
    periods = periods_of("status", initial, T0, _history(initial, steps))
    assert periods[0].started_at == T0 and periods[0].value == initial
    for before, after in zip(periods, periods[1:]):
        assert before.ended_at == after.started_at
        assert before.ended_at is not None
    assert periods[-1].ended_at is None


@given(VALUES, STEPS)
def test_consecutive_periods_never_hold_the_same_value(initial, steps):
    periods = periods_of("status", initial, T0, _history(initial, steps))
    assert all(a.value != b.value for a, b in zip(periods, periods[1:]))


@given(VALUES, STEPS)
def test_the_running_period_holds_the_latest_value(initial, steps):
    entries = _history(initial, steps)
    changes = [c["status"][1] for _, c in entries if "status" in c]
    assert periods_of("status", initial, T0, entries)[-1].value == (changes[-1] if changes else initial)


@given(VALUES, STEPS)
def test_one_period_per_actual_change_of_value(initial, steps):
    entries = _history(initial, steps)
    values = [initial] + [c["status"][1] for _, c in entries if "status" in c]
    actual_changes = sum(1 for a, b in zip(values, values[1:]) if a != b)
    assert len(periods_of("status", initial, T0, entries)) == actual_changes + 1


@pytest.mark.parametrize("field", ["status", "assignee_id", "group"])
def test_periods_of_reads_only_the_named_field(field):
    entries = [(at(1), {"other": ["a", "b"]})]
    assert len(periods_of(field, "x", T0, entries)) == 1
