"""Decide graft / container / deny for one bind or connect: the broker's hot path.

``compile_policy`` turns a validated ``PolicyFile`` into one ``TenantMatcher`` per tenant;
``TenantMatcher.decide`` runs on every request the shim sends.  Pure: no I/O, no clock, no
globals that change, so the broker can swap matchers atomically on SIGHUP and tests can
compare ``decide`` against a naive reference.

Addresses.  Everything is matched in one 128-bit space in which IPv4 a.b.c.d is the
v4-mapped IPv6 address ::ffff:a.b.c.d.  Hence:

* an IPv4 CIDR matches a plain IPv4 address and the same address v4-mapped (an AF_INET6
  socket connecting to ::ffff:10.1.2.3 talks IPv4 to 10.1.2.3);
* an IPv6 CIDR that lies inside ::ffff:0:0/96 (written e.g. ::ffff:10.0.0.0/104) is an IPv4
  range in disguise and matches like one, plain IPv4 addresses included;
* any other IPv6 CIDR matches IPv6 destinations only: ``::/0`` is "all of IPv6", and never
  covers IPv4 traffic, v4-mapped or not.  To match everything, omit ``to``/``addr``.

Other embeddings (IPv4-compatible ::a.b.c.d, NAT64 64:ff9b::/96, 6to4) are plain IPv6.

Rules are tried in file order and the first whose every present key matches decides; no
match means the tenant's ``default``.

Names.  A connect rule's ``names`` match a destination by what the tenant's own lookups
returned: the caller passes ``resolved``, the names (lower case, no trailing dot) whose
answers held the destination, each with the time its match lapses, and the matcher says which
name matched, and until when.  With ``to`` as well, either matches: the address first.  The
clock stays the caller's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .models import BindRule, ConnectRule, PolicyFile, Tenant, format_loc

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4_BASE = 0xFFFF << 32  # ::ffff:0.0.0.0, where IPv4 lives in the unified space
_V4_LAST = _V4_BASE + 0xFFFFFFFF
_PROTOS = {"tcp": frozenset({"tcp"}), "udp": frozenset({"udp"}), "any": frozenset({"tcp", "udp"})}
_OPS = ("connect", "bind")


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one request.

    ``rule`` is the deciding rule's place in the file (``tenants.web.connect[0]``) or
    ``tenants.web.default`` when no rule matched; it goes into the audit log.  ``host`` is set
    for a bind grafted by a rule with ``host``: the (address, port) the broker binds instead;
    the port is the app's requested one when the rule's host has none.
    """

    action: Literal["graft", "container", "deny"]
    rule: str
    host: tuple[IPAddress, int] | None = None
    name: str | None = None  # matched by this name (a rule's `names`), not by address
    expires: float | None = None  # ... until then, in the clock of the caller's `resolved`


def _addr_key(addr: IPAddress) -> int:
    """The address in the unified space (IPv4 as v4-mapped IPv6)."""
    if isinstance(addr, ipaddress.IPv4Address):
        return _V4_BASE + int(addr)
    if isinstance(addr, ipaddress.IPv6Address):
        return int(addr)
    raise TypeError(f"addr must be an IPv4Address or IPv6Address, not {type(addr).__name__}")


