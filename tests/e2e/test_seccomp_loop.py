"""The seccomp agent's C loop (broker/seccomp/seccomp_fast.c): its layouts, its messages, and what it answers.

The loop answers a connect to a destination the broker has granted by
putting a pre-issued host socket on the app's fd; everything that needs a
decision goes to the broker. The end-to-end tests check that it really took
calls (graft status counts them), that every connect is still in the audit
log, and each rule it must keep: a grant revoked by a reload, a process of
another uid, the app's options and flags, no pre-issued sockets while the
audit is required.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import socket
import struct
import sys

import pytest

from graft.broker.seccomp import abi, fast
from support.harness import compile_c, eventually
from support.seccomp_env import (
    CONNECTS,
    connect_rule,
    counting_listener,
    policy,
    seccomp_records,
    seccomp_run,
    tenant_status,
)

PY = sys.executable


# ---- pure: layouts and messages ------------------------------------------------------------


def test_a_handed_off_notification_decodes_as_the_broker_reads_one():
    raw_notif = abi.NOTIF.pack(77, 4242, 0, 42, abi.AUDIT_ARCH_X86_64, 0, 5, 0x1000, 16, 0, 0, 0)
    msg = bytearray(fast.MSG_SIZE)
    struct.pack_into("=I", msg, 0, fast.HANDOFF)
    at = fast.ffi.offsetof("struct graft_fast_msg", "notif")
    msg[at : at + abi.NOTIF.size] = raw_notif
    m = fast.decode_message(bytes(msg))
    assert m.kind == fast.HANDOFF and m.notification == abi.decode_notification(raw_notif)
    assert m.notification.call == "connect" and m.notification.fd == 5


def test_refill_and_pool_messages_round_trip_and_bad_ones_are_refused():
    m = fast.decode_message(fast.encode_refill(socket.AF_INET6, 1000, 31337))
    assert (m.kind, m.family, m.uid, m.pid, m.notification) == (fast.REFILL, socket.AF_INET6, 1000, 31337, None)
    pool = fast.ffi.from_buffer("struct graft_fast_msg *", fast.encode_pool(socket.AF_INET, 0, 0x10002))
    assert (pool.kind, pool.family, pool.uid, pool.grant_id) == (fast.POOL, socket.AF_INET, 0, 0x10002)
    with pytest.raises(ValueError):
        fast.decode_message(b"\x01" * (fast.MSG_SIZE - 1))
    with pytest.raises(ValueError):
        fast.decode_message(fast.encode_pool(socket.AF_INET, 0, 1))  # the broker's own kind, not the loop's
    with pytest.raises(ValueError):
        fast.decode_message(fast.encode_refill(socket.AF_UNIX, 0, 1))


def test_the_loop_copies_exactly_the_brokers_allowlist():
    from graft.broker.core import sockopts

    allow = sockopts.allowlist()
    assert {(o.level, o.name): o.size for o in allow} == sockopts.ALLOWED
    assert {(o.level, o.name) for o in allow if o.lock_bit} == {
        (socket.SOL_SOCKET, socket.SO_SNDBUF),
        (socket.SOL_SOCKET, socket.SO_RCVBUF),
    }
    assert all(o.size <= 16 for o in allow)  # OPT_MAX_SIZE in seccomp_fast.c


# ---- end to end -------------------------------------------------------------------------------


def connects(broker, netns, port: int, n: int) -> list[str]:
    r = seccomp_run(broker, netns, PY, "-c", CONNECTS, str(port), str(n))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def kernel_records(broker) -> list[dict]:
    return [r for r in broker.audit() if r.get("via") == "kernel"]


def test_repeated_connects_take_the_loops_fast_path_and_each_is_audited(netns, seccomp_broker):
    n = 40
    with counting_listener() as (port, arrivals):
        broker = seccomp_broker(policy(connect_rule(port)))
        assert connects(broker, netns, port, n) == ["connected"] * n
        assert eventually(lambda: len(arrivals) == n)
    calls = tenant_status(broker)["seccomp_calls"]
    # The first connects are the broker's (nothing granted yet, the pool on its way); then the loop's.
    assert calls["installed"] >= n // 2, calls
    slow = lambda: [r for r in seccomp_records(broker) if r["op"] == "connect" and r["action"] == "graft"]  # noqa: E731
    assert eventually(lambda: len(slow()) + len(kernel_records(broker)) == n), (len(slow()), kernel_records(broker))
    assert {(r["addr"], r["port"], r["tenant"]) for r in kernel_records(broker)} == {("127.0.0.1", port, "t")}


def test_a_reload_that_revokes_the_grant_sends_connects_back_to_the_broker(netns, seccomp_broker):
    with counting_listener() as (port, arrivals):
        broker = seccomp_broker(policy(connect_rule(port)))
        assert connects(broker, netns, port, 5) == ["connected"] * 5
        assert tenant_status(broker)["seccomp_calls"]["installed"] > 0
        broker.reload(policy())  # nothing allowed now
        assert connects(broker, netns, port, 3) == ["EPERM"] * 3
        denied = [r for r in seccomp_records(broker) if r["action"] == "deny" and r["port"] == port]
        assert len(denied) == 3  # judged by the broker again, not refused by a stale grant
        broker.reload(policy(connect_rule(port)))
        assert connects(broker, netns, port, 3) == ["connected"] * 3
        assert eventually(lambda: len(arrivals) == 8)


# A script's start: attempt() connects to argv[1] on 127.0.0.1, as the uid the process has then.
ATTEMPT = """
import errno, json, os, socket, sys
port = int(sys.argv[1])
def attempt():
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
        return "connected"
    except OSError as e:
        return errno.errorcode[e.errno]
    finally:
        s.close()
