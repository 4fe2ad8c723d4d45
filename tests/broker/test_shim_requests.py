"""The broker in-process, under trio: verdicts, audit, bad input, reload, limits.

A raw SEQPACKET client speaks the wire format directly, so these tests reach
every broker path without the shim and without namespaces.
"""

from __future__ import annotations

import array
import errno
import ipaddress
import json
import os
import socket
import struct

import pytest
import trio
import trio.testing

from graft.broker.core import hostsock, request
from graft.broker.core.audit import AuditLog
from graft.broker.io import unixsock
from graft.broker.io.outlet import Outlet
from graft.broker.server import Broker
from graft.broker.shim import front, wire
from graft.policy import parse_policy
from support.harness import REPLY_ANC_SPACE, free_port, reply_from_msg

POLICY = """
version = 1
[tenants.t]
default = "deny"
[[tenants.t.connect]]
to = ["127.0.0.1/32"]
ports = [{port}]
proto = "tcp"
[[tenants.t.connect]]
to = ["127.0.0.2/32"]
action = "container"
[[tenants.t.bind]]
addr = ["0.0.0.0/32"]
ports = [80]
host = "127.0.0.1:{host_port}"
[[tenants.t.bind]]
addr = ["127.0.0.1/32"]
ports = ["1024-65535"]
"""


def addr(ip: str, port: int) -> request.SockAddr:
    a = ipaddress.ip_address(ip)
    return request.SockAddr(socket.AF_INET6 if a.version == 6 else socket.AF_INET, a, port)


async def open_fds() -> int:
    """This process's open fds (broker's and test's), once every task is idle."""
    await trio.testing.wait_all_tasks_blocked()
    return len(os.listdir("/proc/self/fd"))


