"""What a tenant's own lookups returned, for the connect rules that name destinations (docs/dns.md).

The tenant's resolver (dns/resolver.py) tells ``Resolved.learn`` every
address an answer to an allowed name held, with the moment that stops
counting (the answer's TTL, at least the tenant's ``dns.min_ttl``); the
decision stage asks ``lookup`` which names a connect's destination came
from, and the matcher (graft/policy/matcher.py) judges them against the
rules' ``names``. Pure: the clock is the caller's (``time.monotonic``,
which is the kernel's CLOCK_MONOTONIC, the clock the fast path's grants
lapse by).

Only plain names are kept: lower case, without the trailing dot, and none
with a character the DNS text form escapes (a label "x.corp" would print as
``x\\.corp`` and could pass for a suffix it is not). The table is bounded:
the addresses used least recently go first.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable

from .request import IPAddress

MAX_ADDRESSES = 65536  # per tenant
MAX_NAMES_PER_ADDRESS = 64  # a CDN address behind many names keeps the latest


def plain(ip: IPAddress) -> IPAddress:
    """IPv4 as itself, also when it is written v4-mapped: a connect to ::ffff:a.b.c.d goes to a.b.c.d."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class Resolved:
    def __init__(self, max_addresses: int = MAX_ADDRESSES):
        self.max_addresses = max_addresses
        self._by_addr: OrderedDict[IPAddress, dict[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_addr)

    def learn(self, name: str, addresses: Iterable[str | IPAddress], lapses: float) -> None:
        """name's lookup returned addresses, which count as name's until lapses."""
        name = name.lower().rstrip(".")
        if not name or "\\" in name:
            return
        for address in addresses:
            ip = plain(ipaddress.ip_address(address))
            names = self._by_addr.get(ip)
            if names is None:
                names = self._by_addr[ip] = {}
            names[name] = max(lapses, names.pop(name, lapses))  # re-inserted: the latest last
            while len(names) > MAX_NAMES_PER_ADDRESS:
                del names[next(iter(names))]
            self._by_addr.move_to_end(ip)
        while len(self._by_addr) > self.max_addresses:
            self._by_addr.popitem(last=False)

    def lookup(self, ip: IPAddress, now: float) -> dict[str, float]:
        """The names ip came from that have not lapsed at now, each with when it does."""
        ip = plain(ip)
        names = self._by_addr.get(ip)
        if not names:
            return {}
        live = {name: lapses for name, lapses in names.items() if lapses > now}
        if len(live) != len(names):
            if live:
                self._by_addr[ip] = live
            else:
                del self._by_addr[ip]
        return live
