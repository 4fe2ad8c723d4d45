"""One grafted UDP socket, many peers: it sends where the policy grafts and nowhere else.

Issue 14, item 3. A UDP socket grafted by its first sendto carries its
tenant's grant id in its kernel mark; the kernel lets a datagram through to
any destination the broker has granted that tenant for UDP and refuses any
other with EPERM. The shim puts such a refusal to the broker once
(GRAFT_OP_GRANT, judged as that sendto's connect) and, on a graft, sends
again (docs/architecture.md, UDP). The app runs in a namespace with only
`lo`, so a datagram that reaches the host's loopback went out on a grafted
socket.

Two halves:
- against the real broker (needs confinement): the socket reaches A and B,
  never C, and B costs one GRANT, however often it is sent to; the same
  for a socket inherited across exec; with confinement off (the control)
  the old behaviour stays: any destination.
- against a scripted broker (tests/support/programs/grant_broker.py), the shim's
  side of the exchange on its own: what the GRANT carries, each kind of
  answer, a GRAFT reply with an fd attached (a protocol error: the fd is
  closed, the call fails with the kernel's EPERM), an unreachable broker.
  The refusal there comes from an nftables rule in the test's namespace,
  which the script lifts when it grants, so no confinement is needed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager

import pytest

from support.harness import GRAFT, need_confinement, need_program, run_grafted
from support.seccomp_env import seccomp_run
from support.udp_env import program, run_json, udp_echo

pytestmark = pytest.mark.netns

PY = sys.executable
DEBUG = dict(os.environ, GRAFT_DEBUG="1")


def policy(cidr: str, ports: list[int], confinement: str, mode: str = "preload") -> str:
    return (
        f'version = 1\n[broker]\nconfinement = "{confinement}"\n[tenants.t]\nmode = "{mode}"\ndefault = "deny"\n'
        f'[[tenants.t.connect]]\nto = ["{cidr}"]\nports = {ports}\nproto = "udp"\n'
    )


@contextmanager
def silent_peer(host: str = "127.0.0.1"):
    """A UDP socket that never answers, for C: yields (port, socket)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        yield s.getsockname()[1], s


def queued(sock: socket.socket) -> list[bytes]:
    """What is waiting on sock now, without waiting (bounded)."""
    sock.setblocking(False)
    got = []
    for _ in range(64):
        try:
            got.append(sock.recv(2048))
        except BlockingIOError:
            break
    return got


def run_peers(broker, ns, host: str, a: int, b: int, c: int) -> tuple[dict, str]:
    r = run_grafted(broker, ns, *program("udp_client.py", "peers", host, a, b, c), env=DEBUG)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def debug_lines(stderr: str, call: str) -> list[str]:
    """The GRAFT_DEBUG decisions of one kind ("sendto", "grant"), without the pid prefix."""
    return [
        line.split(": ", 1)[1]
        for line in stderr.splitlines()
        if line.startswith("graft[") and line.split(": ", 1)[1].startswith(call + " ")
    ]


