"""End to end: the shim's connect fast path, in a namespace with only `lo`.

tests/programs/fastpath_client.py connects over and over under graft. The
first connect to a destination goes to the broker, which grants it in the
kernel; later ones take a pre-issued socket from the shim's pool and
connect it directly (GRAFT_DEBUG says "(fast)", the audit log "via":
"kernel"). The tests check that this is invisible to the app, and that
everything that must send a connect back to the broker does: a reload, a
broker without confinement, an app that closed the pool's fds.
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
from contextlib import contextmanager

import pytest

from harness import echo_server, eventually, free_port, graft_cmd

PY = sys.executable
CLIENT = os.path.join(os.path.dirname(__file__), "programs", "fastpath_client.py")

pytestmark = pytest.mark.netns


def policy(port: int, confinement: str = "required", action: str = "graft") -> str:
    return f"""version = 1
[broker]
confinement = "{confinement}"
[tenants.t]
default = "deny"
[[tenants.t.connect]]
to = ["127.0.0.1/32"]
ports = [{port}]
proto = "tcp"
action = "{action}"
"""


class Client:
    """fastpath_client.py under graft: one command in, one line out."""

    def __init__(self, broker, netns: str, port: int):
        env = dict(os.environ, GRAFT_DEBUG="1")
        self.proc = subprocess.Popen(graft_cmd(broker, netns, PY, CLIENT, "127.0.0.1", str(port)), env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)

    def ask(self, command: str, timeout: float = 60) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no answer to {command!r} in {timeout} s"
        return self.proc.stdout.readline().strip()

    def finish(self) -> str:
        """Let it exit; its stderr (the GRAFT_DEBUG lines)."""
        _, err = self.proc.communicate(timeout=60)
        return err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def connects(broker) -> tuple[list[dict], list[dict]]:
    """The audited connects: (answered by the broker, judged in the kernel)."""
    records = [r for r in broker.audit() if r["op"] == "connect"]
    return [r for r in records if "via" not in r], [r for r in records if r.get("via") == "kernel"]


@contextmanager
def grafted_client(netns, start_broker, port: int, **policy_args):
    """A broker allowing port, and the client under graft in netns: (broker, client)."""
    broker = start_broker(policy(port, **policy_args))
    client = Client(broker, netns, port)
    try:
        yield broker, client
    finally:
        client.kill()


def test_repeated_connects_take_the_fast_path(netns, start_broker):
    with echo_server() as port, grafted_client(netns, start_broker, port) as (broker, client):
        assert client.ask("connect 1") == "ok"
        assert client.ask("connect 40") == "ok"
        err = client.finish()
        assert eventually(lambda: len(connects(broker)[1]) == 40), connects(broker)
    by_broker, by_kernel = connects(broker)
    assert [r["action"] for r in by_broker] == ["graft"]  # the first: it made the grant
    assert {(r["pid"], r["action"], r["rule"], r["port"]) for r in by_kernel} == {
        (client.proc.pid, "graft", "tenants.t.connect[0]", port)}
    assert err.count("-> graft (fast)") == 40, err


def test_a_refused_connect_fails_the_same_on_the_fast_path(netns, start_broker):
    port = free_port()  # allowed, nothing listens
    with grafted_client(netns, start_broker, port) as (_, client):
        assert [client.ask("connect 1") for _ in range(3)] == ["ECONNREFUSED"] * 3
        err = client.finish()
    assert err.count("-> graft (fast)") == 2, err


def test_a_reload_sends_connects_back_to_the_broker(netns, start_broker):
    with echo_server() as port, grafted_client(netns, start_broker, port) as (broker, client):
        assert client.ask("connect 3") == "ok"
        broker.reload(policy(port, action="deny"))
        assert client.ask("connect 1") == "EPERM"
        broker.reload(policy(port))
        assert client.ask("connect 3") == "ok"
    by_broker, _ = connects(broker)
    assert [r["action"] for r in by_broker] == ["graft", "deny", "graft"]


def test_a_fork_child_never_uses_its_parents_pool(netns, start_broker):
    """Parent and child connect at once: shared pre-issued sockets would cross their payloads."""
    with echo_server() as port, grafted_client(netns, start_broker, port) as (broker, client):
        assert client.ask("connect 2") == "ok"  # the parent has a pool now
        assert client.ask("fork 30") == "ok"
        assert eventually(lambda: len({r["pid"] for r in connects(broker)[1]}) == 2), connects(broker)


def test_fds_closed_behind_the_shims_back_are_never_used(netns, start_broker):
    """A raw close_range() takes the pool's fds; their numbers then belong to the app's files."""
    with echo_server() as port, grafted_client(netns, start_broker, port) as (_, client):
        assert client.ask("connect 2") == "ok"
        assert client.ask("closeall") == "ok"
        assert client.ask("connect 20") == "ok"
        assert client.ask("files") == "ok"


def test_without_confinement_every_connect_asks_the_broker(netns, start_broker):
    with echo_server() as port, grafted_client(netns, start_broker, port, confinement="off") as (broker, client):
        assert client.ask("connect 10") == "ok"
        err = client.finish()
    by_broker, by_kernel = connects(broker)
    assert (len(by_broker), by_kernel) == (10, [])
    assert "(fast)" not in err
