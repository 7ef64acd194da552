"""Per-token rate limit: a token bucket per identity, in this gateway process.

Each replica limits independently (N replicas allow up to N x the rate); that keeps the
gateway stateless. A shared limiter (Redis) can replace ``TokenBuckets`` behind the same API.
"""
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class Decision:
    allowed: bool
    limit: int
    remaining: int
    retry_after_seconds: int


class TokenBuckets:
    def __init__(self, rate_per_second: float, burst: int, max_keys: int = 100_000):
        self.rate = rate_per_second
        self.burst = burst
        self.max_keys = max_keys
        # key -> (tokens, last refill), least recently used first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str, now: float | None = None) -> Decision:
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                tokens -= 1.0
                self._store(key, tokens, now)
                return Decision(True, self.burst, int(tokens), 0)
            self._store(key, tokens, now)
            wait = (1.0 - tokens) / self.rate if self.rate > 0 else 3600
            return Decision(False, self.burst, 0, max(1, math.ceil(wait)))

    def _store(self, key, tokens, now):
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        if len(self._buckets) > self.max_keys:
            # the least recently seen identity: idle longest, so its bucket has refilled most
            self._buckets.popitem(last=False)