"""

SWITCH_UID = (
    ATTEMPT
    + """
out = [attempt() for _ in range(4)]  # as root: the pool is issued for uid 0
os.setresuid(65534, 65534, 65534)
out += [attempt() for _ in range(2)]
print(json.dumps(out))
"""
)


def test_a_pool_serves_only_the_uid_it_was_issued_for(netns, seccomp_broker):
    with counting_listener() as (port, arrivals):
        broker = seccomp_broker(policy(connect_rule(port), tenant_keys="uids = [0]\n"))
        r = seccomp_run(broker, netns, PY, "-c", SWITCH_UID, str(port))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == ["connected"] * 4 + ["EPERM"] * 2
        assert eventually(lambda: len(arrivals) == 4)
    assert tenant_status(broker)["seccomp_calls"]["installed"] >= 2
    # The connects' refusals. A refill the loop asked for as root may also be refused, audited as
    # op "preissue": the broker judges it for the uid the process has when it reads the request.
    denied = [r for r in seccomp_records(broker) if r["action"] == "deny" and r["op"] == "connect"]
    assert [(r["uid"], r["rule"]) for r in denied] == [(65534, "tenants.t.uids")] * 2


OTHER_UID_FIRST = (
    ATTEMPT
    + """
n = int(sys.argv[2])
result, done = os.pipe(), os.pipe()
child = os.fork()
if child == 0:  # a uid the policy leaves out asks first: its refill is refused...
    os.setresuid(65534, 65534, 65534)
    os.write(result[1], attempt().encode())
    os.read(done[0], 1)  # ...judged for it while it lives (the broker reads its uid then)
    os._exit(0)
