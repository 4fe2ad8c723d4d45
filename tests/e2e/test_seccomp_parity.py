"""What exists twice, in the seccomp agent's C loop and in the broker's Python, answers the same.

The C loop (seccomp_fast.c) answers what needs no decision and connects
granted destinations itself; the broker (seccomp/agent.py, core/) answers
the rest. Three pieces of logic therefore exist in both languages, and each
has a table here, run through the real loop:

* the app's socket options carried to the host socket (core/sockopts.py's
  copy_options and the loop's copy_options): every allowlisted option, set
  on every socket, reads back the same whichever side made the host socket;
* the caller's uid (seccomp/procfs.py, the loop's effective_uid): a process
  whose real and effective uids differ is judged, and served from a pool,
  by its effective uid on both sides;
* which calls need the broker (the agent's _request, the loop's answer):
  a call the broker would judge is never let go on by the loop, and what
  the loop lets go on is what the broker would have left alone.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
from contextlib import contextmanager

import pytest

from graft.broker.core import sockopts
from support.harness import eventually
from support.seccomp_env import CONNECTS, counting_listener, policy, seccomp_records, seccomp_run, tenant_status

pytestmark = pytest.mark.netns
PY = sys.executable
_S, _T, _IP, _IP6 = socket.SOL_SOCKET, socket.IPPROTO_TCP, socket.IPPROTO_IP, socket.IPPROTO_IPV6


def _int(v: int) -> str:
    return struct.pack("=i", v).hex()


# Every allowlisted option with a value an unprivileged app may set that is not the default.
OPTIONS = {
    (_S, socket.SO_REUSEADDR): _int(1),
    (_S, socket.SO_REUSEPORT): _int(1),
    (_S, socket.SO_KEEPALIVE): _int(1),
    (_S, socket.SO_BROADCAST): _int(1),
    (_S, socket.SO_OOBINLINE): _int(1),
    (_S, socket.SO_SNDBUF): _int(32768),
    (_S, socket.SO_RCVBUF): _int(65536),
    (_S, socket.SO_RCVLOWAT): _int(7),
    (_S, socket.SO_LINGER): struct.pack("=ii", 1, 5).hex(),
    (_S, socket.SO_RCVTIMEO): struct.pack("=qq", 3, 0).hex(),
    (_S, socket.SO_SNDTIMEO): struct.pack("=qq", 4, 0).hex(),
    (_T, socket.TCP_NODELAY): _int(1),
    (_T, socket.TCP_KEEPIDLE): _int(71),
    (_T, socket.TCP_KEEPINTVL): _int(13),
    (_T, socket.TCP_KEEPCNT): _int(5),
    (_T, socket.TCP_USER_TIMEOUT): _int(12345),
    (_T, socket.TCP_MAXSEG): _int(1200),
    (_T, socket.TCP_FASTOPEN): _int(5),
    (_T, socket.TCP_NOTSENT_LOWAT): _int(16384),
    (_T, socket.TCP_DEFER_ACCEPT): _int(3),
    (_T, 30): _int(1),  # TCP_FASTOPEN_CONNECT
    (_IP, socket.IP_TOS): _int(0x10),
    (_IP, socket.IP_TTL): _int(33),
    (_IP, 24): _int(1),  # IP_BIND_ADDRESS_NO_PORT
    (_IP6, socket.IPV6_V6ONLY): _int(1),
    (_IP6, socket.IPV6_TCLASS): _int(0x20),
    (_IP6, socket.IPV6_UNICAST_HOPS): _int(17),
}
# Left out, with why: its value follows the connection's traffic, not what was copied.
NOT_COMPARED = {(_T, socket.TCP_QUICKACK)}
IPV6_ONLY, IPV4_ONLY = _IP6, _IP

OPTIONS_PROGRAM = """
import json, socket, sys
family, host, port, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
table = [(level, name, bytes.fromhex(value)) for level, name, value in json.loads(sys.argv[5])]
out = []
for _ in range(n):  # the first is the broker's (nothing granted yet); the loop makes most of the rest
    s = socket.socket(family, socket.SOCK_STREAM)
    for level, name, value in table:
        s.setsockopt(level, name, value)
    s.connect((host, port))
    out.append({f"{level}/{name}": s.getsockopt(level, name, len(value)).hex() for level, name, value in table})
    s.close()
