"""Names over TCP: the broker's resolver falls back to TCP for answers UDP cannot carry (docs/dns.md).

A UDP answer has a size limit: 512 bytes without EDNS (RFC 1035), what the
asker's OPT record offers with it. The broker's resolver (broker/dns/resolver.py)
is in the middle of two such limits, and this module proves it keeps both:

- upstream: its query offers 1232 bytes; an answer that does not fit comes
  back truncated (TC, no records), and the resolver asks the same upstream
  again over TCP for the whole answer, which it gives the client;
- client side: glibc's stub sends no EDNS unless resolv.conf says
  ``options edns0`` (then it offers 1200 bytes); an answer past what the
  client takes is sent over UDP truncated (message.reply), glibc asks again
  over TCP, to the resolver's TCP listener on 127.0.0.11:53 in the
  program's namespace, and gets every address.

The programs are real glibc lookups (getent, Python's getaddrinfo) from a
bare network namespace, run by ``graft run --netns`` with the broker's
resolver. graft run copies resolv.conf's options into the program's, so
each test gives graft run a resolv.conf of its own (a private mount
namespace; the host's file is untouched) and decides whether glibc sends
EDNS, whatever the host's says. The upstream is the tests' own responder
(support/dns_server.py) on the host's 127.0.0.1, which truncates as a real
server does and logs the transport of every question; no test here asks
the host's resolvers. What each side did is read from that log and from
the broker's audit records (``"op": "dns"``, one per query the resolver
answered, with its transport and addresses).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.dns_server import TYPE_A, Question, dns_server
from support.harness import eventually, graft_cmd, need_program, with_resolv_conf
from support.names_env import names_policy

pytestmark = pytest.mark.netns

# Answers' sizes as the upstream sends them to the broker (with an OPT record, 11 bytes of them):
MANY = [f"127.0.1.{i}" for i in range(1, 101)]  # 1644 bytes: past 512, 1200 and 1232
SOME = [f"127.0.2.{i}" for i in range(1, 41)]  # 684 bytes: past 512, within 1200 and 1232
RECORDS = {
    "many.graft.test": MANY,
    "some.graft.test": SOME,
    "myhost.graft.test": "127.0.0.1",  # 62 bytes: UDP everywhere
    "tc.graft.test": "127.0.0.2",  # small, but the responder truncates its UDP answers (truncate=)
}
GETADDRINFO = (
    "import json, socket, sys; "
    "print(json.dumps([a[4][0] for a in socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET, socket.SOCK_STREAM)]))"
)
# glibc's resolv.conf options as graft run finds them: none (no EDNS, 512 bytes), or EDNS offering 1200.
GLIBC_OPTIONS = {"no-edns": "", "edns0": "options edns0\n"}


@pytest.fixture
def resolv_conf(tmp_path):
    """Write the resolv.conf graft run reads (its nameserver is replaced by the broker's resolver)."""
    need_program("unshare")

    def write(options: str) -> Path:
        path = tmp_path / "resolv.conf"
        # 127.0.0.11 only: if graft run left this file to the program, it could reach nothing but the resolver.
        path.write_text(f"nameserver 127.0.0.11\n{options}")
        return path

    return write


def run_by_name(broker, netns: str, resolv: Path, *cmd: str) -> subprocess.CompletedProcess:
    """cmd grafted in netns with the broker's resolver, graft run reading resolv as /etc/resolv.conf.

    The bind mount is in a mount namespace of this command's own: the
    host's file, and every other process, keep theirs.
    """
    wrapped = with_resolv_conf(resolv, graft_cmd(broker, netns, *cmd, dns=True))
    return subprocess.run(wrapped, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def getent_addresses(r: subprocess.CompletedProcess) -> list[str]:
    """The addresses `getent hosts` printed, a line each.

    hosts (gethostbyname2), not ahosts: getaddrinfo's AI_ADDRCONFIG, which
    getent's ahosts databases set, finds no address but loopback ones in a
    bare namespace and answers without asking DNS at all.
    """
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return [line.split()[0] for line in r.stdout.splitlines()]


def upstream_log(asked, name: str) -> list[str]:
    """The transports the responder was asked name's A record over, in order."""
    return [a.transport for a in asked if a.question == Question(name, TYPE_A)]


def repeats(seq: list[str], unit: list[str]) -> bool:
    """Whether seq is unit, once or more: glibc asks a name again when its answer outgrows a buffer (ERANGE)."""
    times, rest = divmod(len(seq), len(unit))
    return times >= 1 and rest == 0 and seq == unit * times


def answered(broker, name: str, count: int) -> list[dict]:
    """The broker's audit records of name's A queries, once there are count of them (bounded wait)."""

    def records() -> list[dict]:
        return [r for r in broker.audit() if r.get("op") == "dns" and r.get("name") == name and r.get("qtype") == "A"]

    eventually(lambda: len(records()) >= count, timeout=10)
    return records()


@pytest.mark.parametrize("glibc", list(GLIBC_OPTIONS))
def test_an_answer_too_large_for_udp_comes_whole_over_tcp_on_both_sides(netns, start_broker, resolv_conf, glibc):
    """100 addresses: truncated by the upstream (past the broker's 1232) and for glibc (past its 512 or 1200)."""
    getent = need_program("getent")
    resolv = resolv_conf(GLIBC_OPTIONS[glibc])
    with dns_server("127.0.0.1", RECORDS, port=0, ttl=300) as (dns_port, asked):
        broker = start_broker(names_policy(dns_port))
        got = getent_addresses(run_by_name(broker, netns, resolv, getent, "hosts", "many.graft.test"))
        small = getent_addresses(run_by_name(broker, netns, resolv, getent, "hosts", "myhost.graft.test"))
        # The broker asked UDP, was told TC, asked the same upstream over TCP; glibc's TCP retry was
        # answered from the tenant's cache (TTL 300), so the upstream was asked no more.
        assert upstream_log(asked, "many.graft.test") == ["udp", "tcp"], asked
        assert upstream_log(asked, "myhost.graft.test") == ["udp"], asked  # no needless TCP
    assert sorted(got) == sorted(MANY), got  # every address, none twice
    assert small == ["127.0.0.1"]

    many = answered(broker, "many.graft.test", 2)
    # glibc asked the resolver over UDP, got TC, and asked its TCP listener, each time it asked (it asks
    # again when an answer outgrows its first buffer, ERANGE): all of them were answered whole.
    assert repeats([x["proto"] for x in many], ["udp", "tcp"]), many
    assert {(x["action"], tuple(sorted(x["answers"]))) for x in many} == {("graft", tuple(sorted(MANY)))}
    assert many[0]["host_addr"] == f"127.0.0.1:{dns_port}" and many[0]["upstream_ms"] > 0
    assert {x["upstream_ms"] for x in many[1:]} == {0}  # the cached whole answer, not the truncated one
    assert [(x["proto"], x["answers"]) for x in answered(broker, "myhost.graft.test", 1)] == [("udp", ["127.0.0.1"])]


def test_a_truncated_upstream_answer_is_asked_again_over_tcp_and_the_client_stays_on_udp(
    netns, start_broker, resolv_conf
):
    """The upstream truncates a one-address answer: the broker takes it over TCP; glibc, whom it fits, gets UDP."""
    getent = need_program("getent")
    resolv = resolv_conf(GLIBC_OPTIONS["no-edns"])
    with dns_server("127.0.0.1", RECORDS, port=0, truncate={"tc.graft.test"}) as (dns_port, asked):
        broker = start_broker(names_policy(dns_port))
        got = getent_addresses(run_by_name(broker, netns, resolv, getent, "hosts", "tc.graft.test"))
        assert upstream_log(asked, "tc.graft.test") == ["udp", "tcp"], asked
    assert got == ["127.0.0.2"]
    records = answered(broker, "tc.graft.test", 1)
    assert [(x["proto"], x["action"], x["answers"], x["host_addr"]) for x in records] == [
        ("udp", "graft", ["127.0.0.2"], f"127.0.0.1:{dns_port}")
    ], records


@pytest.mark.parametrize(("glibc", "client"), [("no-edns", ["udp", "tcp"]), ("edns0", ["udp"])])
def test_an_answer_too_large_only_for_the_client_is_truncated_for_it_alone(
    netns, start_broker, resolv_conf, glibc, client
):
    """40 addresses (684 bytes): whole over UDP from the upstream; over TCP to glibc only if it offers 512 bytes.

    TTL 0, so nothing is cached: glibc's TCP retry is forwarded as any query
    is, over UDP, which carries the whole answer to the broker.
    """
    resolv = resolv_conf(GLIBC_OPTIONS[glibc])
    with dns_server("127.0.0.1", RECORDS, port=0) as (dns_port, asked):
        broker = start_broker(names_policy(dns_port))
        r = run_by_name(broker, netns, resolv, sys.executable, "-c", GETADDRINFO, "some.graft.test")
        assert r.returncode == 0, (r.stdout, r.stderr)
        upstream = upstream_log(asked, "some.graft.test")
    assert sorted(json.loads(r.stdout)) == sorted(SOME)
    records = answered(broker, "some.graft.test", len(client))
    assert repeats([x["proto"] for x in records], client), records
    assert {(x["action"], tuple(sorted(x["answers"]))) for x in records} == {("graft", tuple(sorted(SOME)))}
    assert upstream == ["udp"] * len(records), asked  # each query forwarded (TTL 0), never over TCP