first = os.read(result[0], 64).decode()
out = [first] + [attempt() for _ in range(n)]  # then root, which the policy allows
os.write(done[1], b"x")
os.waitpid(child, 0)
print(json.dumps(out))
"""
)


def test_a_refused_uid_does_not_hold_back_the_pool_of_an_allowed_one(netns, seccomp_broker):
    n = 40
    with counting_listener() as (port, arrivals):
        broker = seccomp_broker(policy(connect_rule(port), tenant_keys="uids = [0]\n"))
        r = seccomp_run(broker, netns, PY, "-c", OTHER_UID_FIRST, str(port), str(n))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == ["EPERM"] + ["connected"] * n
        assert eventually(lambda: len(arrivals) == n)
    refusals = [r for r in seccomp_records(broker) if r["op"] == "preissue"]
    assert [(r["uid"], r["rule"]) for r in refusals] == [(65534, "tenants.t.uids")], refusals
    # root's pool came at once (the refused uid's hold-off is its own): most connects are the loop's
    assert tenant_status(broker)["seccomp_calls"]["installed"] >= n // 2


OPTIONS = """
import errno, fcntl, json, os, select, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
first = socket.socket()
first.connect(("127.0.0.1", port))  # the broker's: grants the destination, fills the pool
first.close()
out = []
for i in range(n):  # the same fd number each time, its flags alternating
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 70 + i)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.set_inheritable(i % 2 == 0)
    s.setblocking(i % 3 != 0)
    err = s.connect_ex(("127.0.0.1", port))
    select.select([], [s], [], 10)
    out.append({
        "connect": errno.errorcode.get(err, err),
        "so_error": s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR),
        "nodelay": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        "keepalive": s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "keepidle": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        "rcvbuf": s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        "nonblocking": bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK),
        "cloexec": bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
        "peer": s.getpeername()[1],
    })
    s.close()
print(json.dumps(out))
"""


def test_the_fast_path_keeps_the_apps_options_and_flags(netns, seccomp_broker):
    n = 12
    with counting_listener() as (port, arrivals):
        broker = seccomp_broker(policy(connect_rule(port)))
        r = seccomp_run(broker, netns, PY, "-c", OPTIONS, str(port), str(n))
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert eventually(lambda: len(arrivals) == n + 1)
    assert tenant_status(broker)["seccomp_calls"]["installed"] >= n // 2  # most were the loop's
    assert got == [
        {
            "connect": "EINPROGRESS" if i % 3 == 0 else 0,
            "so_error": 0,
            "nodelay": 1,
            "keepalive": 1,
            "keepidle": 70 + i,
            "rcvbuf": 2 * 65536,
            "nonblocking": i % 3 == 0,
            "cloexec": i % 2 == 1,
            "peer": port,
        }
        for i in range(n)
    ], got


@pytest.mark.parametrize("mode", ["main-exits", "own-table"])
def test_close_on_exec_is_the_calling_threads(netns, seccomp_broker, tmp_path, mode):
    """The flag comes from the calling thread's fd table, which is not always its process's main thread's."""
    binary = tmp_path / "cloexec_threads"
    compile_c("cloexec_threads.c", binary)
    n = 12
    with counting_listener() as (port, arrivals):
        broker = seccomp_broker(policy(connect_rule(port)))
        r = seccomp_run(broker, netns, str(binary), str(port), mode, str(n))
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["connected", str(n), "wrong", "0"], r.stdout
        assert eventually(lambda: len(arrivals) == n + 1)
    assert tenant_status(broker)["seccomp_calls"]["installed"] >= n // 2


def test_no_pre_issued_sockets_while_the_audit_is_required(netns, seccomp_broker):
    with counting_listener() as (port, arrivals):
        text = policy(connect_rule(port)).replace("[tenants.t]", '[audit]\non_error = "deny"\n[tenants.t]')
        broker = seccomp_broker(text)
        assert connects(broker, netns, port, 6) == ["connected"] * 6
    assert tenant_status(broker)["seccomp_calls"]["installed"] == 0
    assert len([r for r in seccomp_records(broker) if r["op"] == "connect" and r["action"] == "graft"]) == 6
    # The loop asked once and was refused; it holds off instead of asking per connect.
    refusals = [r for r in seccomp_records(broker) if r["op"] == "preissue"]
    assert len(refusals) == 1 and refusals[0]["rule"] == "audit.on_error", refusals
    assert refusals[0]["errno"] == errno.EOPNOTSUPP


