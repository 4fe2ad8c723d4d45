"""What the kernel lets grafted sockets do without asking: grants, pre-issued sockets, their audit.

The broker's verdicts live on in the kernel as grants (confine/lifecycle.py, maps.py):

* A TCP connect the broker grafted becomes a grant: the tenant's
  pre-issued sockets (``preissue``: unconnected, marked, handed to a
  shim's pool or a seccomp loop ahead of time) may then connect there
  without asking, and the kernel itself checks each such connect (the
  fast path, docs/architecture.md).
* A UDP destination the broker grafted becomes a grant for the tenant's
  grafted UDP sockets; a later destination is judged when a front-end asks
  (``judge_grant``).

Each tenant's grants sit under a grant id of its own; a reload that
changes its netns or uids gives it a new id (``new_id``), and any rules
change revokes every grant (``new_rules``). A grant is made only for a
verdict of the rules still in force: a front-end reads ``serial`` before
it judges, and ``grant`` refuses if a reload came in between.

The kernel writes a record of every fast-path connect to its audit ring;
``drain_kernel_audit``, a task of the broker nursery, moves them into the
audit log (``"via": "kernel"``). Without that ring there is no fast path.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import logging
import math
import socket
import time
from collections.abc import Hashable

import trio

from ..confine import fastpath, lifecycle, maps
from ..confine.lifecycle import Confinement
from . import request
from .audit import Record, json_string
from .decisions import Decisions
from .hostsock import HostSockets
from .resolved import plain
from .tenant import Peer, TenantState
from .verdict import Verdict, tenant_loc

log = logging.getLogger("graft.broker")

# How often the kernel's audit records of fast-path connects are written out:
# their lag in the audit log. The ring holds maps.EVENTS_SIZE bytes, about
# 21,000 records: it would take 400,000 connects/s to overflow it in between.
KERNEL_AUDIT_INTERVAL = 0.05
MAX_NAMED_GRANTS = 65536  # grants from rules' `names` whose name the kernel's records can carry


class Grants:
    def __init__(
        self,
        confinement: Confinement | None,
        tenants: dict[str, TenantState],
        decisions: Decisions,
        sockets: HostSockets,
    ):
        self.confinement = confinement
        self.tenants = tenants  # the broker's, by name: the kernel's records name a tenant by its grant id
        self.decisions = decisions
        self.sockets = sockets
        self._serial = 0
        self._tenant_by_gid: dict[int, str] = {}
        self._rule_ids: dict[str, int] = {}
        self._rules: list[str] = []
        self._events_lost = 0
        self._fast_path = False  # sockets are pre-issued only with confinement and its audit ring
        # (grant id, port, address) -> the name a rule's `names` granted it for: the kernel's records
        # of connects it judged by such a grant name it too. Bounded; oldest first out.
        self._names: dict[tuple[int, int, object], str] = {}
        self._named_gids: collections.Counter[int] = collections.Counter()  # grant id -> its entries in _names
        # What the kernel's records are written with changed (a grant id, a rule, _named_gids' keys):
        # _write_kernel_events tells the C reader before the next drain.
        self._names_version = 0
        self._ring_names = -1

    # ---- grant ids and rules -----------------------------------------------

    def new_id(self, tenant: TenantState) -> None:
        """A new id for the tenant's grants and pre-issued sockets: those issued before lose all grants."""
        assert self.confinement is not None
        self.drop(tenant)
        try:
            tenant.gid = self.confinement.new_grant_id()
        except (lifecycle.Unavailable, OSError) as e:
            tenant.gid = 0
            log.error("tenant %s: fast path off: %s", tenant.name, e)
            return
        self._tenant_by_gid[tenant.gid] = tenant.name
        self._names_version += 1

    def drop(self, tenant: TenantState) -> None:
        """The tenant's grant id retires: its grants (its own map in the kernel) go."""
        if self.confinement is None or not tenant.gid:
            return
        try:
            self.confinement.drop_grants(tenant.gid)
        except OSError as e:  # the map stays in the kernel, unreachable: no socket carries the id any more
            log.error("tenant %s: cannot remove its grants: %s", tenant.name, e)
        tenant.gid = 0

    def new_rules(self) -> None:
        """The rules change: grants made under the old ones, and verdicts still being carried out, go.

        Called in the same step as the tenants take their new rules (no
        checkpoint in between), so that no request judged by an old rule
        can make a grant that a new one would not.
        """
        self._serial += 1
        self._names.clear()
        self._named_gids.clear()
        self._names_version += 1
        if self.confinement is None:
            return
        try:
            self.confinement.revoke_grants()
        except OSError as e:  # cannot happen short of a kernel error; then no pre-issued socket can be trusted
            self._fast_path = False
            log.error("fast path off: cannot revoke the old rules' grants in the kernel: %s", e)

    @property
    def serial(self) -> int:
        """Read before a verdict is carried out; grant() makes no grant if a reload came in between."""
        return self._serial

    # ---- grants ------------------------------------------------------------

    def grant(self, tenant: TenantState, req: request.Request, verdict: Verdict, serial: int) -> bool:
        """A connect (or sendto) was grafted: the kernel lets the tenant's sockets reach there too.

        TCP: its pre-issued sockets may connect there (the fast path, off
        while the audit is required: the kernel's records of those connects
        can be lost). UDP: its grafted UDP sockets may send there. The
        verdict depends on the tenant, protocol, address and port only (the
        uid was checked when the sockets were handed out), so it holds for
        every later use until the rules change. Whether the grant was made.
        """
        if (
            self.confinement is None
            or not tenant.gid
            or req.judged_as != "connect"
            or verdict.action != "graft"
            or req.addr is None
            or (req.type == socket.SOCK_STREAM and self.decisions.audit_required)
            or serial != self._serial
        ):  # judged by rules no longer in force
            return False
        rule_id = self._rule_ids.get(verdict.rule)
        if rule_id is None:
            rule_id = self._rule_ids[verdict.rule] = len(self._rules)
            self._rules.append(verdict.rule)
            self._names_version += 1
        # A grant from a rule's `names` lapses with the answer it came from: the kernel's clock and
        # time.monotonic() are one (CLOCK_MONOTONIC); whole seconds, rounded down, so never later.
        expires = max(1, math.floor(verdict.expires)) if verdict.expires is not None else 0
        try:
            self.confinement.grant(tenant.gid, req.family, str(req.addr.ip), req.addr.port, rule_id, req.type, expires)
        except OSError as e:  # only a destination lost: the broker still answers
            log.warning("tenant %s: cannot grant %s in the kernel: %s", tenant.name, req.addr, e)
            return False
        key = (tenant.gid, req.addr.port, plain(req.addr.ip))
        if self._names.pop(key, None) is not None:
            self._forget_name(key)
        if verdict.name is not None:
            self._names[key] = verdict.name
            self._named_gids[key[0]] += 1
            if self._named_gids[key[0]] == 1:  # the grant id's records are Python's from now on
                self._names_version += 1
            if len(self._names) > MAX_NAMED_GRANTS:
                oldest = next(iter(self._names))
                del self._names[oldest]
                self._forget_name(oldest)
        return True

    def _forget_name(self, key: tuple[int, int, object]) -> None:
        self._named_gids[key[0]] -= 1
        if not self._named_gids[key[0]]:
            del self._named_gids[key[0]]
            self._names_version += 1

    def judge_grant(self, tenant: TenantState, req: request.Request, peer: Peer, via: str) -> Verdict:
        """GRANT: a new destination of a grafted UDP socket, judged as its sendto and granted in the kernel.

        Every front-end's: the shim asks when the kernel refused a send, the
        seccomp agent before it lets one go on. Synchronous from the
        judgement to the grant, so no reload can come between them. The
        socket is on the host already: a "container" verdict cannot be
        carried out on it and is refused. The verdict as recorded; "graft"
        means granted.
        """
        verdict = self.decisions.judge(tenant, req, peer)
        if verdict.action == "container":
            verdict = Verdict(
                "deny", verdict.rule, errno.EPERM, None, "a grafted socket cannot send through the container's stack"
            )
        elif verdict.action == "graft" and (self.confinement is None or not tenant.gid):
            verdict = Verdict(
                "error",
                verdict.rule,
                errno.EPERM,
                verdict.target,
                "no grants: confinement (or this tenant's grant map) is not in place",
            )
        if not self.decisions.record(tenant, peer, req, verdict, via):
            return Verdict("deny", verdict.rule, self.decisions.unrecorded_errno(req), None, "not recorded")
        if verdict.action == "graft" and not self.grant(tenant, req, verdict, self._serial):
            return Verdict("error", verdict.rule, errno.EPERM, verdict.target, "the grant failed")
        return verdict

    # ---- what the kernel holds of a socket (the seccomp front-end asks) -----

    @property
    def confined(self) -> bool:
        """Whether the kernel confines the sockets the broker hands out."""
        return self.confinement is not None

    def loop_maps(self) -> tuple[int, int]:
        """The maps the seccomp agent's C loop reads (marks, grants), which it never writes."""
        assert self.confinement is not None
        return self.confinement.map_fd, self.confinement.maps["grants"]

    def held(self, sock: socket.socket) -> bytes | None:
        """sock's mark when it is a socket the broker handed out and the kernel holds; else None.

        A pre-issued socket whose first connect the kernel refused (its
        grant went meanwhile: a reload, the LRU) holds nothing yet: None, so
        that the connect is judged again like one on the container's own.
        """
        assert self.confinement is not None
        mark = self.confinement.mark_of(sock)
        return None if mark is None or maps.unconnected_preissued(mark) else mark

    def needs_no_grant(self, mark: bytes, addr: request.SockAddr) -> bool:
        """Whether a send to addr on a held UDP socket is the kernel's alone to judge.

        So it is when the socket may send to any peer, when addr is granted
        already, or when the socket carries no grant id (no grant could help).
        """
        assert self.confinement is not None
        flags, grant_id = maps.mark_flags_and_tenant(mark)
        return (
            bool(flags & maps.F_ANY_PEER)
            or not grant_id
            or self.confinement.granted(grant_id, addr.family, str(addr.ip), addr.port, socket.SOCK_DGRAM)
        )

    # ---- pre-issued sockets ------------------------------------------------

    async def preissue(
        self, tenant: TenantState, req: request.Request, peer: Peer, via: str, pool: Hashable
    ) -> tuple[fastpath.Batch, Verdict | None, int]:
        """Unconnected TCP sockets for a fast path: as many as max_sockets and max_rate allow.

        Both front-ends' (via): the shim's pools, and the seccomp agent's C
        loop (seccomp_fast.c), which puts them on apps' fds. Returns the
        sockets (the broker's copies: the caller sends them on and closes
        them), or none and the refusal, audited; and the grant id they are
        marked with: the one in force when the peer's uid was checked (a
        reload that changes the tenant's netns or uids meanwhile gives it a
        new id, and these sockets are refused rather than marked with it).

        They are issued only while the tenant holds fewer than half its
        max_sockets, so sockets idling in pools never make a real connect
        fail with ENOBUFS; beyond that every connect asks the broker. pool
        names what the sockets fill (a shim process, a seccomp listener's
        loop): the pools that asked lately share that half (core/poolshare.py).

        Each is marked pre-issued for the tenant: the kernel lets it connect
        only where the broker has granted (``grant``). Issuing confers no
        access, so an issue is not audited (the connects are, by the kernel);
        a refusal is, like every other decision.
        """
        name = tenant.name

        def refuse(verdict: Verdict) -> tuple[fastpath.Batch, Verdict, int]:
            return self._refuse(tenant, peer, req, via, verdict)

        grant_id, namespace = tenant.gid, tenant.namespace  # what the checks below are good for
        if self.confinement is None or not self._fast_path or not grant_id:
            return refuse(
                Verdict(
                    "deny",
                    "broker.confinement",
                    errno.EOPNOTSUPP,
                    reason="no fast path: it needs confinement and the kernel's audit ring",
                ),
            )  # nothing would hold them to the policy
        if self.decisions.audit_required:  # the kernel's records of fast-path connects can be lost (a full ring)
            return refuse(
                Verdict("deny", "audit.on_error", errno.EOPNOTSUPP, reason='no fast path while on_error = "deny"'),
            )
        if not tenant.matcher.uid_allowed(peer.uid):
            return refuse(Verdict("deny", tenant_loc(name, "uids"), errno.EPERM))
        # Idle pre-issued sockets must not crowd out real ones: pools fill only the lower half.
        share, now = tenant.config.max_sockets // 2, time.monotonic()
        n = await self.sockets.room(tenant, tenant.pools.batch(pool, req.wanted, share, now), share)
        if tenant.pools.warn_now(now):
            log.warning(
                "tenant %s: %d processes share the fast path's pools (half of max_sockets %d), refills of %d:"
                " a busy one runs dry within a time slice and waits; raise max_sockets to about %d"
                " (docs/policy.md, max_sockets)",
                name,
                len(tenant.pools),
                tenant.config.max_sockets,
                tenant.pools.each,
                128 * len(tenant.pools),
            )
        if n == 0:
            return refuse(
                Verdict(
                    "deny", tenant_loc(name, "max_sockets"), errno.ENOBUFS, reason="pools fill only half of max_sockets"
                ),
            )
        if tenant.bucket is not None:
            n = tenant.bucket.take_up_to(n, time.monotonic())
            if n == 0:
                return refuse(Verdict("deny", tenant_loc(name, "max_rate"), errno.EAGAIN))
        issuer, kid = self.confinement.issuer(), tenant.kid
        try:  # made, marked and counted in C, many at a time (confine/fastpath.py)
            batch = await namespace.run(
                lambda: issuer.issue(req.family, req.type, req.protocol, n, namespace.owner, grant_id, kid)
            )
        except fastpath.LockError as e:  # fail closed: none of them leaves
            tenant.issued += e.counted  # closed, and their closes counted
            log.error("tenant %s: %s", tenant.name, e)
            return refuse(Verdict("error", "broker.confinement", errno.EPERM, reason=str(e)))
        except OSError as e:  # from graft_issue (an IssueError) or from entering the namespace
            tenant.issued += getattr(e, "counted", 0)
            log.error("tenant %s: cannot open sockets to pre-issue: %s", tenant.name, e)
            return refuse(
                Verdict("error", tenant_loc(name, "netns"), e.errno or errno.EIO, reason=f"cannot open sockets: {e}"),
            )
        tenant.issued += n  # the kernel counts their closes from here, whether they leave or not
        if tenant.gid != grant_id:
            batch.close()
            return refuse(
                Verdict("error", "broker.reload", errno.EAGAIN, reason="the tenant's netns or uids changed meanwhile"),
            )
        tenant.preissued += n
        return batch, None, grant_id

    def _refuse(
        self, tenant: TenantState, peer: Peer, req: request.Request, via: str, verdict: Verdict
    ) -> tuple[fastpath.Batch, Verdict, int]:
        self.decisions.audit_request(tenant, peer, req, verdict, via)
        return fastpath.NONE, verdict, 0

    # ---- the kernel's audit records ----------------------------------------

    def open_audit_ring(self) -> fastpath.KernelAudit | None:
        """The kernel's ring of fast-path connect records, mapped: the fast path is on from here.

        None, and the fast path stays off, without confinement or when the
        ring cannot be mapped (or its C reader loaded): nobody would audit
        those connects.
        """
        if self.confinement is None:
            return None
        try:
            ring = fastpath.KernelAudit.mapped(self.confinement.maps["events"], maps.EVENTS_SIZE)
        except (OSError, fastpath.Unavailable) as e:
            log.error("fast path off: cannot read the kernel's audit ring: %s", e)
            return None
        self._fast_path = True
        return ring

    async def drain_kernel_audit(self, ring: fastpath.KernelAudit) -> None:
        """Write the kernel's records of fast-path connects to the audit log, every KERNEL_AUDIT_INTERVAL.

        A drain yields to the broker's other tasks after each C call's few
        hundred lines: at 40,000 fast-path connects a second an interval
        brings 2,000 records, milliseconds of formatting in one piece,
        during which every shim's refill waited (busy stretches of up to
        51 ms measured at 8 processes, 7 ms after).
        """
        try:
            while True:
                await trio.sleep(KERNEL_AUDIT_INTERVAL)
                try:
                    for _ in self._kernel_events_written(ring):
                        await trio.lowlevel.checkpoint()  # what was drained is written: nothing is lost here
                except Exception:  # a bug here must cost audit records, never the broker
                    log.exception("audit: cannot write the kernel's records of fast-path connects")
        finally:
            # Until the next broker starts, no pre-issued socket may connect anywhere:
            # nobody would audit it, nor answer for rules that may change meanwhile.
            self.new_rules()
            self._audit_kernel_events(ring)  # what the last interval left
            ring.close()

    def _audit_kernel_events(self, ring: fastpath.KernelAudit) -> None:
        try:
            self._write_kernel_events(ring)
        except Exception:  # a bug here must cost audit records, never the broker
            log.exception("audit: cannot write the kernel's records of fast-path connects")

    def _write_kernel_events(self, ring: fastpath.KernelAudit) -> None:
        """The ring's records, in order, all at once (the last drain, as the broker stops)."""
        for _ in self._kernel_events_written(ring):
            pass

    def _kernel_events_written(self, ring: fastpath.KernelAudit):
        """The ring's records, in order: written in C, but for those of grant ids _names_for_ring leaves to Python.

        Yields after each piece is written (a drain call's lines, or one
        record Python writes), so that its caller may let other tasks run;
        what they changed meanwhile (a grant from a rule's ``names``, a new
        grant id) applies to the records after it, as in the next drain.
        """
        self._update_ring_names(ring)
        for lines, n, held in ring.drain():
            if lines is not None:
                self.decisions.audit.write_lines(lines, n)
            else:
                self._write_kernel_event(maps.decode_event(held))
            yield
            self._update_ring_names(ring)
        self._count_written(ring)
        assert self.confinement is not None
        lost = self.confinement.events_lost()
        if lost > self._events_lost:
            log.error(
                "audit: %d record(s) of fast-path connects lost (the kernel's ring was full)", lost - self._events_lost
            )
            self._events_lost = lost

    def _update_ring_names(self, ring: fastpath.KernelAudit) -> None:
        if self._ring_names != self._names_version:
            self._count_written(ring)
            ring.set_names(*self._names_for_ring())
            self._ring_names = self._names_version

    def _names_for_ring(self) -> tuple[list[tuple[int, bool, str]], list[str], str]:
        """What the C reader writes records with: each grant id's tenant, the rules; as JSON.

        A grant id with grants from a rule's ``names`` is left to Python
        (its records may name the name); so, by not being listed, is an
        earlier broker's.
        """
        tenants = [(gid, gid in self._named_gids, json_string(name)) for gid, name in self._tenant_by_gid.items()]
        return tenants, [json_string(rule) for rule in self._rules], json_string(self.decisions.confinement_state)

    def _count_written(self, ring: fastpath.KernelAudit) -> None:
        for gid, n in ring.take_written().items():
            tenant = self.tenants.get(self._tenant_by_gid[gid])
            if tenant is not None and tenant.gid == gid:
                tenant.counts["graft"] += n

    def _write_kernel_event(self, ev: maps.ConnectEvent) -> None:
        """One record the C reader left to Python: an earlier broker's grant, or one that may be a name's."""
        name = self._tenant_by_gid.get(ev.tenant_id)
        reason = None
        if name is None:
            # Judged by an earlier broker's grant after it stopped uncleanly
            # (a crash): its tenant names and rules are not known here.
            reason = f"judged in the kernel by a grant of an earlier broker (tenant id {ev.tenant_id})"
            log.warning("audit: a fast-path connect of pid %d was judged by an earlier broker's grant", ev.pid)
        else:
            tenant = self.tenants.get(name)
            if tenant is not None and tenant.gid == ev.tenant_id:
                tenant.counts["graft"] += 1
        rule = self._rules[ev.rule_id] if name is not None and ev.rule_id < len(self._rules) else None
        self.decisions.audit.write(
            Record(
                tenant=name,
                pid=ev.pid,
                uid=ev.uid,
                op="connect",
                proto="tcp",
                family=request.family_name(ev.family),
                addr=ev.addr,
                port=ev.port,
                host_addr=None,
                action="graft",
                rule=rule,
                errno=0,
                confinement=self.decisions.confinement_state,
                via="kernel",
                reason=reason,
                name=self._names.get((ev.tenant_id, ev.port, plain(ipaddress.ip_address(ev.addr)))),
            )
        )
