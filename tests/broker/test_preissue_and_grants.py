"""The connect fast path in the kernel: pre-issued sockets, grants, exact socket counts.

These tests speak the wire format directly (harness.WireClient) and act as
the app themselves: the test process holds the pre-issued sockets and calls
connect() on them, so what is checked is what the kernel allows any program
holding them, whatever it runs. The shim's use of them is in
e2e/test_shim_fast_path.py.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import json
import os
import socket
import struct
import subprocess
import threading
from contextlib import contextmanager

import pytest

from graft.broker.confine import fastpath
from graft.broker.core import request
from graft.broker.shim import wire
from support.harness import (
    BrokerProcess,
    WireClient,
    cgroup2_dir,
    connect_request,
    echo_server,
    eventually,
    free_port,
    grant_many,
    loopback_destination,
    make_test_cgroup,
    need_confinement,
    network_namespace,
    program,
    remove_test_cgroup,
)

pytestmark = pytest.mark.netns


def policy(
    port: int, *, max_sockets: int = 1024, confinement: str = "required", port6: int | None = None, uids: str = ""
) -> str:
    text = f"""version = 1
[broker]
confinement = "{confinement}"
[tenants.t]
default = "deny"
max_sockets = {max_sockets}
{uids}
[[tenants.t.connect]]
to = ["127.0.0.1/32"]
ports = [{port}]
proto = "tcp"
"""
    if port6 is not None:
        text += f"""[[tenants.t.connect]]
to = ["::1/128"]
ports = [{port6}]
proto = "tcp"
"""
    return text


@contextmanager
def running(tmp, text: str, cgroup: str | None = None, **kwargs):
    broker = BrokerProcess(tmp, text, cgroup=cgroup, **kwargs).start()
    try:
        yield broker
    finally:
        broker.stop()


def connect_errno(sock: socket.socket, addr: tuple) -> int:
    """connect() on a blocking copy of sock's settings: 0 or the errno."""
    sock.setblocking(True)
    sock.settimeout(5)
    return sock.connect_ex(addr)


def disconnect(sock: socket.socket) -> int:
    """connect(AF_UNSPEC), which Python's socket module cannot express: 0 or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    unspec = struct.pack("=H14x", socket.AF_UNSPEC)
    return 0 if libc.connect(sock.fileno(), unspec, len(unspec)) == 0 else ctypes.get_errno()


def grant(client: WireClient, port: int) -> None:
    """A CONNECT request the broker grafts: the grant the fast path needs."""
    client.send(connect_request(port))
    reply, sock = client.reply()
    assert reply.verdict == wire.V_GRAFT, reply
    sock.close()


@contextmanager
def pre_issued(broker, family: int = socket.AF_INET):
    """A connection to the tenant and one PREISSUE on it: (client, reply, sockets), all closed at the end.

    Sockets the test appends to the list are closed too.
    """
    client = WireClient(broker.socket_path)
    socks: list[socket.socket] = []
    try:
        reply, got = client.preissue(family)
        socks += got
        yield client, reply, socks
    finally:
        for s in socks:
            s.close()
        client.close()


def echoes(sock: socket.socket) -> bool:
    sock.sendall(b"ping")
    return sock.recv(4) == b"ping"


def test_a_pre_issued_socket_connects_only_where_the_broker_has_granted(short_tmp):
    need_confinement()
    with echo_server() as port, echo_server() as other, running(short_tmp / "b", policy(port)) as broker:
        with pre_issued(broker) as (client, reply, socks):
            assert reply.verdict == wire.V_GRAFT and len(socks) == request.PREISSUE_MAX, reply
            assert all(s.type == socket.SOCK_STREAM and fcntl.fcntl(s, fcntl.F_GETFL) & os.O_NONBLOCK for s in socks)
            assert connect_errno(socks[0], ("127.0.0.1", port)) == errno.EPERM  # allowed, not granted yet
            grant(client, port)
            assert connect_errno(socks[0], ("127.0.0.1", port)) == 0  # the EPERM left it usable
            assert echoes(socks[0])
            # from now on locked to it, like a socket the broker connected
            assert disconnect(socks[0]) == 0
            assert connect_errno(socks[0], ("127.0.0.1", other)) == errno.EPERM
            assert connect_errno(socks[1], ("127.0.0.1", other)) == errno.EPERM  # never granted
            assert connect_errno(socks[1], ("127.0.0.2", port)) == errno.EPERM  # another address
            with pytest.raises(PermissionError):
                socks[2].bind(("127.0.0.1", 0))
            pid = os.getpid()
            assert eventually(lambda: any(r.get("via") == "kernel" for r in broker.audit()))
    kernel = [r for r in broker.audit() if r.get("via") == "kernel"]
    assert len(kernel) == 1, kernel
    assert {
        k: kernel[0][k]
        for k in ("tenant", "pid", "uid", "op", "proto", "family", "addr", "port", "action", "rule", "errno")
    } == {
        "tenant": "t",
        "pid": pid,
        "uid": os.getuid(),
        "op": "connect",
        "proto": "tcp",
        "family": "inet",
        "addr": "127.0.0.1",
        "port": port,
        "action": "graft",
        "rule": "tenants.t.connect[0]",
        "errno": 0,
    }


def test_a_preissue_gets_as_many_sockets_as_it_wants(short_tmp):
    """The shim's batches follow its connect rate: the broker gives what is asked, up to PREISSUE_MAX."""
    need_confinement()
    with echo_server() as port, running(short_tmp / "b", policy(port)) as broker:
        client = WireClient(broker.socket_path)
        try:
            for want in (1, 3, request.PREISSUE_MAX):
                reply, socks = client.preissue(want=want)
                for s in socks:
                    s.close()
                assert (reply.verdict, len(socks)) == (wire.V_GRAFT, want)
        finally:
            client.close()