def fmt(host: str, port: int) -> str:
    """An address as GRAFT_DEBUG lines write it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# app's destination host, servers' host, the rule's CIDR
ADDRESSES = [
    ("127.0.0.1", "127.0.0.1", "127.0.0.1/32"),
    ("::ffff:127.0.0.1", "127.0.0.1", "127.0.0.1/32"),  # an IPv6 socket, IPv4 peers
    ("::1", "::1", "::1/128"),
]


@pytest.mark.parametrize("host, server, cidr", ADDRESSES, ids=["ipv4", "v4-mapped", "ipv6"])
def test_a_grafted_socket_reaches_every_peer_the_policy_grafts_and_no_other(netns, start_broker, host, server, cidr):
    need_confinement()
    with udp_echo(server) as (a, _), udp_echo(server) as (b, _), silent_peer(server) as (c, c_sock):
        broker = start_broker(policy(cidr, [a, b], "required"))
        out, stderr = run_peers(broker, netns, host, a, b, c)
        at_c = queued(c_sock)  # the app's later round trip to B came after its send to C
    assert out == {
        "steps": [
            ["OK", "echo:a", [host, a]],
            ["OK", "echo:b1", [host, b]],
            ["EPERM", None, None],
            ["OK", "echo:b2", [host, b]],
        ]
    }, stderr
    assert at_c == []
    records = broker.audit()
    assert all(r["confinement"] == "on" for r in records)
    # One judgement per destination: B's second datagram went straight through the kernel.
    assert [(r["op"], r["port"], r["action"]) for r in records] == [
        ("connect", a, "graft"),
        ("grant", b, "graft"),
        ("grant", c, "deny"),
    ]
    assert debug_lines(stderr, "grant") == [
        f"grant udp {fmt(host, b)} -> graft",
        f"grant udp {fmt(host, c)} -> deny (Operation not permitted)",
    ]


@pytest.mark.parametrize("host, server, cidr", ADDRESSES, ids=["ipv4", "v4-mapped", "ipv6"])
@pytest.mark.parametrize("mode", ["preload", "seccomp"])
def test_a_grafted_socket_re_pointed_by_connect_reaches_what_the_policy_grafts(
    netns, start_broker, mode, host, server, cidr
):
    """A UDP connect() only names where later sends go: judged as a send to there would be."""
    need_confinement()
    with udp_echo(server) as (a, _), udp_echo(server) as (b, _), silent_peer(server) as (c, c_sock):
        broker = start_broker(policy(cidr, [a, b], "required", mode))
        cmd = program("udp_client.py", "repoint", host, a, b, c)
        r = seccomp_run(broker, netns, *cmd) if mode == "seccomp" else run_grafted(broker, netns, *cmd)
        assert r.returncode == 0, r.stderr
        at_c = queued(c_sock)
    # C refused: the socket stays connected to B
    assert json.loads(r.stdout) == {
        "steps": [
            ["OK", "echo:a", [host, a]],
            ["OK", "echo:b1", [host, b]],
            ["EPERM", None, None],
            ["OK", "echo:b2", [host, b]],
        ]
    }
    assert at_c == []
    assert [(x["op"], x["port"], x["action"]) for x in broker.audit()] == [
        ("connect", a, "graft"),
        ("grant", b, "graft"),
        ("grant", c, "deny"),
    ]


def test_a_socket_grafted_before_an_exec_reaches_the_peers_the_policy_grafts(netns, start_broker):
    """After exec the shim's table is empty: the inherited host socket is known by its namespace."""
    need_confinement()
    with udp_echo() as (a, _), udp_echo() as (b, _), silent_peer() as (c, _):
        broker = start_broker(policy("127.0.0.1/32", [a, b], "required"))
        out = run_json(broker, netns, "udp_client.py", "exec", "127.0.0.1", a, b)
        refused = run_json(broker, netns, "udp_client.py", "exec", "127.0.0.1", a, c)
    assert out == {"first": "echo:one", "second": ["OK", "echo:two"]}
    assert refused == {"first": "echo:one", "second": ["EPERM", None]}
    assert [(r["op"], r["port"], r["action"]) for r in broker.audit()] == [
        ("connect", a, "graft"),
        ("grant", b, "graft"),
        ("connect", a, "graft"),
        ("grant", c, "deny"),
    ]


def test_without_confinement_a_grafted_socket_still_sends_anywhere(netns, start_broker):
    """The control: no kernel refusal, so no GRANT, and C is reached as before this change."""
    with udp_echo() as (a, _), udp_echo() as (b, _), silent_peer() as (c, c_sock):
        broker = start_broker(policy("127.0.0.1/32", [a, b], "off"))
        out, stderr = run_peers(broker, netns, "127.0.0.1", a, b, c)
        c_sock.settimeout(10)
        at_c = c_sock.recv(2048)
    assert out == {
        "steps": [
            ["OK", "echo:a", ["127.0.0.1", a]],
            ["OK", "echo:b1", ["127.0.0.1", b]],
            ["OK", None, None],
            ["OK", "echo:b2", ["127.0.0.1", b]],
        ]
    }, stderr
    assert at_c == b"c"
    assert [(r["op"], r["port"], r["action"]) for r in broker.audit()] == [("connect", a, "graft")]
    assert debug_lines(stderr, "grant") == []


