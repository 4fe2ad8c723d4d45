"""End to end: unmodified programs in a namespace with only `lo`, under graft.

The namespace cannot reach the host's loopback, so everything that works
here works through grafted sockets; each test also checks the audit log.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys

import pytest

from support.harness import (
    GRAFT,
    echo_server,
    free_port,
    graft_cmd,
    http_server,
    need_program,
    program,
    run_grafted,
    run_in_netns,
)

PY = sys.executable

pytestmark = pytest.mark.netns


def policy(
    connect_port: int | None = None,
    bind_port: int | None = None,
    host_port: int | None = None,
    default: str = "deny",
    extra: str = "",
) -> str:
    text = f'version = 1\n[tenants.t]\ndefault = "{default}"\n'
    if connect_port is not None:
        text += f'[[tenants.t.connect]]\nto = ["127.0.0.1/32", "::1/128"]\nports = [{connect_port}]\nproto = "tcp"\n'
    if bind_port is not None:
        text += (
            f'[[tenants.t.bind]]\naddr = ["0.0.0.0/32", "::/128"]\nports = [{bind_port}]\n'
            f'host = "127.0.0.1:{host_port}"\nproto = "tcp"\n'
        )
    return text + extra


def read_all(address: tuple[str, int]) -> str:
    with socket.create_connection(address, timeout=30) as s:
        return b"".join(iter(lambda: s.recv(4096), b"")).decode()


def test_curl_fetches_a_host_only_page(netns, start_broker, tmp_path):
    need_program("curl")
    (tmp_path / "index.html").write_text("grafted page\n")
    with http_server(tmp_path) as port:
        url = f"http://127.0.0.1:{port}/"
        assert run_in_netns(netns, "curl", "-sS", "--max-time", "5", url).returncode != 0
        broker = start_broker(policy(connect_port=port))
        r = run_grafted(broker, netns, "curl", "-sS", "--max-time", "10", url)
    assert (r.returncode, r.stdout) == (0, "grafted page\n"), r.stderr
    (rec,) = [a for a in broker.audit() if a["op"] == "connect"]
    assert (rec["action"], rec["addr"], rec["port"], rec["rule"]) == (
        "graft",
        "127.0.0.1",
        port,
        "tenants.t.connect[0]",
    )


def test_curl_over_ipv6_loopback(netns, start_broker, tmp_path):
    (tmp_path / "index.html").write_text("v6\n")
    with http_server(tmp_path, host="::1") as port:
        broker = start_broker(policy(connect_port=port))
        r = run_grafted(broker, netns, "curl", "-sS", "--max-time", "10", f"http://[::1]:{port}/")
    assert (r.returncode, r.stdout) == (0, "v6\n"), r.stderr
    assert broker.audit()[-1]["family"] == "inet6"


def test_http_server_in_namespace_is_published_on_the_host(netns, start_broker, tmp_path):
    (tmp_path / "index.html").write_text("from the namespace\n")
    host_port = free_port()
    broker = start_broker(policy(bind_port=80, host_port=host_port))
    server = subprocess.Popen(
        graft_cmd(
            broker, netns, PY, "-u", "-m", "http.server", "80", "--bind", "0.0.0.0", "--directory", str(tmp_path)
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "Serving HTTP" in server.stdout.readline()  # printed once it listens
        r = subprocess.run(
            ["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{host_port}/"], capture_output=True, text=True
        )
        assert (r.returncode, r.stdout) == (0, "from the namespace\n"), r.stderr
    finally:
        server.terminate()
        server.wait()
    (rec,) = [a for a in broker.audit() if a["op"] == "bind"]
    assert (rec["action"], rec["port"], rec["host_addr"]) == ("graft", 80, f"127.0.0.1:{host_port}")


def test_socat_client_through_graft(netns, start_broker):
    need_program("socat")
    with echo_server() as port:
        broker = start_broker(policy(connect_port=port))
        r = subprocess.run(
            graft_cmd(broker, netns, "socat", "-t", "5", "-", f"TCP:127.0.0.1:{port}"),
            input="hello socat\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert (r.returncode, r.stdout) == (0, "hello socat\n"), r.stderr


def test_socat_server_published_with_reuseaddr(netns, start_broker):
    host_port = free_port()
    broker = start_broker(policy(bind_port=80, host_port=host_port))
    server = subprocess.Popen(
        graft_cmd(broker, netns, "socat", "-d", "-d", "TCP-LISTEN:80,reuseaddr", "SYSTEM:echo served-by-socat"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in server.stderr:  # socat -d -d logs "listening on" once it listens
            if "listening on" in line:
                break
        r = subprocess.run(
            ["socat", "-", f"TCP:127.0.0.1:{host_port}"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert r.stdout == "served-by-socat\n", r.stderr
    finally:
        server.terminate()
        server.wait()


def test_nonblocking_connect_with_epoll(netns, start_broker):
    with echo_server() as port:
        broker = start_broker(policy(connect_port=port))
        r = run_grafted(broker, netns, *program("nonblocking_epoll.py", "127.0.0.1", port))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "connect": "EINPROGRESS",
        "events": 1,
        "so_error": 0,
        "nonblocking": True,
        "echo": "epoll says hi",
    }


def test_a_socket_registered_with_epoll_before_its_connect_is_still_watched(netns, start_broker):
    """Event loops (nginx's upstreams) register before they connect: the graft moves each registration."""
    with echo_server() as port:
        broker = start_broker(policy(connect_port=port))
        r = run_grafted(broker, netns, *program("epoll_first.py", "tcp", "127.0.0.1", port))
    assert r.returncode == 0, r.stderr
    # `reused` holds the number of an epoll fd the socket was registered in, closed before the connect
    assert json.loads(r.stdout) == {
        "connect": "EINPROGRESS",
        "a": [select.EPOLLOUT],
        "b": [select.EPOLLOUT],
        "reused": [],
        "reused_number": True,
        "dup": [select.EPOLLOUT],
        "echo": "registered first",
        "a_after_send": [select.EPOLLIN],
    }
    assert [a["action"] for a in broker.audit()] == ["graft"]


def test_a_fifth_epoll_set_is_not_moved_and_the_debug_log_says_so(netns, start_broker):
    with echo_server() as port:
        broker = start_broker(policy(connect_port=port))
        r = run_grafted(
            broker, netns, *program("epoll_first.py", "many", "127.0.0.1", port), env=dict(os.environ, GRAFT_DEBUG="1")
        )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"connect": "EINPROGRESS", "sets": [[select.EPOLLOUT]] * 4 + [[]]}
    assert len(re.findall(r"will not move to a host socket \(4 epoll sets remembered already\)", r.stderr)) == 1


