"""Real, unmodified programs under graft, each in a namespace with only `lo`.

The namespace has no route to the host: servers on the host listen on
127.0.0.1 / ::1 of the host's loopback, and servers in the namespace are
reached from the host only through a bind rule's `host` address. Anything
that works here therefore works through grafted sockets.

Readiness is always a line the program prints once it is ready (read from a
pipe with a deadline, ending early if the program exits); there are no
sleeps. Every process started here is stopped in a `finally`, pass or fail.
docs/compatibility.md lists the versions and the known limits.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from support.harness import (
    echo_server,
    free_port,
    graft_cmd,
    http_server,
    need_program,
    program,
    run_grafted,
    run_in_netns,
)
from support.programs_env import ANSI, loopback_connect, publish, rules, running
from support.udp_env import udp_echo

pytestmark = pytest.mark.netns

PY = sys.executable


# ---- local helpers -------------------------------------------------------------


def grafts(broker, op: str, proto: str = "tcp") -> list[dict]:
    return [a for a in broker.audit() if a["op"] == op and a["proto"] == proto and a["action"] == "graft"]


def socket_option_in(pid: int, port: int, level: int, name: int) -> int:
    """getsockopt on the socket that process pid has bound to `port`, via pidfd_getfd(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    SYS_pidfd_getfd = 438  # x86_64 and the generic table alike
    pidfd = os.pidfd_open(pid)
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    continue
            except FileNotFoundError:
                continue
            mine = libc.syscall(SYS_pidfd_getfd, pidfd, int(fd), 0)
            assert mine >= 0, os.strerror(ctypes.get_errno())
            with socket.socket(fileno=mine) as s:
                if s.family in (socket.AF_INET, socket.AF_INET6) and s.getsockname()[1] == port:
                    return s.getsockopt(level, name)
    finally:
        os.close(pidfd)
    raise AssertionError(f"process {pid} has no socket on port {port}")


# ---- nginx -----------------------------------------------------------------------


def nginx_config(root: Path, locations: str = "", user: str = "") -> Path:
    """master + 2 workers, epoll, `listen 80 reuseport`; the error log on stderr (our pipe).

    locations: more location blocks for the server; user: the workers' (default: nginx's own).
    """
    (root / "www").mkdir(parents=True)
    (root / "www" / "index.html").write_text("served by nginx\n")
    conf = root / "nginx.conf"
    conf.write_text(f"""
daemon off;
{f"user {user};" if user else ""}
master_process on;
worker_processes 2;
pid {root}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 128; use epoll; }}
http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen 80 reuseport;
        root {root}/www;
        location = /pid {{ return 200 "$pid\\n"; }}
        {locations}
    }}
}}
""")
    # The workers drop to nginx's unprivileged user: let them reach the docroot.
    for d in (root.parent, root, root / "www"):
        d.chmod(0o755)
    return conf


def test_nginx_master_and_reuseport_workers_published(netns, start_broker, short_tmp):
    need_program("nginx")
    need_program("curl")
    host_port = free_port()
    broker = start_broker(rules(bind=[publish(80, f"127.0.0.1:{host_port}")]))
    conf = nginx_config(short_tmp / "nginx")
    # `-e stderr`: nginx's early log (before the config is read) goes to our pipe too.
    with running(graft_cmd(broker, netns, "nginx", "-e", "stderr", "-c", str(conf))) as nginx:
        # Readiness: the master opens, binds and listens on every socket (both reuseport
        # copies) in ngx_init_cycle, and only then forks the workers and logs "start worker
        # process PID". From that line on, the host port queues connections for the worker
        # that owns the socket; a worker that dies would make the fetches below fail.
        workers = {int(nginx.expect(r"start worker process (\d+)").group(1)) for _ in range(2)}
        n = 20
        urls = [f"http://127.0.0.1:{host_port}/{path}" for _ in range(n) for path in ("index.html", "pid")]
        # Connection: close makes curl open a new connection per URL; reuseport spreads them.
        r = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "-H", "Connection: close", *urls],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 0, f"curl: {r.stderr}\nnginx:\n{nginx.output()}"
        lines = r.stdout.splitlines()
        assert lines[0::2] == ["served by nginx"] * n, r.stdout
        served_by = {int(pid) for pid in lines[1::2]}
        assert served_by == workers, f"workers {workers} served {served_by}: both reuseport sockets must serve"
        assert nginx.stop() == 0, nginx.output()
    binds = grafts(broker, "bind")
    assert len(binds) == 2, broker.audit()  # one per reuseport copy: SO_REUSEPORT was replayed on the host
    assert {(a["addr"], a["port"], a["host_addr"], a["pid"]) for a in binds} == {
        ("0.0.0.0", 80, f"127.0.0.1:{host_port}", nginx.pid)
    }