print(json.dumps(out))
"""


@contextmanager
def listener6():
    """A TCP listener on [::1] that accepts and closes; yields its port."""
    srv = socket.socket(socket.AF_INET6)
    srv.bind(("::1", 0))
    srv.listen(128)
    srv.settimeout(0.05)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                srv.accept()[0].close()
            except TimeoutError:
                continue

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join()
        srv.close()


def tcp_rule(net: str, port: int) -> str:
    return f'[[tenants.t.connect]]\nto = ["{net}"]\nports = [{port}]\nproto = "tcp"\n'


def test_the_table_names_every_allowlisted_option():
    assert set(OPTIONS) | NOT_COMPARED == set(sockopts.ALLOWED)
    wrong = {k: len(bytes.fromhex(v)) for k, v in OPTIONS.items() if len(bytes.fromhex(v)) != sockopts.ALLOWED[k]}
    assert wrong == {}


@pytest.mark.parametrize("family", ["inet", "inet6"])
def test_options_read_back_the_same_from_the_brokers_and_the_loops_sockets(netns, seccomp_broker, family):
    n = 10
    v6 = family == "inet6"
    table = [(lvl, name, v) for (lvl, name), v in OPTIONS.items() if lvl != (IPV4_ONLY if v6 else IPV6_ONLY)]
    with listener6() if v6 else counting_listener() as served:
        port = served if v6 else served[0]
        broker = seccomp_broker(policy(tcp_rule("::1/128" if v6 else "127.0.0.1/32", port)))
        fam = socket.AF_INET6 if v6 else socket.AF_INET
        r = seccomp_run(
            broker,
            netns,
            PY,
            "-c",
            OPTIONS_PROGRAM,
            str(int(fam)),
            "::1" if v6 else "127.0.0.1",
            str(port),
            str(n),
            json.dumps(table),
        )
        assert r.returncode == 0, r.stderr
    readings = json.loads(r.stdout)
    assert len(readings) == n
    # Both sides made some of these sockets: the broker the first, the loop at least half the rest.
    assert eventually(lambda: tenant_status(broker)["seccomp_calls"]["installed"] >= n // 2), tenant_status(broker)
    assert [x["op"] for x in seccomp_records(broker) if x["action"] == "graft"].count("connect") >= 1
    differing = {k for x in readings[1:] for k in x if x[k] != readings[0][k]}
    assert differing == set(), {k: [x[k] for x in readings] for k in differing}
    # ...and the same is what the app set, where the kernel reads back what was set.
    first = readings[0]
    for key in [(_T, socket.TCP_NODELAY), (_T, socket.TCP_KEEPIDLE), (_S, socket.SO_LINGER), (_T, 30)]:
        assert first[f"{key[0]}/{key[1]}"] == OPTIONS[key], key
    hops = (_IP6, socket.IPV6_UNICAST_HOPS) if v6 else (_IP, socket.IP_TTL)
    assert first[f"{hops[0]}/{hops[1]}"] == OPTIONS[hops]


# CONNECTS (port, n) after a switch to (real uid, effective uid), given as its third and fourth arguments.
# Its modules are imported first: the new uids may not read the interpreter's files.
UID_PROGRAM = "import errno, json, os, socket, sys\nos.setresuid(int(sys.argv[3]), int(sys.argv[4]), 0)\n" + CONNECTS

# (real uid, effective uid, the policy's uids): judged, and served from a pool, by the effective uid.
UIDS = [
    (0, 65534, [65534]),
    (65534, 0, [0]),
    (0, 65534, [0]),
    (65534, 0, [65534]),
]


@pytest.mark.parametrize(("ruid", "euid", "uids"), UIDS)
def test_the_loop_and_the_broker_take_the_same_uid(netns, seccomp_broker, ruid, euid, uids):
    n = 8
    allowed = euid in uids
    with counting_listener() as (port, arrivals):
        broker = seccomp_broker(policy(tcp_rule("127.0.0.1/32", port), tenant_keys=f"uids = {uids}\n"))
        r = seccomp_run(broker, netns, PY, "-c", UID_PROGRAM, str(port), str(n), str(ruid), str(euid))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == ["connected" if allowed else "EPERM"] * n
        assert eventually(lambda: len(arrivals) == (n if allowed else 0))
    assert {x["uid"] for x in seccomp_records(broker)} == {euid}
    installed = tenant_status(broker)["seccomp_calls"]["installed"]
    # A loop that read another uid than the broker would find no pool for it, and install nothing.
    assert installed >= n // 2 if allowed else installed == 0, installed


# One stopped call each (or two, named), under a policy whose default is "container": a call the
# broker judges is audited, and goes on in the container unless a rule grafts it.
CALLS = """
import ctypes, errno, json, socket, struct, sys
port = int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)

