"""Every kind of program finds the host's server by name, on every path a program is started on (docs/dns.md).

Four programs, three resolvers between them: curl and Python's urllib
(glibc's getaddrinfo, the sockets of which the shim never sees), getent
(glibc's NSS "dns" module: resolution alone), and a Go program built with
CGO_ENABLED=0 (its own resolver, raw system calls). Each runs in a network
namespace with nothing but `lo`, resolves `myhost.graft.test` through the
tenant's resolver there, and fetches the page of a server that listens only
on the host's 127.0.0.1:

- `graft run --netns` (preload mode) and `graft run --seccomp --netns`;
- a container started by runc through graft-runtime, its tenant in preload
  mode or in seccomp mode (the bundle names the tenant and nothing else).

A static Go binary loads no shim, so it is not a preload-mode case: its
lookup works there but its connect stays in the namespace
(tests/e2e/test_names_go.py pins that down). The upstream is the tests' own
DNS responder on the host's loopback; no test asks the host's resolvers.
"""

from __future__ import annotations

import json
import sys

import pytest

from support.dns_server import TYPE_A, dns_server
from support.harness import need_program, run_grafted
from support.rootfs import default_config, write_bundle
from support.runtime_env import PAGE, annotations
from support.runtime_env import policy as runtime_policy
from support.seccomp_env import seccomp_run

pytestmark = pytest.mark.netns

NAME = "myhost.graft.test"
GO_IN_CONTAINER = "/run/graft-test/fetch"  # /run is a tmpfs in the test containers: a mount point can be made
# urllib without the environment's proxies: the page is the host's, asked for directly
URLLIB = (
    "import sys, urllib.request\n"
    "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
    "sys.stdout.write(opener.open(sys.argv[1], timeout=10).read().decode())\n"
)
# (mode, program): a static Go binary loads no shim, so it has no preload-mode case here
CASES = [(mode, kind) for mode in ("preload", "seccomp") for kind in ("curl", "python", "getent", "go")]
CASES.remove(("preload", "go"))


def program(kind: str, port: int, python: str, go: str) -> list[str]:
    url = f"http://{NAME}:{port}/"
    return {
        "curl": ["curl", "-sS", "--max-time", "10", url],
        "python": [python, "-c", URLLIB, url],
        "getent": ["getent", "hosts", NAME],
        "go": [go, url],
    }[kind]


def fetched(kind: str, stdout: str) -> bool:
    """Whether the program's output is the host's page (getent: the name's address, what it prints)."""
    if kind == "getent":
        return stdout.split() == ["127.0.0.1", NAME]
    if kind == "go":
        return json.loads(stdout).get("body") == PAGE
    return stdout == PAGE


def names_policy(site: int, dns_port: int, mode: str) -> str:
    """graft-runtime's tests' tenant "web", with the test's responder as its upstream."""
    return runtime_policy(site, mode=mode) + f'[tenants.web.dns]\nupstream = ["127.0.0.1:{dns_port}"]\n'


def check_audit(broker, kind: str, site: int) -> None:
    records = broker.audit()
    looked_up = [r for r in records if r["op"] == "dns" and r["name"] == NAME and r["qtype"] == "A"]
    assert looked_up and {(r["action"], tuple(r["answers"]), r["via"]) for r in looked_up} == {
        ("graft", ("127.0.0.1",), "resolver")
    }, records
    grafted = [r for r in records if r["op"] == "connect" and r["port"] == site and r["action"] == "graft"]
    assert bool(grafted) == (kind != "getent"), records


@pytest.mark.parametrize(("mode", "kind"), CASES)
def test_graft_run(netns, seccomp_broker, site, go_fetch, kind, mode):
    need_program("curl" if kind == "curl" else "getent")
    with dns_server("127.0.0.1", {NAME: "127.0.0.1"}, port=0, ttl=300) as (dns_port, asked):
        text = names_policy(site, dns_port, mode)
        broker = seccomp_broker(text.replace('confinement = "auto"', 'confinement = "required"'), "web")
        run = seccomp_run if mode == "seccomp" else run_grafted
        r = run(broker, netns, *program(kind, site, sys.executable, go_fetch), dns=True)
        assert TYPE_A in {q.qtype for q, _ in asked if q.name == NAME}
    assert r.returncode == 0 and fetched(kind, r.stdout), (r.returncode, r.stdout, r.stderr)
    check_audit(broker, kind, site)


@pytest.mark.parametrize(("mode", "kind"), CASES)
def test_graft_runtime(rt, start_broker, short_tmp, rootfs, site, go_fetch, kind, mode):
    with dns_server("127.0.0.1", {NAME: "127.0.0.1"}, port=0, ttl=300) as (dns_port, _):
        broker = start_broker(names_policy(site, dns_port, mode), "web")
        config = default_config(rootfs, program(kind, site, "python3", GO_IN_CONTAINER), annotations(broker))
        if kind == "go":
            config["mounts"].append(
                {"destination": GO_IN_CONTAINER, "type": "bind", "source": go_fetch, "options": ["rbind", "ro"]}
            )
        bundle = write_bundle(short_tmp / "bundle", config)
        with rt.container_id() as cid:
            r = rt.run("run", "--bundle", str(bundle), cid)
    assert r.returncode == 0 and fetched(kind, r.stdout), (r.returncode, r.stdout, r.stderr)
    check_audit(broker, kind, site)
