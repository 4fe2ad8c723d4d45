"""The resolver front-end: a tenant's DNS, served inside the network namespace its programs run in.

``Resolvers.serve`` is asked by a process (``graft run``, through the
shim front-end's RESOLVER request) from inside its namespace: the broker
learns the namespace from the process's pid, and serves one ``Resolver``
per (tenant, namespace) on the tenant's resolver address, port 53, UDP and
TCP, for as long as a process that asked lives (pidfds; no polling). Each
runs as a task of its tenant's nursery, so it ends with the tenant; its
tasks are drawn in docs/architecture.md.

A query is judged by the tenant's ``max_rate`` (a query is a request) and
``dns.names``, answered from the tenant's
cache, or forwarded to its upstreams from a socket in the tenant's netns
(where its grafted sockets are made), under a random id; a truncated answer
is asked again over TCP. Every query is an audit record (``"op": "dns"``,
``"via": "resolver"``). The messages are message.py's; docs/dns.md has the
design and what is not done yet.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import secrets
import socket
import struct
import time
from pathlib import Path

import dns.rcode
import trio

from ..core import request
from ..core.audit import Record
from ..core.decisions import Decisions
from ..core.netns import Namespace
from ..core.tenant import Peer, TenantState
from ..core.verdict import tenant_loc
from ..io.fdstore import FdStore
from ..io.unixsock import accept_forever
from . import message

log = logging.getLogger("graft.broker")

RESOLVER_PORT = 53  # what resolv.conf can name: glibc asks port 53 only
UPSTREAM_TIMEOUT = 2.0  # seconds per upstream before the next is asked
QUERIES_AT_ONCE = 64  # per resolver: more wait for a slot (UDP ones are dropped)
MAX_RESOLVERS_PER_TENANT = 64  # namespaces a tenant's resolvers serve at once
MAX_ASKERS = 256  # processes one resolver waits for (each holds a pidfd)
TCP_IDLE_TIMEOUT = 10.0
UDP_BURST = 64  # queued datagrams answered before the resolver yields to the broker's other tasks
MAX_TCP_CLIENTS = 32
HOST_RESOLV_CONF = Path("/etc/resolv.conf")
SIOCGSKNS = 0x894C  # linux/sockios.h: an fd of the network namespace a socket belongs to


def host_nameservers(path: Path = HOST_RESOLV_CONF) -> list[tuple[str, int]]:
    """The nameservers the host's resolv.conf names, port 53 each."""
    out = []
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                out.append((str(ipaddress.ip_address(words[1].split("%")[0])), 53))
            except ValueError:
                continue
    return out


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