def _net_intervals(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[tuple[int, int]]:
    lo = int(net.network_address)
    hi = int(net.broadcast_address)
    if net.version == 4:
        return [(_V4_BASE + lo, _V4_BASE + hi)]
    if lo <= _V4_BASE and hi >= _V4_LAST and not (lo == _V4_BASE and hi == _V4_LAST):
        # A wider IPv6 network (::/0, ::/64, ...) that contains the v4-mapped /96: IPv4 is not
        # part of what it means, so cut the /96 out.
        out = []
        if lo < _V4_BASE:
            out.append((lo, _V4_BASE - 1))
        if hi > _V4_LAST:
            out.append((_V4_LAST + 1, hi))
        return out
    return [(lo, hi)]  # disjoint from the /96, or inside it (an IPv4 range written as IPv6)


def _merge(intervals: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted, overlapping or adjacent intervals joined: fewer comparisons per request."""
    out: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


# A compiled rule: (address intervals | None, port intervals | None, protos, decision, host,
# names | None). `decision` is pre-built whenever it does not depend on the request; otherwise
# it is None and `host` holds (address, None): the app's port is filled in per request.
# A rule with `names` and no `to` matches no address as such: its intervals are empty.
_Compiled = tuple


def _compile_rule(rule: ConnectRule | BindRule, loc: str) -> _Compiled:
    nets = rule.to if isinstance(rule, ConnectRule) else rule.addr
    names = tuple(rule.names) if isinstance(rule, ConnectRule) and rule.names is not None else None
    addrs = (None if names is None else ()) if nets is None else _merge([iv for n in nets for iv in _net_intervals(n)])
    ports = None if rule.ports is None else _merge([(p.lo, p.hi) for p in rule.ports])
    target = getattr(rule, "host", None)
    if target is None:
        return (addrs, ports, _PROTOS[rule.proto], Decision(rule.action, loc), None, names)
    if target.port is not None:
        return (addrs, ports, _PROTOS[rule.proto], Decision(rule.action, loc, (target.addr, target.port)), None, None)
    return (addrs, ports, _PROTOS[rule.proto], None, (target.addr, loc), None)


def name_matches(name: str, pattern: str) -> bool:
    """A plain name (lower case, no trailing dot) against a `names` pattern: exact, "*.suffix", "*"."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])  # "*.svc.example": a name under svc.example, not it
    return name == pattern


def _by_name(names: tuple[str, ...], resolved: Mapping[str, float]) -> tuple[str, float] | None:
    """The first name in resolved that one of names admits (the one that lasts longest), and its end."""
    best = None
    for name, expires in resolved.items():
        if (best is None or expires > best[1]) and any(name_matches(name, p) for p in names):
            best = (name, expires)
    return best


def _within(value: int, ranges: tuple[tuple[int, int], ...] | None) -> bool:
    """Whether value is in one of the inclusive (lo, hi) ranges; None means any value."""
    return ranges is None or any(lo <= value <= hi for lo, hi in ranges)


class TenantMatcher:
    """One tenant's compiled rules.  Immutable after construction; safe to share."""

    __slots__ = ("name", "default", "uids", "has_names", "_rules", "_default")

    def __init__(self, name: str, tenant: Tenant):
        self.name = name
        self.default = tenant.default
        # None = any uid.  A frozenset makes uid_allowed one hash lookup.
        self.uids: frozenset[int] | None = None if tenant.uids is None else frozenset(tenant.uids)
        self._rules = {
            op: tuple(
                _compile_rule(rule, format_loc(("tenants", name, op, i))) for i, rule in enumerate(getattr(tenant, op))
            )
            for op in _OPS
        }
        self._default = Decision(tenant.default, format_loc(("tenants", name, "default")))
        # Whether a connect's destination needs looking up among the tenant's resolved names at all.
        self.has_names = any(rule.names is not None for rule in tenant.connect)

    def uid_allowed(self, uid: int) -> bool:
        """Whether a peer with this SO_PEERCRED uid may use the tenant at all."""
        return self.uids is None or uid in self.uids

    def decide(
        self,
        op: Literal["connect", "bind"],
        proto: Literal["tcp", "udp"],
        addr: IPAddress,
        port: int,
        resolved: Mapping[str, float] | None = None,
    ) -> Decision:
        """First matching rule for ``op`` wins; otherwise the tenant default.

        ``addr``/``port`` are the destination for connect (and for a UDP sendto on an
        unconnected socket), the requested local address for bind (0.0.0.0 / :: for the
        wildcard, port 0 for an ephemeral port). ``resolved``: the names whose lookups by
        this tenant returned ``addr``, each with when that lapses (module doc, Names).
        """
        try:
            rules = self._rules[op]
        except (KeyError, TypeError):
            raise ValueError(f"op must be 'connect' or 'bind', not {op!r}") from None
        if proto != "tcp" and proto != "udp":
            raise ValueError(f"proto must be 'tcp' or 'udp', not {proto!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port out of range: {port!r}")
        key = _addr_key(addr)
        for addrs, ports, protos, decision, host, names in rules:
            if proto not in protos or not _within(port, ports):
                continue
            if not _within(key, addrs):
                found = _by_name(names, resolved) if names is not None and resolved else None
                if found is None:
                    continue
                return Decision(decision.action, decision.rule, name=found[0], expires=found[1])
            if decision is not None:
                return decision
            return Decision("graft", host[1], (host[0], port))
        return self._default

    def grafts_everything(self, op: Literal["connect", "bind"], proto: Literal["tcp", "udp"]) -> bool:
        """Whether every ``op`` of ``proto`` is grafted, whatever its address and port.

        True when the first rule for ``proto`` that matches any address and
        any port grafts, and every rule for ``proto`` before it grafts too.
        The broker uses it to decide whether the kernel may let a UDP socket
        grafted for one destination send to any other.
        """
        for addrs, ports, protos, decision, _host, _names in self._rules[op]:
            if proto not in protos:
                continue
            if (decision.action if decision is not None else "graft") != "graft":
                return False
            if addrs is None and ports is None:
                return True
        return False

    def __repr__(self) -> str:
        n_c, n_b = len(self._rules["connect"]), len(self._rules["bind"])
        return f"<TenantMatcher {self.name!r}: {n_c} connect, {n_b} bind rules, default {self.default}>"


def compile_policy(policy: PolicyFile) -> dict[str, TenantMatcher]:
    """One matcher per tenant, keyed by tenant name (= socket file name without .sock)."""
    return {name: TenantMatcher(name, tenant) for name, tenant in policy.tenants.items()}