def test_nginx_proxies_to_a_host_only_upstream(netns, start_broker, short_tmp):
    """nginx adds each upstream socket to its epoll set (edge-triggered) before it connects it."""
    need_program("nginx")
    need_program("curl")
    host_port = free_port()
    (short_tmp / "up").mkdir()
    (short_tmp / "up" / "page").write_text("served by the upstream\n")
    with http_server(short_tmp / "up") as upstream:
        broker = start_broker(
            rules(
                bind=[publish(80, f"127.0.0.1:{host_port}")],
                connect=[{"to": ["127.0.0.1/32"], "ports": [upstream], "proto": "tcp"}],
            )
        )
        # A lost registration would leave each request waiting for proxy_connect_timeout, then 504.
        # Workers as root: `graft run` gives them the broker's socket by its path, in a 0700
        # directory (a container gets it bind-mounted instead, graft-runtime).
        conf = nginx_config(
            short_tmp / "nginx",
            f"location /up/ {{ proxy_pass http://127.0.0.1:{upstream}/; proxy_connect_timeout 10s; }}",
            user="root",
        )
        with running(graft_cmd(broker, netns, "nginx", "-e", "stderr", "-c", str(conf))) as nginx:
            nginx.expect(r"start worker process (\d+)")  # after every listener is up (see above)
            n = 6  # each request a new upstream connection (HTTP/1.0 to the upstream)
            r = subprocess.run(
                ["curl", "-sS", "--max-time", "20", *[f"http://127.0.0.1:{host_port}/up/page"] * n],
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
            assert r.returncode == 0, f"curl: {r.stderr}\nnginx:\n{nginx.output()}"
            assert r.stdout.splitlines() == ["served by the upstream"] * n, nginx.output()
            assert nginx.stop() == 0, nginx.output()
    connects = [a for a in broker.audit() if a["op"] == "connect"]
    assert connects and all(a["port"] == upstream and a["action"] == "graft" for a in connects), connects


def test_nginx_denied_bind_fails_with_eacces(netns, start_broker, short_tmp):
    need_program("nginx")
    broker = start_broker(rules(bind=[publish(80, "", action="deny")], default="container"))
    conf = nginx_config(short_tmp / "nginx")
    r = run_grafted(broker, netns, "nginx", "-e", "stderr", "-c", str(conf), timeout=30)
    assert r.returncode == 1, r.stderr
    assert re.search(r"\[emerg\] .*bind\(\) to 0\.0\.0\.0:80 failed \(13: Permission denied\)", r.stderr), r.stderr
    assert [(a["op"], a["action"], a["errno"], a["rule"]) for a in broker.audit()] == [
        ("bind", "deny", 13, "tenants.t.bind[0]")
    ]


# ---- redis -----------------------------------------------------------------------


def test_redis_dual_stack_published_v4_and_v6(netns, start_broker, short_tmp):
    need_program("redis-server")
    need_program("redis-cli")
    p4, p6 = free_port(), free_port("::1")
    broker = start_broker(
        rules(bind=[publish(6379, f"127.0.0.1:{p4}", addr="0.0.0.0/32"), publish(6379, f"[::1]:{p6}", addr="::/128")])
    )
    conf = short_tmp / "redis.conf"
    conf.write_text(
        f'bind 0.0.0.0 ::\nport 6379\ndaemonize no\nsave ""\nappendonly no\n'
        f'dir {short_tmp}\nlogfile ""\nloglevel notice\n'
    )
    with running(graft_cmd(broker, netns, "redis-server", str(conf))) as redis:
        redis.expect(r"Ready to accept connections")  # logged after every listener is up

        def cli(host: str, port: int, *args: str) -> str:
            r = subprocess.run(
                ["redis-cli", "-h", host, "-p", str(port), *args],
                capture_output=True,
                text=True,
                timeout=20,
                stdin=subprocess.DEVNULL,
            )
            assert r.returncode == 0 and "ERR" not in r.stdout, (r.stdout, r.stderr, redis.output())
            return r.stdout.strip()

        assert cli("127.0.0.1", p4, "SET", "greeting", "over-v4") == "OK"
        assert cli("::1", p6, "GET", "greeting") == "over-v4"
        assert cli("::1", p6, "SET", "greeting", "over-v6") == "OK"
        assert cli("127.0.0.1", p4, "GET", "greeting") == "over-v6"
        assert [cli(h, p, "INCR", "hits") for h, p in (("127.0.0.1", p4), ("::1", p6), ("127.0.0.1", p4))] == [
            "1",
            "2",
            "3",
        ]
        # redis sets IPV6_V6ONLY on its `::` socket; the shim recorded it, the broker replayed it.
        assert socket_option_in(redis.pid, p6, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert redis.stop() == 0, redis.output()
    binds = sorted(grafts(broker, "bind"), key=lambda a: a["family"])
    assert [(a["family"], a["addr"], a["port"], a["host_addr"]) for a in binds] == [
        ("inet", "0.0.0.0", 6379, f"127.0.0.1:{p4}"),
        ("inet6", "::", 6379, f"[::1]:{p6}"),
    ]


# ---- iperf3 ----------------------------------------------------------------------


@contextmanager
def iperf3_server():
    port = free_port()
    with running(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port), "--forceflush"]) as server:
        server.expect(rf"Server listening on {port}")  # printed once its control socket listens
        yield port, server