def test_a_stopping_broker_writes_every_fast_path_connect_first(short_tmp):
    """SIGTERM right after the connects: every one the kernel judged is in the log the broker leaves.

    Its periodic write of the kernel's records is an hour away here, so only the
    write on its way out can bring them; a broker that exits without draining
    the ring leaves none.
    """
    need_confinement()
    with echo_server() as port, running(short_tmp / "b", policy(port), kernel_audit_interval=3600.0) as broker:
        with pre_issued(broker) as (client, reply, socks):
            assert reply.verdict == wire.V_GRAFT and len(socks) == request.PREISSUE_MAX, reply
            grant(client, port)
            assert [connect_errno(s, ("127.0.0.1", port)) for s in socks] == [0] * len(socks)
            assert not [r for r in broker.audit() if r.get("via") == "kernel"]  # none written yet
            audit = broker.stop_and_audit()
    kernel = [r for r in audit if r.get("via") == "kernel"]
    assert len(kernel) == request.PREISSUE_MAX, audit
    assert {(r["pid"], r["op"], r["port"], r["action"]) for r in kernel} == {(os.getpid(), "connect", port, "graft")}


def test_ipv6_pre_issued_sockets_follow_ipv6_grants(short_tmp):
    need_confinement()
    with echo_server("::1") as port6, running(short_tmp / "b", policy(free_port(), port6=port6)) as broker:
        with pre_issued(broker, socket.AF_INET6) as (client, reply, socks):
            assert reply.verdict == wire.V_GRAFT and socks and all(s.family == socket.AF_INET6 for s in socks)
            assert connect_errno(socks[0], ("::1", port6)) == errno.EPERM
            client.send(
                wire.encode_request(
                    request.OP_CONNECT, request.SockAddr(socket.AF_INET6, ipaddress.ip_address("::1"), port6)
                )
            )
            reply, sock = client.reply()
            assert reply.verdict == wire.V_GRAFT, reply
            sock.close()
            assert connect_errno(socks[0], ("::1", port6)) == 0 and echoes(socks[0])
            assert connect_errno(socks[1], ("::ffff:127.0.0.1", port6)) == errno.EPERM  # not the same place


