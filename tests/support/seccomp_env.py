"""What the seccomp-mode tests share: policies, `graft run --seccomp`, the audit and status, a counting server.

Used by e2e/test_seccomp_mode.py (the agent end to end) and e2e/test_seccomp_loop.py
(its C loop).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from contextlib import contextmanager

import pytest

from .harness import GRAFT, need_confinement


def policy(*rules: str, default: str = "deny", mode: str = "seccomp", tenant_keys: str = "") -> str:
    """Tenant "t" in mode, with more of its keys (TOML lines) and then its rules."""
    text = (
        f'version = 1\n[broker]\nconfinement = "required"\n'
        f'[tenants.t]\nmode = "{mode}"\ndefault = "{default}"\n{tenant_keys}'
    )
    return text + "".join(rules)


def connect_rule(port: int, proto: str = "tcp") -> str:
    return f'[[tenants.t.connect]]\nto = ["127.0.0.1/32"]\nports = [{port}]\nproto = "{proto}"\n'


# A Python program: n TCP connects to 127.0.0.1:port in turn; prints a JSON list of "connected" or the errno's name.
CONNECTS = """
import errno, json, os, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
out = []
for _ in range(n):
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
        out.append("connected")
    except OSError as e:
        out.append(errno.errorcode[e.errno])
    s.close()
print(json.dumps(out))
"""


def seccomp_cmd(broker, ns: str | None, *cmd: str, dns: bool = False) -> list[str]:
    """`graft run --seccomp` of cmd in ns; dns as for harness.graft_cmd (off: no test reaches the host's resolvers)."""
    args = [GRAFT, "run", "--seccomp", "--socket", str(broker.socket_path)]
    if ns:
        args += ["--netns", ns] + ([] if dns else ["--no-dns"])
    return [*args, "--", *cmd]


def seccomp_run(
    broker, ns: str | None, *cmd: str, timeout: float = 60, dns: bool = False
) -> subprocess.CompletedProcess:
    return subprocess.run(
        seccomp_cmd(broker, ns, *cmd, dns=dns),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def seccomp_records(broker) -> list[dict]:
    return [r for r in broker.audit() if r.get("via") == "seccomp"]


@pytest.fixture
def seccomp_broker(netns, start_broker):
    """start_broker, once it is sure that confinement (which seccomp mode needs) can be had."""
    need_confinement()
    return start_broker


@contextmanager
def counting_listener():
    """A TCP listener on 127.0.0.1 that accepts and closes; yields (port, arrivals list)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4096)
    arrivals: list[tuple] = []
    stop = threading.Event()

    def serve():
        srv.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, peer = srv.accept()
            except TimeoutError:
                continue
            arrivals.append(peer)
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], arrivals
    finally:
        stop.set()
        t.join()
        while True:  # what completed its handshake after the last accept still counts
            srv.setblocking(False)
            try:
                conn, peer = srv.accept()
            except BlockingIOError:
                break
            arrivals.append(peer)
            conn.close()
        srv.close()


def tenant_status(broker, name: str = "t") -> dict:
    """The tenant's entry of `graft status --json`."""
    out = subprocess.run(
        [GRAFT, "status", "--socket-dir", str(broker.socket_dir), "--json"], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)["tenants"][name]
