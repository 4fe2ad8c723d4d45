"""The decision and its audit record: the two stages every request goes through.

``judge`` is the one decision for a bind/connect request, whichever
front-end asked: a max_rate token, then the rules (verdict.judge, pure).
``record`` writes the request's audit record before the decision takes
effect (a socket sent or installed, a grant made): with ``[audit] on_error
= "deny"`` a decision the log cannot take is refused instead, so nothing
leaves the broker unaudited. The kernel's own records of fast-path
connects are written by grants.py, which drains them. stages.py puts
these stages in their one order.
"""

from __future__ import annotations

import errno
import time

from graft.policy.models import format_loc

from . import request
from .audit import AuditLog, Record
from .tenant import Peer, TenantState
from .verdict import Verdict, judge, tenant_loc


def to_resolver(tenant: TenantState, req: request.Request) -> bool:
    """Whether req connects (or first sends) to the tenant's resolver, port 53."""
    resolver = tenant.config.dns.resolver
    if resolver == "off" or req.judged_as != "connect" or req.addr is None or req.addr.port != 53:
        return False
    ip = req.addr.ip
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip) == resolver


class Decisions:
    def __init__(self, audit: AuditLog, confinement_state: str, on_error: str):
        self.audit = audit
        self.confinement_state = confinement_state  # "on" | "off", in every record
        self.on_error = on_error  # the policy's [audit] on_error; the broker sets it on reload
        self.refused = 0  # decisions refused because the audit log could not take them

    def judge(self, tenant: TenantState, req: request.Request, peer: Peer) -> Verdict:
        """The decision for a bind/connect request of any front-end: max_rate, the resolver, then the rules."""
        if tenant.bucket is not None and not tenant.bucket.take(time.monotonic()):
            return Verdict("deny", tenant_loc(tenant.name, "max_rate"), errno.EAGAIN)
        if to_resolver(tenant, req):
            # The broker's own resolver listens in the program's network (docs/dns.md): a query
            # sent there by hand (a TCP fallback, a program with its own resolver) stays there.
            return Verdict("container", format_loc(("tenants", tenant.name, "dns", "resolver")))
        resolved = None
        if tenant.matcher.has_names:  # destinations by name: what the tenant's lookups returned, now
            now = time.monotonic()
            resolved = lambda ip: tenant.resolved.lookup(ip, now)  # noqa: E731
        return judge(req, tenant.matcher, peer.uid, resolved)

    @property
    def audit_required(self) -> bool:
        """[audit] on_error = "deny": nothing is granted that the audit log has not taken."""
        return self.on_error == "deny"

    def record(self, tenant: TenantState, peer: Peer, req: request.Request, verdict: Verdict, via: str) -> bool:
        """Audit a decision before it takes effect; whether it may (every front-end's last stage).

        False only when the record was lost and the policy says on_error =
        "deny": the caller then refuses the request (``unrecorded_errno``)
        and gives out nothing, so no socket leaves the broker unaudited.
        """
        if self.audit_request(tenant, peer, req, verdict, via) or not self.audit_required:
            return True
        self.refused += 1
        return False

    @staticmethod
    def unrecorded_errno(req: request.Request) -> int:
        """What a request refused for want of an audit record fails with: as a policy denial would."""
        return errno.EACCES if req.op == request.OP_BIND else errno.EPERM

    def audit_request(self, tenant: TenantState, peer: Peer, req: request.Request, verdict: Verdict, via: str) -> bool:
        """Write the request's audit record and count it for graft status; whether it was recorded.

        via: the front-end that asked, "shim" or "seccomp" (the kernel's
        fast-path records are written by grants.py).
        """
        tenant.counts[verdict.action] += 1
        host = verdict.target if verdict.action in ("graft", "error") and verdict.target != req.addr else None
        return self.audit.write(
            Record(
                tenant=tenant.name,
                pid=peer.pid,
                uid=peer.uid,
                op=req.op_name,
                proto=req.proto,
                family=req.family_name,
                addr=str(req.addr.ip) if req.addr is not None else None,  # None: a preissue names no address
                port=req.addr.port if req.addr is not None else None,
                host_addr=str(host) if host is not None else None,
                action=verdict.action,
                rule=verdict.rule,
                errno=verdict.errno,
                confinement=self.confinement_state,
                via=via,
                reason=verdict.reason,
                name=verdict.name,
            )
        )

    def audit_malformed(self, tenant: TenantState, peer: Peer, err: int, reason: str, via: str) -> None:
        """A request that could not be read: an error, with no op or address to name."""
        tenant.counts["error"] += 1
        self.audit.write(
            Record(
                tenant=tenant.name,
                pid=peer.pid,
                uid=peer.uid,
                op=None,
                proto=None,
                family=None,
                addr=None,
                port=None,
                host_addr=None,
                action="error",
                rule=None,
                errno=err,
                confinement=self.confinement_state,
                via=via,
                reason=reason,
            )
        )
