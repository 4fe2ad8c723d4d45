"""The seccomp agent: the broker's second front-end, for programs that no shim can see.

A container runtime (``linux.seccomp.listenerPath``) or ``graft run --seccomp``
installs a seccomp filter that stops ``connect``, ``bind``, ``sendto`` and
``sendmsg`` (seccomp/calls.py) and passes the filter's notify fd to
``<socket_dir>/seccomp.sock`` with the OCI container process state, whose
``metadata`` names the tenant. Each notify fd is then served by a task of
its own in the tenant's nursery, so it ends with the tenant (reload, stop);
the fd's C loop (seccomp_fast.c) runs on a thread of its own, receives every
call and answers what needs no decision, and hands the rest over to
``_serve_loop`` here (docs/architecture.md, task tree).

What the loop answers itself is in seccomp_fast.c and docs/architecture.md;
a TCP connect to a destination already granted gets a pre-issued socket
from it, and the kernel audits that connect (``"via": "kernel"``). What it
hands over is answered here as follows.

A notification on an inet socket of the container, naming an inet address,
is carried out like a shim's request (``Stages.carry_out``: max_rate,
verdict.judge, the shared host-socket factory, the audit record), with the
options and flags of the app's socket; the host socket is put on the app's
own fd number (SECCOMP_IOCTL_NOTIF_ADDFD with SETFD), and the call goes on:

* connect, and a UDP sendto/sendmsg with a destination: the app's own call
  runs on the host socket (USER_NOTIF_FLAG_CONTINUE), with its own blocking
  and errno semantics. The address is read again by the kernel then, and
  another thread may have changed it since the check (the TOCTOU hole
  bypass4netns documents): the socket is marked and pinned to the judged
  destination before the call goes on, so the kernel's connect/sendmsg
  programs refuse any other (EPERM). That is why seccomp mode needs
  confinement: without it the broker accepts no notify fd.
* bind: the broker binds (a published port binds the rule's host address)
  and the call returns 0.

Continued at once, untouched: calls of another architecture, no address or
a non-inet one, a socket that is not inet TCP/UDP, a socket the broker made
(it carries a confinement mark: the kernel judges it), a bind to port 0 (as
the shim defers it, its socket stays in the container), a sendto on a TCP
socket, or on a UDP socket already bound or connected in the container. A
"container" verdict continues too; "deny" fails the call with the policy's
errno. A continued call runs in the container's own network stack, never on
a host socket the broker did not lock. Every judged call is audited with
``"via": "seccomp"``.

The broker survives every client: a bad process state, a wrong or missing
fd, a tenant not in seccomp mode get one JSON line back and the connection
closed; a program that dies mid-notification makes the ioctls fail with
ENOENT, which ends that notification only.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import logging
import math
import os
import socket
from collections.abc import Mapping
from pathlib import Path

import trio

from ..confine import fastpath
from ..core import request
from ..core.decisions import to_resolver
from ..core.sockopts import Defaults, copy_options, option_defaults
from ..core.stages import Stages
from ..core.tenant import Peer, ServeResolver, TenantState
from ..io.scmrights import STRAY_FD_CLOSERS, close_all, passed_fds
from ..io.unixsock import accept_forever, bind_unix_listener, unlink_if_socket
from . import abi, fast, procfs, syscalls

log = logging.getLogger("graft.broker")

HANDSHAKE_TIMEOUT = 5.0  # a sender that does not finish its message in time is dropped
MAX_HANDSHAKES = 32  # handshakes served at once; more connections wait in the backlog
MAX_LISTENERS_PER_TENANT = 256  # notify fds (one fd and one task each) a tenant may have served
_ANC_SPACE = socket.CMSG_SPACE(16 * 4)
_SECCOMP_NOTIFY_LINK = "anon_inode:seccomp notify"
# Errors of a notification whose thread is gone (killed, or its call interrupted): nothing to answer.
_GONE = (errno.ENOENT, errno.ESRCH)


class Refused(Exception):
    """A handshake the agent refuses; the text goes back to the sender and to the log."""


class SeccompAgent:
    def __init__(self, stages: Stages, tenants: Mapping[str, TenantState], serve_resolver: ServeResolver):
        self.stages = stages
        self.tenants = tenants  # the broker's, by name: a handshake names its tenant
        self.serve_resolver = serve_resolver  # dns/resolver.py's Resolvers.serve, as for the shim front-end
        self._handshakes = trio.CapacityLimiter(MAX_HANDSHAKES)
        self._closers = trio.CapacityLimiter(STRAY_FD_CLOSERS)  # closing fds that came with refused handshakes
        # A fresh host socket's option values, per (netns, family, type): see sockopts.copy_options.
        self._defaults: dict[tuple, Defaults] = {}
        self._thread_pidfds = True  # pidfd_open(PIDFD_THREAD) works (Linux 6.9); found out on first use
        # One thread per notify fd runs its C loop; they must not take the default limiter's tokens.
        self._loop_threads = trio.CapacityLimiter(math.inf)
        # Loaded now, not at the first handshake: loading needs resources (fds, a temporary file)
        # a busy broker may lack then. Without it the broker runs, and refuses seccomp listeners.
        self._unavailable: str | None = None
        try:
            fast.library()
            abi.native_arch()
        except (fast.Unavailable, ValueError) as e:
            self._unavailable = str(e)
            log.warning("seccomp mode is unavailable: %s", e)

    # ---- seccomp.sock ------------------------------------------------------------------

    async def serve(self, path: Path, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept notify fds on path until cancelled; started() once it listens."""
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with listener:
            # Root only: whoever connects names the tenant whose rules its fd gets.
            identity = await bind_unix_listener(listener, path, 0o600, socket.SOCK_STREAM)
            try:
                task_status.started()
                await accept_forever(listener, self._handshake, "seccomp agent", self._handshakes)
            finally:
                unlink_if_socket(path, identity)

    async def _handshake(self, conn: trio.socket.SocketType) -> None:
        fds: list[int] = []
        try:
            with conn:
                error = None
                with trio.move_on_after(HANDSHAKE_TIMEOUT) as timer:
                    try:
                        raw, fds = await self._receive(conn)
                        self._accept(raw, fds)  # takes the notify fd out of fds
                    except Refused as e:
                        error = str(e)
                if timer.cancelled_caught:
                    error = f"no complete process state within {HANDSHAKE_TIMEOUT:g} s"
                if error is not None:
                    log.warning("seccomp agent: notify fd refused: %s", error)
                with trio.move_on_after(HANDSHAKE_TIMEOUT):
                    try:  # runc and crun do not read it; graft run --seccomp waits for it
                        await conn.send(abi.encode_answer(error))
                    except OSError:
                        pass
        except Exception:  # a bug must cost this handshake, never the broker
            log.exception("seccomp agent: internal error in a handshake")
        finally:
            if fds:
                await trio.to_thread.run_sync(close_all, fds, limiter=self._closers, abandon_on_cancel=True)

    @staticmethod
    async def _receive(conn: trio.socket.SocketType) -> tuple[bytes, list[int]]:
        """The process state and the fds that came with it.

        The runtime-spec allows the state in several messages, with the fds
        in the first; runc sends one and keeps the connection open, so the
        state ends where it parses as JSON.
        """
        raw, fds = b"", []
        while True:
            data, anc, flags, _ = await conn.recvmsg(abi.STATE_MAX + 1 - len(raw), _ANC_SPACE)
            fds += passed_fds(anc)
            if flags & socket.MSG_CTRUNC:
                raise Refused("too many fds came with the process state")
            raw += data
            if not data:
                raise Refused("connection closed before a complete process state" if raw else "empty message")
            if len(raw) > abi.STATE_MAX:
                raise Refused(f"process state longer than {abi.STATE_MAX} bytes")
            if not raw.rstrip().endswith(b"}"):
                continue  # not the end of an object yet: no parse per byte of a trickling sender
            try:
                json.loads(raw)
            except ValueError:
                continue
            return raw, fds

    def _accept(self, raw: bytes, fds: list[int]) -> None:
        """Validate a handshake and start serving its notify fd (removed from fds: it is ours now)."""
        try:
            state = abi.decode_process_state(raw, len(fds))
        except abi.StateError as e:
            raise Refused(str(e)) from None
        if not self.stages.grants.confined:
            raise Refused(
                "seccomp mode needs kernel confinement, and this broker runs without it (docs/policy.md, mode)"
            )
        fd = fds[state.fd_index]
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as e:
            raise Refused(f"the fd named seccompFd cannot be inspected: {e.strerror}") from None
        if link != _SECCOMP_NOTIFY_LINK:
            raise Refused(f"the fd named seccompFd is not a seccomp notify fd ({link})")
        tenant = self.tenants.get(state.tenant)
        if tenant is None:
            raise Refused(f"no tenant {state.tenant!r} in the policy")
        if tenant.config.mode != "seccomp":
            raise Refused(f'tenant {state.tenant} is in mode "{tenant.config.mode}", not "seccomp"')
        if self._unavailable is not None:
            raise Refused(self._unavailable)
        if tenant.seccomp_listeners >= MAX_LISTENERS_PER_TENANT:
            raise Refused(f"tenant {state.tenant} already has {MAX_LISTENERS_PER_TENANT} seccomp listeners")
        if tenant.nursery is None or tenant.cancel_scope.cancel_called:
            raise Refused(f"tenant {state.tenant} is being removed")
        try:
            tenant.nursery.start_soon(self._serve_listener, tenant, fd, state)
        except RuntimeError:  # its nursery has closed: the tenant is going
            raise Refused(f"tenant {state.tenant} is being removed") from None
        # No checkpoint since the check above: the task runs only after this.
        fds.remove(fd)
        tenant.seccomp_listeners += 1

    # ---- one notify fd -----------------------------------------------------------------

    async def _serve_listener(self, tenant: TenantState, fd: int, state: abi.ProcessState) -> None:
        log.info(
            "tenant %s: serving the seccomp listener of container %r (pid %d)", tenant.name, state.container, state.pid
        )
        try:
            # Each answer is a hand-off: the stopped thread runs while the agent waits (ADDFD) or
            # goes on to the next call. Waking it on this CPU saves a cross-CPU wake-up per hand-off.
            syscalls.notif_sync_wake_up(fd)
        except OSError as e:  # before Linux 6.6: the same, a little slower
            log.debug("seccomp listener: no synchronous wake-ups: %s", e)
        loop = loop_end = broker_end = None
        try:
            loop_end, broker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            marks_fd, grants_fd = self.stages.grants.loop_maps()  # no listener is served without confinement
            loop = fast.Loop(fd, loop_end, marks_fd, grants_fd)
            tenant.seccomp_loops.add(loop)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_loop, tenant, state, loop, loop_end)
                ctl = trio.socket.from_stdlib_socket(broker_end)
                try:
                    await self._serve_loop(tenant, fd, ctl)
                finally:
                    ctl.close()  # the loop sees its control socket close, and ends
        except (OSError, fast.Unavailable) as e:  # no fds left for the control socket, say: this listener only
            log.error(
                "tenant %s: cannot serve the seccomp listener of container %r: %s", tenant.name, state.container, e
            )
        finally:
            tenant.seccomp_listeners -= 1
            if loop is not None:
                tenant.seccomp_loops.discard(loop)
                tenant.seccomp_ended.update(loop.stats)
            for end in (loop_end, broker_end):
                if end is not None:
                    end.close()
            os.close(fd)  # the filter's calls now fail with ENOSYS: closed, not open
            log.info("tenant %s: seccomp listener of container %r closed", tenant.name, state.container)

    async def _run_loop(
        self, tenant: TenantState, state: abi.ProcessState, loop: fast.Loop, loop_end: socket.socket
    ) -> None:
        """The C loop, on a thread of its own; it ends when the filter's processes are gone or the
        broker closes the control socket (a cancelled listener does so before waiting here)."""
        try:
            ret = await trio.to_thread.run_sync(loop.run, limiter=self._loop_threads)
        finally:
            loop_end.close()  # the broker's side of the control socket reads its end
        if ret < 0:
            log.error(
                "tenant %s: seccomp listener of container %r failed: %s",
                tenant.name,
                state.container,
                os.strerror(-ret),
            )

    async def _serve_loop(self, tenant: TenantState, fd: int, ctl: trio.socket.SocketType) -> None:
        """Answer what the C loop hands over, one message at a time, until it ends."""
        while True:
            try:
                raw = await ctl.recv(fast.MSG_SIZE + 1)
            except ConnectionResetError:  # the loop ended with a refill of ours unread
                return
            if not raw:
                return
            try:
                msg = fast.decode_message(raw)
            except ValueError as e:  # from the loop, not from the container: a bug, which ends this listener
                log.error("tenant %s: the seccomp loop sent a bad message (%s); closing its listener", tenant.name, e)
                return
            if msg.kind == fast.REFILL:
                await self._refill(tenant, fd, ctl, msg)
                continue
            n = msg.notification
            try:
                await self._notification(tenant, fd, n)
            except Exception:  # a bug costs this call (EPERM), never the listener or the broker
                log.exception("tenant %s: internal error serving a seccomp notification of pid %d", tenant.name, n.pid)
                try:
                    self._respond(fd, abi.encode_response(n.id, error=errno.EPERM))
                except OSError as e:
                    log.error("tenant %s: cannot answer pid %d: %s", tenant.name, n.pid, e)

    async def _refill(self, tenant: TenantState, fd: int, ctl: trio.socket.SocketType, msg: fast.Message) -> None:
        """Pre-issued TCP sockets for listener fd's loop, judged for the calling process (none: refused, audited)."""
        peer = procfs.proc_status(msg.pid)
        batch = fastpath.NONE
        grant_id = 0
        if peer is not None:
            req = request.Request(request.OP_PREISSUE, msg.family, socket.SOCK_STREAM, 0, 0, None, ())
            try:
                batch, _, grant_id = await self.stages.grants.preissue(tenant, req, peer, "seccomp", ("seccomp", fd))
            except Exception:  # a bug costs the pool (the loop holds off), never the listener
                log.exception("tenant %s: internal error issuing sockets to a seccomp loop", tenant.name)
        # The thread that asked is gone: nothing was judged, so nothing was refused; the next may ask.
        header = fast.encode_pool(msg.family, peer.uid if peer is not None else msg.uid, grant_id, again=peer is None)
        try:
            fds = array.array("i", batch.fds())
            await ctl.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)] if fds else [])
        except OSError:
            pass  # the loop has ended; the sockets go with the broker's copies
        finally:
            batch.close()

    @staticmethod
    def _respond(fd: int, response: bytes) -> None:
        try:
            syscalls.notif_send(fd, response)
        except OSError as e:
            if e.errno not in _GONE:
                raise

    def _continue(self, fd: int, n: abi.Notification) -> None:
        self._respond(fd, abi.encode_response(n.id, continue_=True))

    async def _notification(self, tenant: TenantState, fd: int, n: abi.Notification) -> None:
        """Answer one stopped call (see the module doc for which calls are judged)."""
        found = self._address(n)
        if found is None:
            return self._continue(fd, n)
        # From here on, what cannot be found out lets the call go on as it was (if its thread is
        # gone, the answer is refused with ENOENT): it then runs on the program's own socket, in
        # its own network namespace, and never on a host socket the broker has not locked.
        copy = self._take_fd(n)
        if copy is None:
            return self._continue(fd, n)
        try:
            sock = socket.socket(fileno=copy)
        except OSError:  # not a socket
            os.close(copy)
            return self._continue(fd, n)
        with sock:
            req = self._request(n, sock, found)
            if req is None:
                return self._continue(fd, n)
            peer = procfs.proc_status(n.pid)
            # What was read (address, fd, credentials) belongs to this call only if it is still pending.
            if not syscalls.notif_id_valid(fd, n.id):
                return  # its thread is gone: nothing to answer
            if peer is None:
                return self._continue(fd, n)
            if req.op == request.OP_GRANT:
                verdict = self.stages.grants.judge_grant(tenant, req, peer, "seccomp")
                if verdict.action == "graft":
                    return self._continue(fd, n)
                return self._respond(fd, abi.encode_response(n.id, error=verdict.errno))
            if to_resolver(tenant, req):
                await self._resolver_for(tenant, peer)
            out = await self.stages.carry_out(
                tenant, req, peer, "seccomp", lambda fresh: self._copy_options(tenant, sock, fresh), connect=False
            )
            try:  # recorded by now; delivered here, then granted
                if out.sock is not None:
                    self._install(fd, n, req, sock, out.sock)
                    self.stages.grant(tenant, req, out)
                elif out.verdict.action == "container":
                    self._continue(fd, n)
                else:
                    self._respond(fd, abi.encode_response(n.id, error=out.verdict.errno))
            finally:
                out.close()  # the broker's copy: the app has its own now

    async def _resolver_for(self, tenant: TenantState, peer: Peer) -> None:
        """A query to the tenant's resolver (docs/dns.md): served in the caller's namespace before the call goes on.

        A program no `graft run` started (a container's) has no one to ask
        for it before its first lookup: its first call to the resolver's
        address does. Asking again costs a lookup: one process is one asker.
        """
        try:
            await self.serve_resolver(tenant, peer)
        except OSError as e:  # the call goes on, and finds no resolver: as with the resolver off
            log.error("tenant %s: cannot serve a resolver for pid %d: %s", tenant.name, peer.pid, e)

    def _take_fd(self, n: abi.Notification) -> int | None:
        """A copy of the fd the call is on (pidfd_getfd), or None if there is none to take."""
        try:
            if self._thread_pidfds:
                try:
                    pidfd = syscalls.pidfd_open(n.pid, syscalls.PIDFD_THREAD)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        return None
                    self._thread_pidfds = False  # before Linux 6.9: a thread's process is needed
            if not self._thread_pidfds:
                proc = procfs.proc_status(n.pid)
                if proc is None:
                    return None
                pidfd = syscalls.pidfd_open(proc.pid)
        except OSError:
            return None
        try:
            return syscalls.pidfd_getfd(pidfd, n.fd)
        except OSError:  # not an open fd: the kernel answers the call itself
            return None
        finally:
            os.close(pidfd)

    @staticmethod
    def _address(n: abi.Notification) -> bytes | None:
        """The inet address the call names, read from the caller's memory; None: nothing to judge."""
        try:
            where = abi.address_at(n)
            if where is None:
                hdr = abi.msghdr_at(n)
                if hdr is None:
                    return None
                raw = syscalls.read_memory(n.pid, hdr.ptr, hdr.length)
                if len(raw) < hdr.length:
                    return None
                where = abi.address_in_msghdr(raw)
                if where is None:
                    return None
            raw = syscalls.read_memory(n.pid, where.ptr, where.length)
        except OSError:  # unreadable: the kernel answers the call with EFAULT itself
            return None
        return raw if abi.sockaddr_family(raw) in abi.INET_FAMILIES else None

    def _request(self, n: abi.Notification, sock: socket.socket, raw: bytes) -> request.Request | None:
        """The call as a request the decision code judges; None when it is not one to judge."""
        if sock.family not in abi.INET_FAMILIES or sock.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            return None
        mark = self.stages.grants.held(sock)  # no listener is served without confinement
        try:
            addr = request.decode_sockaddr(raw)
        except request.BadRequest:
            return None  # the kernel refuses it the same way
        if addr.family != sock.family:
            return None
        if mark is not None:
            return self._later_destination(n, sock, addr, mark)
        flags = 0
        if n.call == "bind":
            if addr.port == 0:
                return None
            op = request.OP_BIND
        elif n.call == "connect":
            op = request.OP_CONNECT
        else:  # sendto, sendmsg: the first destination of a UDP socket neither bound nor connected, as the shim
            if sock.type != socket.SOCK_DGRAM or sock.getsockname()[1] != 0 or _connected(sock):
                return None
            op, flags = request.OP_CONNECT, request.REQF_SENDTO
        return request.Request(op, sock.family, sock.type, sock.proto, flags, addr, ())

    def _copy_options(self, tenant: TenantState, src: socket.socket, dst: socket.socket) -> None:
        key = (tenant.config.netns, dst.family, dst.type)
        defaults = self._defaults.get(key)
        if defaults is None:
            defaults = self._defaults[key] = option_defaults(dst)  # dst is fresh: nothing set on it yet
        for o, e in copy_options(src, dst, defaults):
            log.debug("tenant %s: socket option level=%d name=%d refused: %s", tenant.name, o.level, o.name, e)

    def _later_destination(
        self, n: abi.Notification, sock: socket.socket, addr: request.SockAddr, mark: bytes
    ) -> request.Request | None:
        """A host socket already: confinement holds it to what was judged, so the call goes on.

        Except a datagram, or a connect, of a grafted UDP socket to a
        destination its tenant's UDP grants do not cover yet: judged first,
        as the shim's GRANT, so that the socket sends exactly where the
        policy allows (a UDP connect only names where later sends go).
        """
        if sock.type != socket.SOCK_DGRAM or n.call == "bind":
            return None
        if self.stages.grants.needs_no_grant(mark, addr):
            return None
        return request.Request(request.OP_GRANT, sock.family, sock.type, sock.proto, request.REQF_SENDTO, addr, ())

    def _install(
        self, fd: int, n: abi.Notification, req: request.Request, app_sock: socket.socket, host: socket.socket
    ) -> None:
        """Put the host socket on the app's fd number, as the app had its flags, and let the call finish."""
        host.setblocking(not fcntl.fcntl(app_sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)
        try:
            syscalls.notif_addfd(fd, abi.encode_addfd(n.id, host.fileno(), n.fd, procfs.cloexec(n.pid, n.fd)))
        except OSError as e:
            if e.errno in _GONE:  # the caller died: the socket goes with the broker's copy
                log.info("pid %d went away before its grafted socket was installed", n.pid)
                return
            raise
        if req.op == request.OP_BIND:
            self._respond(fd, abi.encode_response(n.id, val=0))  # bound by the broker, as judged
        else:
            self._continue(fd, n)  # the app's own connect/sendto, pinned to the judged destination


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True
