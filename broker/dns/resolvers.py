"""The tenants' resolvers: which network namespaces are served, for whom, and across restarts (docs/dns.md).

``Resolvers.serve`` is asked by a process (``graft run``, the shim as it
loads, the seccomp agent at a program's first query) in its namespace: the
broker learns the namespace from the process's pid and serves one
``Resolver`` (resolver.py) per (tenant, namespace), watching the process.
None is served in the broker's own namespace or the tenant's. A resolver's
sockets live in the service manager's fd store (io/fdstore.py):
``Resolvers.adopt`` serves them again after a restart, for the processes
then in their namespace. The tenant's cache of answers is kept here, one
per tenant, shared by its resolvers.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import socket
import time

from ..core import request
from ..core.decisions import Decisions
from ..core.tenant import Peer, TenantState
from ..io.fdstore import FdStore
from . import message
from .resolver import RESOLVER_PORT, Resolver

log = logging.getLogger("graft.broker")

MAX_RESOLVERS_PER_TENANT = 64  # namespaces a tenant's resolvers serve at once
SIOCGSKNS = 0x894C  # linux/sockios.h: an fd of the network namespace a socket belongs to


class Resolvers:
    """The tenants' resolvers, one per (tenant, network namespace)."""

    def __init__(self, decisions: Decisions, fdstore: FdStore):
        self.decisions = decisions
        self.fdstore = fdstore  # resolvers' sockets survive a restart there, as the tenants' listeners do
        self._by_key: dict[tuple[str, int, int], Resolver] = {}
        # Per tenant, not per resolver: a tenant's programs in any namespace share its answers, and
        # they outlive a resolver that closes between two programs. Two tenants' policies differ.
        self.caches: dict[str, message.Cache] = {}

    def forget(self, tenant: TenantState) -> None:
        """A tenant gone: its cached answers go (its resolvers end with its nursery)."""
        self.caches.pop(tenant.name, None)

    def count(self, tenant: TenantState) -> int:
        return sum(1 for (name, _, _) in self._by_key if name == tenant.name)

    async def serve(self, tenant: TenantState, peer: Peer) -> request.SockAddr | None:
        """Serve the tenant's resolver in peer's namespace while peer lives; its address, or None.

        None: the tenant's dns.resolver is "off", or peer runs in the
        broker's namespace or the tenant's, whose names are their own.

        Raises OSError when it cannot be served: a uid the tenant does not
        allow, max_rate, too many resolvers or askers, the peer gone, its
        namespace unreadable, the address taken there.
        """
        if tenant.config.dns.resolver == "off":
            return None
        if not tenant.matcher.uid_allowed(peer.uid):
            raise OSError(errno.EPERM, f"uid {peer.uid} is not among the tenant's uids")
        pidfd, ns_fd = os.pidfd_open(peer.pid), -1
        try:  # both fds are closed here unless a resolver took them, on every way out
            ns_fd = os.open(f"/proc/{peer.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            st = os.fstat(ns_fd)
            if any(_same_file(st, ns) for ns in ("/proc/self/ns/net", tenant.namespace.path)):
                return None  # the host's, or where the tenant's grafted sockets live: names need no graft there
            key = (tenant.name, st.st_dev, st.st_ino)
            resolver = self._by_key.get(key)
            if resolver is not None and resolver.closing:
                await resolver.done.wait()  # its last asker went as this one asked: a fresh one
                resolver = self._by_key.get(key)
            if resolver is None:
                # max_rate counts new resolvers only: every process the shim is loaded in asks at start
                if tenant.bucket is not None and not tenant.bucket.take(time.monotonic()):
                    raise OSError(errno.EAGAIN, "the tenant's max_rate")
                if self.count(tenant) >= MAX_RESOLVERS_PER_TENANT:
                    raise OSError(errno.EMFILE, f"the tenant has {MAX_RESOLVERS_PER_TENANT} resolvers already")
                resolver, ns_fd = Resolver(self, tenant, key, ns_fd), -1  # the ns fd is the resolver's now
                self._by_key[key] = resolver
                try:
                    await tenant.nursery.start(resolver.run)
                except RuntimeError:  # the tenant's nursery is closing: it is being removed
                    resolver.never_started()
                    raise OSError(errno.ESHUTDOWN, f"tenant {tenant.name} is being removed") from None
            else:
                await resolver.ready.wait()  # another asker's start, a moment ago
            if resolver.closing:
                raise OSError(errno.EAGAIN, "the resolver there is closing; ask again")
            if resolver.watch(peer.pid, pidfd):
                pidfd = -1  # the resolver's now
            return resolver.address
        finally:
            for fd in (pidfd, ns_fd):
                if fd >= 0:
                    os.close(fd)

    async def adopt(self, tenant: TenantState) -> None:
        """Serve again what an earlier broker left in the fd store for tenant, while its programs live.

        A resolver's programs are the processes in its namespace now (one
        scan of /proc for all): who asked of the earlier broker is not
        known. A resolver with none left, or whose sockets are not what the
        broker stores, is closed and leaves the store.
        """
        stored = self.fdstore.take_resolvers(tenant.name)
        if not stored:
            return
        programs = _processes_by_netns()
        for store_key, socks in stored.items():
            try:
                await self._adopt_one(tenant, socks, programs)
            except (OSError, ValueError) as e:
                log.info("tenant %s: stored resolver %s not served again: %s", tenant.name, store_key, e)
                for sock in socks:
                    sock.close()
                self.fdstore.remove_resolver(store_key)

    async def _adopt_one(self, tenant: TenantState, socks: list[socket.socket], programs: dict) -> None:
        udp, tcp = _stored_pair(socks)
        if tenant.config.dns.resolver == "off":
            raise ValueError('the tenant\'s resolver is "off" now')
        ns_fd = fcntl.ioctl(udp.fileno(), SIOCGSKNS)  # the socket's own namespace
        try:
            st = os.fstat(ns_fd)
            key = (tenant.name, st.st_dev, st.st_ino)
            pids = programs.get((st.st_dev, st.st_ino), [])
            if not pids:
                raise ValueError("no process is left in its namespace")
            if key in self._by_key:
                raise ValueError("the namespace is served already")
        except BaseException:
            os.close(ns_fd)
            raise
        resolver = Resolver(self, tenant, key, ns_fd, adopted=(udp, tcp))  # the fds are the resolver's now
        self._by_key[key] = resolver
        await tenant.nursery.start(resolver.run)
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue  # gone since the scan
            if not resolver.watch(pid, pidfd):
                os.close(pidfd)
        if not resolver.watched:
            resolver.close_for_good()  # all of them went meanwhile
        log.info("tenant %s: resolver in namespace %d served again for %d processes", tenant.name, key[2], len(pids))

    def drop_leftovers(self) -> None:
        """Stored resolvers of tenants no longer in the policy: closed, out of the store."""
        for store_key, socks in self.fdstore.leftover_resolvers().items():
            for sock in socks:
                sock.close()
            self.fdstore.remove_resolver(store_key)
            log.info("stored resolver %s: its tenant is not in the policy; closed", store_key)

    def _gone(self, resolver: Resolver) -> None:
        if self._by_key.get(resolver.key) is resolver:
            del self._by_key[resolver.key]


def _stored_pair(socks: list[socket.socket]) -> tuple[socket.socket, socket.socket]:
    """(udp, tcp) of a stored resolver: one each, IPv4, bound to a loopback address's port 53, TCP listening."""
    by_type = {s.type: s for s in socks}
    if len(socks) != 2 or set(by_type) != {socket.SOCK_DGRAM, socket.SOCK_STREAM}:
        raise ValueError(f"{len(socks)} sockets, not one UDP and one TCP")
    udp, tcp = by_type[socket.SOCK_DGRAM], by_type[socket.SOCK_STREAM]
    for sock in (udp, tcp):
        if sock.family != socket.AF_INET:
            raise ValueError("not IPv4")
        addr, port = sock.getsockname()
        if port != RESOLVER_PORT or not ipaddress.ip_address(addr).is_loopback or addr != udp.getsockname()[0]:
            raise ValueError(f"bound to {addr}:{port}")
    if not tcp.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ValueError("its TCP socket does not listen")
    for sock in (udp, tcp):
        sock.setblocking(False)
    return udp, tcp


def _processes_by_netns() -> dict[tuple[int, int], list[int]]:
    """Every process's pid, by the (dev, inode) of its network namespace: one scan of /proc."""
    out: dict[tuple[int, int], list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue  # gone, or a kernel thread's
        out.setdefault((st.st_dev, st.st_ino), []).append(int(entry.name))
    return out


def _same_file(st: os.stat_result, path: str | None) -> bool:
    if path is None:
        return False
    try:
        other = os.stat(path)
    except OSError:
        return False  # the tenant's namespace is gone: not the peer's, which is open
    return (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino)