def test_32_threads_by_50_connects(netns, start_broker):
    with echo_server() as port:
        broker = start_broker(policy(connect_port=port))
        r = run_grafted(broker, netns, *program("thread_storm.py", "127.0.0.1", port, 32, 50), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "ok 1600", r.stdout
    grafts = [a for a in broker.audit() if a["action"] == "graft"]
    assert len(grafts) == 1600


def test_forking_server_and_forked_clients(netns, start_broker):
    host_port, workers = free_port(), 4
    with echo_server() as echo_port:
        broker = start_broker(policy(connect_port=echo_port, bind_port=80, host_port=host_port))
        server = subprocess.Popen(
            graft_cmd(broker, netns, *program("forking_server.py", 80, workers, echo_port)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout.readline().strip() == "listening"
            replies = [read_all(("127.0.0.1", host_port)) for _ in range(workers)]
            assert server.wait(timeout=30) == 0, server.stderr.read()
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    pids = {int(m.group(1)) for r in replies for m in [re.match(r"worker (\d+) echo=from-child", r)] if m}
    assert len(pids) == workers, replies
    connects = [a for a in broker.audit() if a["op"] == "connect" and a["action"] == "graft"]
    assert {a["pid"] for a in connects} == pids  # each child used a broker connection of its own


def test_sockets_survive_exec(netns, start_broker):
    with echo_server() as port:
        broker = start_broker(policy(connect_port=port))
        r = run_grafted(broker, netns, *program("exec_chain.py", "127.0.0.1", port))
    assert (r.returncode, r.stdout.strip()) == (0, "placeholder=p grafted=g"), r.stderr
    assert len([a for a in broker.audit() if a["action"] == "graft"]) == 2


def test_data_path_is_a_plain_host_socket(netns, start_broker):
    """ss in the host namespace shows the grafted connection, owned by the app."""
    need_program("ss")
    with echo_server() as port:
        broker = start_broker(policy(connect_port=port))
        app = subprocess.Popen(
            graft_cmd(broker, netns, *program("hold_connection.py", "127.0.0.1", port)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            pid, fd = app.stdout.readline().split()
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            inode = re.fullmatch(r"socket:\[(\d+)\]", link).group(1)
            ss = subprocess.run(
                ["ss", "-tnpeH", "state", "established", f"dport = :{port}"], capture_output=True, text=True, check=True
            ).stdout
            mine = [line for line in ss.splitlines() if f"ino:{inode}" in line]
            assert len(mine) == 1 and f"pid={pid}," in mine[0], ss
            app.stdin.close()
            assert app.stdout.readline().strip() == "still here"
            assert app.wait(timeout=10) == 0
        finally:
            if app.poll() is None:
                app.kill()
                app.wait()


def test_denied_connect_fails_with_eperm_and_bind_with_eacces(netns, start_broker):
    broker = start_broker(policy())
    r = run_grafted(broker, netns, *program("connect_errno.py", "127.0.0.1:9", "bind:80"))
    assert r.stdout.split() == ["EPERM", "EACCES"], r.stderr
    assert [(a["op"], a["action"], a["errno"]) for a in broker.audit()] == [
        ("connect", "deny", 1),
        ("bind", "deny", 13),
    ]


def test_container_verdict_runs_the_call_in_the_namespace(netns, start_broker):
    """default = "container": the connect happens in the namespace's own stack."""
    with echo_server() as port:  # on the host: the namespace's 127.0.0.1 has nothing there
        broker = start_broker(policy(default="container"))
        r = run_grafted(broker, netns, *program("connect_errno.py", f"127.0.0.1:{port}"))
    assert r.stdout.split() == ["ECONNREFUSED"], r.stderr
    assert broker.audit()[-1]["action"] == "container"


class TestBrokerDown:
    """GRAFT_FALLBACK when nothing listens on the tenant socket."""

    def run(self, netns, short_tmp, fallback: str | None, *targets: str):
        env = dict(os.environ)
        env.pop("GRAFT_FALLBACK", None)
        if fallback:
            env["GRAFT_FALLBACK"] = fallback
        sock = short_tmp / "nobody.sock"
        return subprocess.run(
            [
                GRAFT,
                "run",
                "--socket",
                str(sock),
                "--netns",
                netns,
                "--no-dns",
                "--",
                *program("connect_errno.py", *targets),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def test_fail_is_the_default(self, netns, short_tmp):
        r = self.run(netns, short_tmp, None, "127.0.0.1:9", "127.0.0.1:10", "bind:80")
        assert r.stdout.split() == ["ENETUNREACH", "ENETUNREACH", "EADDRNOTAVAIL"]
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and "graft" in lines[0] and "nobody.sock" in lines[0], r.stderr

    def test_container_falls_back_to_the_namespace(self, netns, short_tmp):
        r = self.run(netns, short_tmp, "container", "127.0.0.1:9", "bind:80")
        assert r.stdout.split() == ["ECONNREFUSED", "OK"]  # native results inside the namespace
        assert len(r.stderr.splitlines()) == 1, r.stderr


def test_posix_spawn_and_vfork_children(netns, start_broker):
    with echo_server() as port:
        broker = start_broker(policy(connect_port=port))
        r = run_grafted(broker, netns, *program("spawn_chain.py", "127.0.0.1", port))
    assert r.returncode == 0, r.stderr
    lines = [line.split() for line in r.stdout.splitlines()]
    assert [(who, echo) for who, _, echo in lines] == [
        ("parent", "parent"),
        ("spawned", "spawned"),
        ("vforked", "vforked"),
        ("parent-again", "parent-again"),
    ]
    pids = [int(pid) for _, pid, _ in lines]
    assert pids[0] == pids[3] and len(set(pids)) == 3
    assert [a["pid"] for a in broker.audit()] == pids  # each graft from its own process's connection


def test_dual_stack_listener_accepts_ipv4_clients(netns, start_broker):
    """bind([::]:80) with IPV6_V6ONLY off, published on the host's [::]: v4 and v6 clients both get in."""
    host_port = free_port("::")
    broker = start_broker(
        f'version = 1\n[tenants.t]\ndefault = "deny"\n[[tenants.t.bind]]\naddr = ["::/128"]\n'
        f'ports = [80]\nhost = "[::]:{host_port}"\n'
    )
    server = subprocess.Popen(
        graft_cmd(broker, netns, *program("dualstack.py", "server", 2)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == "listening", server.stderr.read()
        seen_v4 = read_all(("127.0.0.1", host_port))
        seen_v6 = read_all(("::1", host_port))
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert (seen_v4, seen_v6) == ("::ffff:127.0.0.1\n", "::1\n")


def test_v4_mapped_destination_is_matched_by_an_ipv4_rule(netns, start_broker):
    with echo_server() as port:
        broker = start_broker(policy(connect_port=port))  # to = 127.0.0.1/32: an IPv4 CIDR
        r = run_grafted(broker, netns, *program("dualstack.py", "client", "127.0.0.1", port))
    assert (r.returncode, r.stdout.strip()) == (0, "mapped"), r.stderr
    (rec,) = broker.audit()
    assert (rec["family"], rec["addr"], rec["rule"]) == ("inet6", "::ffff:7f00:1", "tenants.t.connect[0]")
