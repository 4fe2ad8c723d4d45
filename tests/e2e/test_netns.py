"""Grafting onto namespaces other than the host's (tenants.<name>.netns).

Three namespaces, each with only `lo`: a "container", a "front" and a
"back". Services listen on the 127.0.0.1 of front or back, which neither
the container nor the host can reach; only a tenant whose netns names them
gets there, through graft.
"""

from __future__ import annotations

import errno
import subprocess
import sys
from contextlib import contextmanager

import pytest
from pyroute2 import netns as pyroute2_netns

from support.harness import (
    create_namespace,
    free_port,
    graft_cmd,
    need_root_and_netns,
    network_namespace,
    run_grafted,
    run_in_netns,
)

pytestmark = pytest.mark.netns
PY = sys.executable
SERVICE_PORT = 8000


@pytest.fixture
def three_netns():
    need_root_and_netns()
    with network_namespace("graft-c") as c, network_namespace("graft-f") as f, network_namespace("graft-b") as b:
        yield c, f, b


@contextmanager
def http_service(ns: str, directory, port: int = SERVICE_PORT):
    """python3 -m http.server on 127.0.0.1:port inside ns (no graft), ready when yielded."""
    proc = subprocess.Popen(
        [
            "nsenter",
            f"--net=/run/netns/{ns}",
            "--",
            PY,
            "-u",
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(directory),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert "Serving HTTP" in proc.stdout.readline()
        yield proc
    finally:
        proc.terminate()
        proc.wait()


def two_tenants(front: str, back: str, host_port: int) -> str:
    return f"""
version = 1
[tenants.toback]
netns = "{back}"
default = "deny"
[[tenants.toback.connect]]
to = ["127.0.0.1/32"]
ports = [{SERVICE_PORT}]
[tenants.tofront]
netns = "{front}"
default = "deny"
[[tenants.tofront.bind]]
ports = [80]
host = "127.0.0.1:{host_port}"
"""


def curl(*args: str) -> list[str]:
    return ["curl", "-sS", "--max-time", "10", *args]


def with_tenant(broker, tenant: str):
    broker.tenant = tenant
    return broker


def test_container_reaches_a_service_that_exists_only_in_back(three_netns, start_broker, tmp_path):
    container, front, back = three_netns
    (tmp_path / "index.html").write_text("back office\n")
    url = f"http://127.0.0.1:{SERVICE_PORT}/"
    with http_service(back, tmp_path):
        assert run_in_netns(container, *curl(url)).returncode != 0
        assert run_in_netns(front, *curl(url)).returncode != 0
        assert subprocess.run(curl(url), capture_output=True).returncode != 0  # not on the host either
        broker = with_tenant(start_broker(two_tenants(front, back, free_port()), "toback"), "toback")
        r = run_grafted(broker, container, *curl(url))
    assert (r.returncode, r.stdout) == (0, "back office\n"), r.stderr
    assert broker.audit()[-1]["action"] == "graft"


def test_container_publishes_a_port_in_front(three_netns, start_broker, tmp_path):
    container, front, back = three_netns
    (tmp_path / "index.html").write_text("published in front\n")
    host_port = free_port()
    broker = with_tenant(start_broker(two_tenants(front, back, host_port), "tofront"), "tofront")
    server = subprocess.Popen(
        graft_cmd(broker, container, PY, "-u", "-m", "http.server", "80", "--directory", str(tmp_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert "Serving HTTP" in server.stdout.readline()
        url = f"http://127.0.0.1:{host_port}/"
        r = run_in_netns(front, *curl(url))
        assert (r.returncode, r.stdout) == (0, "published in front\n"), r.stderr
        assert subprocess.run(curl(url), capture_output=True).returncode != 0  # front's, not the host's
        assert run_in_netns(back, *curl(url)).returncode != 0
    finally:
        server.terminate()
        server.wait()


def test_deleted_namespace_fails_clearly_and_comes_back(three_netns, start_broker, tmp_path):
    container, front, back = three_netns
    (tmp_path / "index.html").write_text("again\n")
    url = f"http://127.0.0.1:{SERVICE_PORT}/"
    broker = with_tenant(start_broker(two_tenants(front, back, free_port()), "toback"), "toback")
    pyroute2_netns.remove(back)
    r = run_grafted(
        broker, container, PY, "-c", f"import socket; socket.create_connection(('127.0.0.1', {SERVICE_PORT}))"
    )
    assert "Network is unreachable" in r.stderr
    rec = broker.audit()[-1]
    assert (rec["action"], rec["errno"]) == ("error", errno.ENETUNREACH) and back in rec["reason"]
    # The other tenant is still served.
    probe = run_grafted(
        with_tenant(broker, "tofront"),
        container,
        PY,
        "-c",
        "import socket; s = socket.socket(); s.bind(('0.0.0.0', 80)); print('bound')",
    )
    assert probe.stdout.strip() == "bound", probe.stderr
    create_namespace(back)  # recreated under the same name: picked up without a restart
    with http_service(back, tmp_path):
        r = run_grafted(with_tenant(broker, "toback"), container, *curl(url))
    assert (r.returncode, r.stdout) == (0, "again\n"), r.stderr


def test_reload_moves_new_sockets_only(three_netns, start_broker, tmp_path):
    container, front, back = three_netns
    for name in ("front", "back"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "index.html").write_text(f"{name}\n")
    policy = two_tenants(front, back, free_port())
    broker = with_tenant(start_broker(policy, "toback"), "toback")
    hold = (
        "import socket, sys\n"
        f"s = socket.create_connection(('127.0.0.1', {SERVICE_PORT}))\n"
        "print('connected', flush=True); sys.stdin.read()\n"
        "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
        "print(b''.join(iter(lambda: s.recv(4096), b'')).decode().split('\\r\\n\\r\\n')[-1], end='')\n"
    )
    with http_service(back, tmp_path / "back"), http_service(front, tmp_path / "front"):
        held = subprocess.Popen(
            graft_cmd(broker, container, PY, "-c", hold),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert held.stdout.readline().strip() == "connected", held.stderr.read()
            broker.reload(policy.replace(f'netns = "{back}"', f'netns = "{front}"'))
            r = run_grafted(broker, container, *curl(f"http://127.0.0.1:{SERVICE_PORT}/"))
            assert (r.returncode, r.stdout) == (0, "front\n"), r.stderr  # a new socket: in front
            held.stdin.close()
            assert held.stdout.read() == "back\n"  # the socket from before the reload: still in back
            assert held.wait(timeout=10) == 0
        finally:
            if held.poll() is None:
                held.kill()
                held.wait()
