"""Static programs and libc's own sockets, grafted in seccomp mode, end to end.

An LD_PRELOAD shim never sees these programs' socket calls
(docs/compatibility.md, "Known limits"): busybox-static and Go binaries
built with CGO_ENABLED=0 have no dynamic loader to read LD_PRELOAD, and
glibc's resolver calls its internal socket functions. seccomp mode stops
the calls in the kernel instead (`graft run --seccomp`, or graft-runtime for
a seccomp-mode tenant; docs/containers.md), so these tests run them with it, each in
a fresh network namespace with only `lo`: a host server on the host's
127.0.0.1 is reachable from there only through a grafted socket, and a
server in the namespace is reached from the host only at the address a bind
rule publishes. Each test first checks the property it
rests on (the binary is static; without graft the call fails) and then that
every decision is in the audit log, marked ``"via": "seccomp"``.

Readiness is a line the program prints, or the host's listening socket for
programs that print nothing; there are no sleeps. Every process is stopped
and every namespace and server removed at the end, pass or fail.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import random
import shutil
import socket
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

from support.dns_server import TYPE_A, TYPE_AAAA, Question, dns_server
from support.harness import (
    GRAFT,
    echo_server,
    eventually,
    free_port,
    http_server,
    need,
    need_confinement,
    need_program,
    run_grafted,
    run_in_netns,
    with_resolv_conf,
)
from support.programs_env import loopback_connect, publish, rules, running
from support.rootfs import default_config, write_bundle
from support.runtime_env import PAGE, annotations, policy
from support.static_binaries import build_go, interpreter

pytestmark = pytest.mark.netns

RUN_TIMEOUT = 60


@pytest.fixture(autouse=True)
def _confinement():
    """Root and cgroup2: a broker accepts seccomp listeners only with its kernel confinement on."""
    need_confinement()


# ---- local helpers -------------------------------------------------------------


def seccomp_rules(**kw) -> str:
    """programs_env.rules (tenant "t"), with the tenant in seccomp mode."""
    return rules(**kw).replace("[tenants.t]\n", '[tenants.t]\nmode = "seccomp"\n', 1)


def seccomp_cmd(broker, ns: str, *cmd: str) -> list[str]:
    """cmd in namespace ns, grafted by broker's tenant in seccomp mode."""
    return [
        GRAFT,
        "run",
        "--seccomp",
        "--tenant",
        broker.tenant,
        "--socket-dir",
        str(broker.socket_dir),
        "--netns",
        ns,
        "--no-dns",  # these tests point resolv.conf at their own server
        "--",
        *cmd,
    ]


