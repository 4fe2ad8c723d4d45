"""Names for a Go program built with CGO_ENABLED=0: its own resolver, the broker's answers (docs/dns.md).

Go's pure resolver is not glibc's: it reads /etc/resolv.conf itself and
sends its queries (A and AAAA at once, each from a UDP socket of its own;
TCP after a truncated answer) with raw system calls. An LD_PRELOAD shim
never sees them, and a static binary never loads the shim at all. Neither
matters for names: `graft run --netns` has the broker serve the tenant's
resolver inside the program's network namespace and mounts a resolv.conf
naming it (graft/names.py), so Go's queries reach it on the namespace's own
`lo` in either mode, are judged by `dns.names`, forwarded from the host side
to the test's own DNS responder on the host's 127.0.0.1 (never the host's
resolvers) and audited (`"op": "dns"`, `"via": "resolver"`).

What differs is the connect that follows. In seccomp mode the kernel stops
it and the broker grafts it, so the program fetches a page from a server
that listens only on the host's 127.0.0.1; in preload mode nothing grafts
it (tests/e2e/test_static_apps.py shows the shim is never loaded), so it
stays in the bare namespace and is refused there.

The program is tests/support/programs/go/fetch, built once per session.
Each test runs it in a fresh namespace with only `lo`; brokers, servers
and namespaces are removed at the end, pass or fail.
"""

from __future__ import annotations

import errno
import json

import pytest

from support.dns_server import TYPE_A, TYPE_AAAA, Question, dns_server
from support.harness import run_grafted
from support.names_env import names_policy
from support.runtime_env import PAGE  # the page of the shared `site` fixture
from support.seccomp_env import seccomp_records, seccomp_run

pytestmark = pytest.mark.netns

NAME = "myhost.graft.test"
RECORDS = {NAME: "127.0.0.1"}


def policy(http_port: int, dns_port: int, seccomp: bool = False) -> str:
    """Tenant "t": the test's responder as its upstream, *.graft.test allowed, one host port to connect to."""
    return names_policy(dns_port, http_port, seccomp=seccomp)


def check_lookups(broker, asked: list) -> None:
    """Go's queries for NAME went to the broker's resolver, were forwarded, answered and audited.

    Go asks A and AAAA (the responder has no AAAA: an empty answer); a
    resolv.conf search domain could add NAME.<domain> queries, which
    dns.names refuses without asking upstream. Anything else fails.
    """
    # Upstream heard only NAME, from the broker's side (the host's loopback), and at least its A question.
    assert {q.name for q, _ in asked} == {NAME}, asked
    assert Question(NAME, TYPE_A) in {q for q, _ in asked}, asked
    assert {q.qtype for q, _ in asked} <= {TYPE_A, TYPE_AAAA}, asked
    assert {peer[0] for _, peer in asked} == {"127.0.0.1"}, asked
    records = [r for r in broker.audit() if r.get("op") == "dns"]
    assert {r["via"] for r in records} == {"resolver"}, records
    mine = [r for r in records if r["name"] == NAME]
    verdicts = [(r["qtype"], r["action"], tuple(r["answers"]), r["errno"]) for r in mine]
    assert ("A", "graft", ("127.0.0.1",), 0) in verdicts, mine
    assert set(verdicts) <= {("A", "graft", ("127.0.0.1",), 0), ("AAAA", "graft", (), 0)}, mine
    # The resolver listens in the program's namespace: the clients are the program's sockets on its own lo.
    assert {r["addr"] for r in mine} == {"127.0.0.1"}, mine
    others = [r for r in records if r["name"] != NAME]
    assert all(r["name"].startswith(NAME + ".") and r["action"] == "deny" for r in others), others


def test_seccomp_mode_go_fetches_a_host_only_page_by_name(netns, seccomp_broker, go_fetch, site):
    """Resolved by Go through the broker's resolver, then its connect grafted: the page of a host-only server."""
    url = f"http://{NAME}:{site}/"
    with dns_server("127.0.0.1", RECORDS, port=0, ttl=300) as (dns_port, asked):
        broker = seccomp_broker(policy(site, dns_port, seccomp=True))
        r = seccomp_run(broker, netns, go_fetch, url, dns=True)
        assert r.returncode == 0, (r.stdout, r.stderr)
        out = json.loads(r.stdout)
        assert out == {
            "dns": ["127.0.0.1"],
            "dialed": [f"127.0.0.1:{site}"],
            "remote": f"127.0.0.1:{site}",  # the program's view: the address it connected to
            "status": 200,
            "body": PAGE,
            "errno": 0,
        }, out
        check_lookups(broker, asked)
    seccomp = seccomp_records(broker)
    # Go's UDP sockets to the resolver were stopped and judged, and left in the program's network, where it listens;
    kept = [r for r in seccomp if r["port"] == 53]
    assert kept and {(r["op"], r["proto"], r["addr"], r["action"], r["rule"]) for r in kept} == {
        ("connect", "udp", "127.0.0.11", "container", "tenants.t.dns.resolver")
    }, kept
    # and the one TCP connect, to the resolved address, grafted onto a host socket.
    grafted = [r for r in seccomp if r["port"] != 53]
    assert [(r["op"], r["proto"], r["addr"], r["port"], r["action"], r["rule"], r["errno"]) for r in grafted] == [
        ("connect", "tcp", "127.0.0.1", site, "graft", "tenants.t.connect[0]", 0)
    ], grafted


def test_preload_mode_go_resolves_by_name_but_its_connect_is_not_grafted(netns, start_broker, go_fetch, site):
    """The limit of preload mode for a static program: names work, the connect does not.

    The broker's resolver answers Go's own queries in the namespace (no
    shim is needed for that), so the name resolves to the host's
    127.0.0.1. The connect to it is Go's raw system call in a process that
    never loaded the shim: it goes to the bare namespace's own lo, where
    nothing listens, and is refused (ECONNREFUSED, though the host's
    127.0.0.1 has a listener on that port), and the broker never hears of
    it: no connect record, only the lookups. seccomp mode is the answer
    (the test above).
    """
    url = f"http://{NAME}:{site}/"
    with dns_server("127.0.0.1", RECORDS, port=0, ttl=300) as (dns_port, asked):
        broker = start_broker(policy(site, dns_port))
        r = run_grafted(broker, netns, go_fetch, url, dns=True)
        assert r.returncode == 1, (r.stdout, r.stderr)
        out = json.loads(r.stdout)
        assert (out["dns"], out["dialed"], out["errno"]) == (["127.0.0.1"], [f"127.0.0.1:{site}"], errno.ECONNREFUSED)
        assert "connect: connection refused" in out["error"] and "remote" not in out and "status" not in out, out
        check_lookups(broker, asked)
    assert [r for r in broker.audit() if r.get("op") != "dns"] == []
