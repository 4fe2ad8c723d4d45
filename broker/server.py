"""The broker's trio task tree: tenant listeners, client connections, grafts.

    Broker.run                      (owns the broker nursery)
      └─ _serve_tenant  × tenant    (own cancel scope: removed on reload)
           └─ _serve_client × connection  (bounded by the tenant's slots)

Each tenant has one SOCK_SEQPACKET listener at <socket_dir>/<tenant>.sock
(bound here, or adopted from systemd's fd store across a restart: fdstore.py);
the tenant is known from the listener a connection arrived on, the peer's
pid and uid from SO_PEERCRED. A client connection carries any number of
request/reply exchanges in turn. ``_exchange`` is the one place a request
is decoded, judged (decide.judge), carried out on the host and audited; the
reply goes back with the host socket attached, and the broker closes its
own copy right after, so it never keeps a grafted socket open.

With kernel confinement on, the broker also runs the connect fast path
(docs/architecture.md, grants.py): a shim may ask for unconnected TCP
sockets ahead of time (PREISSUE), and each TCP connect the broker grafts
becomes a grant in the kernel, so that those sockets may connect there
without asking.

Every byte from a client is untrusted: a malformed message gets an error
reply and the connection is closed; stray fds in ancillary data are closed;
a client that vanishes costs nothing but its own connection. A tenant may
hold at most ``tenant.MAX_CLIENTS_PER_TENANT`` connections at once, so one tenant
cannot exhaust the broker's fds for the others.
"""
from __future__ import annotations

import array
import errno
import logging
import os
import socket
import struct
import time
from datetime import datetime, timezone
from pathlib import Path

import trio

from graft.policy import PolicyFile, Tenant, TenantMatcher, compile_policy

from . import confine, wire
from .admin import ADMIN_SOCKET, serve_admin
from .seccomp_abi import SECCOMP_SOCKET
from .unixsock import adopt_unix_listener, bind_unix_listener, unlink_if_socket
from .audit import AuditLog
from .confine import Confinement
from .decide import Verdict
from .decisions import Decisions
from .grants import Grants
from .fdstore import FdStore
from .hostsock import HostSockets, recorded_options
from .netns import Namespace
from .scmrights import STRAY_FD_CLOSERS, close_all, passed_fds
from .seccomp import SeccompAgent
from .tenant import Peer, TenantState

log = logging.getLogger("graft.broker")

# A client connection idle this long is closed, so processes that graft once
# and live on do not keep the tenant's slots; the shim's pooled connection
# then fails on its next call and it retries on a fresh one.
IDLE_TIMEOUT = 60.0
_ANC_SPACE = socket.CMSG_SPACE(wire.MAX_OPTS * 4)  # room to receive (and close) stray fds
_PEERCRED = struct.Struct("3i")


