"""End to end: UDP under graft, in a namespace with only `lo`.

Only grafted sockets can reach the host's 127.0.0.1 from the namespace, so
every datagram that crosses did so on a host socket the broker handed out.

A sendto/sendmsg with a destination on a socket that is neither bound nor
connected is judged as a connect to that destination (GRAFT_REQF_SENDTO);
on a graft the host socket stays *unconnected*, so later datagrams may go
to other peers and replies from any peer are received, with recvfrom
giving the true peer address.
"""

from __future__ import annotations

import select
import socket
import subprocess

import pytest

from support.harness import free_port, graft_cmd, need, run_grafted
from support.udp_env import PY, program, run_json, udp_echo

pytestmark = pytest.mark.netns


def policy(
    default: str = "deny",
    connect_ports=(),
    bind: tuple[int, int] | None = None,
    proto: str = "udp",
    action: str = "graft",
    any_udp: bool = False,
) -> str:
    text = f'version = 1\n[tenants.t]\ndefault = "{default}"\n'
    if any_udp:
        text += '[[tenants.t.connect]]\nproto = "udp"\n'  # every UDP destination is grafted
    if connect_ports:
        text += (
            f'[[tenants.t.connect]]\nto = ["127.0.0.1/32", "::1/128"]\nports = {list(connect_ports)}\n'
            f'proto = "{proto}"\naction = "{action}"\n'
        )
    if bind is not None:
        text += (
            f'[[tenants.t.bind]]\naddr = ["0.0.0.0/32"]\nports = [{bind[0]}]\nhost = "127.0.0.1:{bind[1]}"\n'
            f'proto = "udp"\n'
        )
    return text


def test_connected_udp_client_reaches_a_host_server(netns, start_broker):
    with udp_echo() as (port, _):
        broker = start_broker(policy(connect_ports=[port]))
        out = run_json(broker, netns, "udp_client.py", "connect", "127.0.0.1", port)
    assert out == {"data": "echo:hello connected", "peer": ["127.0.0.1", port], "getpeername": ["127.0.0.1", port]}
    (rec,) = broker.audit()
    assert (rec["op"], rec["proto"], rec["action"], rec["port"]) == ("connect", "udp", "graft", port)


def test_a_socket_registered_with_epoll_before_its_first_sendto_is_still_watched(netns, start_broker):
    with udp_echo() as (port, _):
        broker = start_broker(policy(connect_ports=[port]))
        out = run_json(broker, netns, "epoll_first.py", "udp", "127.0.0.1", port)
    assert out == {"a": [select.EPOLLIN], "echo": "echo:udp first"}
    assert [a["action"] for a in broker.audit()] == ["graft"]


def test_sendto_grafts_an_unconnected_socket_that_hears_any_peer(netns, start_broker):
    with udp_echo(reply_from_other_port=True) as (port, reply_port), udp_echo() as (port2, _):
        broker = start_broker(policy(any_udp=True))
        out = run_json(broker, netns, "udp_client.py", "sendto", "127.0.0.1", port, port2)
    assert "error" not in out, out  # a socket connected to `port` would time out on the first reply
    # recvfrom gives the true peers: the first reply came from the server's second socket.
    assert out["replies"] == [["echo:one", ["127.0.0.1", reply_port]], ["echo:two", ["127.0.0.1", port2]]]
    assert out["connected"] == "ENOTCONN" and out["local_port"] != 0
    # One judgement, on the first datagram; the second send was a plain host call.
    (rec,) = broker.audit()
    assert (rec["op"], rec["proto"], rec["action"], rec["addr"], rec["port"]) == (
        "connect",
        "udp",
        "graft",
        "127.0.0.1",
        port,
    )


def test_sendto_over_ipv6(netns, start_broker):
    with udp_echo("::1") as (port, _), udp_echo("::1") as (port2, _):
        broker = start_broker(policy(any_udp=True))
        out = run_json(broker, netns, "udp_client.py", "sendto", "::1", port, port2)
    assert out["replies"] == [["echo:one", ["::1", port]], ["echo:two", ["::1", port2]]], out
    assert broker.audit()[0]["family"] == "inet6"


