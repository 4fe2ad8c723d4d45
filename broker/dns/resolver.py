"""One tenant's resolver in one network namespace: its listeners and its queries (docs/dns.md).

A ``Resolver`` listens on the tenant's resolver address, port 53, UDP and
TCP, inside the namespace a program runs in, for as long as a process that
asked for it lives (pidfds; no polling); resolvers.py decides which
namespaces are served, for whom, and keeps them across a restart. It runs
as a task of its tenant's nursery, so it ends with the tenant; its tasks
are drawn in docs/architecture.md.

A query is judged by the tenant's ``max_rate`` (a query is a request) and
``dns.names``, answered from the tenant's cache, or forwarded to its
upstreams from a socket in the tenant's netns (where its grafted sockets
are made), under a random id; a truncated answer is asked again over TCP.
Every query is an audit record (``"op": "dns"``, ``"via": "resolver"``).
The messages are message.py's.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import secrets
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING

import dns.rcode
import trio

from ..core import request
from ..core.audit import Record
from ..core.netns import Namespace
from ..core.tenant import TenantState
from ..core.verdict import tenant_loc
from ..io.unixsock import accept_forever
from . import message

if TYPE_CHECKING:
    from .resolvers import Resolvers

log = logging.getLogger("graft.broker")

RESOLVER_PORT = 53  # what resolv.conf can name: glibc asks port 53 only
UPSTREAM_TIMEOUT = 2.0  # seconds per upstream before the next is asked
QUERIES_AT_ONCE = 64  # per resolver: more wait for a slot (UDP ones are dropped)
MAX_ASKERS = 256  # processes one resolver waits for (each holds a pidfd)
TCP_IDLE_TIMEOUT = 10.0
UDP_BURST = 64  # queued datagrams answered before the resolver yields to the broker's other tasks
MAX_TCP_CLIENTS = 32
HOST_RESOLV_CONF = Path("/etc/resolv.conf")


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
