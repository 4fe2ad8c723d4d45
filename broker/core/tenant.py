"""A tenant as the broker serves it, and the peer that asks for it.

``TenantState`` is the one record of a tenant that every stage shares: the
composition root (server.py) makes it from the policy, hands it the new
rules on reload and cancels it when the tenant goes; the front-ends keep
their per-tenant limits in it (the shim's connection slots and turns, the
seccomp agent's listeners); the decision (decisions.py) reads its matcher
and rate bucket and counts its verdicts; the host-socket factory
(hostsock.py) counts its sockets against max_sockets; grants.py keeps the
id its grants and pre-issued sockets carry. ``Peer`` is who asked: a shim's
SO_PEERCRED, or a stopped thread's process and effective ids.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from graft.policy import Tenant, TenantMatcher

from .netns import Namespace
from .poolshare import PoolShare
from .ratelimit import TokenBucket
from .request import SockAddr
from .resolved import Resolved

MAX_CLIENTS_PER_TENANT = 256
# Requests of one tenant the broker works on at once. A tenant's other ready
# connections wait for a turn off trio's run queue, so however many
# connections a flooding tenant keeps busy, another tenant's request has at
# most this many of them ahead of it.
TURNS_PER_TENANT = 1


@dataclass
class TenantState:
    name: str
    config: Tenant
    matcher: TenantMatcher
    namespace: Namespace
    path: Path
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    removed: bool = False  # by a reload: its socket goes too (a stop leaves a stored one in place)
    done: trio.Event = field(default_factory=trio.Event)  # its task has ended, socket torn down
    slots: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(MAX_CLIENTS_PER_TENANT))
    turns: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(TURNS_PER_TENANT))
    live: set[int] = field(default_factory=set)  # inodes of grafted sockets handed out (no confinement)
    kid: int = 0  # the id its sockets are counted under in the kernel (confinement on)
    gid: int = 0  # the id its grants and pre-issued sockets carry; 0: no fast path
    issued: int = 0  # sockets handed out and counted in the kernel (confinement on)
    closed: int = 0  # of those, closed as of the kernel's count when last read
    preissued: int = 0  # of those, pre-issued for the fast path
    pools: PoolShare = field(default_factory=PoolShare)  # its pools that asked lately, for the size of a batch
    refreshing: trio.Event | None = None  # set when the running liveness dump ends
    full_until: float = float("-inf")  # a dump found the tenant full: trust it until then
    bucket: TokenBucket | None = None  # max_rate
    resolved: Resolved = field(default_factory=Resolved)  # what its lookups returned, for rules' `names`
    counts: Counter = field(default_factory=Counter)  # requests by audited action, for graft status
    # Owns the tenant's client tasks and its seccomp listeners' tasks (seccomp/agent.py): they end with it.
    nursery: trio.Nursery | None = None
    seccomp_listeners: int = 0  # notify fds served for its containers now
    seccomp_loops: set = field(default_factory=set)  # their C loops (seccomp_fast.Loop), running now
    seccomp_ended: Counter = field(default_factory=Counter)  # the counts of loops that have ended

    def seccomp_calls(self) -> dict[str, int]:
        """How the seccomp listeners' loops answered the stopped calls, since the tenant started."""
        total = Counter(self.seccomp_ended)
        for loop in self.seccomp_loops:
            total.update(loop.stats)
        return {k: total[k] for k in ("continued", "installed", "handed_off")}

    def configure(self, config: Tenant, matcher: TenantMatcher) -> None:
        """Take a (re)loaded policy. Sockets already handed out keep what they got."""
        self.config, self.matcher = config, matcher
        owner = config.socket_owner(self.name)
        if (self.namespace.netns, self.namespace.owner) != (config.netns, owner):
            self.namespace = Namespace(config.netns, owner)
        if config.max_rate is None:
            self.bucket = None
        elif self.bucket is None or self.bucket.rate != config.max_rate:
            self.bucket = TokenBucket(config.max_rate, time.monotonic())


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


# What a front-end calls to have the tenant's resolver served in a peer's network namespace
# (dns/resolver.py's Resolvers.serve): its address, None when none is served there.
ServeResolver = Callable[[TenantState, Peer], Awaitable[SockAddr | None]]