def iperf3_client(broker, netns, port: int, *args: str) -> dict:
    r = run_grafted(broker, netns, "iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", "1", "--json", *args, timeout=30)
    result = json.loads(r.stdout)
    assert "error" not in result and r.returncode == 0, (result.get("error"), r.stderr)
    return result["end"]


@pytest.mark.parametrize("direction", [(), ("-R",)], ids=["upload", "reverse"])
def test_iperf3_tcp(netns, start_broker, direction):
    need_program("iperf3")
    with iperf3_server() as (port, server):
        broker = start_broker(rules(connect=[loopback_connect(port, "tcp")]))
        end = iperf3_client(broker, netns, port, *direction)
    assert end["sum_sent"]["bytes"] > 0 and end["sum_received"]["bytes"] > 0, end
    assert len(grafts(broker, "connect", "tcp")) == 2  # control + data connection


@pytest.mark.parametrize("direction", [(), ("-R",)], ids=["upload", "reverse"])
def test_iperf3_udp(netns, start_broker, direction):
    need_program("iperf3")
    with iperf3_server() as (port, server):
        broker = start_broker(rules(connect=[loopback_connect(port, "any")]))
        end = iperf3_client(broker, netns, port, "-u", "-b", "10M", *direction)
    assert end["sum_sent"]["bytes"] > 0 and end["sum_received"]["bytes"] > 0, end
    assert end["sum"]["lost_percent"] < 100, end
    assert len(grafts(broker, "connect", "udp")) == 1, broker.audit()


