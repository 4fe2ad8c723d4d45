"""End to end: the shim's connect fast path, in a namespace with only `lo`.

tests/support/programs/fastpath_client.py connects over and over under graft. The
first connect to a destination goes to the broker, which grants it in the
kernel; later ones take a pre-issued socket from the shim's pool and
connect it directly (GRAFT_DEBUG says "(fast)", the audit log "via":
"kernel"), and once the pool is in use, socket() itself takes one, which
its connect then connects in place ("(fast, in place)"). The tests check
that this is invisible to the app, and that everything that must send a
connect back to the broker does: a reload, a broker without confinement,
an app that closed the pool's fds; and that a socket used for anything but
such a connect is a container socket again first.
"""

from __future__ import annotations

import array
import errno
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
from pyroute2 import NetNS

from graft.broker.shim import wire
from support.harness import GRAFT, PROGRAMS, echo_server, eventually, free_port, graft_cmd

PY = sys.executable
CLIENT = str(PROGRAMS / "fastpath_client.py")

pytestmark = pytest.mark.netns


def policy(port: int, confinement: str = "required", action: str = "graft", max_sockets: int = 1024) -> str:
    return f"""version = 1
[broker]
confinement = "{confinement}"
[tenants.t]
default = "deny"
max_sockets = {max_sockets}
[[tenants.t.connect]]
to = ["127.0.0.1/32"]
ports = [{port}]
proto = "tcp"
action = "{action}"
"""


