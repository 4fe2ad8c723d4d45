"""Restart without loss: grafted sockets belong to the apps, and the shim
reconnects to a new broker on its next call."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support.harness import PROGRAMS, echo_server, eventually, graft_cmd

pytestmark = pytest.mark.netns
PROGRAM = str(PROGRAMS / "many_connections.py")


def test_100_connections_carry_data_through_a_restart(netns, start_broker):
    with echo_server() as port:
        policy = f'version = 1\n[tenants.t]\ndefault = "deny"\n[[tenants.t.connect]]\nports = [{port}]\n'
        broker = start_broker(policy)
        app = subprocess.Popen(
            graft_cmd(broker, netns, sys.executable, PROGRAM, "127.0.0.1", str(port), "100"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert app.stdout.readline().strip() == "open 100", app.stderr.read()
            app.stdin.write("echo 5\n")
            app.stdin.flush()
            assert app.stdout.readline().strip() == "round ok=100 new=5 errors=-"

            # SIGTERM: the tenant socket goes away, and a new broker serves the same path.
            # The connects after it find the old broker's pre-issued sockets refused
            # (confinement's new epoch) and fall back to a round trip.
            assert broker.restart() == 0
            app.stdin.write("echo 10\n")
            app.stdin.flush()
            # The pooled broker connection is dead; the shim retries once on a
            # fresh one, so not even the first new connect fails.
            assert app.stdout.readline().strip() == "round ok=100 new=10 errors=-"
        finally:
            app.stdin.close()
            app.wait(timeout=30)
        # The audit log is appended across the restart; the kernel's records of
        # fast-path connects reach it within the broker's drain interval.
        assert eventually(lambda: len([a for a in broker.audit() if a["action"] == "graft"]) == 100 + 5 + 10)
    grafts = [a for a in broker.audit() if a["action"] == "graft"]
    assert len(grafts) == 100 + 5 + 10, grafts