# ---- the shim's side, against a scripted broker -------------------------------------

NFT_TABLE = "graft_grant_test"
PORT_A, PORT_C = 4000, 4001  # in the test's own namespace: nothing listens, nothing needs to


def refuse_udp_to(ns: str, port: int) -> None:
    """Datagrams sent in ns to port are dropped on output, so their send fails with EPERM."""
    nft = need_program("nft")
    rules = (
        f"table inet {NFT_TABLE} {{\n chain out {{\n type filter hook output priority 0; policy accept;\n"
        f" udp dport {port} drop\n }}\n}}\n"
    )
    r = subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns}", "--", nft, "-f", "-"],
        input=rules,
        text=True,
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr


@contextmanager
def scripted_broker(ns: str, path, answer: str):
    """tests/support/programs/grant_broker.py in ns (its sockets live there), listening: yields the process."""
    proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{ns}", "--", PY, program("grant_broker.py")[1], str(path), answer, NFT_TABLE],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


# ANSWER to the GRANT, the CALL refused, what the call returns, and errno after it
SCRIPTED = [
    ("graft", "sendto", 8, "EEXIST"),  # granted, sent again: errno as on entry
    ("graft", "sendmsg", 8, "EEXIST"),
    ("graft", "sendmmsg", 2, "EEXIST"),  # the whole batch, sent again
    ("graft-kept", "sendto", "EPERM", "EPERM"),  # sent again once, refused again: no second GRANT
    ("deny", "sendto", "EACCES", "EACCES"),
    ("old", "sendto", "EPERM", "EPERM"),  # a broker without GRANT: as before it
    ("graft-fd", "sendto", "EPERM", "EPERM"),  # invalid: the kernel's refusal stands
    ("gone", "sendto", "EPERM", "EPERM"),
]


@pytest.mark.parametrize("answer, call, result, errno_after", SCRIPTED, ids=[f"{a}-{c}" for a, c, _, _ in SCRIPTED])
def test_a_refused_destination_is_put_to_the_broker_once(netns, short_tmp, answer, call, result, errno_after):
    refuse_udp_to(netns, PORT_C)
    path = short_tmp / "t.sock"
    env = {k: v for k, v in os.environ.items() if k != "GRAFT_FALLBACK"}
    with scripted_broker(netns, path, answer) as fake:
        r = subprocess.run(
            [
                GRAFT,
                "run",
                "--socket",
                str(path),
                "--netns",
                netns,
                "--no-dns",  # the scripted broker speaks only what the test scripts
                "--",
                *program("grant_client.py", PORT_A, PORT_C, call),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 0, r.stderr
        assert fake.wait(timeout=30) == 0  # it exits once it has answered the GRANT
        requests = [json.loads(line) for line in fake.stdout]
    out = json.loads(r.stdout)
    assert out == {"first": 8, "second": result, "errno_after": errno_after, "attached_held": 0}, r.stderr
    udp = {"family": socket.AF_INET, "type": socket.SOCK_DGRAM, "protocol": 0, "flags": 1}  # GRAFT_REQF_SENDTO
    assert requests == [
        {"op": "connect", **udp, "addr": ["127.0.0.1", PORT_A], "n_opts": 1},
        {"op": "grant", **udp, "addr": ["127.0.0.1", PORT_C], "n_opts": 0},
    ]
    unreachable = [line for line in r.stderr.splitlines() if "broker unreachable" in line]
    if answer == "graft-fd":
        assert len(unreachable) == 1 and "invalid reply" in unreachable[0]
    elif answer == "gone":
        assert len(unreachable) == 1
    else:
        assert unreachable == []