def test_a_reload_revokes_every_grant(short_tmp):
    """Grants are verdicts of the old rules: after a reload the broker judges again."""
    need_confinement()
    with (
        echo_server() as port,
        running(short_tmp / "b", policy(port)) as broker,
        pre_issued(broker) as (client, _, socks),
    ):
        grant(client, port)
        assert connect_errno(socks[0], ("127.0.0.1", port)) == 0
        broker.reload(policy(free_port()))  # port is no longer allowed
        assert connect_errno(socks[1], ("127.0.0.1", port)) == errno.EPERM
        client.send(connect_request(port))
        assert client.reply()[0].verdict == wire.V_DENY
        assert connect_errno(socks[1], ("127.0.0.1", port)) == errno.EPERM
        assert echoes(socks[0])  # a socket already connected keeps its connection


def test_sockets_pre_issued_by_an_earlier_broker_find_no_grant(short_tmp):
    """A restarted broker's grants are for its own tenant ids: the old pool can connect nowhere."""
    need_confinement()
    with echo_server() as port, running(short_tmp / "b", policy(port)) as broker, pre_issued(broker) as (_, _, old):
        assert broker.restart() == 0
        assert "reused pinned programs" in broker.stderr()
        with pre_issued(broker) as (client, _, new):
            grant(client, port)
            assert connect_errno(old[0], ("127.0.0.1", port)) == errno.EPERM
            assert connect_errno(new[0], ("127.0.0.1", port)) == 0


def test_max_sockets_counts_pre_issued_sockets_until_they_are_closed(short_tmp):
    """The kernel counts closes: unconnected sockets, which no socket dump sees, count exactly.

    Pre-issued sockets fill only half of max_sockets: the other half stays
    for the sockets the broker grafts per request. One pool gets half of
    that share a request (core/poolshare.py), so it fills in two.
    """
    need_confinement()
    with echo_server() as port, running(short_tmp / "b", policy(port, max_sockets=8)) as broker:
        client = WireClient(broker.socket_path)
        held: list[socket.socket] = []

        def graft_one() -> str:
            client.send(connect_request(port))
            reply, sock = client.reply()
            if sock is not None:
                held.append(sock)
            if reply.verdict == wire.V_DENY and reply.error == errno.ENOBUFS:
                return "full"
            return "graft" if reply.verdict == wire.V_GRAFT else str(reply)

        try:
            _, pool = client.preissue()
            _, more = client.preissue()
            assert (len(pool), len(more)) == (2, 2)
            pool += more
            reply, more = client.preissue()
            assert (reply.verdict, reply.error, more) == (wire.V_DENY, errno.ENOBUFS, [])
            assert [graft_one() for _ in range(5)] == ["graft"] * 4 + ["full"]
            pool.pop().close()
            pool.pop().close()
            assert [graft_one() for _ in range(3)] == ["graft"] * 2 + ["full"]
            for s in held + pool:
                s.close()
            held.clear()
            pool = client.preissue()[1]
            assert len(pool) == 2
        finally:
            for s in held + pool:
                s.close()
            client.close()
    denied = [(r["op"], r["rule"], r["errno"]) for r in broker.audit() if r["action"] == "deny"]
    # the refused pre-issue is audited like the refused connects
    assert (
        denied
        == [("preissue", "tenants.t.max_sockets", errno.ENOBUFS)]
        + [("connect", "tenants.t.max_sockets", errno.ENOBUFS)] * 2
    ), denied