def run(cmd: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


def seccomp_records(broker) -> list[dict]:
    """The broker's audit records, each checked to come from the seccomp agent."""
    records = broker.audit()
    assert records, f"no audit record:\n{broker.stderr()}"
    assert {a.get("via") for a in records} == {"seccomp"}, records
    return records


def decisions(records: list[dict]) -> list[tuple]:
    return [(a["op"], a["proto"], a["addr"], a["port"], a["action"], a["rule"], a["errno"]) for a in records]


def host_address(record: dict) -> tuple[str, int]:
    """A record's host_addr as (IPv4 or IPv6 address, port), a v4-mapped address as IPv4.

    A published bind on an AF_INET6 socket binds the host's IPv4 address
    v4-mapped (broker/core/verdict.py), and the record says so: [::ffff:7f00:1]:P.
    """
    host, port = record["host_addr"].rsplit(":", 1)
    ip = ipaddress.ip_address(host.strip("[]"))
    return str(getattr(ip, "ipv4_mapped", None) or ip), int(port)


def listening_on(port: int) -> bool:
    """Whether a TCP socket of this (the host's) namespace listens on port, any address."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def no_connection_arrived(listener: socket.socket) -> bool:
    """Whether listener's accept queue is empty (a loopback connect is queued before it returns)."""
    listener.setblocking(False)
    try:
        listener.accept()[0].close()
    except BlockingIOError:
        return True
    return False


# ---- the static programs ---------------------------------------------------------


@pytest.fixture
def busybox() -> str:
    path = shutil.which("busybox")
    need(path is not None and interpreter(path) is None, "needs a static busybox (Debian busybox-static)")
    return path


@pytest.fixture(scope="session")
def go_programs(request, tmp_path_factory) -> dict[str, Path]:
    """tests/support/programs/go built once per session with CGO_ENABLED=0; Go's caches kept in pytest's cache."""
    need_program("go")
    cache_provider = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache = cache_provider.mkdir("graft-go") if cache_provider else tmp_path_factory.mktemp("go-cache")
    built = build_go(tmp_path_factory.mktemp("go-bin"), cache)
    for name, path in built.items():
        assert interpreter(path) is None, f"{name} is not static: it asks for {interpreter(path)}"
    return built


def test_preload_mode_never_reaches_a_static_program(netns, start_broker, busybox, tmp_path):
    """Why seccomp mode exists: the shim is not loaded, so the connect stays in the namespace."""
    (tmp_path / "index.html").write_text("unreachable\n")
    with http_server(tmp_path) as port:
        broker = start_broker(rules(connect=[loopback_connect(port)]))
        r = run_grafted(
            broker, netns, busybox, "wget", "-q", "-O", "-", f"http://127.0.0.1:{port}/", timeout=RUN_TIMEOUT
        )
    assert r.returncode == 1 and "Connection refused" in r.stderr, r.stderr
    assert broker.audit() == []


# ---- busybox wget and nc ------------------------------------------------------------


def test_busybox_wget_fetches_a_host_only_page(netns, start_broker, busybox, tmp_path):
    (tmp_path / "index.html").write_text("grafted for busybox\n")
    with http_server(tmp_path) as port:
        url = f"http://127.0.0.1:{port}/"
        alone = run_in_netns(netns, busybox, "wget", "-q", "-O", "-", url)
        assert alone.returncode == 1 and "Connection refused" in alone.stderr, alone.stderr
        broker = start_broker(seccomp_rules(connect=[loopback_connect(port)]))
        r = run(seccomp_cmd(broker, netns, busybox, "wget", "-q", "-O", "-", url))
    assert (r.returncode, r.stdout) == (0, "grafted for busybox\n"), r.stderr
    assert decisions(seccomp_records(broker)) == [
        ("connect", "tcp", "127.0.0.1", port, "graft", "tenants.t.connect[0]", 0)
    ]


@pytest.mark.parametrize("denied_by", ["rule", "default"])
def test_busybox_wget_denied_with_eperm(netns, start_broker, busybox, denied_by):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        connect = [loopback_connect(port, action="deny")] if denied_by == "rule" else []
        broker = start_broker(seccomp_rules(connect=connect))
        r = run(seccomp_cmd(broker, netns, busybox, "wget", "-q", "-O", "-", f"http://127.0.0.1:{port}/"))
        assert r.returncode == 1, r.stderr
        assert "wget: can't connect to remote host (127.0.0.1): Operation not permitted" in r.stderr, r.stderr
        assert no_connection_arrived(listener)
    rule = "tenants.t.connect[0]" if denied_by == "rule" else "tenants.t.default"
    assert decisions(seccomp_records(broker)) == [("connect", "tcp", "127.0.0.1", port, "deny", rule, errno.EPERM)]


def test_busybox_nc_talks_to_a_host_only_echo_server(netns, start_broker, busybox):
    with echo_server() as port:
        alone = run_in_netns(netns, busybox, "nc", "127.0.0.1", str(port))
        assert alone.returncode == 1 and "Connection refused" in alone.stderr, alone.stderr
        broker = start_broker(seccomp_rules(connect=[loopback_connect(port)]))
        # nc shuts its sending side down at the end of stdin, and exits when the echo server closes.
        r = run(seccomp_cmd(broker, netns, busybox, "nc", "127.0.0.1", str(port)), stdin="hello from nc\n")
    assert (r.returncode, r.stdout) == (0, "hello from nc\n"), r.stderr
    assert decisions(seccomp_records(broker)) == [
        ("connect", "tcp", "127.0.0.1", port, "graft", "tenants.t.connect[0]", 0)
    ]


def test_busybox_nc_server_published_on_the_host(netns, start_broker, busybox):
    host_port = free_port()
    broker = start_broker(
        seccomp_rules(
            bind=[
                publish(80, f"127.0.0.1:{host_port}", addr="0.0.0.0/32"),
                publish(80, f"127.0.0.1:{host_port}", addr="::/128"),
            ]
        )
    )
    with running(seccomp_cmd(broker, netns, busybox, "nc", "-l", "-p", "80"), stdin=True) as nc:
        nc.proc.stdin.write(b"served by busybox nc\n")  # sent once a client is accepted
        nc.proc.stdin.close()
        # nc prints nothing when it listens: the host socket it listens on is the signal.
        assert eventually(lambda: listening_on(host_port) or nc.proc.poll() is not None, timeout=20)
        assert nc.proc.poll() is None, nc.output()
        (rec,) = seccomp_records(broker)  # written before the bind went on: the caller is still there
        assert os.readlink(f"/proc/{rec['pid']}/exe") == os.path.realpath(busybox), rec
        with socket.create_connection(("127.0.0.1", host_port), timeout=20) as c:
            c.sendall(b"hello from the host\n")
            c.shutdown(socket.SHUT_WR)
            assert b"".join(iter(lambda: c.recv(4096), b"")) == b"served by busybox nc\n"
        assert nc.proc.wait(timeout=20) == 0, nc.output()
        nc.expect(r"^hello from the host$")
    assert seccomp_records(broker) == [rec]
    assert (rec["op"], rec["port"], rec["action"], host_address(rec)) == (
        "bind",
        80,
        "graft",
        ("127.0.0.1", host_port),
    ), rec
    # busybox binds the unspecified address of its preferred family: ::, as IPv6 works in the namespace.
    assert ipaddress.ip_address(rec["addr"]).is_unspecified


def test_busybox_wget_in_a_container_through_graft_runtime(
    rt,
    start_broker,
    short_tmp,
    rootfs,
    site,  # noqa: F811
    busybox,
):
    """runc/crun through graft-runtime, a seccomp-mode tenant: no hand edits, no LD_PRELOAD, static wget grafted."""
    broker = start_broker(policy(site, mode="seccomp"), "web")
    with socket.create_server(("127.0.0.1", 0)) as unlisted:
        denied_port = unlisted.getsockname()[1]
        outs = []
        for name, port in (("granted", site), ("denied", denied_port)):
            wget = ["busybox", "wget", "-q", "-O", "-", f"http://127.0.0.1:{port}/"]
            bundle = write_bundle(short_tmp / name, default_config(rootfs, wget, annotations(broker)))
            with rt.container_id() as cid:
                outs.append(rt.run("run", "--bundle", str(bundle), cid))
        assert no_connection_arrived(unlisted)
    granted, denied = outs
    assert (granted.returncode, granted.stdout) == (0, PAGE), granted.stderr
    assert denied.returncode == 1, denied.stderr
    assert "wget: can't connect to remote host (127.0.0.1): Operation not permitted" in denied.stderr, denied.stderr
    assert decisions(seccomp_records(broker)) == [
        ("connect", "tcp", "127.0.0.1", site, "graft", "tenants.web.connect[0]", 0),
        ("connect", "tcp", "127.0.0.1", denied_port, "deny", "tenants.web.default", errno.EPERM),
    ]


# ---- Go, CGO_ENABLED=0 --------------------------------------------------------------


def test_go_client_reaches_a_host_only_server(netns, start_broker, go_programs):
    client = str(go_programs["client"])
    with echo_server() as port:
        alone = run_in_netns(netns, client, f"127.0.0.1:{port}", "hi")
        assert (alone.returncode, json.loads(alone.stdout)["errno"]) == (1, errno.ECONNREFUSED), alone.stdout
        broker = start_broker(seccomp_rules(connect=[loopback_connect(port)]))
        r = run(seccomp_cmd(broker, netns, client, f"127.0.0.1:{port}", "hello from go"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout) == {"reply": "hello from go\n", "remote": f"127.0.0.1:{port}", "errno": 0}
    assert decisions(seccomp_records(broker)) == [
        ("connect", "tcp", "127.0.0.1", port, "graft", "tenants.t.connect[0]", 0)
    ]


def test_go_client_denied_with_eperm(netns, start_broker, go_programs):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        broker = start_broker(seccomp_rules(connect=[loopback_connect(port, action="deny")]))
        r = run(seccomp_cmd(broker, netns, str(go_programs["client"]), f"127.0.0.1:{port}", "hi"))
        assert no_connection_arrived(listener)
    assert r.returncode == 1, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["errno"] == errno.EPERM, result
    assert "connect: operation not permitted" in result["error"], result
    assert decisions(seccomp_records(broker)) == [
        ("connect", "tcp", "127.0.0.1", port, "deny", "tenants.t.connect[0]", errno.EPERM)
    ]


# Go's net.Listen("tcp", ":80") first probes IPv6 by binding throw-away sockets to port 0
# ([::1]:0, [::ffff:127.0.0.1]:0); seccomp mode leaves binds to port 0 in the container,
# unjudged, as the shim does. IPv6 works in the namespace, so Go listens on [::]:80, dual
# stack, and the rule for "::/128" (bind[1]) decides.
GO_BIND_RULE = "tenants.t.bind[1]"


def test_go_server_published_on_the_host(netns, start_broker, go_programs):
    host_port = free_port()
    broker = start_broker(
        seccomp_rules(
            bind=[
                publish(80, f"127.0.0.1:{host_port}", addr="0.0.0.0/32"),
                publish(80, f"127.0.0.1:{host_port}", addr="::/128"),
            ]
        )
    )
    with running(seccomp_cmd(broker, netns, str(go_programs["server"]), "80")) as server:
        server.expect(r"^listening ")
        for i in range(3):  # each connection is accepted on the grafted listener by Go's poller
            with socket.create_connection(("127.0.0.1", host_port), timeout=20) as c:
                c.sendall(f"ping {i}\n".encode())
                assert c.makefile().readline() == f"go-server: ping {i}\n"
    (rec,) = seccomp_records(broker)
    assert decisions([rec]) == [("bind", "tcp", "::", 80, "graft", GO_BIND_RULE, 0)]
    assert host_address(rec) == ("127.0.0.1", host_port), rec


def test_go_server_denied_bind_fails_with_eacces(netns, start_broker, go_programs):
    broker = start_broker(
        seccomp_rules(
            bind=[publish(80, "", addr="0.0.0.0/32", action="deny"), publish(80, "", addr="::/128", action="deny")]
        )
    )
    r = run(seccomp_cmd(broker, netns, str(go_programs["server"]), "80"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout == f"listen failed errno={errno.EACCES}: listen tcp :80: bind: permission denied\n", r.stdout
    assert decisions(seccomp_records(broker)) == [("bind", "tcp", "::", 80, "deny", GO_BIND_RULE, errno.EACCES)]


# ---- glibc's resolver ----------------------------------------------------------------

DNS_NAME = "svc.graft.test"
DNS_ANSWER = "10.9.8.7"


def resolver_address() -> str:
    """A loopback address for the test's name server, port 53.

    resolv.conf names no port, so the server must be on 53; 127.77.0.0/16 is
    clear of the resolvers hosts run on loopback (systemd-resolved's
    127.0.0.53, dnsmasq's 127.0.0.1 and 127.0.1.1), and the random host part
    keeps concurrent runs apart.
    """
    return f"127.77.{random.randint(1, 254)}.{random.randint(1, 254)}"


@pytest.fixture
def resolver(tmp_path):
    """A name server on the host's loopback and a resolv.conf naming it: yields (address, questions asked)."""
    need_program("getent")
    need_program("unshare")
    address = resolver_address()
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {address}\noptions timeout:2 attempts:1\n")
    with dns_server(address, {DNS_NAME: DNS_ANSWER}) as (_port, asked):
        yield address, resolv, asked


class Lookup(NamedTuple):
    """What one getent database does with glibc's resolver, as seen on this machine (glibc 2.36)."""

    first_line: list[str]  # the words of getent's first line of output
    questions: list[int]  # the query types the name server gets, in order
    connects: int  # the UDP sockets the resolver connects to it


LOOKUPS = {
    # gethostbyname2(AF_INET6), then (no AAAA) AF_INET: one socket, connect and send per query.
    "hosts": Lookup([DNS_ANSWER, DNS_NAME], [TYPE_AAAA, TYPE_A], 2),
    # getaddrinfo(AF_UNSPEC): A and AAAA at once, sendmmsg on one connected socket.
    "ahosts": Lookup([DNS_ANSWER, "STREAM", DNS_NAME], [TYPE_A, TYPE_AAAA], 1),
}


@pytest.mark.parametrize("database", list(LOOKUPS))
def test_getent_resolves_through_graft_only_in_seccomp_mode(netns, start_broker, resolver, database):
    address, resolv, asked = resolver
    getent, expected = ["getent", database, DNS_NAME], LOOKUPS[database]
    dns_rule = {"to": [f"{address}/32"], "ports": [53], "proto": "udp"}

    def first_line(r: subprocess.CompletedProcess) -> list[str]:
        return r.stdout.splitlines()[0].split() if r.stdout else []

    # On the host the arrangement works: the private resolv.conf leads to the test's server.
    host = run(with_resolv_conf(resolv, getent))
    assert (host.returncode, first_line(host)) == (0, expected.first_line), host.stderr
    asked.clear()

    # In the namespace, without graft, the query goes to its own lo, where nothing answers.
    alone = run(with_resolv_conf(resolv, ["nsenter", f"--net=/run/netns/{netns}", "--", *getent]))
    assert (alone.returncode, alone.stdout, asked) == (2, "", []), alone.stderr

    # Preload mode, the shim alone (--no-dns: without the broker's resolver, tests/e2e/test_names.py):
    # glibc's resolver calls its internal __socket/__connect/__send, which the shim cannot
    # interpose, so the query still goes to the namespace's lo, and the broker hears nothing of it.
    preload = start_broker(rules(connect=[dns_rule]))
    shim_alone = [GRAFT, "run", "--socket", str(preload.socket_path), "--netns", netns, "--no-dns", "--", *getent]
    r = run(with_resolv_conf(resolv, shim_alone))
    assert (r.returncode, r.stdout, asked) == (2, "", []), r.stderr
    assert preload.audit() == []

    # seccomp mode: the resolver's connect() to the name server is stopped in the kernel and
    # grafted; the queries then go out on the host socket, from the host's loopback.
    broker = start_broker(seccomp_rules(connect=[dns_rule]))
    r = run(with_resolv_conf(resolv, seccomp_cmd(broker, netns, *getent)))
    assert (r.returncode, first_line(r)) == (0, expected.first_line), r.stderr
    assert [(q, peer[0]) for q, peer in asked] == [
        (Question(DNS_NAME, qtype), "127.0.0.1") for qtype in expected.questions
    ]
    assert (
        decisions(seccomp_records(broker))
        == [("connect", "udp", address, 53, "graft", "tenants.t.connect[0]", 0)] * expected.connects
    )
