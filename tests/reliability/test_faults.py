"""Faults: the broker dies at each point of a request; the broker is killed
under load. The app gets the documented errno within a bounded time, never
hangs, and leaks no fd."""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from graft.broker.shim import wire
from support.harness import GRAFT, PROGRAMS, WireClient, connect_request, echo_server

pytestmark = pytest.mark.netns
# The shim's bound on one broker exchange is 10 s; a dead broker is noticed at once.
PROMPT = 2.0


def fault_client(socket_path, ns, port: int, fallback: str | None = None) -> list[str]:
    env = dict(os.environ)
    env.pop("GRAFT_FALLBACK", None)
    if fallback:
        env["GRAFT_FALLBACK"] = fallback
    r = subprocess.run(
        [
            GRAFT,
            "run",
            "--socket",
            str(socket_path),
            "--netns",
            ns,
            "--no-dns",  # the faults here are the connect path's; a fake broker speaks only that
            "--",
            sys.executable,
            os.path.join(PROGRAMS, "fault_client.py"),
            "127.0.0.1",
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.split() + [r.stderr]


def against_dying_broker(ns, short_tmp, point: str, fallback: str | None = None):
    """Run fault_client against a fake broker that SIGKILLs itself at point.

    Returns (the fake's exit status, fault_client's fields).
    """
    path = short_tmp / "t.sock"
    fake = subprocess.Popen(
        [sys.executable, os.path.join(PROGRAMS, "dying_broker.py"), str(path), point], stdout=subprocess.PIPE, text=True
    )
    try:
        assert fake.stdout.readline().strip() == "ready"
        result = fault_client(path, ns, 9, fallback)
    finally:
        fake.kill()
        fake.wait()
    return fake.returncode, result


@pytest.mark.parametrize("point", ["accept", "request", "socket"])
def test_broker_killed_before_its_reply(netns, short_tmp, point):
    status, (result, took, before, after, stderr) = against_dying_broker(netns, short_tmp, point)
    assert status == -signal.SIGKILL
    assert result == "ENETUNREACH" and float(took) < PROMPT and before == after
    assert stderr.count("broker unreachable") == 1


def test_broker_killed_right_after_its_reply(netns, short_tmp):
    """The reply arrived: the graft stands; the broker's reply said its connect succeeded."""
    status, (result, took, before, after, _) = against_dying_broker(netns, short_tmp, "reply")
    assert status == -signal.SIGKILL
    assert float(took) < PROMPT and before == after
    assert result == "OK"  # reply said error 0: the shim trusts the broker's connect result


def test_fallback_container_when_the_broker_dies(netns, short_tmp):
    _, (result, _, before, after, _) = against_dying_broker(netns, short_tmp, "request", fallback="container")
    assert result == "ECONNREFUSED" and before == after  # the namespace's own 127.0.0.1:9


def test_real_broker_sigkilled_then_restarted(netns, start_broker):
    with echo_server() as port:
        broker = start_broker(f"version = 1\n[tenants.t]\n[[tenants.t.connect]]\nports = [{port}]\n")
        ok = fault_client(broker.socket_path, netns, port)
        assert ok[0] == "OK"
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait()
        assert broker.socket_path.exists()  # SIGKILL leaves the socket file behind
        down = fault_client(broker.socket_path, netns, port)
        assert down[0] == "ENETUNREACH" and float(down[1]) < PROMPT and down[2] == down[3]
        broker.start()  # finds the stale socket file, sees nobody answers, replaces it
        again = fault_client(broker.socket_path, netns, port)
        assert again[0] == "OK"


def test_a_lingering_socket_passed_by_a_client_cannot_stall_the_broker(start_broker):
    """A client passes a TCP socket with SO_LINGER of an hour and data stuck behind a zero window.

    The broker closes what clients pass; closing that last reference would
    block for the hour. The broker must answer, keep serving, and stop at once.
    """
    broker = start_broker('version = 1\n[tenants.t]\ndefault = "deny"\n')
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(1)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stuck.connect(lsn.getsockname())
    sink, _ = lsn.accept()  # never reads: its window closes
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.setblocking(False)
    for _ in range(10_000):  # bounded: until the send buffer is full too
        try:
            stuck.send(bytes(4096))
        except BlockingIOError:
            break
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 3600))
    c = WireClient(broker.socket_path)
    try:
        c.send(connect_request(9), fds=[stuck.fileno()])
        stuck.close()  # the broker now holds the last reference
        rep, _ = c.reply()
        assert (rep.verdict, rep.error) == (wire.V_ERROR, errno.EBADMSG)
        other = WireClient(broker.socket_path)
        other.send(connect_request(9))
        assert other.reply()[0].verdict == wire.V_DENY  # still serving
        other.close()
        t0 = time.monotonic()
        assert broker.stop() == 0, broker.stderr()
        assert time.monotonic() - t0 < 5
    finally:
        c.close()
        sink.close()
        lsn.close()