def preissue_in_another_process(path) -> int:
    """How many sockets one PREISSUE of another process (another pid, so another pool) gets."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # nothing but the request and the answer: the test process's state stays untouched
        code = 1
        try:
            os.close(r)
            client = WireClient(path)
            _, socks = client.preissue()
            os.write(w, str(len(socks)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            got = f.read()
    finally:
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and got, (status, got)
    return int(got)


def test_pools_that_ask_together_share_the_pools_half_of_max_sockets(short_tmp):
    """A pool that asks alone gets half of the pools' share; with a second one asking, each a quarter.

    The pools are the shim processes (core/poolshare.py): this one and a
    forked child, told apart by their pids. Neither is refused.
    """
    need_confinement()
    with echo_server() as port, running(short_tmp / "b", policy(port, max_sockets=40)) as broker:
        client = WireClient(broker.socket_path)
        held: list[socket.socket] = []
        try:
            _, alone = client.preissue()  # the share is 20: alone, 20 // 2
            held += alone
            other = preissue_in_another_process(broker.socket_path)  # two pools: 20 // 4
            _, together = client.preissue()
            held += together
            assert (len(alone), other, len(together)) == (10, 5, 5)
        finally:
            for s in held:
                s.close()
            client.close()
    assert not [r for r in broker.audit() if r["action"] == "deny"]


def test_a_pre_issued_socket_that_listens_never_gets_a_connection(short_tmp):
    """listen() on a pre-issued socket binds an ephemeral host port; the listen guard drops its SYNs."""
    need_confinement()
    with running(short_tmp / "b", policy(free_port())) as broker, pre_issued(broker) as (_, _, socks):
        listener = socks[0]
        listener.listen()
        port = listener.getsockname()[1]
        with socket.socket() as probe:
            probe.setblocking(False)
            assert probe.connect_ex(("127.0.0.1", port)) == errno.EINPROGRESS
            listener.settimeout(1.0)  # bounds the wait for what must not arrive
            with pytest.raises(TimeoutError):
                listener.accept()


@pytest.mark.parametrize("case", ["confinement off", "uid not allowed"])
def test_preissue_is_refused_where_the_kernel_cannot_hold_or_the_tenant_may_not(short_tmp, case):
    need_confinement()
    port = free_port()
    if case == "confinement off":
        text, want, rule = policy(port, confinement="off"), errno.EOPNOTSUPP, "broker.confinement"
    else:
        text, want, rule = policy(port, uids=f"uids = [{os.getuid() + 1}]"), errno.EPERM, "tenants.t.uids"
    with running(short_tmp / "b", text) as broker:
        client = WireClient(broker.socket_path)
        try:
            reply, socks = client.preissue()
            assert (reply.verdict, reply.error, socks) == (wire.V_DENY, want, [])
        finally:
            client.close()
    # audited like every other decision
    [record] = broker.audit()
    assert {
        k: record[k]
        for k in ("tenant", "pid", "uid", "op", "proto", "family", "addr", "port", "action", "rule", "errno", "via")
    } == {
        "tenant": "t",
        "pid": os.getpid(),
        "uid": os.getuid(),
        "op": "preissue",
        "proto": "tcp",
        "family": "inet",
        "addr": None,
        "port": None,
        "action": "deny",
        "rule": rule,
        "errno": want,
        "via": "shim",
    }


def two_tenants(port: int, *, allowed: bool, with_gone: bool) -> str:
    text = policy(port if allowed else free_port())
    return text + ('[tenants.gone]\ndefault = "deny"\n' if with_gone else "")


def test_no_grant_survives_a_reload_while_requests_are_being_judged(short_tmp):
    """Verdicts of the old rules still in flight when a reload (removing a tenant) applies make no grant."""
    need_confinement()
    with echo_server() as port, running(short_tmp / "b", two_tenants(port, allowed=True, with_gone=True)) as broker:
        for _ in range(3):
            stop, flooding = threading.Event(), threading.Barrier(5)

            def flood(stop=stop, flooding=flooding):  # this round's
                client = WireClient(broker.socket_path)
                try:
                    first = True
                    while not stop.is_set():
                        client.send(connect_request(port))
                        sock = client.reply()[1]
                        if sock is not None:
                            sock.close()
                        if first:
                            flooding.wait(timeout=10)
                            first = False
                except OSError:
                    pass  # the reload may close an idle connection; the attempt goes on
                finally:
                    client.close()

            gone = WireClient(broker.socket_dir / "gone.sock")  # a connection its removal must cancel
            threads = [threading.Thread(target=flood) for _ in range(4)]
            for t in threads:
                t.start()
            try:
                flooding.wait(timeout=10)
                broker.reload(two_tenants(port, allowed=False, with_gone=False))
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=30)
                gone.close()
            with pre_issued(broker) as (_, _, socks):
                assert connect_errno(socks[0], ("127.0.0.1", port)) == errno.EPERM
            broker.reload(two_tenants(port, allowed=True, with_gone=True))


def test_a_reload_that_moves_the_tenant_to_another_netns_strands_its_old_pool(short_tmp):
    """Sockets pre-issued in the old namespace must not use grants made in the new one."""
    need_confinement()
    with (
        echo_server() as port,
        network_namespace("gfp") as ns,
        running(short_tmp / "b", policy(free_port())) as broker,
        pre_issued(broker) as (client, _, old),
    ):  # in the host namespace, where the echo server is
        broker.reload(policy(port).replace("[tenants.t]\n", f'[tenants.t]\nnetns = "{ns}"\n'))
        grant(client, port)  # judged and connected in ns (refused there: nothing listens)
        assert connect_errno(old[0], ("127.0.0.1", port)) == errno.EPERM
        _, new = client.preissue()
        old += new
        assert connect_errno(new[0], ("127.0.0.1", port)) == errno.ECONNREFUSED  # in ns, as granted


def test_a_reload_that_narrows_uids_strands_pools_of_uids_it_leaves_out(short_tmp):
    need_confinement()
    uid = 12345
    with (
        echo_server() as port,
        running(short_tmp / "b", policy(port)) as broker,
        pre_issued(broker) as (_, _, ours),
    ):  # uid 0
        broker.reload(policy(port, uids=f'uids = [{uid}]\nsocket_mode = "0666"'))
        for d in (short_tmp, short_tmp / "b", broker.socket_dir):
            os.chmod(d, 0o711)
        pid = os.fork()
        if pid == 0:  # the uid still allowed makes the grant
            try:
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                c = WireClient(broker.socket_path)
                c.send(connect_request(port))
                os._exit(0 if c.reply()[0].verdict == wire.V_GRAFT else 1)
            finally:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert connect_errno(ours[0], ("127.0.0.1", port)) == errno.EPERM


def test_while_no_broker_runs_pre_issued_sockets_connect_nowhere(short_tmp):
    """A stopped broker revokes its grants: nobody would audit those connects."""
    need_confinement()
    with (
        echo_server() as port,
        running(short_tmp / "b", policy(port)) as broker,
        pre_issued(broker) as (client, _, socks),
    ):
        grant(client, port)
        assert connect_errno(socks[0], ("127.0.0.1", port)) == 0
        assert broker.stop(keep_cgroup=True) == 0  # the programs stay attached, as under systemd
        assert connect_errno(socks[1], ("127.0.0.1", port)) == errno.EPERM


# More destinations than the one map all tenants shared held (16,384), by a quarter.
FLOOD = 16384 + 4096
PROBES = 16  # among the flood's oldest 16,384 (all but a map's 4,096), which an exact LRU would all forget


def forgotten(path, destinations: list[str]) -> int:
    """How many of destinations the kernel no longer lets the tenant's pre-issued sockets connect to.

    A fresh socket for each: one that has tried a connect may not try another.
    A destination still granted only refuses the connection (port 9 is closed).
    """
    client = WireClient(path)
    socks: list[socket.socket] = []
    try:
        while len(socks) < len(destinations):
            _, got = client.preissue()
            assert got
            socks += got
        errs = [
            connect_errno(sock, (host, 9)) for sock, host in zip(socks[: len(destinations)], destinations, strict=True)
        ]
    finally:
        for sock in socks:
            sock.close()
        client.close()
    assert set(errs) <= {errno.EPERM, errno.ECONNREFUSED}, errs
    return errs.count(errno.EPERM)


def test_a_tenant_granted_many_destinations_never_evicts_another_tenants_grants(short_tmp):
    """Each tenant's grants are an LRU of its own: a flood of destinations costs only the flooder's."""
    need_confinement()
    with echo_server() as port:
        text = f"""version = 1
