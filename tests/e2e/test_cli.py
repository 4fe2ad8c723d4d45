"""The graft and graft-broker command lines, as an operator runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from support.harness import GRAFT, GRAFT_BROKER, REPO

EXAMPLES = sorted((REPO / "policy" / "examples").glob("*.toml"))

BROKEN = """\
version = 1
[broker]
confinement = "sometimes"
[tenants.web]
socket_mode = "999"
[[tenants.web.connect]]
to = ["10.0.0.300/8"]
ports = [70000]
[[tenants.web.bind]]
ports = ["9-3"]
action = "deny"
host = "127.0.0.1:8080"
"""


def graft(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([GRAFT, *args], capture_output=True, text=True, timeout=60, **kw)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_policy_check_accepts_every_example(example):
    r = graft("policy", "check", str(example))
    assert r.returncode == 0, r.stderr
    assert "tenant" in r.stdout


def test_policy_check_reports_every_error_with_its_place(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text(BROKEN)
    r = graft("policy", "check", str(f))
    assert r.returncode == 1
    for place in [
        "broker.confinement",
        "tenants.web.socket_mode",
        "tenants.web.connect[0].to",
        "tenants.web.connect[0].ports",
        "tenants.web.bind[0].ports",
        "tenants.web.bind[0].host",
    ]:
        assert place in r.stderr, f"{place} missing from:\n{r.stderr}"


def test_policy_schema_is_json_schema():
    r = graft("policy", "schema")
    schema = json.loads(r.stdout)
    assert r.returncode == 0 and "tenants" in schema["properties"]


@pytest.mark.parametrize("flags, name", [((), "libgraft.so"), (("--musl",), "libgraft-musl.so")])
def test_shim_path_points_at_the_built_library(flags, name):
    r = graft("shim-path", *flags)
    path = Path(r.stdout.strip())
    assert r.returncode == 0 and path.is_absolute() and path.name == name and path.is_file()


@pytest.mark.parametrize("flags", [(), ("--musl",)])  # the glibc build, and the musl one (same map)
def test_shim_exports_only_interposed_symbols(flags):
    lib = graft("shim-path", *flags).stdout.strip()
    out = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.split()[1] in "TtWi"}
    assert exported == {
        "socket",
        "connect",
        "bind",
        "listen",
        "setsockopt",
        "close",
        "dup",
        "dup2",
        "dup3",
        "fcntl",
        "fcntl64",
        "close_range",
        "sendto",
        "sendmsg",
        "sendmmsg",
        "getsockname",
        "epoll_ctl",
    }


def test_broker_refuses_a_broken_policy_at_start(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text(BROKEN)
    r = subprocess.run(
        [GRAFT_BROKER, "--policy", str(f), "--socket-dir", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "tenants.web.connect[0].ports" in r.stderr and not (tmp_path / "s" / "web.sock").exists()


def test_broker_lifecycle_reload_and_stop(start_broker):
    good = 'version = 1\n[tenants.t]\ndefault = "deny"\n'
    broker = start_broker(good)
    assert broker.socket_path.is_socket()
    broker.reload("version = 1\n[tenants.t]\nmax_sockets = 0\n")  # invalid: old policy stays
    assert "reload refused" in broker.stderr() and "tenants.t.max_sockets" in broker.stderr()
    assert broker.socket_path.is_socket()
    broker.reload(good + "[tenants.u]\n")
    assert (broker.socket_dir / "u.sock").is_socket()
    assert broker.stop() == 0
    assert not broker.socket_path.exists() and not (broker.socket_dir / "u.sock").exists()


def test_second_broker_on_the_same_sockets_refuses(start_broker, short_tmp):
    # confinement off: the second broker runs outside the test's cgroup and must leave no BPF state behind
    first = start_broker('version = 1\n[broker]\nconfinement = "off"\n[tenants.t]\n')
    r = subprocess.run(
        [GRAFT_BROKER, "--policy", str(first.policy_path), "--socket-dir", str(first.socket_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "running broker" in r.stderr
    assert first.socket_path.is_socket()


def test_graft_status_human_and_json(start_broker):
    broker = start_broker("version = 1\n[tenants.t]\nmax_rate = 100\n")
    human = graft("status", "--socket-dir", str(broker.socket_dir))
    assert human.returncode == 0, human.stderr
    assert "generation 1" in human.stdout and any(line.startswith("t ") for line in human.stdout.splitlines())
    st = json.loads(graft("status", "--socket-dir", str(broker.socket_dir), "--json").stdout)
    assert st["tenants"]["t"]["max_rate"] == 100 and st["confinement"] in ("on", "off")


def test_graft_status_without_a_broker(tmp_path):
    r = graft("status", "--socket-dir", str(tmp_path))
    assert r.returncode == 1 and "no broker answers" in r.stderr