def test_a_broker_out_of_fds_fails_the_listener_not_itself(netns, seccomp_broker):
    """The listener's control socket is its first new fd after the handshake: without one, that
    listener ends (the program's socket calls fail), and the broker serves the next."""
    failed = "cannot serve the seccomp listener"
    with counting_listener() as (port, arrivals):
        broker = seccomp_broker(policy(connect_rule(port)))
        pid = broker.proc.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        # The limit comes from a snapshot of the broker's fds: one open only at that moment (a
        # netlink dump, say) leaves room for the socketpair, and the listener is served, only
        # short of fds later (its calls then go on unjudged, in the container). Tried again then.
        for _ in range(5):
            before = broker.stderr().count(failed)
            used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
            free = [fd for fd in range(max(used) + 3) if fd not in used]
            # Room for the handshake's two fds (the connection, the notify fd), none for the socketpair.
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (free[1] + 1, hard))
            try:
                starved = connects(broker, netns, port, 1)
            finally:
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            if broker.stderr().count(failed) > before:
                break
        assert broker.stderr().count(failed) > before, broker.stderr()
        assert starved == ["ENOSYS"], starved
        assert broker.proc.poll() is None
        assert connects(broker, netns, port, 2) == ["connected"] * 2
        assert eventually(lambda: len(arrivals) == 2)


REUSED_FD = """
import json, os, socket, sys
tcp_port, udp_port = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket()
s.connect(("127.0.0.1", tcp_port))  # a host socket now
for _ in range(3):  # as sockperf does: the address named on every send; the loop learns the socket
    s.sendto(b"x", ("127.0.0.1", tcp_port))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
os.dup2(u.fileno(), s.fileno())  # the same fd number, now the container's own UDP socket
s.sendto(b"hello", ("127.0.0.1", udp_port))  # its first destination: the broker's to judge
print("sent")
"""


def test_a_fd_number_reused_for_another_socket_is_judged_again(netns, seccomp_broker):
    """The loop lets calls on a known host TCP socket go on after checking its cookie, not its fd number."""
    with socket.socket() as listener, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # never accepted: the connection waits in the backlog and takes the bytes
        tcp_port = listener.getsockname()[1]
        receiver.bind(("127.0.0.1", 0))
        udp_port = receiver.getsockname()[1]
        broker = seccomp_broker(policy(connect_rule(tcp_port), connect_rule(udp_port, "udp")))
        r = seccomp_run(broker, netns, PY, "-c", REUSED_FD, str(tcp_port), str(udp_port))
        assert r.returncode == 0 and r.stdout.strip() == "sent", r.stderr
        receiver.settimeout(10)
        assert receiver.recv(100) == b"hello"  # through the host: grafted, not sent into the container
    assert tenant_status(broker)["seccomp_calls"]["continued"] >= 3
    assert [r["proto"] for r in seccomp_records(broker) if r["action"] == "graft"] == ["tcp", "udp"]


REFUSED_PREISSUED = """
import errno, socket, sys
from graft.broker.core import request
from graft.broker.shim import wire
from graft.broker.io.scmrights import passed_fds
path, port = sys.argv[1], int(sys.argv[2])
# An unconnected pre-issued socket on one of the program's fds, as the C loop leaves one when the
# kernel refused its connect (the grant gone between the loop's lookup and the connect).
c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
c.connect(path)
c.sendmsg([wire.encode_request(request.OP_PREISSUE, None, family=socket.AF_INET)])
_, anc, _, _ = c.recvmsg(wire.REPLY_SIZE + 1, socket.CMSG_SPACE(4 * request.PREISSUE_MAX))
s = socket.socket(fileno=passed_fds(anc)[0])
s.setblocking(True)  # the broker issues them non-blocking; the loop gives them the app's flags
try:
    s.connect(("127.0.0.1", port))  # allowed, never granted
    print("connected")
except OSError as e:
    print(errno.errorcode[e.errno])
"""


def test_an_unconnected_pre_issued_socket_is_judged_again(netns, seccomp_broker):
    """A connect the kernel refused leaves the pre-issued socket on the app's fd: a retry there is
    the broker's to judge, not a certain EPERM."""
    with counting_listener() as (port, arrivals):
        broker = seccomp_broker(policy(connect_rule(port)))
        r = seccomp_run(broker, netns, PY, "-c", REFUSED_PREISSUED, str(broker.socket_path), str(port))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "connected"
        assert eventually(lambda: len(arrivals) == 1)
    grafts = [(x["op"], x["port"]) for x in seccomp_records(broker) if x["action"] == "graft"]
    assert grafts == [("connect", port)]