[broker]
confinement = "required"
[tenants.quiet]
default = "deny"
[[tenants.quiet.connect]]
to = ["127.0.0.1/32"]
ports = [{port}]
proto = "tcp"
[tenants.busy]
default = "deny"
[[tenants.busy.connect]]
to = ["127.0.0.0/8"]
proto = "tcp"
"""
        broker = BrokerProcess(short_tmp / "b", text, tenant="quiet").start()
        busy_path = broker.socket_dir / "busy.sock"
        try:
            with pre_issued(broker) as (client, _, quiet_socks):
                grant(client, port)
                grant_many(busy_path, FLOOD)
                # the quiet tenant's grant is still in the kernel: its connect needs no broker
                assert connect_errno(quiet_socks[0], ("127.0.0.1", port)) == 0
                assert echoes(quiet_socks[0])
                # while the flooder forgot its own oldest grants: the flood did overflow a map.
                # Most of them, not each: the kernel's LRU is approximate (a run of entries can
                # wait on an idle CPU's local list, out of eviction's reach; seen on 6.18).
                oldest = [loopback_destination(k * 16384 // PROBES) for k in range(PROBES)]
                assert forgotten(busy_path, oldest) > PROBES // 2
        finally:
            assert broker.stop() == 0, broker.stderr()


def test_the_kernel_marks_and_counts_a_batch_as_the_c_updates_did(short_tmp):
    """issue.c's stamps: every socket of a batch carries what the per-socket updates gave it, and no other socket does.

    Both ways side by side (issue_probe.py): the kernel's sock_create program
    stamping each socket of the batch as it is created, and the map updates
    from C it replaces (still the way when stamps cannot be used). Each
    socket: the pre-issued mark of the batch's grant id, its tenant's count
    id, the listen guard locked; the closes of the broker's copies counted;
    a socket made after the batch carries nothing. A batch cut short by the
    fd limit hands out none, and says exactly how many of the sockets it
    closed the kernel counts (the tenant's count must add them).
    """
    need_confinement()
    cgroup = make_test_cgroup()
    assert cgroup is not None
    try:
        done = subprocess.run(
            program("issue_probe.py", cgroup2_dir(cgroup)), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
    finally:
        remove_test_cgroup(cgroup)
    # Only in the initial pid namespace do the thread's ids key what the kernel looks up (fastpath.py).
    assert out["kernel"]["stamped"] is fastpath.in_initial_pid_namespace(), out["kernel"]
    assert out["from_c"]["stamped"] is False
    for way in ("kernel", "from_c"):
        got = out[way]
        want = {"mark": [out["preissued_flag"], got["gid"]], "count": got["kid"], "locked": 1}
        assert got["sockets"] == [want] * 8, (way, got)
        assert got["plain"] == {"mark": None, "count": None, "locked": 0}, (way, got)
        assert got["stamps_left"] == 0 and got["released"] == 8, (way, got)
    together = out["concurrent"]  # 4 threads x 20 batches of 16, each thread for a tenant of its own
    assert together["batches"] == 80 and together["crossed"] == [], together
    assert together["stamped"] == (80 if fastpath.in_initial_pid_namespace() else 0), together
    assert together["released"] == [20 * 16] * 4, together
    kernel, from_c = out["kernel_cut_short"], out["from_c_cut_short"]
    assert kernel["error"] == from_c["error"] == errno.EMFILE, out
    assert kernel["counted"] == kernel["released"] >= 1, kernel  # stamped as made: counted, though never handed out
    assert from_c["counted"] == from_c["released"] == 0, from_c  # made, not yet counted, when socket() failed


def test_a_kernel_that_refuses_the_sock_create_program_still_gets_confinement(short_tmp):
    """The stamps are an optimisation: without the program (an older kernel), C marks and counts each socket."""
    need_confinement()
    cgroup = make_test_cgroup()
    assert cgroup is not None
    try:
        argv = program("issue_probe.py", cgroup2_dir(cgroup), "refused")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
    finally:
        remove_test_cgroup(cgroup)
    assert (out["loaded"], out["attached"]) == (False, 0), out
    got = out["issued"]
    assert got["stamped"] is False, got
    assert got["sockets"] == [{"mark": [fastpath.maps.F_PREISSUED, got["gid"]], "count": got["kid"], "locked": 1}] * 8
    assert got["released"] == 8, got
