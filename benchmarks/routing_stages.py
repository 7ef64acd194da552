"""Where a routed ticket's time went, read back from a kept routing_e2e.py stack.

    .venv/bin/python benchmarks/routing_e2e.py --keep-var          # prints "stack: kept /tmp/..."
    .venv/bin/python benchmarks/routing_stages.py /tmp/hd-bench-routing-xxxx
    .venv/bin/python benchmarks/routing_stages.py /tmp/hd-bench-routing-xxxx --timeline

For every ticket of the run that routing assigned (all of them, warm-up included), four stages
from the two SQLite databases, each a difference of two server-side timestamps:

  * outbox: the ticket's ``created_at`` -> its ``ticket_created`` event published (tickets'
    outbox ``published_at``, set once the broker confirmed it);
  * to routing: published -> routing's handler marked the event handled (``handled_events``;
    it can be slightly negative: the mark is written before the publisher records its confirm);
  * dispatch: handled -> routing's first ``assigning`` decision for it (the claim);
  * delivery: claimed -> the history entry that gave the ticket its assignee (tickets applied it).

``--timeline`` adds, per quarter second of creation time, how many tickets were created and the
median and worst created -> assigned time: waves show up there (a stalled process, a backlog
being worked off). Percentiles are nearest-rank. Nothing is written.
"""
import argparse
import json
import sqlite3
from collections import defaultdict
from datetime import datetime
from pathlib import Path

STAGES = ("outbox", "to routing", "dispatch", "delivery", "total")


def _seconds(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _percentile(values: list, share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def read_moments(var_dir: Path) -> dict:
    """ticket id -> {created, published, handled, claimed, assigned} (epoch seconds or None)."""
    tickets = sqlite3.connect(f"file:{var_dir / 'tickets.db'}?mode=ro", uri=True)
    routing = sqlite3.connect(f"file:{var_dir / 'routing.db'}?mode=ro", uri=True)
    moments = {ticket_id: {"created": _seconds(created)}
               for ticket_id, created in tickets.execute("SELECT id, created_at FROM tickets")}
    event_ticket = {}
    for event_id, envelope, published in tickets.execute(
            "SELECT event_id, envelope, published_at FROM outbox WHERE event_type = 'ticket_created'"):
        ticket_id = json.loads(envelope)["subject_ids"]["ticket_id"]
        if ticket_id in moments:
            moments[ticket_id]["published"] = _seconds(published)
            event_ticket[event_id] = ticket_id
    for event_id, handled in routing.execute(
            "SELECT event_id, handled_at FROM handled_events WHERE handler = 'on_ticket_created'"):
        if event_id in event_ticket:
            moments[event_ticket[event_id]]["handled"] = _seconds(handled)
    for ticket_id, claimed in routing.execute(
            "SELECT ticket_id, MIN(decided_at) FROM routing_decisions "
            "WHERE outcome IN ('assigning', 'assigned') GROUP BY ticket_id"):
        if ticket_id in moments:
            moments[ticket_id]["claimed"] = _seconds(claimed)
    for ticket_id, assigned in tickets.execute(
            # an assignment with the rules' changes is an "updated" entry that sets the assignee
            "SELECT ticket_id, MIN(occurred_at) FROM ticket_history WHERE action = 'assigned' "
            "OR (action = 'updated' AND json_extract(changes, '$.assignee_id') IS NOT NULL) GROUP BY ticket_id"):
        if ticket_id in moments:
            moments[ticket_id]["assigned"] = _seconds(assigned)
    return moments


def stage_times(moments: dict) -> dict:
    """stage -> milliseconds, over the tickets with every moment known."""
    stages = {name: [] for name in STAGES}
    for m in moments.values():
        if None in (m.get(k) for k in ("created", "published", "handled", "claimed", "assigned")):
            continue
        stages["outbox"].append((m["published"] - m["created"]) * 1000)
        stages["to routing"].append((m["handled"] - m["published"]) * 1000)
        stages["dispatch"].append((m["claimed"] - m["handled"]) * 1000)
        stages["delivery"].append((m["assigned"] - m["claimed"]) * 1000)
        stages["total"].append((m["assigned"] - m["created"]) * 1000)
    return stages


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("var_dir", type=Path, help="the directory routing_e2e.py --keep-var kept")
    parser.add_argument("--timeline", action="store_true", help="also per quarter second of creation time")
    args = parser.parse_args(argv)
    for name in ("tickets.db", "routing.db"):
        if not (args.var_dir / name).is_file():
            parser.error(f"{args.var_dir / name} not found: pass the directory routing_e2e.py --keep-var kept")
    moments = read_moments(args.var_dir)
    stages = stage_times(moments)
    counted = len(stages["total"])
    print(f"{counted} of {len(moments)} tickets with every moment recorded (ms, nearest-rank)")
    for name in STAGES:
        values = stages[name]
        if values:
            print(f"  {name:<11} p50 {_percentile(values, .5):8.1f}  p90 {_percentile(values, .9):8.1f}  "
                  f"p99 {_percentile(values, .99):8.1f}  max {max(values):8.1f}")
    if args.timeline:
        done = sorted((m["created"], (m["assigned"] - m["created"]) * 1000)
                      for m in moments.values() if m.get("created") and m.get("assigned"))
        if not done:
            return
        by_quarter = defaultdict(list)
        for created, waited in done:
            by_quarter[int((created - done[0][0]) * 4)].append(waited)
        for quarter in sorted(by_quarter):
            values = by_quarter[quarter]
            print(f"  {quarter / 4:6.2f}s  created {len(values):3d}  p50 {_percentile(values, .5):6.0f}  "
                  f"max {max(values):6.0f}  " + "#" * int(max(values) / 20))


if __name__ == "__main__":
    main()