# ---- sockperf --------------------------------------------------------------------


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_sockperf_ping_pong(netns, start_broker, proto):
    need_program("sockperf")
    port = free_port()
    flags = ["--tcp"] if proto == "tcp" else []
    with running(["sockperf", "server", *flags, "-i", "127.0.0.1", "-p", str(port)]) as server:
        server.expect(r"using \S+ to block on socket")  # printed by the server thread once bound
        broker = start_broker(rules(connect=[loopback_connect(port, proto)]))
        r = run_grafted(
            broker,
            netns,
            "sockperf",
            "ping-pong",
            *flags,
            "-i",
            "127.0.0.1",
            "-p",
            str(port),
            "-t",
            "1",
            env=dict(os.environ, GRAFT_DEBUG="1"),
            timeout=30,
        )
    out = ANSI.sub("", r.stdout + r.stderr)
    assert r.returncode == 0, out
    m = re.search(r"Total (\d+) observations", out)
    assert m and int(m.group(1)) > 0, f"no observations (sockperf exits 0 even so):\n{out}\naudit: {broker.audit()}"
    assert grafts(broker, "connect", proto), broker.audit()


# ---- curl ------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def test_curl(netns, start_broker, tmp_path, host):
    need_program("curl")
    (tmp_path / "index.html").write_text(f"page over {host}\n")
    with http_server(tmp_path, host=host) as port:
        url = f"http://{host}:{port}/" if ":" not in host else f"http://[{host}]:{port}/"
        assert run_in_netns(netns, "curl", "-sS", "--max-time", "5", url).returncode == 7  # no route without graft
        broker = start_broker(rules(connect=[loopback_connect(port)]))
        r = run_grafted(broker, netns, "curl", "-sS", "--max-time", "10", url)
    assert (r.returncode, r.stdout) == (0, f"page over {host}\n"), r.stderr
    (rec,) = grafts(broker, "connect")
    assert (rec["family"], rec["addr"], rec["port"]) == ("inet6" if ":" in host else "inet", host, port)


def test_curl_denied_connect_fails_with_eperm(netns, start_broker, tmp_path):
    need_program("curl")
    (tmp_path / "index.html").write_text("never served\n")
    with http_server(tmp_path) as port:
        broker = start_broker(rules(connect=[loopback_connect(port, action="deny")], default="container"))
        r = run_grafted(
            broker,
            netns,
            "curl",
            "-sS",
            "--max-time",
            "10",
            f"http://127.0.0.1:{port}/",
            env=dict(os.environ, GRAFT_DEBUG="1"),
        )
    assert r.returncode == 7, (r.returncode, r.stderr)  # CURLE_COULDNT_CONNECT
    assert re.search(rf"graft\[\d+\]: connect tcp 127\.0\.0\.1:{port} -> deny \(Operation not permitted\)", r.stderr), (
        r.stderr
    )
    assert [(a["op"], a["action"], a["errno"]) for a in broker.audit()] == [("connect", "deny", 1)]


# ---- socat -----------------------------------------------------------------------


