"""A token bucket for a tenant's max_rate: pure, the caller passes the time.

The bucket holds up to one second's worth of requests, so a tenant may
burst to its rate at once and is then held to it on average.
"""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("rate", "tokens", "stamp")

    def __init__(self, rate: int, now: float):
        self.rate = rate
        self.tokens = float(rate)
        self.stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; refill by elapsed time first."""
        return self.take_up_to(1, now) == 1

    def take_up_to(self, n: int, now: float) -> int:
        """Spend up to n whole tokens; returns how many (0 if none is left)."""
        self.tokens = min(float(self.rate), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        got = min(n, int(self.tokens))
        self.tokens -= got
        return got