class Client:
    """fastpath_client.py under graft: one command in, one line out."""

    def __init__(self, broker, netns: str, port: int, cmd: list[str] | None = None):
        """The client of port under graft with broker's socket, in netns; or run by cmd + its arguments."""
        args = [PY, CLIENT, "127.0.0.1", str(port)]
        cmd = graft_cmd(broker, netns, *args) if cmd is None else [*cmd, *args]
        self.proc = subprocess.Popen(
            cmd,
            env=dict(os.environ, GRAFT_DEBUG="1"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

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
    return [r for r in records if r.get("via") == "shim"], [r for r in records if r.get("via") == "kernel"]


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
        (client.proc.pid, "graft", "tenants.t.connect[0]", port)
    }
    assert err.count("-> graft (fast") == 40, err
    # Once a batch has come, socket() takes its socket from the pool: only a pool that is empty
    # at that moment (before the first batch, or a refill late) leaves a connect to the pool.
    assert err.count("-> graft (fast, in place)") >= 20, err


def test_a_refused_connect_fails_the_same_on_the_fast_path(netns, start_broker):
    port = free_port()  # allowed, nothing listens
    with grafted_client(netns, start_broker, port) as (_, client):
        assert [client.ask("connect 1") for _ in range(4)] == ["ECONNREFUSED"] * 4
        err = client.finish()
    assert err.count("-> graft (fast") == 3, err
    assert err.count("-> graft (fast, in place)") >= 1, err


def test_a_pool_given_less_than_it_asks_keeps_to_its_share(netns, start_broker):
    """max_sockets 32: the pools' half is 16, a lone pool's batches 8 (core/poolshare.py).

    The pool asks for its next batch when it is down to what the last one
    brought, not to what it asked for (up to 64), so it never holds more
    than two batches and the tenant's limit never refuses its refills.
    """
    with echo_server() as port, grafted_client(netns, start_broker, port, max_sockets=32) as (broker, client):
        assert client.ask("connect 300") == "ok"
        client.finish()
        assert eventually(lambda: len(connects(broker)[1]) >= 290), len(connects(broker)[1])
    refusals = [r for r in broker.audit() if r["op"] == "preissue"]
    assert refusals == []
    by_broker, by_kernel = connects(broker)
    assert len(by_broker) + len(by_kernel) == 300
    assert len(by_broker) <= 3, by_broker  # the first, and at most a dry pool's rare round trip
    # refills of 8 for a pool that asks for more: the operator is told, once
    assert broker.stderr().count("share the fast path's pools (half of max_sockets 32), refills of 8") == 1


def batch_sizes(broker, netns, port: int, nofile: int) -> list[int]:
    """The sizes of the batches a client with RLIMIT_NOFILE nofile got over 800 quick connects.

    Not more: the client's GRAFT_DEBUG lines (one a connect) wait in its stderr pipe until it exits."""
    client = Client(broker, netns, port, cmd=graft_cmd(broker, netns, "prlimit", f"--nofile={nofile}:{nofile}", "--"))
    try:
        assert client.ask("connect 800") == "ok"
        err = client.finish()
    finally:
        client.kill()
    return [int(m) for m in re.findall(r"preissue tcp: (\d+) sockets", err)]


def test_a_pool_takes_at_most_a_quarter_of_the_fd_limit(netns, start_broker):
    """Batches follow the connect rate up to GRAFT_PREISSUE_MAX, but a pool of two batches per family
    stays within a quarter of RLIMIT_NOFILE: at 256 fds, batches of 16 at most (preissue.c)."""
    with echo_server() as port:
        broker = start_broker(policy(port))
        roomy = batch_sizes(broker, netns, port, 4096)
        tight = batch_sizes(broker, netns, port, 256)
    assert roomy and max(roomy) > 16, roomy  # the control: this rate asks for more than 16
    assert sum(tight) >= 750 and max(tight) <= 16, tight  # the fast path still serves nearly every connect


def test_a_socket_is_on_a_host_socket_once_the_pool_is_in_use(netns, start_broker):
    with echo_server() as port, grafted_client(netns, start_broker, port) as (_, client):
        assert client.ask("where") == "container"  # no grant yet: nothing to pre-issue
        assert client.ask("connect 3") == "ok"
        assert client.ask("where") == "host"


def test_a_bind_puts_the_container_socket_back_first(netns, start_broker):
    """A deferred port-0 bind is the container's: the socket must be one of the container's first."""
    with echo_server() as port, grafted_client(netns, start_broker, port) as (broker, client):
        assert client.ask("connect 3") == "ok"
        assert client.ask("bind0") == "container ok"
        assert client.ask("where") == "host"  # the next socket takes the fast way again
    by_broker, _ = connects(broker)
    assert [r["action"] for r in by_broker] == ["graft", "graft"]  # the bound socket's connect went to the broker


def test_options_beyond_what_the_shim_records_put_the_container_socket_back(netns, start_broker):
    """The 17th option cannot be recorded, so it could not be carried over: set on a container socket."""
    with echo_server() as port, grafted_client(netns, start_broker, port) as (_, client):
        assert client.ask("connect 3") == "ok"
        assert client.ask("opts") == "container ok"


def test_an_option_the_host_socket_refuses_is_set_on_a_container_socket(netns, start_broker):
    """SO_BINDTODEVICE to a device only the container has: ENODEV on a host socket, fine in the container."""
    device = f"gv{os.getpid() % 100000}"
    with NetNS(netns) as ns:  # a veth pair with both ends in the namespace, gone with it
        ns.link("add", ifname=device, kind="veth", peer=f"{device}p")
    with echo_server() as port, grafted_client(netns, start_broker, port) as (_, client):
        assert client.ask("connect 3") == "ok"
        assert client.ask("where") == "host"
        assert client.ask(f"device {device}") == "container"
        assert client.ask("device no-such-device") == "ENODEV"  # refused in the container too: its errno


def test_a_connect_in_place_the_kernel_refuses_goes_to_the_broker(netns, start_broker):
    """A reload takes the kernel's grants: the socket under the app's fd is refused, the broker grants again."""
    with echo_server() as port, grafted_client(netns, start_broker, port) as (broker, client):
        assert client.ask("connect 3") == "ok"
        assert client.ask("where") == "host"
        broker.reload(policy(port))
        assert client.ask("connect 1") == "ok"
        err = client.finish()
    assert "refused in place" in err, err
    by_broker, _ = connects(broker)
    assert [r["action"] for r in by_broker] == ["graft", "graft"]


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


def test_a_broker_that_stops_answering_costs_one_timeout_not_two(netns, short_tmp):
    """The refill finds the broker wedged: the connect fails after one broker timeout (10 s)."""
    path = short_tmp / "wedged.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen()
    stop = threading.Event()

    def wedged_broker():
        """Grafts the first request (a connect, not to be connected here), then answers nothing."""
        conn, _ = listener.accept()
        with conn, socket.socket() as host:
            conn.recv(wire.REQUEST_SIZE)
            conn.sendmsg(
                [wire.encode_reply(wire.V_GRAFT, errno.ECONNREFUSED)],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [host.fileno()]))],
            )
            stop.wait(60)

    t = threading.Thread(target=wedged_broker)
    t.start()
    try:
        client = Client(None, netns, 9, cmd=[GRAFT, "run", "--socket", str(path), "--netns", netns, "--no-dns", "--"])
        try:
            assert client.ask("connect 1") == "ECONNREFUSED"  # the broker's graft: the grant is cached
            started = time.monotonic()
            assert client.ask("connect 1", timeout=40) == "ENETUNREACH"  # the refill times out: unreachable
            assert time.monotonic() - started < 15
        finally:
            client.kill()
    finally:
        stop.set()
        t.join()
        listener.close()