def test_socat_tcp_client(netns, start_broker):
    need_program("socat")
    with echo_server() as port:
        broker = start_broker(rules(connect=[loopback_connect(port, "tcp")]))
        r = subprocess.run(
            graft_cmd(broker, netns, "socat", "-t", "5", "-", f"TCP:127.0.0.1:{port}"),
            input="hello over tcp\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert (r.returncode, r.stdout) == (0, "hello over tcp\n"), r.stderr
    assert len(grafts(broker, "connect", "tcp")) == 1


@pytest.mark.parametrize("address", ["UDP", "UDP-SENDTO"], ids=["connect", "sendto"])
def test_socat_udp_client(netns, start_broker, address):
    """UDP: connect() then send(); UDP-SENDTO: sendto() on an unconnected, unbound socket."""
    need_program("socat")
    peers: list = []
    with udp_echo(prefix=b"", peers=peers) as (port, _):
        broker = start_broker(rules(connect=[loopback_connect(port, "udp")]))
        # socat has no end-of-data on UDP; drive it line by line and stop it ourselves.
        with running(
            graft_cmd(broker, netns, "socat", "-", f"{address}:127.0.0.1:{port}"),
            stdin=True,
            env=dict(os.environ, GRAFT_DEBUG="1"),
        ) as socat:
            for i in range(3):
                socat.proc.stdin.write(f"datagram {i}\n".encode())
                socat.proc.stdin.flush()
                try:
                    socat.expect(rf"^datagram {i}$", timeout=5)  # the echo; a lost datagram fails here
                except AssertionError as e:
                    raise AssertionError(f"{e}\naudit: {broker.audit()}") from None
    assert len(peers) == 3 and {p[0] for p in peers} == {"127.0.0.1"}, peers
    assert len({p[1] for p in peers}) == 1, peers  # one grafted socket for the whole session
    (rec,) = grafts(broker, "connect", "udp")
    assert (rec["addr"], rec["port"]) == ("127.0.0.1", port)


# ---- asyncio ---------------------------------------------------------------------


def test_asyncio_server_published(netns, start_broker):
    host_port = free_port()
    broker = start_broker(rules(bind=[publish(80, f"127.0.0.1:{host_port}")]))
    with running(graft_cmd(broker, netns, *program("asyncio_echo.py", "server", "0.0.0.0", 80, 2))) as server:
        name = server.expect(r"listening (\S+) (\d+)")
        for i in range(2):
            with socket.create_connection(("127.0.0.1", host_port), timeout=10) as s:
                s.sendall(f"ping {i}".encode())
                s.shutdown(socket.SHUT_WR)
                assert b"".join(iter(lambda: s.recv(4096), b"")) == f"ping {i}".encode()
        assert server.proc.wait(timeout=30) == 0, server.output()
    (rec,) = grafts(broker, "bind")
    assert (rec["addr"], rec["port"], rec["host_addr"]) == ("0.0.0.0", 80, f"127.0.0.1:{host_port}")
    # The app's own view: getsockname() shows the address it bound, not the host's.
    assert (name.group(1), int(name.group(2))) == ("0.0.0.0", 80), server.output()


def test_asyncio_client(netns, start_broker):
    with echo_server() as port:
        broker = start_broker(rules(connect=[loopback_connect(port, "tcp")]))
        r = run_grafted(broker, netns, *program("asyncio_echo.py", "client", "127.0.0.1", port, "hello asyncio"))
    assert (r.returncode, r.stdout) == (0, "hello asyncio\n"), r.stderr
    assert len(grafts(broker, "connect", "tcp")) == 1


# ---- every program, under a policy that denies its path ------------------------------

DENIED = {
    # name: (command builder (port) -> argv, op, errno, what the program says)
    "redis-server bind": (
        lambda port: ["redis-server", "--port", "6379", "--bind", "0.0.0.0", "--save", "", "--appendonly", "no"],
        "bind",
        errno.EACCES,
        "Permission denied",
    ),
    "iperf3 client": (
        lambda port: ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", "1"],
        "connect",
        errno.EPERM,
        "Operation not permitted",
    ),
    "socat tcp": (
        lambda port: ["socat", "-", f"TCP:127.0.0.1:{port}"],
        "connect",
        errno.EPERM,
        "Operation not permitted",
    ),
    "socat udp sendto": (
        lambda port: ["sh", "-c", f"echo x | socat - UDP-SENDTO:127.0.0.1:{port}"],
        "connect",
        errno.EPERM,
        "Operation not permitted",
    ),
    "asyncio client": (
        lambda port: program("asyncio_echo.py", "client", "127.0.0.1", port, "x"),
        "connect",
        errno.EPERM,
        "Operation not permitted",
    ),
    "sockperf tcp": (
        lambda port: ["sockperf", "ping-pong", "--tcp", "-i", "127.0.0.1", "-p", str(port), "-t", "1"],
        "connect",
        errno.EPERM,
        None,
    ),
}


@pytest.mark.parametrize("name", list(DENIED))
def test_denied_path_fails_with_the_documented_errno(netns, start_broker, name):
    """default = "deny" and no rule: each program's first bind or connect is refused."""
    argv, op, err, says = DENIED[name]
    need_program("socat" if name.startswith("socat") else argv(0)[0])
    broker = start_broker(rules())
    r = run_grafted(broker, netns, *argv(free_port()), timeout=60)
    output = r.stdout + r.stderr
    if says is not None:
        assert says in output, output
        assert r.returncode != 0, output
    refused = [a for a in broker.audit() if a["action"] == "deny"]
    assert refused and (refused[0]["op"], refused[0]["errno"]) == (op, err), broker.audit()
