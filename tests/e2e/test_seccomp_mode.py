"""Seccomp mode end to end: `graft run --seccomp` in a namespace with only `lo`, a real broker.

Nothing in the namespace can reach the host's loopback, so whatever reaches
a host-only server got there on a socket the seccomp agent installed. Each
test checks the audit log too. The TOCTOU test races a thread that rewrites
the address against the agent's check, thousands of times.
"""

from __future__ import annotations

import array
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from support.harness import GRAFT, compile_c, eventually, free_port, http_server, need_program, run_in_netns
from support.seccomp_env import (
    connect_rule,
    counting_listener,
    policy,
    seccomp_cmd,
    seccomp_records,
    seccomp_run,
    tenant_status,
)
from support.udp_env import udp_echo, udp_socket

pytestmark = pytest.mark.netns

PY = sys.executable


def test_a_command_reaches_a_host_only_server(netns, seccomp_broker, tmp_path):
    need_program("curl")
    (tmp_path / "index.html").write_text("grafted by seccomp\n")
    with http_server(tmp_path) as port:
        url = f"http://127.0.0.1:{port}/"
        assert run_in_netns(netns, "curl", "-sS", "--max-time", "5", url).returncode != 0  # only lo in there
        broker = seccomp_broker(policy(connect_rule(port)))
        r = seccomp_run(broker, netns, "curl", "-sS", "--max-time", "10", url)
        assert r.returncode == 0, r.stderr
        assert r.stdout == "grafted by seccomp\n"
    (rec,) = [r for r in seccomp_records(broker) if r["op"] == "connect"]
    assert (rec["action"], rec["addr"], rec["port"], rec["proto"], rec["errno"]) == (
        "graft",
        "127.0.0.1",
        port,
        "tcp",
        0,
    )
    assert rec["rule"] == "tenants.t.connect[0]" and rec["confinement"] == "on" and rec["uid"] == 0


CONNECT_ERRNO = """
import errno, socket, sys
s = socket.socket()
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
except OSError as e:
    print(errno.errorcode[e.errno])
else:
    print("connected")
"""


def test_a_denied_connect_fails_with_the_policys_errno(netns, seccomp_broker):
    port = free_port()
    broker = seccomp_broker(policy())
    r = seccomp_run(broker, netns, PY, "-c", CONNECT_ERRNO, str(port))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "EPERM"
    (rec,) = seccomp_records(broker)
    assert (rec["op"], rec["action"], rec["errno"], rec["rule"]) == (
        "connect",
        "deny",
        errno.EPERM,
        "tenants.t.default",
    )
    assert rec["pid"] > 0


BIND_THEN_ANSWER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("0.0.0.0", int(sys.argv[1])))
except OSError as e:
    print("bind", e.errno, flush=True)
    sys.exit(0)
s.listen(1)
print("listening", s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0, flush=True)
c, _ = s.accept()
c.sendall(b"served from the container")
c.close()
"""


def test_a_published_bind_serves_the_host_and_a_denied_bind_gets_eacces(netns, seccomp_broker):
    app_port, host_port, other = free_port(), free_port(), free_port()
    rule = (
        f'[[tenants.t.bind]]\naddr = ["0.0.0.0/32"]\nports = [{app_port}]\n'
        f'host = "127.0.0.1:{host_port}"\nproto = "tcp"\n'
    )
    broker = seccomp_broker(policy(rule))
    proc = subprocess.Popen(
        seccomp_cmd(broker, netns, PY, "-c", BIND_THEN_ANSWER, str(app_port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "listening True"  # SO_REUSEADDR was copied over
        with socket.create_connection(("127.0.0.1", host_port), timeout=10) as c:
            assert b"".join(iter(lambda: c.recv(100), b"")) == b"served from the container"
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    r = seccomp_run(broker, netns, PY, "-c", BIND_THEN_ANSWER, str(other))
    assert r.stdout.strip() == f"bind {errno.EACCES}", r.stderr
    binds = [(x["action"], x["port"], x["host_addr"], x["errno"]) for x in seccomp_records(broker)]
    assert binds == [("graft", app_port, f"127.0.0.1:{host_port}", 0), ("deny", other, None, errno.EACCES)]


UDP_ASK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.sendto(b"ping", ("127.0.0.1", int(sys.argv[1])))
data, peer = s.recvfrom(100)
print(data.decode(), peer[1] == int(sys.argv[1]))
"""


