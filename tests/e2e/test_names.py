"""Names: `graft run --netns` programs resolve through the broker's resolver (docs/dns.md).

The resolver listens inside the program's own network namespace (a bare
one here, with only `lo`), judges every name by the tenant's `dns.names`,
forwards what is allowed to the tenant's upstream from the host side (here
the tests' own DNS responder on the host's 127.0.0.1: no test ever asks
the host's real resolvers), and audits every query.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys

import pytest

from graft.broker.shim import wire
from support.dns_server import TYPE_A, Question, dns_server
from support.dnsmasq import dnsmasq
from support.harness import (
    GRAFT,
    PROGRAMS,
    BrokerProcess,
    eventually,
    graft_cmd,
    need_program,
    run_grafted,
)
from support.names_env import names_policy
from support.runtime_env import PAGE  # the page of the shared `site` fixture
from support.seccomp_env import seccomp_records, seccomp_run

pytestmark = pytest.mark.netns
RECORDS = {"myhost.graft.test": "127.0.0.1"}


def policy(http_port: int, dns_port: int, **options) -> str:
    return names_policy(dns_port, http_port, **options)


def dns_records(broker) -> list[dict]:
    return [r for r in broker.audit() if r.get("op") == "dns"]


def resolvers(broker) -> int:
    from graft.brokerstatus import read_status

    return read_status(broker.socket_dir)["tenants"]["t"]["resolvers"]


def test_curl_reaches_a_host_server_by_name_from_a_bare_namespace(netns, start_broker, site):
    curl = need_program("curl")
    with open("/etc/resolv.conf") as f:
        hosts_resolv_conf = f.read()
    with dns_server("127.0.0.1", RECORDS, port=0, ttl=300) as (dns_port, asked):
        broker = start_broker(policy(site, dns_port))
        r = run_grafted(
            broker, netns, curl, "-sS", "-o", "-", "-w", " %{http_code}", f"http://myhost.graft.test:{site}/", dns=True
        )
        assert r.returncode == 0 and r.stdout == PAGE + " 200", (r.stdout, r.stderr)
        assert (Question("myhost.graft.test", TYPE_A),) == tuple({q for q, _ in asked if q.qtype == TYPE_A})
        # A second program asks again: answered from the tenant's cache while the TTL lasts.
        py = run_grafted(
            broker,
            netns,
            sys.executable,
            "-c",
            "import socket; print(socket.gethostbyname('myhost.graft.test'))",
            dns=True,
        )
        assert py.returncode == 0 and py.stdout.strip() == "127.0.0.1", py.stderr
        assert [q for q, _ in asked if q.qtype == TYPE_A] == [Question("myhost.graft.test", TYPE_A)]
    records = dns_records(broker)
    a = [x for x in records if x["qtype"] == "A"]
    assert [(x["name"], x["answers"], x["action"], x["via"]) for x in a] == [
        ("myhost.graft.test", ["127.0.0.1"], "graft", "resolver")
    ] * 2
    assert a[0]["host_addr"] == f"127.0.0.1:{dns_port}" and a[0]["upstream_ms"] > 0
    assert a[1]["upstream_ms"] == 0  # the cached one
    grafts = [x for x in broker.audit() if x.get("op") == "connect" and x["action"] == "graft"]
    assert [(x["addr"], x["port"]) for x in grafts][:1] == [("127.0.0.1", site)]
    with open("/etc/resolv.conf") as f:
        assert f.read() == hosts_resolv_conf  # only the programs saw another one
    assert eventually(lambda: resolvers(broker) == 0, timeout=10)  # closed once its programs exited


def test_the_hosts_resolver_answers_by_default_as_in_the_issues_reproduction(netns, start_broker, site):
    """dnsmasq on the host's loopback, named by the host's resolv.conf (as the broker sees it); no upstream in the
    policy: `graft run` curl by name from a bare namespace gets the page, and the log has the lookup and the graft."""
    curl = need_program("curl")
    address = f"127.53.{random.randrange(1, 255)}.{random.randrange(1, 255)}"  # others may run a dnsmasq too
    with dnsmasq(address, {"myhost.test": "127.0.0.1"}):
        broker = start_broker(
            f"""
