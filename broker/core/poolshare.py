"""How many pre-issued sockets one pool gets per request: the tenant's pool share split among its active pools.

Pools fill only half of a tenant's ``max_sockets`` (core/grants.py). First
come, first served, that half went to the first few processes of a burst: a
shim's pool holds up to two batches (shim/preissue.c), so at the default
``max_sockets`` four processes of 64 held all of it, the other 60 had refill
after refill refused, and 28% of their connects went to the broker
(docs/benchmarks.md). Here a request gets at most the share divided by
twice the number of pools that asked in the last ``ACTIVE_S``: each holds up
to two requests' worth, so together they fit in the share, and a pool that
has gone quiet stops counting. A pool is what fills one: a shim process, or
a seccomp listener's loop (which serves every process of its container).

Pure: the caller passes the time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

ACTIVE_S = 1.0  # a pool that asked within this long is sharing
MIN_BATCH = 2  # the shim's smallest batch (preissue.c's MIN_WANT): below it a pool refills at every connect
# A share that holds a request below this many sockets is cramped: a process connecting as fast as it
# can empties two such batches within one scheduler time slice, and then sleeps behind every other
# runnable process for its refill (docs/benchmarks.md, "Stamps": 64 processes at the default
# max_sockets, refills of 4, p99 ~1000x the host's). Its tenant's operator is told, at most every
# WARN_EVERY_S.
CRAMPED = 16
WARN_EVERY_S = 60.0


class PoolShare:
    """The pools of one tenant that asked lately, oldest first."""

    __slots__ = ("_asked", "each", "_cramped", "_warned_at")

    def __init__(self) -> None:
        self._asked: OrderedDict[Hashable, float] = OrderedDict()
        self.each = 0  # the most a pool could get at the last request
        self._cramped = False  # the last request got less than it wanted, and under CRAMPED, for want of share
        self._warned_at = float("-inf")

    def batch(self, pool: Hashable, wanted: int, share: int, now: float) -> int:
        """How many of wanted this request of pool may get, at most (the tenant's room decides the rest)."""
        self._asked[pool] = now
        self._asked.move_to_end(pool)
        while next(iter(self._asked.values())) < now - ACTIVE_S:  # pool itself, just stamped, stays
            self._asked.popitem(last=False)
        self.each = max(MIN_BATCH, share // (2 * len(self._asked)))
        self._cramped = self.each < min(wanted, CRAMPED)
        return min(wanted, self.each)

    def warn_now(self, now: float) -> bool:
        """Whether the last request was cramped and the operator has not been told within WARN_EVERY_S."""
        if not self._cramped or now - self._warned_at < WARN_EVERY_S:
            return False
        self._warned_at = now
        return True

    def __len__(self) -> int:
        return len(self._asked)
