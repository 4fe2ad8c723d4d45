"""UDP peers and clients shared by the UDP tests (end to end, confinement, seccomp, many peers).

An echo server on loopback answers from a thread woken by a pipe (no
sleeps); the client programs live in tests/programs and print JSON.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import threading
from contextlib import contextmanager

from .harness import program, run_grafted

PY = sys.executable


def udp_socket(host: str, port: int = 0) -> socket.socket:
    """A UDP socket bound to host:port (0: an ephemeral port)."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((host, port))
    except OSError:
        s.close()
        raise
    return s


@contextmanager
def udp_echo(
    host: str = "127.0.0.1",
    *,
    sock: socket.socket | None = None,
    prefix: bytes = b"echo:",
    reply_from_other_port: bool = False,
    peers: list | None = None,
):
    """Echo datagrams, prefixed, from a thread on sock (default: a new one on host); yields (port, reply_port).

    With reply_from_other_port it answers from a second socket, so a client
    whose socket were connected to `port` would never see the reply. Each
    sender's address is appended to peers, if given.
    """
    rx = sock or udp_socket(host)
    tx = udp_socket(rx.getsockname()[0]) if reply_from_other_port else rx
    stop_r, stop_w = os.pipe()

    def serve():
        while True:
            ready, _, _ = select.select([rx, stop_r], [], [])
            if stop_r in ready:
                return
            data, peer = rx.recvfrom(65536)
            if peers is not None:
                peers.append(peer)
            tx.sendto(prefix + data, peer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield rx.getsockname()[1], tx.getsockname()[1]
    finally:
        os.write(stop_w, b"x")
        t.join()
        for f in {rx, tx}:
            f.close()
        os.close(stop_r)
        os.close(stop_w)


def run_json(broker, ns, *args) -> dict:
    """Run a test program grafted in ns and return the JSON it printed."""
    r = run_grafted(broker, ns, *program(*args), timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)