version = 1
[tenants.t]
default = "deny"
[[tenants.t.connect]]
to = ["127.0.0.1/32"]
ports = [{site}]
proto = "tcp"
""",
            nameserver=address,
        )
        r = run_grafted(broker, netns, curl, "-sS", "-w", " %{http_code}", f"http://myhost.test:{site}/", dns=True)
    assert r.returncode == 0 and r.stdout == PAGE + " 200", (r.stdout, r.stderr)
    looked_up = [x for x in dns_records(broker) if x["qtype"] == "A"]
    assert [(x["name"], x["answers"], x["action"], x["host_addr"]) for x in looked_up] == [
        ("myhost.test", ["127.0.0.1"], "graft", f"{address}:53")
    ]
    assert [(x["addr"], x["port"]) for x in broker.audit() if x.get("op") == "connect" and x["action"] == "graft"] == [
        ("127.0.0.1", site)
    ]


# A program started by hand: the operator's one resolv.conf line (docs/dns.md), the shim in LD_PRELOAD, no graft run.
BY_HAND = (
    "import os, sys\n"
    "from pyroute2 import netns\n"
    "from graft.names import point_resolv_conf_at\n"
    "netns.setns(sys.argv[1], flags=0)\n"
    "point_resolv_conf_at('127.0.0.11')\n"
    "env = dict(os.environ, LD_PRELOAD=sys.argv[2], GRAFT_SOCKET=sys.argv[3])\n"
    "os.execve(sys.argv[4], sys.argv[4:], env)\n"
)


def test_a_program_launched_by_hand_with_the_shim_finds_the_resolver_at_its_first_lookup(netns, start_broker, site):
    from graft.shim import LIB_PATH

    curl = need_program("curl")
    with dns_server("127.0.0.1", RECORDS, port=0, ttl=300) as (dns_port, asked):
        broker = start_broker(policy(site, dns_port))
        assert resolvers(broker) == 0
        r = subprocess.run(
            [sys.executable, "-c", BY_HAND, netns, str(LIB_PATH), str(broker.socket_path), curl, "-sS"]
            + ["-w", " %{http_code}", f"http://myhost.graft.test:{site}/"],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 0 and r.stdout == PAGE + " 200", (r.stdout, r.stderr)
        assert Question("myhost.graft.test", TYPE_A) in {q for q, _ in asked}
    assert [x["name"] for x in dns_records(broker) if x["qtype"] == "A"] == ["myhost.graft.test"]
    assert eventually(lambda: resolvers(broker) == 0, timeout=10)  # it went with the program


def test_only_the_first_process_in_a_namespace_waits_for_its_resolver(netns, start_broker, site):
    """The shim that had it served tells its children, which only say they are there too (docs/dns.md)."""
    from graft.shim import LIB_PATH

    with dns_server("127.0.0.1", RECORDS, port=0) as (dns_port, _):
        broker = start_broker(policy(site, dns_port))
        r = subprocess.run(
            [sys.executable, "-c", BY_HAND, netns, str(LIB_PATH), str(broker.socket_path)]
            + ["/bin/sh", "-c", 'echo "$GRAFT_RESOLVER_NETNS"; /bin/true'],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, GRAFT_DEBUG="1"),
        )
    assert r.returncode == 0, r.stderr
    st = os.stat(f"/run/netns/{netns}")
    assert r.stdout == f"{st.st_dev}:{st.st_ino}\n"  # sh had it served, and says where
    lines = [line for line in r.stderr.splitlines() if "resolver:" in line]
    assert len(lines) == 2 and "served in this namespace" in lines[0] and "served here already" in lines[1], lines


def test_no_resolver_is_served_in_the_hosts_namespace(start_broker, site):
    """A grafted program on the host asks at load too: the broker serves nothing there (127.0.0.11 is not its)."""
    with dns_server("127.0.0.1", RECORDS, port=0) as (dns_port, _):
        broker = start_broker(policy(site, dns_port))
        with subprocess.Popen(
            graft_cmd(broker, None, sys.executable, "-c", "print('up', flush=True); input()"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as program:
            assert program.stdout.readline() == "up\n"  # past the shim's constructor, which asked
            assert resolvers(broker) == 0
            program.communicate("", timeout=10)
    assert "resolver on" not in broker.stderr()


def test_a_name_outside_the_policy_is_refused_without_leaving_the_host(netns, start_broker, site):
    getent = need_program("getent")
    with dns_server("127.0.0.1", {**RECORDS, "other.example": "127.0.0.1"}, port=0) as (dns_port, asked):
        broker = start_broker(policy(site, dns_port))
        r = run_grafted(broker, netns, getent, "hosts", "other.example", dns=True)
        assert r.returncode == 2, (r.stdout, r.stderr)  # not found
        assert not [q for q, _ in asked if q.name == "other.example"]
    refused = [x for x in dns_records(broker) if x["name"] == "other.example"]
    assert refused and {(x["action"], x["rule"], tuple(x["answers"])) for x in refused} == {
        ("deny", "tenants.t.dns.names", ())
    }


def test_a_tenant_with_the_resolver_off_keeps_the_containers_names(netns, start_broker, site):
    with dns_server("127.0.0.1", RECORDS, port=0) as (dns_port, asked):
        broker = start_broker(policy(site, dns_port, extra='resolver = "off"'))
        r = run_grafted(broker, netns, "cat", "/etc/resolv.conf", dns=True)
        assert r.returncode == 0, r.stderr
        with open("/etc/resolv.conf") as f:
            assert r.stdout == f.read()
    assert dns_records(broker) == [] and asked == []


def test_malformed_and_tcp_queries_are_served_and_audited(netns, start_broker, site):
    """Over TCP too (a truncated UDP answer's retry), and junk gets FORMERR, not a dead resolver."""
    probe = r"""
import json, socket, struct, sys
import dns.message, dns.query
out = {}
q = dns.message.make_query("myhost.graft.test", "A")
r = dns.query.tcp(q, "127.0.0.11", port=53, timeout=5)
out["tcp"] = [rd.address for rrset in r.answer for rd in rrset]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"\x12\x34\x01\x00\x00\x01" + bytes(6) + b"junk", ("127.0.0.11", 53))  # a header, a broken question
out["junk_rcode"] = s.recv(512)[3] & 0xF
print(json.dumps(out))
"""
    with dns_server("127.0.0.1", RECORDS, port=0) as (dns_port, _):
        broker = start_broker(policy(site, dns_port))
        r = run_grafted(broker, netns, sys.executable, "-c", probe, dns=True)
        assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"tcp": ["127.0.0.1"], "junk_rcode": 1}  # FORMERR
    kinds = {(x["proto"], x["action"]) for x in dns_records(broker)}
    assert kinds == {("tcp", "graft"), ("udp", "error")}, dns_records(broker)


