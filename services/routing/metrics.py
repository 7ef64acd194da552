"""Routing's own metrics (aggregates per tier: never agent or ticket ids as labels)."""
import time

from prometheus_client import Counter, Histogram, REGISTRY
from prometheus_client.core import GaugeMetricFamily

ASSIGNMENTS = Counter("helpdesk_routing_assignments_total", "Tickets assigned by routing", ["tier", "reason"])
TIME_TO_ASSIGNMENT = Histogram(
    "helpdesk_routing_time_to_assignment_seconds", "From the ticket's creation to its assignment by routing",
    ["tier"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600, 14400, 86400))
QUEUED = Counter("helpdesk_routing_queued_total", "Tickets that found nobody free and joined a tier's queue",
                 ["tier", "reason"])
ESCALATIONS = Counter("helpdesk_routing_escalations_total", "Escalations to a higher tier",
                      ["from_tier", "to_tier", "trigger"])
CLAIM_CONFLICTS = Counter("helpdesk_routing_claim_conflicts_total",
                          "Claims lost to another router (agent filled up or ticket taken meanwhile)")
RELEASED = Counter("helpdesk_routing_claims_released_total",
                   "Claims the tickets service refused (ticket closed or gone); the slot was freed")
REFUSED_AS_INVALID = Counter(
    "helpdesk_routing_deliveries_refused_invalid_total",
    "Assignments the tickets service refused as invalid (e.g. an older tickets version during an upgrade); "
    "the claim and its slot are kept and re-sent by the sweeper")
LOADS_RECONCILED = Counter("helpdesk_routing_loads_reconciled_total",
                           "Agents whose active-ticket counter differed from a recount and was corrected")
CLAIM_BATCH_SIZE = Histogram("helpdesk_routing_claim_batch_size",
                             "Tickets claimed per claim transaction (the dispatcher's batching under load)",
                             buckets=(1, 2, 4, 8, 16, 32, 64))
DECISION_SECONDS = Histogram("helpdesk_routing_decision_seconds",
                             "Time to choose an agent for one ticket (a dispatch round: its plan's time per ticket)",
                             buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1))


class TierSnapshotCollector:
    """Queue depth, oldest age and agent load per tier, from the last snapshot the sweeper took.

    The oldest age is computed at scrape time from the oldest queued timestamp, so it keeps
    growing between snapshots, as a waiting ticket does.
    """

    def __init__(self):
        self.stats = {}
        self.taken_at = None

    def update(self, stats: dict) -> None:
        self.stats, self.taken_at = stats, time.time()

    def collect(self):
        depth = GaugeMetricFamily("helpdesk_routing_queue_depth", "Tickets waiting in a tier's queue", labels=["tier"])
        oldest = GaugeMetricFamily("helpdesk_routing_queue_oldest_age_seconds",
                                   "How long the oldest ticket of a tier's queue has waited", labels=["tier"])
        online = GaugeMetricFamily("helpdesk_routing_agents_online", "Agents online per tier", labels=["tier"])
        active = GaugeMetricFamily("helpdesk_routing_active_tickets",
                                   "Active tickets held by the online agents of a tier", labels=["tier"])
        capacity = GaugeMetricFamily("helpdesk_routing_capacity_online",
                                     "Summed capacity of the online agents of a tier", labels=["tier"])
        now = time.time()
        for tier, entry in sorted(self.stats.items()):
            depth.add_metric([tier], entry["depth"])
            first = entry["oldest_queued_at"]
            oldest.add_metric([tier], max(0.0, now - first.timestamp()) if first else 0.0)
            online.add_metric([tier], entry["agents_online"])
            active.add_metric([tier], entry["active_tickets"])
            capacity.add_metric([tier], entry["capacity_online"])
        yield from (depth, oldest, online, active, capacity)


TIER_SNAPSHOT = TierSnapshotCollector()
REGISTRY.register(TIER_SNAPSHOT)
