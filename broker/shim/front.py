"""The shim front-end: each tenant's Unix socket, and the wire protocol libgraft.so speaks there.

Its tasks run under each tenant's (docs/architecture.md, task tree).
Each tenant has one SOCK_SEQPACKET listener at <socket_dir>/<tenant>.sock
(bound here, or adopted from systemd's fd store across a restart: fdstore.py);
the tenant is known from the listener a connection arrived on, the peer's
pid and uid from SO_PEERCRED. A client connection carries any number of
request/reply exchanges in turn. ``_exchange`` is the one place a shim's
request is decoded and handed to core/ (``Stages.carry_out``; grants.py for
PREISSUE and GRANT); the reply delivers the outcome, with the host socket
attached, and the broker closes its own copy
right after, so it never keeps a grafted socket open.

Every byte from a client is untrusted: a malformed message gets an error
reply and an audit record, and the connection is closed; stray fds in
ancillary data are closed; a client that vanishes costs nothing but its own
connection. A tenant may hold at most ``MAX_CLIENTS_PER_TENANT`` connections
at once, so one tenant cannot exhaust the broker's fds for the others, and
is served ``TURNS_PER_TENANT`` requests at a time, so a flooding tenant
queues behind itself.
"""

from __future__ import annotations

import array
import errno
import logging
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from ..core import request
from ..core.hostsock import recorded_options
from ..core.stages import Outcome, Stages
from ..core.tenant import Peer, ServeResolver, TenantState
from ..core.verdict import Verdict
from ..io.fdstore import FdStore
from ..io.scmrights import STRAY_FD_CLOSERS, close_all, passed_fds
from ..io.unixsock import accept_forever, adopt_unix_listener, bind_unix_listener, unlink_if_socket
from . import wire

log = logging.getLogger("graft.broker")

# A client connection idle this long is closed, so processes that graft once
# and live on do not keep the tenant's slots; the shim's pooled connection
# then fails on its next call and it retries on a fresh one.
IDLE_TIMEOUT = 60.0
_ANC_SPACE = socket.CMSG_SPACE(wire.MAX_OPTS * 4)  # room to receive (and close) stray fds
_PEERCRED = struct.Struct("3i")


def outcome_reply(req: request.Request, out: Outcome) -> bytes:
    """The reply that delivers a carried-out bind/connect; with a socket, it says how the app's call ends."""
    v = out.verdict
    if out.sock is None:
        if v.action == "container":
            return wire.encode_reply(wire.V_CONTAINER)
        return wire.encode_reply(wire.V_DENY if v.action == "deny" else wire.V_ERROR, v.errno)
    if req.flags & request.REQF_SENDTO:
        return wire.encode_reply(wire.V_GRAFT, 0)  # an unconnected UDP socket: the app's sendto follows
    if req.op == request.OP_CONNECT:
        return wire.encode_reply(wire.V_GRAFT, out.err)
    return wire.encode_reply(wire.V_GRAFT, 0, v.target)  # a bind: the address it got


def fd_less_reply(verdict: Verdict) -> bytes:
    """The reply to a request answered without a socket: a GRANT granted, or a refusal with its errno."""
    kind = {"graft": wire.V_GRAFT, "deny": wire.V_DENY}.get(verdict.action, wire.V_ERROR)
    return wire.encode_reply(kind, 0 if kind == wire.V_GRAFT else verdict.errno)