def test_seccomp_mode_resolves_through_the_same_resolver(netns, seccomp_broker, site):
    """glibc's own resolver sockets are stopped there: its query to the resolver goes on, in the program's network."""
    getent = need_program("getent")
    with dns_server("127.0.0.1", RECORDS, port=0) as (dns_port, asked):
        broker = seccomp_broker(policy(site, dns_port, seccomp=True))
        r = seccomp_run(broker, netns, getent, "hosts", "myhost.graft.test", dns=True)
        assert (r.returncode, r.stdout.split()[:2]) == (0, ["127.0.0.1", "myhost.graft.test"]), r.stderr
        assert Question("myhost.graft.test", TYPE_A) in {q for q, _ in asked}
    answered = [x for x in dns_records(broker) if x["name"] == "myhost.graft.test" and x["qtype"] == "A"]
    assert answered and answered[0]["answers"] == ["127.0.0.1"]
    # the resolver's socket was judged, and left in the program's network, where the broker listens
    kept = [x for x in seccomp_records(broker) if x["port"] == 53]
    assert kept and {(x["addr"], x["action"], x["rule"]) for x in kept} == {
        ("127.0.0.11", "container", "tenants.t.dns.resolver")
    }


# A container's program in seccomp mode: its resolv.conf names the resolver, and no one asked for it beforehand.
POINTED = (
    "import os, sys; from graft.names import point_resolv_conf_at; point_resolv_conf_at('127.0.0.11'); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def test_seccomp_mode_serves_the_resolver_at_the_programs_first_query(netns, seccomp_broker, site):
    """No `graft run` asked (--no-dns): the stopped connect to the resolver's address has it served first."""
    getent = need_program("getent")
    with dns_server("127.0.0.1", RECORDS, port=0) as (dns_port, asked):
        broker = seccomp_broker(policy(site, dns_port, seccomp=True))
        r = seccomp_run(broker, netns, sys.executable, "-c", POINTED, getent, "hosts", "myhost.graft.test")
        assert (r.returncode, r.stdout.split()[:2]) == (0, ["127.0.0.1", "myhost.graft.test"]), r.stderr
        assert Question("myhost.graft.test", TYPE_A) in {q for q, _ in asked}
    assert [x["answers"] for x in dns_records(broker) if x["qtype"] == "A"] == [["127.0.0.1"]]
    assert eventually(lambda: resolvers(broker) == 0, timeout=10)  # it went with the program


FLOOD = r"""
import json, socket, sys
import dns.message, dns.rcode
counts = {"answered": 0, "refused": 0, "lost": 0}
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(2)
    s.connect(("127.0.0.11", 53))
    for i in range(int(sys.argv[1])):
        s.send(dns.message.make_query("myhost.graft.test", "A", id=i).to_wire())
        try:
            rcode = dns.message.from_wire(s.recv(4096)).rcode()
        except TimeoutError:
            counts["lost"] += 1
            continue
        counts["answered" if rcode == dns.rcode.NOERROR else "refused"] += 1
print(json.dumps(counts), flush=True)
"""
CONNECTS = r"""
import socket, sys
for _ in range(int(sys.argv[2])):
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10).close()
print("connected", flush=True)
"""


def test_a_flood_of_queries_costs_its_tenant_and_not_anothers_connects(netns, start_broker, site):
    """Queries are requests: over max_rate they are refused and audited, and another tenant's connects go on."""
    with dns_server("127.0.0.1", RECORDS, port=0, ttl=300) as (dns_port, _):
        text = policy(site, dns_port).replace('default = "deny"\n', 'default = "deny"\nmax_rate = 50\n', 1)
        other = f"""
[tenants.b]
default = "deny"
[[tenants.b.connect]]
to = ["127.0.0.1/32"]
ports = [{site}]
proto = "tcp"
"""
        broker = start_broker(text + other)
        flood = subprocess.Popen(
            graft_cmd(broker, netns, sys.executable, "-c", FLOOD, "600", dns=True),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            b = subprocess.run(
                [GRAFT, "run", "--socket", str(broker.socket_dir / "b.sock"), "--", sys.executable, "-c", CONNECTS]
                + [str(site), "50"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            out, err = flood.communicate(timeout=60)
        finally:
            flood.kill()
            flood.wait()
    assert b.returncode == 0 and b.stdout == "connected\n", b.stderr
    counts = json.loads(out)  # the flood's own tally
    assert counts["refused"] > 0 and counts["answered"] + counts["refused"] + counts["lost"] == 600, (out, err)
    records = broker.audit()
    limited = [x for x in records if x.get("op") == "dns" and x["rule"] == "tenants.t.max_rate"]
    assert len(limited) == counts["refused"] and {(x["action"], x["errno"]) for x in limited} == {("deny", 11)}
    # every connect of b's was granted (the kernel's records of fast-path ones reach the log a moment later)
    assert eventually(lambda: len([x for x in broker.audit() if x["tenant"] == "b" and x["op"] == "connect"]) == 50)
    assert {x["action"] for x in broker.audit() if x["tenant"] == "b"} == {"graft"}


LOOKUPS = r"""
import socket, sys
for line in sys.stdin:
    try:
        print(socket.gethostbyname(line.strip()), flush=True)
    except OSError as e:
        print(f"error {e.errno}", flush=True)
"""


def test_a_reload_keeps_the_resolver_answering_under_the_new_names(netns, start_broker, site):
    records = {**RECORDS, "other.graft.test": "127.0.0.2"}
    with dns_server("127.0.0.1", records, port=0, ttl=300) as (dns_port, _):
        broker = start_broker(policy(site, dns_port))
        with subprocess.Popen(
            graft_cmd(broker, netns, sys.executable, "-c", LOOKUPS, dns=True),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as program:

            def lookup(name: str) -> str:
                program.stdin.write(name + "\n")
                program.stdin.flush()
                return program.stdout.readline().strip()

            try:
                assert (lookup("myhost.graft.test"), lookup("other.graft.test")) == ("127.0.0.1", "127.0.0.2")
                broker.reload(policy(site, dns_port, names='["myhost.graft.test"]'))
                assert resolvers(broker) == 1  # the same one, still listening
                assert lookup("myhost.graft.test") == "127.0.0.1"
                assert lookup("other.graft.test").startswith("error")  # refused now: the new names hold
            finally:
                program.stdin.close()
                program.wait(timeout=10)
    refused = [x for x in dns_records(broker) if x["name"] == "other.graft.test" and x["action"] == "deny"]
    assert refused and {x["rule"] for x in refused} == {"tenants.t.dns.names"}


def test_a_restart_keeps_the_resolver_answering_from_the_fd_store(netns, short_tmp, site):
    """The resolver's sockets wait in the service manager's store; the next broker serves them, then closes them."""
    with dns_server("127.0.0.1", RECORDS, port=0, ttl=300) as (dns_port, asked):
        broker = BrokerProcess(short_tmp / "b", policy(site, dns_port), fdstore=True)
        try:
            broker.start()
            with subprocess.Popen(
                graft_cmd(broker, netns, sys.executable, "-c", LOOKUPS, dns=True),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            ) as program:
                try:
                    program.stdin.write("myhost.graft.test\n")
                    program.stdin.flush()
                    assert program.stdout.readline() == "127.0.0.1\n"
                    (stored,) = [name for name in broker.drain_store() if name.startswith("resolver.")]
                    assert broker.restart() == 0
                    assert stored in broker.stored and resolvers(broker) == 1  # the same sockets, served again
                    program.stdin.write("myhost.graft.test\n")  # the cache went with the first broker
                    program.stdin.flush()
                    assert program.stdout.readline() == "127.0.0.1\n"
                finally:
                    program.stdin.close()
                    program.wait(timeout=10)
            assert eventually(lambda: resolvers(broker) == 0, timeout=10)  # its program gone: closed,
            assert eventually(lambda: stored not in broker.drain_store(), timeout=10)  # and out of the store
        finally:
            assert broker.stop() == 0, broker.stderr()
            broker.release_store()
    assert [q for q, _ in asked if q.qtype == TYPE_A] == [Question("myhost.graft.test", TYPE_A)] * 2


NAME_RULE_TTL = 2  # seconds: the answer's TTL, with min_ttl = 0, is how long the rule lets it be reached


def name_rule_policy(http_port: int, dns_port: int, seccomp: bool = False) -> str:
    text = f"""
version = 1
[broker]
confinement = "required"
[tenants.t]
default = "deny"
mode = "{"seccomp" if seccomp else "preload"}"
[tenants.t.dns]
upstream = ["127.0.0.1:{dns_port}"]
min_ttl = 0
[[tenants.t.connect]]
names = ["*.graft.test"]
ports = [{http_port}]
proto = "tcp"
"""
    return text


@pytest.mark.parametrize("mode", ["preload", "seccomp"])
def test_a_name_rule_reaches_what_the_lookup_returned_until_its_ttl_runs_out(netns, short_tmp, site, mode):
    """Before the lookup, the address is denied; after it, reached (the fast path too); after the TTL, denied."""
    with dns_server("127.0.0.1", {"api.graft.test": "127.0.0.1"}, port=0, ttl=NAME_RULE_TTL) as (dns_port, _):
        broker = BrokerProcess(short_tmp / "b", name_rule_policy(site, dns_port, seccomp=mode == "seccomp"))
        try:
            broker.start()
            cmd = [sys.executable, str(PROGRAMS / "name_rule_client.py"), "api.graft.test", str(site), str(site + 1)]
            run = seccomp_run if mode == "seccomp" else run_grafted
            r = run(broker, netns, *cmd, dns=True)
            records = broker.stop_and_audit()
        finally:
            broker.stop()
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["before"], out["addresses"], out["other"]) == (errno.EPERM, ["127.0.0.1"], errno.EPERM), out
    assert out["after"] == [0] * 10, out
    # denied once the answer's TTL has run out, and not much before: whole seconds, rounded down in the kernel
    assert out["lapsed_after"] is not None and NAME_RULE_TTL - 1 <= out["lapsed_after"] <= NAME_RULE_TTL + 3, out
    connects = [x for x in records if x.get("op") == "connect" and x["port"] == site]
    by_name = [x for x in connects if x["action"] == "graft"]
    assert len(by_name) >= 10 and {(x["rule"], x["name"]) for x in by_name} == {
        ("tenants.t.connect[0]", "api.graft.test")
    }
    if mode == "preload":
        assert {"shim", "kernel"} <= {x["via"] for x in by_name}  # the fast path's grants lapse too
    denied = [x for x in connects if x["action"] == "deny"]
    assert len(denied) >= 2 and {(x["rule"], x.get("name")) for x in denied} == {("tenants.t.default", None)}


ASK_MANY = r"""
import json, socket, sys
from graft.broker.core import request
from graft.broker.shim import wire
path = sys.argv[1]
out = set()
with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
    s.settimeout(10)
    s.connect(path)
    for _ in range(300):
        s.send(wire.encode_request(request.OP_RESOLVER, None, type=socket.SOCK_DGRAM, family=socket.AF_INET))
        rep = wire.decode_reply(s.recv(wire.REPLY_SIZE))
        out.add((rep.verdict, rep.error))
print(json.dumps(sorted(out)), flush=True)
sys.stdin.readline()  # the test looks at the broker while this process, the asker, lives
"""


def ask_many(broker, netns, while_asking=lambda: None) -> list:
    """300 RESOLVER requests from one process in netns, on one connection: the distinct answers.

    while_asking runs once they are answered, before the asker exits.
    """
    cmd = ["nsenter", f"--net=/run/netns/{netns}", "--", sys.executable, "-c", ASK_MANY, str(broker.socket_path)]
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            answers = [tuple(x) for x in json.loads(proc.stdout.readline())]
            while_asking()
        finally:
            proc.stdin.close()
            assert proc.wait(timeout=60) == 0
    return answers


def test_a_process_asking_again_and_again_gets_one_resolver(netns, start_broker, site):
    """Each ask of one process is the same asker: no pidfd (or task) per request."""
    with dns_server("127.0.0.1", RECORDS, port=0) as (dns_port, _):
        broker = start_broker(policy(site, dns_port))
        fds: list[int] = []

        def look():
            fds.append(len(os.listdir(f"/proc/{broker.proc.pid}/fd")))
            assert resolvers(broker) == 1

        assert ask_many(broker, netns, look) == [(wire.V_GRAFT, 0)]
        assert fds[0] < 100, fds  # one pidfd for the asker, not one per request
        assert eventually(lambda: resolvers(broker) == 0, timeout=10)  # the asker exited: closed


def test_a_uid_the_tenant_does_not_allow_gets_no_resolver(netns, start_broker, site):
    with dns_server("127.0.0.1", RECORDS, port=0) as (dns_port, _):
        broker = start_broker(policy(site, dns_port).replace('default = "deny"', 'default = "deny"\nuids = [12345]'))
        assert ask_many(broker, netns) == [(wire.V_ERROR, errno.EPERM)]  # it asks as root
        assert resolvers(broker) == 0
