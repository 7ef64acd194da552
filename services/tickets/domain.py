"""Ticket rules: the lifecycle state machine and what history tells (time in status, who had it).

Plain Python; no database, no broker.
"""
from dataclasses import dataclass
from datetime import datetime

from contracts.errors import Conflict, InvalidTransition
from contracts.tickets import PRIORITIES, STAFF_ROLES

# new -> open -> pending (waiting on requester) / on_hold (waiting on a third party) -> solved -> closed
TRANSITIONS: dict[str, frozenset[str]] = {
    "new": frozenset({"open", "pending", "on_hold", "solved"}),
    "open": frozenset({"pending", "on_hold", "solved"}),
    "pending": frozenset({"open", "on_hold", "solved"}),
    "on_hold": frozenset({"open", "pending", "solved"}),
    "solved": frozenset({"open", "closed"}),
    "closed": frozenset(),
}
ACTIVE_STATUSES = frozenset({"new", "open"})

# low=0 .. critical=3: "sort=-priority" lists the most urgent first
PRIORITY_RANK = {name: rank for rank, name in enumerate(reversed(PRIORITIES))}


def check_transition(old: str, new: str) -> None:
    if new == old:
        return
    if new not in TRANSITIONS[old]:
        allowed = ", ".join(sorted(TRANSITIONS[old])) or "none (closed tickets are final)"
        raise InvalidTransition(
            f"a ticket cannot go from {old} to {new}; allowed from {old}: {allowed}",
            {"status": [f"{old} -> {new} is not allowed"]},
        )


def status_after_requester_reply(status: str) -> str:
    """A requester's reply brings a ticket waiting on them (or solved) back to the agents."""
    if status == "closed":
        raise Conflict("this ticket is closed; open a new ticket to follow up",
                       {"ticket": ["closed tickets accept no replies"]})
    if status in ("pending", "solved"):
        return "open"
    return status


def status_after_assignment(status: str) -> str:
    """Assigning a new ticket means somebody is working on it."""
    return "open" if status == "new" else status


def is_first_response(author_role: str, public: bool, already_responded: bool) -> bool:
    return public and author_role in STAFF_ROLES and not already_responded


# --- what the history tells ---------------------------------------------------------------

@dataclass(frozen=True)
class Period:
    value: str | None  # a status, an assignee id or a group name
    started_at: datetime
    ended_at: datetime | None  # None: still running

    def seconds(self, now: datetime) -> float:
        return ((self.ended_at or now) - self.started_at).total_seconds()


def periods_of(field: str, initial: str | None, created_at: datetime,
               entries: list[tuple[datetime, dict]]) -> list[Period]:
    """Turn the history of one field into consecutive periods.

    ``entries`` are (occurred_at, changes) in order, where changes maps field -> [old, new].
    """
    periods: list[Period] = []
    current, since = initial, created_at
    for occurred_at, changes in entries:
        change = changes.get(field)
        if not change or change[1] == current:
            continue
        periods.append(Period(current, since, occurred_at))
        current, since = change[1], occurred_at
    periods.append(Period(current, since, None))
    return periods


def time_in_status(periods: list[Period], now: datetime) -> dict[str, float]:
    totals: dict[str, float] = {}
    for period in periods:
        totals[period.value] = totals.get(period.value, 0.0) + period.seconds(now)
    return totals


def assignment_periods(periods: list[Period], now: datetime) -> list[dict]:
    """Who had it and for how long (unassigned stretches are the waiting-in-queue time)."""
    return [
        {"assignee_id": p.value, "started_at": p.started_at, "ended_at": p.ended_at,
         "seconds": p.seconds(now)}
        for p in periods
    ]