class Broker:
    def __init__(self, policy: PolicyFile, socket_dir: Path, audit: AuditLog, confinement: Confinement | None = None,
                 fdstore: FdStore | None = None):
        self.policy = policy
        self.fdstore = fdstore if fdstore is not None else FdStore()
        # Kernel confinement (confine.py): every grafted socket is marked before it is sent.
        # None (tests that build a Broker in-process, confinement "off"/unavailable): not locked.
        self.confinement = confinement
        self.confinement_state = "on" if confinement is not None else "off"
        # Every front-end's decision and audit record (judge, record), and its grafted sockets.
        self.decisions = Decisions(audit, self.confinement_state, policy.audit.on_error)
        self.sockets = HostSockets(confinement)  # every front-end's grafted sockets are made there
        self.seccomp = SeccompAgent(self)
        self.socket_dir = Path(socket_dir)
        self.audit = audit
        self.tenants: dict[str, TenantState] = {}
        self._nursery: trio.Nursery | None = None
        self._closers = trio.CapacityLimiter(STRAY_FD_CLOSERS)
        self.generation = 1  # of the policy in force: 1 at start, +1 per reload
        self.loaded_at = time.time()
        # The fast path: grants are made only for verdicts of the rules in force (see reload).
        self.grants = Grants(confinement, self.tenants, self.decisions, self.sockets)

    # ---- lifecycle -------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve every tenant until cancelled; started() once all listen."""
        prepare_socket_dir(self.socket_dir)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            matchers = compile_policy(self.policy)
            self.fdstore.check_capacity(len(self.policy.tenants))
            for name, config in self.policy.tenants.items():
                await self._add_tenant(name, config, matchers[name])
            self._drop_leftover_listeners()
            ring = self.grants.open_audit_ring()
            if ring is not None:
                nursery.start_soon(self.grants.drain_kernel_audit, ring)
            await nursery.start(serve_admin, self, self.socket_dir / ADMIN_SOCKET)
            await nursery.start(self.seccomp.serve, self.socket_dir / SECCOMP_SOCKET)
            task_status.started()

    async def _add_tenant(self, name: str, config: Tenant, matcher: TenantMatcher) -> None:
        assert self._nursery is not None
        state = TenantState(name, config, matcher, Namespace(config.netns, config.socket_owner(name)),
                            self.socket_dir / f"{name}.sock")
        state.configure(config, matcher)
        if self.confinement is not None:
            try:
                state.kid = self.confinement.new_tenant_id()
            except confine.Unavailable as e:
                raise RuntimeError(str(e)) from None
            self.grants.new_id(state)
        try:
            await self._nursery.start(self._serve_tenant, state)
        except BaseException:
            self._forget(state)
            raise
        self.tenants[name] = state  # only once it listens: a failed start leaves no half tenant

    def _forget(self, tenant: TenantState) -> None:
        """A tenant gone: its grants and its close count go (its sockets stay counted nowhere)."""
        self.grants.drop(tenant)
        if self.confinement is None or not tenant.kid:
            return
        try:
            self.confinement.forget_tenant(tenant.kid)
        except OSError as e:  # a leftover count entry costs one map slot
            log.error("tenant %s: cannot remove its socket count: %s", tenant.name, e)

    async def reload(self, policy: PolicyFile) -> None:
        """Apply a validated policy: new decisions for new requests only.

        Grafted sockets belong to the apps and are not touched. Removed
        tenants stop listening; added tenants start; the rest keep their
        listeners and connections and take the new rules at once. If some
        added tenants cannot start, everything else is applied and then
        RuntimeError names them.
        """
        matchers = compile_policy(policy)
        self.fdstore.check_capacity(len(policy.tenants))
        for key in ("socket_dir", "audit_log", "confinement"):
            if getattr(policy.broker, key) != getattr(self.policy.broker, key):
                log.warning("broker.%s changed in the policy; it takes effect at the next restart", key)
        # One step, with no checkpoint: removed tenants are cancelled, the others
        # take their new rules, and the old rules' grants go (Grants.new_rules).
        # Existing tenants come first, so that a new tenant whose listener cannot
        # start leaves none of them on the old rules.
        removed = [self.tenants.pop(name) for name in list(self.tenants) if name not in policy.tenants]
        for gone in removed:
            gone.removed = True
            gone.cancel_scope.cancel()
        added = [name for name in policy.tenants if name not in self.tenants]
        for name, state in self.tenants.items():
            config = policy.tenants[name]
            # Sockets pre-issued into the old namespace, or to a uid the new list
            # leaves out, must not use the new grants: they get none, ever.
            reissue = (config.netns, config.uids) != (state.config.netns, state.config.uids)
            state.configure(config, matchers[name])
            if reissue and self.confinement is not None and state.gid:
                self.grants.new_id(state)
            try:
                os.chmod(state.path, config.socket_mode_int)
            except OSError as e:
                log.error("tenant %s: cannot set the mode of %s: %s", name, state.path, e)
        self.grants.new_rules()
        for gone in removed:
            await gone.done.wait()  # READY=1 after a reload means the removal is complete
            self._forget(gone)
            log.info("tenant %s removed", gone.name)
        failed = []
        for name in added:
            try:
                await self._add_tenant(name, policy.tenants[name], matchers[name])
                log.info("tenant %s added", name)
            except (OSError, RuntimeError) as e:
                failed.append(f"tenant {name}: {e}")
        self.policy = policy
        self.decisions.on_error = policy.audit.on_error
        self.generation += 1
        self.loaded_at = time.time()
        if failed:
            raise RuntimeError("; ".join(failed))

    async def status(self) -> dict:
        """What `graft status` shows: tenants, live grafted sockets, counters, confinement."""
        tenants = {}
        for name, t in list(self.tenants.items()):
            try:
                live, exact = await self.sockets.live_count(t), True
            except OSError:
                live, exact = len(t.live), False  # an upper bound: not pruned
            tenants[name] = {
                "socket": str(t.path),
                "netns": t.config.netns,
                "mode": t.config.mode,
                "socket_uid": t.namespace.owner,
                "live_sockets": live,
                "live_exact": exact,
                "max_sockets": t.config.max_sockets,
                "max_rate": t.config.max_rate,
                "counts": {a: t.counts[a] for a in ("graft", "container", "deny", "error")},
                "preissued": t.preissued,
                "seccomp_listeners": t.seccomp_listeners,
                "seccomp_calls": t.seccomp_calls(),
            }
        return {
            "policy": {"version": self.policy.version, "generation": self.generation,
                       "loaded_at": datetime.fromtimestamp(self.loaded_at, timezone.utc).isoformat()},
            "confinement": self.confinement_state,
            "audit": {"on_error": self.policy.audit.on_error, "lost": self.audit.lost,
                      "waiting_bytes": self.audit.waiting, "refused": self.decisions.refused},
            "tenants": tenants,
        }

    # ---- per tenant ------------------------------------------------------

    def _drop_leftover_listeners(self) -> None:
        """Stored listeners of tenants no longer in the policy: out of the store, file removed."""
        for name, socks in self.fdstore.leftovers().items():
            self.fdstore.remove(name)
            for sock in socks:
                with sock:
                    bound = sock.getsockname() if sock.family == socket.AF_UNIX else ""
                path = Path(bound) if isinstance(bound, str) and bound else None
                if path is not None and path.parent == self.socket_dir:
                    unlink_if_socket(path)
            log.info("tenant %s is not in the policy: its stored listener is closed", name)

    async def _open_listener(self, tenant: TenantState) -> tuple[trio.socket.SocketType, tuple[int, int], bool]:
        """The tenant's listener: adopted from the fd store, or bound; stored either way.

        Returns (listener, socket file identity, whether the fd store holds it).
        """
        mode = tenant.config.socket_mode_int
        adopted, identity = None, None
        for sock in self.fdstore.take(tenant.name):  # normally one; the first usable one wins
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
        return listener, identity, self.fdstore.push(tenant.name, listener)

    async def _serve_tenant(self, tenant: TenantState, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._listen(tenant, task_status)
        finally:
            tenant.done.set()

    async def _listen(self, tenant: TenantState, task_status) -> None:
        listener, identity, stored = await self._open_listener(tenant)
        with listener, tenant.cancel_scope:
            try:
                task_status.started()
                log.info("tenant %s listening on %s (netns %s)", tenant.name, tenant.path, tenant.config.netns)
                async with trio.open_nursery() as clients:
                    tenant.nursery = clients
                    while True:
                        token = object()
                        await tenant.slots.acquire_on_behalf_of(token)
                        try:
                            conn, _ = await listener.accept()
                        except OSError as e:
                            tenant.slots.release_on_behalf_of(token)
                            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                                log.error("tenant %s: accept failed: %s", tenant.name, e)
                                await trio.sleep(0.1)  # resource pressure: back off, do not spin
                                continue
                            raise
                        clients.start_soon(self._serve_client, tenant, conn, token)
            finally:
                if tenant.removed and stored:
                    self.fdstore.remove(tenant.name)
                if tenant.removed or not stored:
                    unlink_if_socket(tenant.path, identity)

    async def _serve_client(self, tenant: TenantState, conn: trio.socket.SocketType, token: object) -> None:
        try:
            # The exchange loop drives the non-blocking socket itself: one
            # wait for readability per request, then plain recvmsg/sendmsg,
            # instead of trio's socket methods' extra scheduling points.
            with socket.socket(fileno=conn.detach()) as sock:
                sock.setblocking(False)
                peer = Peer(*_PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)))
                while await self._take_turn(tenant, sock, peer):
                    pass
        finally:
            tenant.slots.release_on_behalf_of(token)

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
                raise wire.WireError(errno.EBADMSG, "request carried ancillary data")
            if msg_flags & socket.MSG_TRUNC:
                raise wire.WireError(errno.EMSGSIZE, "request longer than a graft_request")
            req = wire.decode_request(data)
        except wire.WireError as e:
            self._audit_refusal(tenant, peer, e)
            await self._send(conn, wire.encode_reply(wire.V_ERROR, e.errno), [], tenant, peer)
            return False

        if req.op == wire.OP_PREISSUE:
            socks, refusal, _ = await self.grants.preissue(tenant, req, peer, "shim")
            reply = fd_less_reply(refusal) if refusal is not None else wire.encode_reply(wire.V_GRAFT, 0)
            try:
                return await self._send(conn, reply, socks, tenant, peer)
            finally:
                for sock in socks:
                    sock.close()

        if req.op == wire.OP_GRANT:
            reply = fd_less_reply(self.grants.judge_grant(tenant, req, peer, "shim"))
            return await self._send(conn, reply, [], tenant, peer)

        verdict = self.decisions.judge(tenant, req, peer)
        serial = self.grants.serial
        host_sock, reply = None, None
        if verdict.action == "graft":
            host_sock, reply, verdict = await self._graft(tenant, req, verdict)
        elif verdict.action == "container":
            reply = wire.encode_reply(wire.V_CONTAINER)
        else:
            reply = wire.encode_reply(wire.V_DENY, verdict.errno)
        try:
            if not self.decisions.record(tenant, peer, req, verdict, "shim"):
                if host_sock is not None:
                    host_sock.close()
                    host_sock = None
                reply = wire.encode_reply(wire.V_DENY, self.decisions.unrecorded_errno(req))
            elif host_sock is not None:
                self.grants.grant(tenant, req, verdict, serial)
            return await self._send(conn, reply, [host_sock] if host_sock is not None else [], tenant, peer)
        finally:
            if host_sock is not None:
                host_sock.close()

    async def _graft(self, tenant: TenantState, req: wire.Request, verdict: Verdict):
        """Carry out a graft verdict for a shim: (socket or None, reply, verdict as audited)."""
        made = await self.sockets.make(tenant, req, verdict, recorded_options(tenant.name, req.opts))
        v = made.verdict
        if made.sock is None:
            return None, wire.encode_reply(wire.V_DENY if v.action == "deny" else wire.V_ERROR, v.errno), v
        if req.flags & wire.REQF_SENDTO:
            return made.sock, wire.encode_reply(wire.V_GRAFT, 0), v
        if req.op == wire.OP_CONNECT:
            return made.sock, wire.encode_reply(wire.V_GRAFT, made.err), v
        return made.sock, wire.encode_reply(wire.V_GRAFT, 0, v.target), v

    async def _send(self, conn: socket.socket, reply: bytes, socks: list[socket.socket], tenant: TenantState,
                    peer: Peer) -> bool:
        anc = []
        if socks:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno() for s in socks]))]
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
            log.info("tenant %s: client pid %d went away before its reply: %s", tenant.name, peer.pid, e)
            return False

    def _audit_refusal(self, tenant: TenantState, peer: Peer, e: wire.WireError) -> None:
        tenant.counts["error"] += 1
        log.warning("tenant %s: malformed request from pid %d: %s", tenant.name, peer.pid, e.reason)
        self.audit.write(
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
            errno=e.errno,
            confinement=self.confinement_state,
            via="shim",
            reason=e.reason,
        )


def fd_less_reply(verdict: Verdict) -> bytes:
    """The reply to a request answered without a socket: a GRANT granted, or a refusal with its errno."""
    kind = {"graft": wire.V_GRAFT, "deny": wire.V_DENY}.get(verdict.action, wire.V_ERROR)
    return wire.encode_reply(kind, 0 if kind == wire.V_GRAFT else verdict.errno)


def prepare_socket_dir(path: Path) -> None:
    """Create the socket directory, mode 0700: host users must not reach tenants' sockets."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