class ShimFront:
    def __init__(self, stages: Stages, fdstore: FdStore, socket_dir: Path, serve_resolver: ServeResolver):
        self.stages = stages
        self.serve_resolver = serve_resolver  # dns/resolver.py's Resolvers.serve (a front-end of its own)
        self.fdstore = fdstore  # the tenants' listeners survive a restart in systemd's fd store
        self.socket_dir = socket_dir
        self._closers = trio.CapacityLimiter(STRAY_FD_CLOSERS)

    # ---- the tenants' sockets ----------------------------------------------

    def drop_leftover_listeners(self) -> None:
        """Stored listeners of tenants no longer in the policy: out of the store, file removed."""
        fdstore, socket_dir = self.fdstore, self.socket_dir
        for name, socks in fdstore.leftovers().items():
            fdstore.remove(name)
            for sock in socks:
                with sock:
                    bound = sock.getsockname() if sock.family == socket.AF_UNIX else ""
                path = Path(bound) if isinstance(bound, str) and bound else None
                if path is not None and path.parent == socket_dir:
                    unlink_if_socket(path)
            log.info("tenant %s is not in the policy: its stored listener is closed", name)

    @asynccontextmanager
    async def listening(self, tenant: TenantState) -> AsyncIterator[trio.socket.SocketType]:
        """The tenant's listener while the block runs; then closed, its socket file removed unless stored.

        A tenant removed by a reload leaves the fd store and loses its file;
        a stop leaves a stored listener in place for the next broker.
        """
        listener, identity, stored = await self._open_listener(tenant)
        with listener:
            try:
                yield listener
            finally:
                if tenant.removed and stored:
                    self.fdstore.remove(tenant.name)
                if tenant.removed or not stored:
                    unlink_if_socket(tenant.path, identity)

    async def _open_listener(self, tenant: TenantState) -> tuple[trio.socket.SocketType, tuple[int, int], bool]:
        """The tenant's listener: adopted from the fd store, or bound; stored either way.

        Returns (listener, socket file identity, whether the fd store holds it).
        """
        fdstore = self.fdstore
        mode = tenant.config.socket_mode_int
        adopted, identity = None, None
        for sock in fdstore.take(tenant.name):  # normally one; the first usable one wins
            if adopted is not None:
                sock.close()
                continue
            try:
                identity = adopt_unix_listener(sock, tenant.path, mode)
                adopted = sock
            except (ValueError, OSError) as e:
                log.warning("tenant %s: a stored listener cannot be used (%s)", tenant.name, e)
                sock.close()
        if adopted is not None:
            log.info("tenant %s: listener adopted from the service manager's fd store", tenant.name)
            listener = trio.socket.from_stdlib_socket(adopted)
        else:
            listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                identity = await bind_unix_listener(listener, tenant.path, mode)
            except BaseException:
                listener.close()
                raise
        # Pushed again when adopted too: that leaves exactly this one stored under the name.
        return listener, identity, fdstore.push(tenant.name, listener)

    async def accept(self, tenant: TenantState, listener: trio.socket.SocketType) -> None:
        """Serve the tenant's connections, each in a task of its own, until cancelled."""
        await accept_forever(
            listener, lambda conn: self._serve_client(tenant, conn), f"tenant {tenant.name}", tenant.slots
        )

    # ---- one connection ----------------------------------------------------

    async def _serve_client(self, tenant: TenantState, conn: trio.socket.SocketType) -> None:
        # The exchange loop drives the non-blocking socket itself: one
        # wait for readability per request, then plain recvmsg/sendmsg,
        # instead of trio's socket methods' extra scheduling points.
        with socket.socket(fileno=conn.detach()) as sock:
            sock.setblocking(False)
            peer = Peer(*_PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)))
            while await self._take_turn(tenant, sock, peer):
                pass

    async def _take_turn(self, tenant: TenantState, conn: socket.socket, peer: Peer) -> bool:
        """Wait for a request on conn, then serve it in one of the tenant's turns.

        The turn is taken only once the connection is readable: idle
        connections (the shim keeps a pool of them) hold nothing.
        """
        with trio.move_on_after(IDLE_TIMEOUT) as idle:
            await trio.lowlevel.wait_readable(conn)
        if idle.cancelled_caught:
            return False  # idle: free the tenant's slot; the shim reconnects on its next call
        async with tenant.turns:
            # Yield once holding the turn: the tenant's other ready
            # connections then find it taken and wait off the run queue,
            # so each tenant gets about one request per scheduling round.
            await trio.lowlevel.checkpoint()
            try:
                return await self._exchange(tenant, conn, peer)
            except Exception:  # a bug must cost one client its connection, never the broker
                log.exception("tenant %s: internal error serving pid %d; connection dropped", tenant.name, peer.pid)
                return False

    async def _exchange(self, tenant: TenantState, conn: socket.socket, peer: Peer) -> bool:
        """Serve one request on conn (readable). Returns whether to keep the connection."""
        try:
            data, ancdata, msg_flags, _ = conn.recvmsg(wire.REQUEST_SIZE + 1, _ANC_SPACE)
        except BlockingIOError:
            return True  # woken without a message after all: wait again
        except OSError:
            return False  # the client reset the connection: nothing to answer
        stray = passed_fds(ancdata)
        if stray:
            # close_all defuses lingering sockets; another kind of fd may
            # still block in close (a hung NFS file): never on the event
            # loop, and never holding up the broker's shutdown.
            await trio.to_thread.run_sync(close_all, stray, limiter=self._closers, abandon_on_cancel=True)
        if not data and not ancdata:
            return False  # orderly close
        try:
            if stray or ancdata or msg_flags & socket.MSG_CTRUNC:
                raise request.BadRequest(errno.EBADMSG, "request carried ancillary data")
            if msg_flags & socket.MSG_TRUNC:
                raise request.BadRequest(errno.EMSGSIZE, "request longer than a graft_request")
            req = wire.decode_request(data)
        except request.BadRequest as e:
            self._audit_refusal(tenant, peer, e)
            await self._send(conn, wire.encode_reply(wire.V_ERROR, e.errno), [], tenant, peer)
            return False

        if req.op == request.OP_RESOLVER:
            return await self._send(conn, await self._resolver(tenant, peer), [], tenant, peer)

        grants = self.stages.grants
        if req.op == request.OP_PREISSUE:
            batch, refusal, _ = await grants.preissue(tenant, req, peer, "shim", ("shim", peer.pid))
            reply = fd_less_reply(refusal) if refusal is not None else wire.encode_reply(wire.V_GRAFT, 0)
            try:
                return await self._send(conn, reply, batch.fds(), tenant, peer)
            finally:
                batch.close()

        if req.op == request.OP_GRANT:
            reply = fd_less_reply(grants.judge_grant(tenant, req, peer, "shim"))
            return await self._send(conn, reply, [], tenant, peer)

        out = await self.stages.carry_out(tenant, req, peer, "shim", recorded_options(tenant.name, req.opts))
        try:
            self.stages.grant(tenant, req, out)  # before the reply: the app's next connect finds it
            return await self._send(
                conn, outcome_reply(req, out), [out.sock.fileno()] if out.sock is not None else [], tenant, peer
            )
        finally:
            out.close()

    async def _resolver(self, tenant: TenantState, peer: Peer) -> bytes:
        """RESOLVER: the tenant's resolver, served in the peer's network namespace (graft_wire.h)."""
        try:
            addr = await self.serve_resolver(tenant, peer)
        except OSError as e:
            log.error("tenant %s: cannot serve a resolver for pid %d: %s", tenant.name, peer.pid, e)
            return wire.encode_reply(wire.V_ERROR, e.errno or errno.EIO)
        if addr is None:
            return wire.encode_reply(wire.V_CONTAINER)  # dns.resolver = "off": names stay the container's
        return wire.encode_reply(wire.V_GRAFT, 0, addr)

    async def _send(self, conn: socket.socket, reply: bytes, fds: list[int], tenant: TenantState, peer: Peer) -> bool:
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        try:
            conn.sendmsg([reply], anc)
            return True
        except BlockingIOError:
            # The shim has one request in flight per connection and reads
            # its reply; a client whose replies pile up is not a shim, and
            # waiting for it would hold the tenant's turn.
            log.warning("tenant %s: pid %d does not read its replies; connection dropped", tenant.name, peer.pid)
            return False
        except OSError as e:
            # Not an error: a shim that only says it runs in a namespace (RESOLVER, libgraft.c) goes at once.
            log.debug("tenant %s: client pid %d went away before its reply: %s", tenant.name, peer.pid, e)
            return False

    def _audit_refusal(self, tenant: TenantState, peer: Peer, e: request.BadRequest) -> None:
        """A malformed request: audited as an error, with no op or address to name (none could be read)."""
        log.warning("tenant %s: malformed request from pid %d: %s", tenant.name, peer.pid, e.reason)
        self.stages.decisions.audit_malformed(tenant, peer, e.errno, e.reason, "shim")