class Resolver:
    """One tenant's resolver in one network namespace."""

    def __init__(
        self,
        owner: Resolvers,
        tenant: TenantState,
        key: tuple,
        ns_fd: int,
        adopted: tuple[socket.socket, socket.socket] | None = None,
    ):
        self.owner, self.tenant, self.key = owner, tenant, key
        self._ns_fd = ns_fd
        self._adopted = adopted  # (udp, tcp) an earlier broker left in the fd store, bound and listening
        address = adopted[0].getsockname()[0] if adopted is not None else tenant.config.dns.resolver
        self.address = request.SockAddr(socket.AF_INET, ipaddress.ip_address(address), RESOLVER_PORT)
        self.store_key = f"{tenant.name}.{key[2]}"  # its name in the fd store (fdstore.py)
        self._for_good = False  # closing because its programs are gone (not because the broker stops)
        self.cache = owner.caches.setdefault(tenant.name, message.Cache())
        self.closing = False
        self.ready = trio.Event()  # set once it listens, or once it failed to (closing then)
        self.done = trio.Event()
        self._askers: set[int] = set()  # pids
        self._nursery: trio.Nursery | None = None
        self._slots = trio.CapacityLimiter(QUERIES_AT_ONCE)  # queries being forwarded at once
        self._parsed = message.Parsed()
        self._allowed: dict[bytes, bool] = {}  # query bytes after the id -> whether `names` admit it
        self._allowed_for: list[str] | None = None  # ... the `names` that said so

    # ---- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen in the namespace; started() once both listeners are bound; until the last asker goes."""
        udp = tcp = None
        stored = False
        try:
            # UDP stays a plain non-blocking socket, which _serve_udp drives itself (one wait per burst).
            if self._adopted is not None:
                udp, tcp = self._adopted[0], trio.socket.from_stdlib_socket(self._adopted[1])
            else:
                ns = Namespace(f"/proc/self/fd/{self._ns_fd}")
                udp = await ns.socket(socket.AF_INET, socket.SOCK_DGRAM, 0)
                tcp = trio.socket.from_stdlib_socket(await ns.socket(socket.AF_INET, socket.SOCK_STREAM, 0))
                where = self.address.to_python()
                udp.bind(where)
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                await tcp.bind(where)
                tcp.listen(MAX_TCP_CLIENTS)
            # Kept by the service manager across a restart: the programs' resolver outlives this broker.
            stored = self.owner.fdstore.push_resolver(self.store_key, [udp, tcp])
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._serve_udp, udp)
                    nursery.start_soon(
                        accept_forever,
                        tcp,
                        self._serve_tcp,
                        f"tenant {self.tenant.name}: resolver",
                        trio.CapacityLimiter(MAX_TCP_CLIENTS),
                    )
                    log.info("tenant %s: resolver on %s in namespace %d", self.tenant.name, self.address, self.key[2])
                    self.ready.set()
                    task_status.started()
            except Exception:  # a broken listener, or a bug: this resolver ends, the broker serves on
                self._for_good = True
                log.exception("tenant %s: resolver in namespace %d failed", self.tenant.name, self.key[2])
        finally:
            self.closing = True
            self.ready.set()
            self.owner._gone(self)
            if stored and (self._for_good or self.tenant.removed):
                self.owner.fdstore.remove_resolver(self.store_key)  # a stop leaves it for the next broker
            for s in (udp, tcp):
                if s is not None:
                    s.close()
            os.close(self._ns_fd)
            self.done.set()
            log.info("tenant %s: resolver in namespace %d closed", self.tenant.name, self.key[2])

    def never_started(self) -> None:
        """Its run never ran (the tenant's nursery closed first): give back what it holds."""
        self.closing = True
        self.ready.set()
        self.owner._gone(self)
        os.close(self._ns_fd)
        self.done.set()

    @property
    def watched(self) -> int:
        return len(self._askers)

    def watch(self, pid: int, pidfd: int) -> bool:
        """Serve while pid lives; whether the resolver took pidfd (False: pid is watched already, or too many are)."""
        assert self._nursery is not None  # ready: it listens
        if pid in self._askers:
            return False
        if len(self._askers) >= MAX_ASKERS:
            # Served all the same: it lives while those it waits for do (docs/dns.md, known limits).
            log.debug("tenant %s: resolver in namespace %d: pid %d not waited for", self.tenant.name, self.key[2], pid)
            return False
        self._askers.add(pid)
        self._nursery.start_soon(self._wait_for_exit, pid, pidfd)
        return True

    async def _wait_for_exit(self, pid: int, pidfd: int) -> None:
        try:
            await trio.lowlevel.wait_readable(pidfd)  # readable once the process has exited
        finally:
            os.close(pidfd)
        self._askers.discard(pid)
        if not self._askers:
            self.close_for_good()

    def close_for_good(self) -> None:
        """Its programs are gone: it closes, and leaves the fd store."""
        self.closing = self._for_good = True
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    # ---- queries -----------------------------------------------------------------------

    async def _serve_udp(self, sock: socket.socket) -> None:
        """Answer the queries on sock: hits and refusals inline, misses in tasks of their own.

        The loop drives the non-blocking socket itself, as the shim
        front-end does its connections: one wait for readability, then
        plain recvfrom/sendto for every datagram queued, instead of trio's
        socket methods' scheduling points around each call (a cache hit's
        cost is mostly those, docs/benchmarks.md). It yields after each
        burst of ``UDP_BURST`` so a flood cannot hold the broker.
        """
        async with trio.open_nursery() as queries:
            while True:
                await trio.lowlevel.wait_readable(sock)
                for _ in range(UDP_BURST):
                    try:
                        data, client = sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    except OSError as e:  # an ICMP error of an earlier answer: nothing to do with the next query
                        log.debug("tenant %s: resolver: %s", self.tenant.name, e)
                        continue
                    self._take_udp(sock, queries, data, client)
                await trio.lowlevel.checkpoint()

    def _take_udp(self, sock: socket.socket, queries: trio.Nursery, data: bytes, client) -> None:
        try:
            out, q = self._answer_here(data, "udp", client, udp=True)
        except Exception:  # a bug costs this query, never the resolver or the broker
            log.exception("tenant %s: resolver: internal error answering %s", self.tenant.name, client)
            return
        if q is None:  # answered here (a hit, a refusal): no task, no slot
            self._send_udp(sock, out, data, client)
            return
        token = object()
        try:
            self._slots.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            return  # a flood of misses: UDP clients ask again
        queries.start_soon(self._forward_udp, sock, data, q, client, token)

    def _send_udp(self, sock: socket.socket, out: bytes | None, data: bytes, client) -> None:
        """Send a reply, or drop it: a full send buffer loses a datagram, as the network may (the client asks again)."""
        if out is None:
            return
        try:
            sock.sendto(message.with_id(out, data), client)
        except OSError as e:
            log.debug("tenant %s: resolver: cannot answer %s: %s", self.tenant.name, client, e)

    async def _forward_udp(self, sock: socket.socket, data: bytes, q: message.Query, client, token) -> None:
        try:
            self._send_udp(sock, await self._answer_upstream(q, "udp", client, udp=True), data, client)
        except Exception:  # a bug costs this query, never the resolver or the broker
            log.exception("tenant %s: resolver: internal error answering %s", self.tenant.name, client)
        finally:
            self._slots.release_on_behalf_of(token)

    async def _serve_tcp(self, conn) -> None:
        with conn:
            try:
                client = conn.getpeername()
                while True:
                    with trio.move_on_after(TCP_IDLE_TIMEOUT):
                        data = await _read_framed(conn)
                        if data is None:
                            return
                        out, q = self._answer_here(data, "tcp", client, udp=False)
                        if q is not None:
                            out = await self._answer_upstream(q, "tcp", client, udp=False)
                        if out is None:
                            return
                        out = message.with_id(out, data)
                        await _send_all(conn, struct.pack("!H", len(out)) + out)
                        continue
                    return  # idle
            except OSError as e:
                log.debug("tenant %s: resolver: a TCP client went away: %s", self.tenant.name, e)
            except Exception:  # a bug costs this connection, never the resolver or the broker
                log.exception("tenant %s: resolver: internal error on a TCP connection", self.tenant.name)

    def _answer_here(self, data: bytes, proto: str, client, *, udp: bool) -> tuple[bytes | None, message.Query | None]:
        """What can be answered without an upstream, audited: (reply or None to send nothing, None);
        or (None, the query) to be forwarded (``_answer_upstream``).

        Replies carry the id of the query first parsed from these bytes
        (message.Parsed): the caller gives them the client's (message.with_id).
        """
        dns_policy = self.tenant.config.dns
        try:
            q = self._parsed.parse(data)
        except message.BadQuery as e:
            self._audit(proto, client, None, "error", None, errno.EBADMSG, reason=e.reason)
            return message.error_reply(e), None
        if self.tenant.bucket is not None and not self.tenant.bucket.take(time.monotonic()):
            # max_rate, as for the tenant's requests: a flood of lookups costs this tenant, never another
            self._audit(proto, client, q, "deny", tenant_loc(self.tenant.name, "max_rate"), errno.EAGAIN, answers=[])
            return message.refusal(q, dns.rcode.REFUSED), None
        if not self._name_allowed(data, q, dns_policy.names):
            rcode = dns.rcode.NXDOMAIN if dns_policy.on_refused == "nxdomain" else dns.rcode.REFUSED
            self._audit(proto, client, q, "deny", f"tenants.{self.tenant.name}.dns.names", 0, answers=[])
            return message.refusal(q, rcode), None
        hit = self.cache.get(q, time.monotonic())
        if hit is None:
            return None, q
        answer, age = hit
        self._learn(q, answer, age)
        self._audit(proto, client, q, "graft", None, 0, answers=list(answer.addresses), upstream_ms=0.0)
        limit = message.udp_limit(q) if udp else 65535
        return message.cached_reply(data[2:], q, answer, age, limit), None

    def _name_allowed(self, data: bytes, q: message.Query, names: list[str] | None) -> bool:
        """message.name_allowed, remembered per query bytes for the policy's `names` in force (a reload: anew)."""
        if names is not self._allowed_for:
            self._allowed, self._allowed_for = {}, names
        key = data[2:]
        allowed = self._allowed.get(key)
        if allowed is None:
            if len(self._allowed) >= message.PARSED_MAX:
                self._allowed.clear()
            allowed = self._allowed[key] = message.name_allowed(q.name, names)
        return allowed

    async def _answer_upstream(self, q: message.Query, proto: str, client, *, udp: bool) -> bytes:
        """The upstream's answer to q (or SERVFAIL), cached and audited."""
        limit = message.udp_limit(q) if udp else 65535
        got = await self._forward(q)
        if isinstance(got, str):
            self._audit(proto, client, q, "error", None, errno.ETIMEDOUT, reason=got)
            return message.refusal(q, dns.rcode.SERVFAIL)
        answer, upstream, ms = got
        self.cache.put(q, answer, time.monotonic())
        self._learn(q, answer, 0)
        self._audit(
            proto,
            client,
            q,
            "graft",
            None,
            0,
            answers=list(answer.addresses),
            upstream_ms=round(ms, 3),
            host_addr=f"{upstream[0]}:{upstream[1]}",
        )
        return message.reply(q, answer, 0, max_size=limit)

    def _learn(self, q: message.Query, answer: message.Answer, age: int) -> None:
        """The addresses answered count as q's name for the tenant's rules' `names`, while their TTL lasts.

        Only for a tenant with such rules: a reload that gives it its first
        one counts the lookups made from then on.
        """
        if answer.ips and self.tenant.matcher.has_names:
            lasts = max(answer.addresses_ttl - age, self.tenant.config.dns.min_ttl)
            self.tenant.resolved.learn(q.text, answer.ips, time.monotonic() + lasts)

    async def _forward(self, q: message.Query) -> tuple[message.Answer, tuple[str, int], float] | str:
        """Ask the upstreams in turn: (answer, upstream, milliseconds), or why none answered."""
        upstreams = [(str(u.addr), u.port) for u in self.tenant.config.dns.upstream or []] or host_nameservers()
        why = "no upstream: none in the policy, none in the host's resolv.conf"
        for upstream in upstreams:
            started = time.perf_counter()
            step = "over UDP"
            with trio.move_on_after(UPSTREAM_TIMEOUT):
                try:
                    answer = await self._ask_udp(q, upstream)
                    if answer.truncated:
                        step = "over TCP, after a truncated answer"
                        answer = await self._ask_tcp(q, upstream)
                    return answer, upstream, (time.perf_counter() - started) * 1000
                except (OSError, message.BadAnswer) as e:
                    log.warning("tenant %s: resolver: upstream %s: %s", self.tenant.name, upstream, e)
                    why = f"upstream {upstream[0]}:{upstream[1]} {step}: {e}"
                    continue
            why = f"upstream {upstream[0]}:{upstream[1]}: no answer within {UPSTREAM_TIMEOUT:g} s {step}"
        return why  # the last upstream's, for the audit record

    async def _upstream_socket(self, upstream: tuple[str, int], kind: int):
        family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
        return trio.socket.from_stdlib_socket(await self.tenant.namespace.socket(family, kind, 0))

    async def _ask_udp(self, q: message.Query, upstream: tuple[str, int]) -> message.Answer:
        upstream_id = secrets.randbelow(1 << 16)
        with await self._upstream_socket(upstream, socket.SOCK_DGRAM) as s:
            await s.connect(upstream)  # only its answers reach this socket
            await s.send(message.forwarded(q, upstream_id))
            while True:
                try:
                    return message.parse_answer(await s.recv(65535), q, upstream_id)
                except message.BadAnswer:
                    continue  # not the answer to this query: wait for it

    async def _ask_tcp(self, q: message.Query, upstream: tuple[str, int]) -> message.Answer:
        upstream_id = secrets.randbelow(1 << 16)
        with await self._upstream_socket(upstream, socket.SOCK_STREAM) as s:
            await s.connect(upstream)
            query = message.forwarded(q, upstream_id)
            await _send_all(s, struct.pack("!H", len(query)) + query)
            data = await _read_framed(s)
            if data is None:
                raise message.BadAnswer("the upstream closed the connection")
            return message.parse_answer(data, q, upstream_id)

    def _audit(
        self, proto, client, q, action, rule, err, *, answers=None, upstream_ms=None, host_addr=None, reason=None
    ) -> None:
        self.owner.decisions.audit.write(
            Record(
                tenant=self.tenant.name,
                pid=None,
                uid=None,
                op="dns",
                proto=proto,
                family="inet",
                addr=client[0],
                port=client[1],
                host_addr=host_addr,
                action=action,
                rule=rule,
                errno=err,
                confinement=self.owner.decisions.confinement_state,
                via="resolver",
                reason=reason,
                name=q.text if q is not None else None,
                qtype=q.type_text if q is not None else None,
                answers=answers,
                upstream_ms=upstream_ms,
            )
        )


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


async def _send_all(conn, data: bytes) -> None:
    while data:
        data = data[await conn.send(data) :]


async def _read_framed(conn) -> bytes | None:
    """One length-prefixed DNS message from a TCP stream; None at its end."""
    head = await _read_exactly(conn, 2)
    if head is None:
        return None
    return await _read_exactly(conn, struct.unpack("!H", head)[0])


async def _read_exactly(conn, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = await conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
