"""No fork child ever holds a socket of the shim's (issue 14, item 2).

A fork while another thread grafts a connect must not copy into the child
the host socket on its way onto the app's fd (received from the broker, or
taken from the pre-issued pool), nor a pooled pre-issued socket or a broker
connection: the child would keep the parent's connection open, and its peer
would see no FIN until the child exits. tests/c/fork_inflight.c forks
10,000 times while three threads connect and close as fast as they can;
each child lists its fd table against the app's own record of its sockets
(exact at the fork). Both ways a connect is grafted are stressed: the
broker's round trip (confinement off) and the pre-issued fast path.

What keeps those fds out of a child (shim/forkguard.h) must not make a
fork wait for the broker: the last test forks while a thread waits on a
broker that never answers.
"""

from __future__ import annotations

import json
import select
import socket
import socketserver
import subprocess
import sys

import pytest

from graft.broker.shim import wire
from support.harness import GRAFT, PROGRAMS, compile_c, eventually, need_confinement, run_grafted, serving

pytestmark = pytest.mark.netns

FORKS = 10_000
THREADS = 3


@pytest.fixture(scope="module")
def fork_inflight(tmp_path_factory) -> str:
    binary = tmp_path_factory.mktemp("c") / "fork_inflight"
    compile_c("fork_inflight.c", binary)
    return str(binary)


class ClosingServer(socketserver.TCPServer):
    """Accepts every connection and closes it (BaseRequestHandler does nothing)."""

    allow_reuse_address = True
    request_queue_size = 4096


@pytest.fixture
def port():
    """A host listener for the connects: (127.0.0.1, port)."""
    with serving(ClosingServer(("127.0.0.1", 0), socketserver.BaseRequestHandler)) as p:
        yield p


def policy(port: int, confinement: str) -> str:
    return f"""version = 1
[broker]
confinement = "{confinement}"
[tenants.t]
default = "deny"
max_sockets = 4096
[[tenants.t.connect]]
to = ["127.0.0.1/32"]
ports = [{port}]
proto = "tcp"
"""


def stress(broker, netns, binary: str, port: int) -> dict:
    r = run_grafted(broker, netns, binary, "127.0.0.1", str(port), str(THREADS), str(FORKS), timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["forks"] == FORKS and out["failed"] == 0, out
    # The forks met connects in every phase: thousands of them ran alongside.
    assert out["connects"] >= 2_000, out
    return out


def test_no_fork_child_holds_an_in_flight_host_socket_on_the_broker_path(netns, start_broker, fork_inflight, port):
    broker = start_broker(policy(port, confinement="off"))
    out = stress(broker, netns, fork_inflight, port)
    assert out["leaky"] == {"inet": 0, "unix": 0, "other": 0}, out


def test_no_fork_child_holds_a_pre_issued_socket_on_the_fast_path(netns, start_broker, fork_inflight, port):
    need_confinement()
    broker = start_broker(policy(port, confinement="required"))
    out = stress(broker, netns, fork_inflight, port)
    # Most connects took a pre-issued socket: the kernel judged them, not the broker.
    assert eventually(lambda: len(kernel_connects(broker)) >= out["connects"] // 2, timeout=10), (
        len(kernel_connects(broker)),
        out,
    )
    assert out["leaky"] == {"inet": 0, "unix": 0, "other": 0}, out


def kernel_connects(broker) -> list[dict]:
    return [r for r in broker.audit() if r.get("via") == "kernel"]


def test_a_fork_does_not_wait_for_the_broker(netns, short_tmp):
    """A thread's round trip waits on a broker that never answers; a fork meanwhile takes no time."""
    path = short_tmp / "t.sock"
    program = str(PROGRAMS / "fork_while_waiting.py")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as wedged:
        wedged.bind(str(path))
        wedged.listen(1)
        wedged.settimeout(30)
        app = subprocess.Popen(
            # --no-dns: the wedged broker's one request must be the program's
            [
                GRAFT,
                "run",
                "--socket",
                str(path),
                "--netns",
                netns,
                "--no-dns",
                "--",
                sys.executable,
                program,
                "127.0.0.1",
                "9",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            conn, _ = wedged.accept()
            with conn:
                assert len(conn.recv(wire.REQUEST_SIZE)) == wire.REQUEST_SIZE  # the thread now waits (10 s bound)
                app.stdin.write("fork\n")
                app.stdin.flush()
                ready, _, _ = select.select([app.stdout], [], [], 30)
                assert ready
                took = float(app.stdout.readline())
        finally:
            app.kill()
            app.wait()
    assert took < 2.0, took