class Client:
    """One shim-like connection to a tenant socket."""

    def __init__(self, sock):
        self.sock = sock

    async def send(self, raw: bytes, fds: list[int] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        await self.sock.sendmsg([raw], anc)

    async def reply(self) -> tuple[wire.Reply | None, socket.socket | None]:
        """The next reply and its fd; (None, None) once the broker closed."""
        data, anc, _, _ = await self.sock.recvmsg(wire.REPLY_SIZE + 1, REPLY_ANC_SPACE)
        return reply_from_msg(data, anc)

    async def ask(self, op: int, a: request.SockAddr, **kw):
        await self.send(wire.encode_request(op, a, **kw))
        return await self.reply()


@pytest.fixture
async def env(nursery, short_tmp):
    """A broker serving tenant "t" plus a host listener its connect rule admits."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    audit_path = short_tmp / "audit.jsonl"
    audit = AuditLog(str(audit_path))
    broker = Broker(parse_policy(POLICY.format(port=port, host_port=free_port())), short_tmp / "sock", audit)
    await nursery.start(broker.run)

    class Env:
        pass

    e = Env()
    e.broker, e.port, e.listener, e.dir = broker, port, listener, short_tmp
    e.path = short_tmp / "sock" / "t.sock"

    async def client() -> Client:
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        await s.connect(str(e.path))
        return Client(s)

    e.client = client
    e.audit = lambda: [json.loads(x) for x in audit_path.read_text().splitlines()]
    yield e
    listener.close()
    audit.close()


async def test_graft_connect_hands_out_a_connected_host_socket(env):
    c = await env.client()
    rep, sock = await c.ask(request.OP_CONNECT, addr("127.0.0.1", env.port))
    assert rep.verdict == wire.V_GRAFT and rep.error in (0, errno.EINPROGRESS)
    with sock:
        peer, _ = env.listener.accept()
        with peer:
            assert peer.getpeername() == sock.getsockname()
            sock.setblocking(True)
            sock.sendall(b"ping")
            assert peer.recv(4) == b"ping"
    rec = env.audit()[-1]
    assert rec["action"] == "graft" and rec["rule"] == "tenants.t.connect[0]"
    assert (rec["op"], rec["proto"], rec["family"], rec["addr"], rec["port"]) == (
        "connect",
        "tcp",
        "inet",
        "127.0.0.1",
        env.port,
    )
    assert rec["pid"] == os.getpid() and rec["uid"] == os.getuid() and rec["errno"] == 0


async def test_deny_and_container_verdicts(env):
    c = await env.client()
    rep, fd = await c.ask(request.OP_CONNECT, addr("127.0.0.1", env.port + 1))
    assert (rep.verdict, rep.error, fd) == (wire.V_DENY, errno.EPERM, None)
    rep, fd = await c.ask(request.OP_BIND, addr("0.0.0.0", 81))
    assert (rep.verdict, rep.error, fd) == (wire.V_DENY, errno.EACCES, None)
    rep, fd = await c.ask(request.OP_CONNECT, addr("127.0.0.2", 9))
    assert (rep.verdict, fd) == (wire.V_CONTAINER, None)
    actions = [(r["action"], r["rule"], r["errno"]) for r in env.audit()]
    assert actions == [
        ("deny", "tenants.t.default", errno.EPERM),
        ("deny", "tenants.t.default", errno.EACCES),
        ("container", "tenants.t.connect[1]", 0),
    ]


async def test_published_bind_binds_the_host_address(env):
    c = await env.client()
    rep, sock = await c.ask(request.OP_BIND, addr("0.0.0.0", 80))
    assert rep.verdict == wire.V_GRAFT
    with sock:
        host = sock.getsockname()
        assert rep.addr == addr(*host)
    assert env.audit()[-1]["host_addr"] == f"{host[0]}:{host[1]}"


async def test_bind_failure_on_the_host_is_an_error_reply(env):
    c = await env.client()
    rep, fd = await c.ask(request.OP_BIND, addr("127.0.0.1", env.port))  # the test's listener holds it
    assert (rep.verdict, rep.error, fd) == (wire.V_ERROR, errno.EADDRINUSE, None)
    assert env.audit()[-1]["action"] == "error"


async def test_recorded_options_pass_the_allowlist_only(env):
    one = (1).to_bytes(4, "little")
    opts = (
        request.SockOpt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, one),
        request.SockOpt(socket.IPPROTO_TCP, socket.TCP_NODELAY, one),
        request.SockOpt(socket.SOL_SOCKET, socket.SO_MARK, one),  # needs CAP_NET_ADMIN: never applied
        request.SockOpt(socket.IPPROTO_IP, 19, one),  # IP_TRANSPARENT: likewise
    )
    c = await env.client()
    rep, sock = await c.ask(request.OP_CONNECT, addr("127.0.0.1", env.port), opts=opts)
    with sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0
        assert sock.getsockopt(socket.IPPROTO_IP, 19) == 0
    env.listener.accept()[0].close()


BAD = [
    ("truncated", lambda good: good[:40], errno.EBADMSG),
    ("oversized", lambda good: good + bytes(64), errno.EMSGSIZE),
    ("garbage", lambda good: os.urandom(len(good)), errno.EBADMSG),
    ("unknown op", lambda good: good[:6] + struct.pack("=H", 9) + good[8:], errno.EOPNOTSUPP),
    ("bogus family", lambda good: good[:8] + struct.pack("=i", 38) + good[12:], errno.EAFNOSUPPORT),
]


@pytest.mark.parametrize("name, mangle, err", BAD, ids=[b[0] for b in BAD])
async def test_bad_request_gets_an_error_reply_and_others_keep_being_served(env, name, mangle, err):
    good = wire.encode_request(request.OP_CONNECT, addr("127.0.0.1", env.port))
    bystander = await env.client()
    before = await open_fds()
    bad = await env.client()
    await bad.send(mangle(good))
    rep, fd = await bad.reply()
    assert (rep.verdict, rep.error, fd) == (wire.V_ERROR, err, None)
    assert await bad.reply() == (None, None)  # and the connection is closed
    bad.sock.close()
    rec = env.audit()[-1]
    assert rec["action"] == "error" and rec["errno"] == err and rec["reason"]
    rep, sock = await bystander.ask(request.OP_CONNECT, addr("127.0.0.1", env.port))
    assert rep.verdict == wire.V_GRAFT
    sock.close()
    env.listener.accept()[0].close()
    assert await open_fds() == before


async def test_fds_passed_by_a_client_are_closed_and_refused(env):
    good = wire.encode_request(request.OP_CONNECT, addr("127.0.0.1", env.port))
    before = await open_fds()
    c = await env.client()
    r, w = os.pipe()
    await c.send(good, [r, w])
    os.close(r)
    os.close(w)
    rep, fd = await c.reply()
    assert (rep.verdict, rep.error, fd) == (wire.V_ERROR, errno.EBADMSG, None)
    assert await c.reply() == (None, None)
    c.sock.close()
    assert await open_fds() == before  # the broker closed its copies of the pipe too


async def test_client_that_vanishes_mid_request_costs_nothing(env):
    before = await open_fds()
    for _ in range(20):
        c = await env.client()
        await c.send(wire.encode_request(request.OP_CONNECT, addr("127.0.0.1", env.port)))
        c.sock.close()  # gone before the reply with its fd
    survivor = await env.client()
    rep, sock = await survivor.ask(request.OP_CONNECT, addr("127.0.0.1", env.port))
    assert rep.verdict == wire.V_GRAFT
    sock.close()
    survivor.sock.close()
    # The vanished clients' grafts were made (and audited) but the broker kept no copy.
    assert len([r for r in env.audit() if r["action"] == "graft"]) == 21
    env.listener.setblocking(False)
    try:
        while True:
            env.listener.accept()[0].close()
    except BlockingIOError:
        pass
    assert await open_fds() == before


async def test_many_requests_on_one_connection(env):
    c = await env.client()
    for _ in range(50):
        rep, fd = await c.ask(request.OP_CONNECT, addr("127.0.0.1", 1))
        assert rep.verdict == wire.V_DENY


async def test_reload_applies_to_new_requests(env):
    c = await env.client()
    rep, _ = await c.ask(request.OP_CONNECT, addr("127.0.0.3", 7))
    assert rep.verdict == wire.V_DENY
    await env.broker.reload(
        parse_policy('version = 1\n[tenants.t]\ndefault = "container"\n[tenants.u]\ndefault = "deny"\n')
    )
    rep, _ = await c.ask(request.OP_CONNECT, addr("127.0.0.3", 7))  # same connection, new rules
    assert rep.verdict == wire.V_CONTAINER
    u = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    await u.connect(str(env.dir / "sock" / "u.sock"))  # an added tenant listens at once
    u.close()
    await env.broker.reload(parse_policy("version = 1\n[tenants.u]\n"))
    await trio.testing.wait_all_tasks_blocked()
    assert not env.path.exists()  # a removed tenant stops listening
    assert await c.reply() == (None, None)  # and its connections are closed


async def test_uid_allowlist(env):
    await env.broker.reload(parse_policy(f"version = 1\n[tenants.t]\nuids = [{os.getuid() + 1}]\n"))
    c = await env.client()
    rep, _ = await c.ask(request.OP_CONNECT, addr("127.0.0.1", env.port))
    assert (rep.verdict, rep.error) == (wire.V_DENY, errno.EPERM)
    assert env.audit()[-1]["rule"] == "tenants.t.uids"


async def test_max_sockets_counts_live_sockets_only(env, monkeypatch):
    monkeypatch.setattr(hostsock, "LIVENESS_REFRESH_INTERVAL", 0.0)
    await env.broker.reload(
        parse_policy(
            POLICY.format(port=env.port, host_port=free_port()).replace(
                'default = "deny"', 'default = "deny"\nmax_sockets = 2'
            )
        )
    )
    c = await env.client()
    held = []
    for _ in range(2):
        rep, sock = await c.ask(request.OP_CONNECT, addr("127.0.0.1", env.port))
        assert rep.verdict == wire.V_GRAFT
        held.append(sock)
    accepted = [env.listener.accept()[0] for _ in held]
    rep, fd = await c.ask(request.OP_CONNECT, addr("127.0.0.1", env.port))
    assert (rep.verdict, rep.error, fd) == (wire.V_DENY, errno.ENOBUFS, None)
    assert env.audit()[-1]["rule"] == "tenants.t.max_sockets"
    held.pop().close()  # the app closes one: room again
    rep, sock = await c.ask(request.OP_CONNECT, addr("127.0.0.1", env.port))
    assert rep.verdict == wire.V_GRAFT
    for s in [sock, *held, *accepted]:
        s.close()


async def test_tenant_socket_mode_and_directory_mode(env):
    assert oct(env.path.stat().st_mode & 0o777) == "0o666"
    assert oct((env.dir / "sock").stat().st_mode & 0o777) == "0o700"


async def admin_status(env) -> dict:
    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with s:
        await s.connect(str(env.dir / "sock" / "_admin.sock"))
        chunks = []
        while chunk := await s.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


async def test_status_counts_and_live_sockets(env):
    c = await env.client()
    rep, sock = await c.ask(request.OP_CONNECT, addr("127.0.0.1", env.port))
    await c.ask(request.OP_CONNECT, addr("127.0.0.1", 1))  # deny
    await c.ask(request.OP_CONNECT, addr("127.0.0.2", 1))  # container
    peer, _ = env.listener.accept()
    st = await admin_status(env)
    t = st["tenants"]["t"]
    assert t["counts"] == {"graft": 1, "container": 1, "deny": 1, "error": 0}
    assert (t["live_sockets"], t["live_exact"]) == (1, True)
    assert st["confinement"] == "off" and st["policy"]["generation"] == 1
    sock.close()
    peer.close()
    assert (await admin_status(env))["tenants"]["t"]["live_sockets"] == 0
    await env.broker.reload(parse_policy(POLICY.format(port=env.port, host_port=free_port())))
    assert (await admin_status(env))["policy"]["generation"] == 2
    assert oct((env.dir / "sock" / "_admin.sock").stat().st_mode & 0o777) == "0o600"


async def test_max_rate_refuses_with_eagain_and_audits(env):
    await env.broker.reload(
        parse_policy(
            POLICY.format(port=env.port, host_port=free_port()).replace(
                'default = "deny"', 'default = "deny"\nmax_rate = 5'
            )
        )
    )
    c = await env.client()
    verdicts = [(await c.ask(request.OP_CONNECT, addr("127.0.0.1", 1)))[0] for _ in range(8)]
    # A burst of one second's worth (5) is judged; the rest are refused. The 8
    # requests take far less than the 200 ms that would refill one token.
    assert [(v.verdict, v.error) for v in verdicts] == [(wire.V_DENY, errno.EPERM)] * 5 + [
        (wire.V_DENY, errno.EAGAIN)
    ] * 3
    assert env.audit()[-1]["rule"] == "tenants.t.max_rate"


async def test_ipv6_flowinfo_garbage_is_not_fatal(env):
    """An app that leaves sin6_flowinfo uninitialised must not take the broker down."""
    await env.broker.reload(parse_policy('version = 1\n[tenants.t]\n[[tenants.t.connect]]\nto = ["::1/128"]\n'))
    v6 = socket.socket(socket.AF_INET6)
    v6.bind(("::1", 0))
    v6.listen(4)
    c = await env.client()
    a = request.SockAddr(socket.AF_INET6, ipaddress.ip_address("::1"), v6.getsockname()[1], flowinfo=0xDEADBEEF)
    rep, sock = await c.ask(request.OP_CONNECT, a)
    assert rep.verdict == wire.V_GRAFT
    sock.close()
    v6.close()


async def test_client_that_does_not_read_its_replies_is_dropped(env):
    """Replies piling up mean it is not a shim: drop it rather than hold the tenant's turn."""
    flooder = await env.client()
    req = wire.encode_request(request.OP_CONNECT, addr("127.0.0.1", 1))
    hung_up = False
    with trio.fail_after(10):
        while not hung_up:  # until the broker hangs up on us
            try:
                await flooder.send(req)
            except OSError:
                hung_up = True
    other = await env.client()
    with trio.fail_after(5):  # the tenant's turn is free again
        rep, _ = await other.ask(request.OP_CONNECT, addr("127.0.0.1", 1))
    assert rep.verdict == wire.V_DENY


async def test_unwritable_audit_log_drops_records_not_the_broker(env):
    env.broker.audit.close()
    env.broker.audit._out = Outlet(os.open("/dev/null", os.O_RDONLY))  # every write fails with EBADF
    c = await env.client()
    rep, sock = await c.ask(request.OP_CONNECT, addr("127.0.0.1", env.port))
    assert rep.verdict == wire.V_GRAFT and env.broker.audit.lost == 1
    sock.close()
    env.listener.accept()[0].close()
    env.broker.audit.close()


async def test_reload_with_a_new_tenant_path_taken_by_a_file_applies_the_rest(env):
    (env.dir / "sock" / "u.sock").write_text("not a socket")
    c = await env.client()
    with pytest.raises(RuntimeError, match="tenant u: .*not a socket"):
        await env.broker.reload(parse_policy('version = 1\n[tenants.t]\ndefault = "container"\n[tenants.u]\n'))
    assert set(env.broker.tenants) == {"t"}
    assert (env.dir / "sock" / "u.sock").read_text() == "not a socket"  # left alone
    rep, _ = await c.ask(request.OP_CONNECT, addr("127.0.0.3", 7))
    assert rep.verdict == wire.V_CONTAINER  # the new rules, on the same connection


async def test_reload_applies_everything_but_a_tenant_that_cannot_start(env):
    """A new tenant whose socket is taken by a live listener fails alone; the others take the new policy."""
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    squatter.bind(str(env.dir / "sock" / "u.sock"))
    squatter.listen(1)
    c = await env.client()
    try:
        with pytest.raises(RuntimeError, match="tenant u: .* served by a running broker"):
            await env.broker.reload(
                parse_policy('version = 1\n[tenants.u]\n[tenants.t]\ndefault = "container"\n[tenants.w]\n')
            )
    finally:
        squatter.close()
    assert set(env.broker.tenants) == {"t", "w"}
    rep, _ = await c.ask(request.OP_CONNECT, addr("127.0.0.3", 7))
    assert rep.verdict == wire.V_CONTAINER  # the new rules, though u came first and failed


async def test_idle_client_connections_are_closed(env, monkeypatch):
    monkeypatch.setattr(front, "IDLE_TIMEOUT", 0.05)
    c = await env.client()
    with trio.fail_after(5):
        assert await c.reply() == (None, None)  # the broker hung up on the idle connection


async def test_a_live_listener_with_a_full_backlog_is_not_taken_for_a_stale_file(short_tmp):
    """Its connects would block (EAGAIN): that is a live broker, not a file to replace."""
    path = short_tmp / "t.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    live.bind(str(path))
    live.listen(0)
    queued = []
    try:
        for _ in range(64):  # bounded: fill the backlog until connects would block
            c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            c.setblocking(False)
            try:
                c.connect(str(path))
            except BlockingIOError:
                c.close()
                break
            queued.append(c)
        else:
            pytest.fail("the backlog never filled")
        new = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with new, trio.fail_after(5), pytest.raises(RuntimeError, match="served by a running broker"):
            await unixsock.bind_unix_listener(new, path, 0o600)
        assert path.exists()
    finally:
        for c in queued:
            c.close()
        live.close()
