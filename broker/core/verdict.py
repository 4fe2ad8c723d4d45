"""The broker's decision for one request: pure, no I/O.

Given a decoded request, the peer's credentials and the tenant's compiled
policy, ``judge`` says what to do and where: graft (and the host address to
bind or connect), run the call in the container, or deny with the errno the
brief fixes (EPERM for connect, EACCES for bind). The server performs the
verdict; keeping the decision here lets it be tested without sockets.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from graft.policy import Decision, TenantMatcher
from graft.policy.models import format_loc

from .request import OP_BIND, IPAddress, Request, SockAddr

DENY_ERRNO = {"connect": errno.EPERM, "bind": errno.EACCES}
# When the tenant's namespace is gone: what the shim answers when the broker is.
UNREACHABLE_ERRNO = {"connect": errno.ENETUNREACH, "bind": errno.EADDRNOTAVAIL}


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str  # "graft" | "container" | "deny" | "error"
    rule: str  # the deciding place in the policy file
    errno: int = 0  # for "deny" and "error"
    target: SockAddr | None = None  # for "graft": the host address to bind/connect
    reason: str | None = None  # for "error": what went wrong, for the audit log
    name: str | None = None  # decided by a rule's `names`: the name the destination came from,
    expires: float | None = None  # ... which counts until then (time.monotonic): a grant lapses with it


def tenant_loc(tenant: str, key: str) -> str:
    """The place of a tenant's key in the policy file, as audit records name rules."""
    return format_loc(("tenants", tenant, key))


def host_target(req: Request, decision: Decision) -> SockAddr:
    """Where the broker binds or connects on the host for a graft decision.

    A published bind (a rule with ``host``) binds the rule's host address in
    the app's socket family: an IPv4 host address on an AF_INET6 socket is
    written v4-mapped, so the app keeps the family it asked for.
    """
    if req.op != OP_BIND or decision.host is None:
        return req.addr
    ip, port = decision.host
    if req.family == socket.AF_INET6 and ip.version == 4:
        ip = ipaddress.IPv6Address(f"::ffff:{ip}")
    elif req.family == socket.AF_INET and ip.version == 6:
        mapped = ip.ipv4_mapped
        if mapped is None:
            raise ValueError(f"host address {ip} cannot be bound by an AF_INET socket")
        ip = mapped
    return SockAddr(req.family, ip, port)


_LOOPBACK_V4 = ipaddress.IPv4Address("127.0.0.1")
_UNSPECIFIED_MAPPED = ipaddress.IPv6Address("::ffff:0.0.0.0")


def destination(ip: IPAddress) -> IPAddress:
    """Where the kernel sends a connect or send to ip: the unspecified address means this host.

    A connect to 0.0.0.0 goes to 127.0.0.1 (the route lookup puts the
    source address, loopback for an unbound socket, in place of a zero
    destination), one to :: goes to ::1, and one to ::ffff:0.0.0.0 to
    ::ffff:127.0.0.1. Rules are matched against where the packets go, so a
    rule that denies loopback also denies its unspecified spelling.
    """
    if not ip.is_unspecified and ip != _UNSPECIFIED_MAPPED:
        return ip
    if ip.version == 4:
        return _LOOPBACK_V4
    return (
        ipaddress.IPv6Address("::1") if ip == ipaddress.IPv6Address("::") else ipaddress.IPv6Address("::ffff:127.0.0.1")
    )


def judge(
    req: Request, matcher: TenantMatcher, uid: int, resolved: Callable[[IPAddress], Mapping[str, float]] | None = None
) -> Verdict:
    """The verdict on req; resolved: the names a connect's destination came from (core/resolved.py), if asked."""
    op = req.judged_as
    if not matcher.uid_allowed(uid):
        return Verdict("deny", tenant_loc(matcher.name, "uids"), DENY_ERRNO[op])
    ip = destination(req.addr.ip) if req.op != OP_BIND else req.addr.ip
    names = resolved(ip) if resolved is not None and op == "connect" else None
    decision = matcher.decide(op, req.proto, ip, req.addr.port, names)
    by_name = {"name": decision.name, "expires": decision.expires}
    if decision.action == "deny":
        return Verdict("deny", decision.rule, DENY_ERRNO[op], **by_name)
    if decision.action == "container":
        return Verdict("container", decision.rule, **by_name)
    try:
        target = host_target(req, decision)
    except ValueError:
        return Verdict("deny", decision.rule, errno.EAFNOSUPPORT)
    return Verdict("graft", decision.rule, 0, target, **by_name)