def raw_connect(s, addr: bytes) -> str:
    if libc.connect(s.fileno(), ctypes.c_char_p(addr), len(addr)) == 0:
        return "0"
    return errno.errorcode[ctypes.get_errno()]

def attempt(f):
    try:
        f()
        return "0"
    except OSError as e:
        return errno.errorcode[e.errno]

case = sys.argv[1]
tcp, udp = socket.socket(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if case == "tcp connect":
    out = attempt(lambda: tcp.connect(("127.0.0.1", port)))
elif case == "tcp6 connect":
    out = attempt(lambda: socket.socket(socket.AF_INET6).connect(("::1", port)))
elif case == "unix connect":
    out = attempt(lambda: socket.socket(socket.AF_UNIX).connect("/nonexistent/graft-parity"))
elif case == "tcp sendto":
    out = attempt(lambda: tcp.sendto(b"x", ("127.0.0.1", port)))
elif case == "inet6 address on an inet socket":
    out = raw_connect(tcp, struct.pack("=H", socket.AF_INET6) + struct.pack("!HI16sI", port, 0, bytes(15) + b"\\1", 0))
elif case == "short inet address":
    out = raw_connect(tcp, struct.pack("=H", socket.AF_INET) + struct.pack("!H", port))
elif case == "udp first destination":
    out = attempt(lambda: udp.sendto(b"x", ("127.0.0.1", port)))
elif case == "udp sendmsg first destination":
    out = attempt(lambda: udp.sendmsg([b"x"], [], 0, ("127.0.0.1", port)))
elif case == "udp bound, then sendto":
    udp.bind(("127.0.0.1", 0))
    out = attempt(lambda: udp.sendto(b"x", ("127.0.0.1", port)))
elif case == "bind port 0":
    out = attempt(lambda: tcp.bind(("127.0.0.1", 0)))
print(json.dumps(out))
"""

# case: (stopped calls, calls the broker judges (audited), the program's result)
CASES = {
    "tcp connect": (1, 1, "0"),  # the rule grafts it
    "tcp6 connect": (1, 1, "ECONNREFUSED"),  # no rule: goes on in the container, where nothing listens
    "unix connect": (1, 0, "ENOENT"),
    "tcp sendto": (1, 0, "EPIPE"),
    "inet6 address on an inet socket": (1, 0, "EAFNOSUPPORT"),
    "short inet address": (1, 0, "EINVAL"),
    "udp first destination": (1, 1, "0"),
    "udp sendmsg first destination": (1, 1, "0"),
    "udp bound, then sendto": (2, 0, "0"),
    "bind port 0": (1, 0, "0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_loop_leaves_to_the_broker_every_call_it_would_judge(netns, seccomp_broker, case):
    calls, judged, result = CASES[case]
    with counting_listener() as (port, _):
        broker = seccomp_broker(policy(tcp_rule("127.0.0.1/32", port), default="container"))
        r = seccomp_run(broker, netns, PY, "-c", CALLS, case, str(port))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == result
    # The listener's loop ends with its process; then its counts are the tenant's.
    assert eventually(lambda: sum(tenant_status(broker)["seccomp_calls"].values()) == calls), tenant_status(broker)
    answered = tenant_status(broker)["seccomp_calls"]
    assert len(seccomp_records(broker)) == judged, seccomp_records(broker)
    # What the broker judged reached it: the loop let none of those go on by itself.
    assert answered["continued"] <= calls - judged, answered
    assert answered["installed"] == 0, answered  # nothing granted before: no pre-issued socket
