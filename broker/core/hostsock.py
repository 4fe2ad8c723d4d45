"""The host-socket factory: the one place a tenant's grafted socket is made.

Both front-ends end here once ``verdict.judge`` has said "graft": the shim's
requests (shim/front.py) and the seccomp agent's notifications (seccomp/agent.py).

    front-end (shim | seccomp) → verdict.judge → HostSockets.make → audit

``make`` checks ``max_sockets``, creates the socket in the tenant's network
namespace, lets the front-end configure it (the options the shim recorded,
or those copied from the trapped socket), binds or connects it as the
verdict says, and, with confinement, marks it in the kernel and counts it
against the tenant, all before the socket can leave the broker. Without
confinement the broker remembers the socket's inode instead and prunes the
count with sock_diag (``room``).

A verdict the factory cannot carry out comes back as a changed Verdict:
"deny" at ``max_sockets`` (ENOBUFS), "error" when the namespace is gone,
socket() fails, bind/connect fails, or the socket cannot be locked (fail
closed: an unlocked socket is never handed out).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..confine.lifecycle import Confinement
from . import request
from .netns import NetnsError
from .sockopts import apply_options, split_options
from .verdict import UNREACHABLE_ERRNO, Verdict, tenant_loc

if TYPE_CHECKING:
    from .tenant import TenantState

log = logging.getLogger("graft.broker")

# After a sock_diag refresh finds a tenant still at max_sockets, further
# requests are refused without another dump for this long.
LIVENESS_REFRESH_INTERVAL = 0.1


@dataclass(frozen=True, slots=True)
class Made:
    """What ``HostSockets.make`` did: the socket (None if not made) and the verdict as audited.

    err: the result of the broker's own connect (0 or EINPROGRESS; another
    errno is also in the verdict), 0 when the broker did not connect.
    """

    sock: socket.socket | None
    verdict: Verdict
    err: int = 0


def recorded_options(tenant_name: str, opts: tuple[request.SockOpt, ...]) -> Callable[[socket.socket], None]:
    """A configure step that applies the options a shim recorded, as far as the allowlist admits."""

    def configure(sock: socket.socket) -> None:
        split = split_options(opts)
        for o in split.dropped:
            log.debug("tenant %s: dropped socket option level=%d name=%d", tenant_name, o.level, o.name)
        for o, e in apply_options(sock, split.admitted):
            log.debug("tenant %s: socket option level=%d name=%d refused: %s", tenant_name, o.level, o.name, e)

    return configure


class HostSockets:
    """Makes, locks and counts the tenants' host sockets."""

    def __init__(self, confinement: Confinement | None):
        self.confinement = confinement

    async def make(
        self,
        tenant: TenantState,
        req: request.Request,
        verdict: Verdict,
        configure: Callable[[socket.socket], None],
        *,
        connect: bool = True,
    ) -> Made:
        """Open, set up, bind or connect, lock and count the host socket for a graft verdict.

        connect=False leaves a connect to the caller (the seccomp agent lets
        the app's own call run on the socket): the socket is then only locked
        to the judged destination, which needs confinement. A UDP request
        with REQF_SENDTO is bound to the wildcard address and left
        unconnected, and a bind is always carried out here.
        """
        assert verdict.target is not None
        assert connect or self.confinement is not None, "an unconnected socket is pinned only by confinement"
        # As they were when the verdict was judged: a reload meanwhile may change them.
        namespace, grant_id = tenant.namespace, tenant.gid
        if not await self.room(tenant, 1):
            return Made(None, Verdict("deny", tenant_loc(tenant.name, "max_sockets"), errno.ENOBUFS, verdict.target))
        try:
            sock = await namespace.socket(req.family, req.type, req.protocol)
        except NetnsError as e:
            log.error("tenant %s: %s", tenant.name, e.strerror)
            return Made(
                None, Verdict("error", verdict.rule, UNREACHABLE_ERRNO[req.op_name], verdict.target, e.strerror)
            )
        except OSError as e:
            log.error("tenant %s: cannot open a socket: %s", tenant.name, e)
            return Made(
                None, Verdict("error", verdict.rule, e.errno or errno.EIO, verdict.target, f"socket(): {e.strerror}")
            )
        try:
            configure(sock)
            target = verdict.target.to_python()
            err = 0
            if req.flags & request.REQF_SENDTO:
                # Judged as a connect to the first destination, but left
                # unconnected: a connected UDP socket would drop datagrams
                # from any other peer. Bound here (wildcard, port 0) so it
                # has its local port before the app's first send, and so
                # sock_diag sees it for max_sockets.
                sock.bind(("::", 0, 0, 0) if req.family == socket.AF_INET6 else ("0.0.0.0", 0))
            elif req.op == request.OP_CONNECT:
                if connect:
                    err = sock.connect_ex(target)
            else:
                sock.bind(target)
        except OSError as e:
            sock.close()
            return Made(None, Verdict("error", verdict.rule, e.errno or errno.EIO, verdict.target, e.strerror))
        except BaseException:
            sock.close()
            raise
        if self.confinement is not None:
            # Locked after the broker's own bind/connect, before the fd leaves: from here on the
            # kernel refuses re-pointing. A grafted UDP server may answer any peer.
            try:
                self.confinement.mark(
                    sock,
                    allow_any_peer=self._may_send_anywhere(tenant, req),
                    dest=target if req.op == request.OP_CONNECT else None,
                    grant_id=grant_id if req.type == socket.SOCK_DGRAM else 0,
                )
                self.own(tenant, sock)
            except OSError as e:  # fail closed: an unlocked (or uncounted) socket is not handed out
                sock.close()
                log.error("tenant %s: cannot lock a grafted socket: %s", tenant.name, e)
                return Made(
                    None, Verdict("error", verdict.rule, errno.EPERM, verdict.target, f"confinement: {e.strerror}")
                )
        else:
            tenant.live.add(os.fstat(sock.fileno()).st_ino)
        if err not in (0, errno.EINPROGRESS):
            verdict = Verdict("graft", verdict.rule, err, verdict.target)
        return Made(sock, verdict, err)

    @staticmethod
    def _may_send_anywhere(tenant: TenantState, req: request.Request) -> bool:
        """Whether the kernel may let this grafted socket send to any peer.

        A grafted UDP server answers whoever wrote to it. A UDP socket
        grafted by its first sendto was judged for that destination; it may
        send anywhere if the policy grafts every UDP destination anyway,
        and otherwise to the destinations the broker has granted its
        tenant for UDP (the mark's grant id; docs/security.md).
        """
        if req.type != socket.SOCK_DGRAM:
            return False
        if req.op == request.OP_BIND:
            return True
        return bool(req.flags & request.REQF_SENDTO) and tenant.matcher.grafts_everything("connect", "udp")

    # ---- max_sockets --------------------------------------------------------

    async def room(self, tenant: TenantState, want: int, limit: int | None = None) -> int:
        """How many of want more sockets the tenant may hold under max_sockets (or a lower limit).

        With confinement, the kernel counts every close of a socket the
        broker handed out (confine.Confinement.own): the count is exact and
        costs one map lookup. Without, the count only grows here; sockets the
        apps closed are pruned by a sock_diag dump when the count reaches the
        limit. One dump runs at a time per tenant and concurrent requests
        wait for its result; a dump that finds the tenant still full is
        trusted for LIVENESS_REFRESH_INTERVAL, so a tenant hammering at its
        limit cannot make the broker dump on every request.
        """
        limit = tenant.config.max_sockets if limit is None else limit
        if self.confinement is not None:
            # The count of closes last read only lags: if it leaves room, there is room.
            if tenant.issued - tenant.closed + want <= limit:
                return want
            return max(0, min(want, limit - await self.live_count(tenant)))
        if len(tenant.live) < limit:
            return min(want, limit - len(tenant.live))
        if tenant.refreshing is not None:
            await tenant.refreshing.wait()
            return max(0, min(want, limit - len(tenant.live)))
        if time.monotonic() < tenant.full_until:
            return 0
        tenant.refreshing = trio.Event()
        try:
            await self._prune(tenant)
        except OSError as e:
            log.error("tenant %s: sock_diag dump failed: %s", tenant.name, e)
            return 0
        finally:
            tenant.refreshing.set()
            tenant.refreshing = None
        if len(tenant.live) < limit:
            return min(want, limit - len(tenant.live))
        tenant.full_until = time.monotonic() + LIVENESS_REFRESH_INTERVAL
        return 0

    async def live_count(self, tenant: TenantState) -> int:
        """Grafted sockets of the tenant still open (pruned first, without confinement)."""
        if self.confinement is not None:
            tenant.closed = self.confinement.released(tenant.kid)
            return tenant.issued - tenant.closed
        await self._prune(tenant)
        return len(tenant.live)

    def own(self, tenant: TenantState, sock: socket.socket) -> None:
        """Count a socket about to be handed out against max_sockets, until the app closes it."""
        assert self.confinement is not None
        self.confinement.own(sock, tenant.kid)
        tenant.issued += 1

    @staticmethod
    async def _prune(tenant: TenantState) -> None:
        """Forget handed-out sockets the apps have closed (a sock_diag dump).

        Sockets handed out while the dump ran are kept: the dump may have
        been taken before they existed.
        """
        before = set(tenant.live)
        alive = await tenant.namespace.live_inodes()
        tenant.live = (before & alive) | (tenant.live - before)