def test_a_udp_sendto_is_grafted_by_its_first_destination(netns, seccomp_broker):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv:
        srv.bind(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        broker = seccomp_broker(policy(connect_rule(port, "udp")))

        def answer():
            data, peer = srv.recvfrom(100)
            srv.sendto(data.upper(), peer)

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        r = seccomp_run(broker, netns, PY, "-c", UDP_ASK, str(port))
        t.join(timeout=10)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "PING True"
    (rec,) = seccomp_records(broker)
    assert (rec["op"], rec["proto"], rec["action"], rec["port"]) == ("connect", "udp", "graft", port)


UDP_PEERS = """
import errno, socket, sys
a, b, c = (int(p) for p in sys.argv[1:4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
out = []
for port in (a, b, c, b):
    try:
        s.sendto(b"x", ("127.0.0.1", port))
        out.append(s.recv(10).decode())
    except OSError as e:
        out.append(errno.errorcode[e.errno])
print(" ".join(out))
"""


def test_a_udp_socket_sends_exactly_where_the_policy_allows(netns, seccomp_broker, short_tmp):
    """One unconnected socket: its first destination grafts it, a second allowed one is judged and
    granted by the agent, a forbidden one is refused and never reached, a granted one is not asked again."""
    with udp_echo(prefix=b"") as (a, _), udp_echo(prefix=b"") as (b, _), udp_socket("127.0.0.1") as forbidden:
        c = forbidden.getsockname()[1]
        forbidden.setblocking(False)
        rules = f'[[tenants.t.connect]]\nto = ["127.0.0.1/32"]\nports = [{a}, {b}]\nproto = "udp"\n'
        broker = seccomp_broker(policy(rules))
        r = seccomp_run(broker, netns, PY, "-c", UDP_PEERS, str(a), str(b), str(c))
        with pytest.raises(BlockingIOError):
            forbidden.recv(10)  # nothing arrived there
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["x", "x", "EPERM", "x"]
    records = [(x["op"], x["port"], x["action"]) for x in seccomp_records(broker)]
    assert records == [("connect", a, "graft"), ("grant", b, "graft"), ("grant", c, "deny")], records


UNIX_CLIENT = """
import socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
    s.connect(sys.argv[1])
    s.sendall(b"unix")
    print(s.recv(10).decode())
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
a.send(b"pair")
print(b.recv(10).decode())
"""


def test_unix_sockets_are_untouched(netns, seccomp_broker, short_tmp):
    broker = seccomp_broker(policy())  # default deny: a judged call would fail
    path = str(short_tmp / "u.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen(1)

        def echo():
            c, _ = srv.accept()
            with c:
                c.sendall(c.recv(10).upper())

        t = threading.Thread(target=echo, daemon=True)
        t.start()
        r = seccomp_run(broker, netns, PY, "-c", UNIX_CLIENT, path)
        t.join(timeout=10)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["UNIX", "pair"]
    assert seccomp_records(broker) == []  # nothing was judged


def send_to_agent(path: str, payload: bytes, fds: list[int] = (), close_after: bool = True) -> dict:
    """Send one message (and fds) to the agent as a runtime would; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(15)
        s.connect(path)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        if payload or fds:
            s.sendmsg([payload or b" "], anc)
        if close_after:
            s.shutdown(socket.SHUT_WR)
        try:
            raw = b"".join(iter(lambda: s.recv(4096), b""))
        except ConnectionResetError:  # refused before all of it was read: the answer may be lost
            return {"ok": False, "error": "reset"}
    return json.loads(raw)


def test_the_broker_survives_garbage_on_seccomp_sock(netns, seccomp_broker, tmp_path):
    need_program("curl")
    (tmp_path / "index.html").write_text("still here\n")
    with http_server(tmp_path) as port:
        broker = seccomp_broker(policy(connect_rule(port)))
        agent = str(broker.socket_dir / "seccomp.sock")
        assert oct(os.stat(agent).st_mode & 0o777) == "0o600"
        state = {
            "ociVersion": "1.0.2",
            "fds": ["seccompFd"],
            "pid": 1,
            "metadata": "t",
            "state": {"ociVersion": "1.0.2", "id": "x", "status": "creating", "pid": 1, "bundle": "/"},
        }
        r, w = os.pipe()
        try:
            answers = [
                send_to_agent(agent, b"\x00garbage\xff" * 100),
                send_to_agent(agent, b""),
                send_to_agent(agent, json.dumps(state).encode()),  # no fd
                send_to_agent(agent, json.dumps(state).encode(), [r]),  # not a notify fd
                send_to_agent(agent, json.dumps({**state, "metadata": "nobody"}).encode(), [w]),
                send_to_agent(agent, b"{" * 70000),  # longer than any process state
                send_to_agent(agent, json.dumps(state).encode(), [r, w]),  # more fds than it names
            ]
        finally:
            os.close(r)
            os.close(w)
        assert all(a["ok"] is False for a in answers), answers
        assert "not a seccomp notify fd" in answers[3]["error"]
        assert "0 came with it" in answers[2]["error"]
        # A sender that never finishes its message is dropped after the handshake timeout; meanwhile
        # others are served (one handshake does not hold the agent).
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
            slow.connect(agent)
            slow.sendall(b'{"ociVersion": ')
            res = seccomp_run(broker, netns, "curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/")
            assert res.returncode == 0 and res.stdout == "still here\n", res.stderr
        assert broker.proc.poll() is None


def test_a_tenant_in_preload_mode_gets_no_seccomp_listener(netns, seccomp_broker):
    broker = seccomp_broker(policy(mode="preload"))
    r = seccomp_run(broker, netns, "true")
    assert r.returncode == 1
    assert 'tenant t is in mode "preload", not "seccomp"' in r.stderr


def test_graft_run_seccomp_without_a_broker_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    r = subprocess.run(
        [GRAFT, "run", "--seccomp", "--socket", str(tmp_path / "t.sock"), "--", "touch", str(marker)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1 and "no broker's seccomp agent answers" in r.stderr
    assert not marker.exists()
    r = subprocess.run(
        [
            GRAFT,
            "run",
            "--seccomp",
            "--socket",
            str(tmp_path / "t.sock"),
            "--netns",
            "graft-no-such-namespace",
            "--no-dns",
            "--",
            "touch",
            str(marker),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1 and "cannot enter network namespace graft-no-such-namespace" in r.stderr
    assert not marker.exists()


def test_exit_status_and_signals_are_the_commands(netns, seccomp_broker):
    broker = seccomp_broker(policy())
    assert seccomp_run(broker, netns, "sh", "-c", "exit 7").returncode == 7
    assert seccomp_run(broker, netns, "sh", "-c", "kill -TERM $$").returncode == 128 + 15
    missing = seccomp_run(broker, netns, "/nonexistent/program")
    assert missing.returncode == 127 and "/nonexistent/program" in missing.stderr
    by_name = subprocess.run(
        [
            GRAFT,
            "run",
            "--seccomp",
            "--tenant",
            "t",
            "--socket-dir",
            str(broker.socket_dir),
            "--netns",
            netns,
            "--no-dns",
            "--",
            "sh",
            "-c",
            "exit 3",
        ],
        capture_output=True,
        timeout=60,
    )
    assert by_name.returncode == 3, by_name.stderr


def test_toctou_a_racing_thread_never_reaches_a_forbidden_destination(netns, seccomp_broker, tmp_path):
    """bypass4netns's hole: the address is rewritten between the agent's check and the kernel's use."""
    binary = tmp_path / "toctou_connect"
    compile_c("toctou_connect.c", binary)
    iterations = 3000
    with counting_listener() as (allowed, allowed_arrivals), counting_listener() as (forbidden, forbidden_arrivals):
        broker = seccomp_broker(policy(connect_rule(allowed)))
        r = seccomp_run(broker, netns, str(binary), str(allowed), str(forbidden), str(iterations), timeout=600)
        assert r.returncode == 0, r.stderr
        counts = dict(zip(r.stdout.split()[::2], map(int, r.stdout.split()[1::2]), strict=True))
    assert forbidden_arrivals == [], f"{len(forbidden_arrivals)} connects reached the forbidden port: {counts}"
    assert counts["connected"] + counts["refused"] == iterations and counts["other"] == 0, counts
    assert counts["flips"] > iterations
    grafted = [x for x in seccomp_records(broker) if x["action"] == "graft"]
    assert len(allowed_arrivals) == counts["connected"] > 0
    # Both ways were raced: the broker's (the first connect, and any when the pool is empty) and
    # the C loop's, which found the allowed destination granted and put a pre-issued socket on.
    installed = tenant_status(broker)["seccomp_calls"]["installed"]
    assert grafted and installed, (len(grafted), installed)
    # The race was really run: some connects judged allowed were then refused by the kernel,
    # because the address had changed by the time the call went on.
    assert len(grafted) + installed > counts["connected"], (len(grafted), installed, counts)


WAIT_THEN_CONNECT = """
import errno, socket, sys
for line in sys.stdin:
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", int(sys.argv[1])))
        print("connected", flush=True)
    except OSError as e:
        print(errno.errorcode[e.errno], flush=True)
    s.close()
"""


def test_a_removed_tenants_listeners_close_and_its_calls_fail(netns, seccomp_broker):
    """Reload without the tenant: its containers' notify fds are closed, their calls get ENOSYS."""
    with counting_listener() as (port, arrivals):
        broker = seccomp_broker(policy(connect_rule(port)))
        proc = subprocess.Popen(
            seccomp_cmd(broker, netns, PY, "-c", WAIT_THEN_CONNECT, str(port)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "connected"
            status = tenant_status(broker)
            assert status["seccomp_listeners"] == 1
            assert status["mode"] == "seccomp"
            human = subprocess.run(
                [GRAFT, "status", "--socket-dir", str(broker.socket_dir)], capture_output=True, text=True, check=True
            ).stdout
            (row,) = [line.split() for line in human.splitlines() if line.startswith("t ")]
            assert (row[1], row[-2], row[-1]) == ("seccomp", "1", "host")
            broker.reload('version = 1\n[tenants.other]\nmode = "seccomp"\n')
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "ENOSYS"
            proc.stdin.close()
            assert proc.wait(timeout=30) == 0
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    assert len(arrivals) == 1


KILLED_MID_CALL = """
import socket, sys, threading
def loop():
    while True:
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", int(sys.argv[1])))
        except OSError:
            pass
        s.close()
for _ in range(4):
    threading.Thread(target=loop, daemon=True).start()
print("running", flush=True)
threading.Event().wait()
"""


def test_programs_killed_in_the_middle_of_calls_cost_the_broker_nothing(netns, seccomp_broker):
    with counting_listener() as (port, arrivals):
        broker = seccomp_broker(policy(connect_rule(port)))
        for _ in range(5):
            proc = subprocess.Popen(
                seccomp_cmd(broker, netns, PY, "-c", KILLED_MID_CALL, str(port)),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            try:
                assert proc.stdout.readline().strip() == "running"
                seen = len(arrivals)
                assert eventually(lambda seen=seen: len(arrivals) >= seen + 20, timeout=30)  # calls are in flight now
                # SIGKILL to graft run's child (the program), whatever call it is in
                with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                    (child,) = map(int, f.read().split())
                os.kill(child, signal.SIGKILL)
                assert proc.wait(timeout=30) == 128 + 9
            finally:
                proc.kill()
                proc.wait()
                proc.stdout.close()
        assert broker.proc.poll() is None
        r = seccomp_run(broker, netns, PY, "-c", CONNECT_ERRNO, str(port))
        assert r.stdout.strip() == "connected", r.stderr
    assert "Traceback" not in broker.stderr() and "internal error" not in broker.stderr()


V6_CONNECT = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setblocking(False)
err = s.connect_ex(("::1", int(sys.argv[1])))
import select
select.select([], [s], [], 10)
print(err, s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), s.getpeername()[1] == int(sys.argv[1]),
      s.getblocking())
"""


def test_a_nonblocking_ipv6_connect_keeps_its_semantics(netns, seccomp_broker):
    with socket.socket(socket.AF_INET6) as srv:
        srv.bind(("::1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        rule = f'[[tenants.t.connect]]\nto = ["::1/128"]\nports = [{port}]\n'
        broker = seccomp_broker(policy(rule))
        r = seccomp_run(broker, netns, PY, "-c", V6_CONNECT, str(port))
    assert r.returncode == 0, r.stderr
    # EINPROGRESS from the app's own non-blocking call, then connected; still non-blocking
    assert r.stdout.split() == [str(errno.EINPROGRESS), "0", "True", "False"]
    (rec,) = seccomp_records(broker)
    assert (rec["family"], rec["addr"], rec["action"]) == ("inet6", "::1", "graft")


TWO_CONNECTS = """
import errno, socket, sys
port = int(sys.argv[1])
first = socket.socket()
first.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
first.connect(("127.0.0.1", port))
# the host socket now on this fd took the option the app set on its own socket
print("nodelay", first.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0, flush=True)
second = socket.socket()
try:
    second.connect(("127.0.0.1", port))
    print("second connected")
except OSError as e:
    print("second", errno.errorcode[e.errno])
first.close()
third = socket.socket()
third.connect(("127.0.0.1", port))
print("third connected")
"""


def test_options_are_copied_and_max_sockets_counts_seccomp_grafts(netns, seccomp_broker):
    with counting_listener() as (port, arrivals):
        broker = seccomp_broker(policy(connect_rule(port), tenant_keys="max_sockets = 1\n"))
        r = seccomp_run(broker, netns, PY, "-c", TWO_CONNECTS, str(port))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["nodelay True", "second ENOBUFS", "third connected"]
    # (the C loop's request for pre-issued sockets is refused too, and audited as op "preissue")
    actions = [(x["action"], x["rule"], x["errno"]) for x in seccomp_records(broker) if x["op"] == "connect"]
    assert actions == [
        ("graft", "tenants.t.connect[0]", 0),
        ("deny", "tenants.t.max_sockets", errno.ENOBUFS),
        ("graft", "tenants.t.connect[0]", 0),
    ]