def test_sendto_socket_reaches_a_second_destination_the_narrow_rules_graft(netns, start_broker):
    """Narrow UDP rules: the kernel refuses the second destination until the shim has the
    broker grant it (one GRANT); tests/e2e/test_udp_multi_peer.py has the destinations refused."""
    with udp_echo() as (port, _), udp_echo() as (port2, _):
        broker = start_broker(policy(connect_ports=[port, port2]))
        out = run_json(broker, netns, "udp_client.py", "sendto", "127.0.0.1", port, port2)
    records = broker.audit()
    need(records[0]["confinement"] == "on", "needs kernel confinement (cgroup2 + BPF)")
    assert out["replies"] == [["echo:one", ["127.0.0.1", port]], ["echo:two", ["127.0.0.1", port2]]], out
    assert [(r["op"], r["port"], r["action"]) for r in records] == [
        ("connect", port, "graft"),
        ("grant", port2, "graft"),
    ]


def test_denied_sendto_fails_with_eperm_and_sends_nothing(netns, start_broker):
    with udp_echo() as (port, _):
        # A TCP rule for the port does not cover UDP: proto applies, the default denies.
        broker = start_broker(policy(connect_ports=[port], proto="tcp"))
        out = run_json(broker, netns, "udp_client.py", "deny", "127.0.0.1", port)
    # Nothing left the socket: not even natively, or the kernel would have autobound a port.
    assert out == {"sendto": "EPERM", "local_port": 0}
    (rec,) = broker.audit()
    assert (rec["op"], rec["proto"], rec["action"], rec["errno"]) == ("connect", "udp", "deny", 1)


def test_container_verdict_sends_natively_in_the_namespace(netns, start_broker):
    port = free_port()
    broker = start_broker(policy(connect_ports=[port], action="container"))
    receiver = subprocess.Popen(
        [
            "nsenter",
            f"--net=/run/netns/{netns}",
            "--",
            PY,
            "-u",
            "-c",
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"s.bind(('127.0.0.1', {port})); print('ready', flush=True); s.settimeout(30); "
            "print(s.recvfrom(100)[0].decode(), flush=True)",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout.readline().strip() == "ready"
        r = run_grafted(
            broker,
            netns,
            PY,
            "-c",
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"s.sendto(b'inside', ('127.0.0.1', {port}))",
        )
        assert r.returncode == 0, r.stderr
        assert receiver.stdout.readline().strip() == "inside"
        assert receiver.wait(timeout=30) == 0
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    (rec,) = broker.audit()
    assert (rec["proto"], rec["action"]) == ("udp", "container")


def test_udp_server_in_namespace_is_published_on_the_host(netns, start_broker):
    host_port = free_port()
    broker = start_broker(policy(bind=(5353, host_port)))
    server = subprocess.Popen(
        graft_cmd(broker, netns, *program("udp_server.py", 5353, 2)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The app sees the address it bound, not the host's (getsockname translation).
        assert server.stdout.readline().split() == ["listening", "0.0.0.0", "5353"]
        peers = []
        for msg in (b"a", b"b"):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.settimeout(10)
                c.bind(("127.0.0.1", 0))
                c.sendto(msg, ("127.0.0.1", host_port))
                data, src = c.recvfrom(100)
                assert (data, src) == (b"echo:" + msg, ("127.0.0.1", host_port))
                peers.append(c.getsockname())
        # recvfrom in the server returned each client's true address.
        seen = [tuple(server.stdout.readline().split()[1:]) for _ in peers]
        assert seen == [(h, str(p)) for h, p in peers]
        assert server.wait(timeout=30) == 0, server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    (rec,) = broker.audit()
    assert (rec["op"], rec["proto"], rec["action"], rec["host_addr"]) == (
        "bind",
        "udp",
        "graft",
        f"127.0.0.1:{host_port}",
    )
