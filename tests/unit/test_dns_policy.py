"""[tenants.NAME.dns]: the resolver's policy keys, what they admit, and where they send a query."""

from __future__ import annotations

import ipaddress
import socket

import dns.name
import pytest

from graft.broker.core import request
from graft.broker.core.decisions import to_resolver
from graft.broker.dns.message import name_allowed
from graft.names import resolv_conf_text
from graft.policy import PolicyError, parse_policy
from graft.policy.summary import summarize


def tenant_dns(dns: str):
    return parse_policy(f"version = 1\n[tenants.t]\n[tenants.t.dns]\n{dns}\n").tenants["t"].dns


def allows(d, name) -> bool:
    return name_allowed(dns.name.from_text(name) if isinstance(name, str) else name, d.names)


def test_the_defaults_serve_any_name_from_the_hosts_servers():
    d = parse_policy("version = 1\n[tenants.t]\n").tenants["t"].dns
    assert (d.resolver, d.upstream, d.names, d.on_refused) == ("127.0.0.11", None, None, "refused")
    assert allows(d, "anything.example")


def test_names_are_exact_or_a_suffix_without_case_or_trailing_dot():
    d = tenant_dns('names = ["API.example.com.", "*.svc.example"]')
    assert d.names == ["api.example.com", "*.svc.example"]
    assert allows(d, "api.example.com") and allows(d, "Api.Example.Com.")
    assert allows(d, "db.svc.example") and allows(d, "a.b.svc.example")
    assert not allows(d, "svc.example") and not allows(d, "example.com") and not allows(d, "xsvc.example")


def test_a_label_holding_a_dot_is_not_the_end_of_a_suffix():
    """The labels evil, x.corp, example print as evil.x\\.corp.example: not under corp.example."""
    d = tenant_dns('names = ["*.corp.example"]')
    tricky = dns.name.Name([b"evil", b"x.corp", b"example", b""])
    assert tricky.to_text().endswith(".corp.example.")
    assert not allows(d, tricky)
    assert allows(d, dns.name.Name([b"evil", b"x", b"corp", b"example", b""]))


def test_the_resolver_is_named_with_or_without_its_port():
    assert tenant_dns('resolver = "127.0.0.12:53"').resolver == tenant_dns('resolver = "127.0.0.12"').resolver


def test_upstreams_take_a_port_or_53():
    d = tenant_dns('upstream = ["127.0.0.1:5353", "10.0.0.2", "[fd00::53]:53"]')
    assert [(str(u.addr), u.port) for u in d.upstream] == [("127.0.0.1", 5353), ("10.0.0.2", 53), ("fd00::53", 53)]


@pytest.mark.parametrize(
    ("dns", "loc", "words"),
    [
        ('names = ["bad name"]', "tenants.t.dns.names[0]", "must be a DNS name"),
        ('names = ["*"]\nresolver = "10.0.0.1"', "tenants.t.dns.resolver", "IPv4 loopback address"),
        ('resolver = "nope"', "tenants.t.dns.resolver", "an address"),
        ('resolver = "::1"', "tenants.t.dns.resolver", "IPv4 loopback"),
        ('resolver = "127.0.0.11:5353"', "tenants.t.dns.resolver", "port 53"),
        ("names = []", "tenants.t.dns.names", "matches nothing"),
        ('upstream = ["127.0.0.1:0"]', "tenants.t.dns.upstream[0]", "1-65535"),
        ('upstream = ["0.0.0.0"]', "tenants.t.dns.upstream[0]", "a server's address"),
        ('upstream = ["224.0.0.251:5353"]', "tenants.t.dns.upstream[0]", "a server's address"),
        ('on_refused = "drop"', "tenants.t.dns.on_refused", ""),
        ("cache = 1", "tenants.t.dns.cache", ""),
    ],
)
def test_a_bad_key_is_named_where_it_is(dns, loc, words):
    with pytest.raises(PolicyError) as e:
        tenant_dns(dns)
    assert any(i.loc == loc and words in i.msg for i in e.value.errors), e.value.errors


def test_the_summary_says_what_the_resolver_does():
    text = summarize(parse_policy('version = 1\n[tenants.t]\n[tenants.t.dns]\nnames = ["*.graft.test"]\n'), "p")
    line = "    dns resolver 127.0.0.11:53  upstream host's resolv.conf  names *.graft.test  on_refused refused"
    assert line + "  min_ttl 30s" in text
    off = summarize(parse_policy('version = 1\n[tenants.t]\n[tenants.t.dns]\nresolver = "off"\n'), "p")
    assert "    dns off (names are the container's)" in off


class FakeTenant:
    def __init__(self, resolver: str):
        self.config = type("C", (), {"dns": tenant_dns(f'resolver = "{resolver}"')})()


def connect_to(host: str, port: int, op: int = request.OP_CONNECT, family: int = socket.AF_INET) -> request.Request:
    addr = request.SockAddr(family, ipaddress.ip_address(host), port)
    return request.Request(op, family, socket.SOCK_DGRAM, 0, 0, addr, ())


def test_queries_to_the_resolver_are_recognised_in_either_family():
    t = FakeTenant("127.0.0.11")
    assert to_resolver(t, connect_to("127.0.0.11", 53))
    assert to_resolver(t, connect_to("::ffff:127.0.0.11", 53, family=socket.AF_INET6))
    assert not to_resolver(t, connect_to("127.0.0.11", 5353))
    assert not to_resolver(t, connect_to("127.0.0.12", 53))
    assert not to_resolver(t, connect_to("127.0.0.11", 53, op=request.OP_BIND))
    assert not to_resolver(FakeTenant("off"), connect_to("127.0.0.11", 53))


def test_the_programs_resolv_conf_names_only_the_resolver_and_keeps_search_and_options():
    original = "# generated\nnameserver 10.0.0.2\nnameserver 10.0.0.3\nsearch corp.example\noptions ndots:2 edns0\n"
    assert resolv_conf_text(original, "127.0.0.11") == (
        "nameserver 127.0.0.11\nsearch corp.example\noptions ndots:2 edns0\n"
    )
    assert resolv_conf_text("", "127.0.0.11") == "nameserver 127.0.0.11\n"


def test_a_connect_rule_names_destinations_and_min_ttl_floors_their_answers():
    from graft.policy import parse_policy as parse

    p = parse(
        "version = 1\n[tenants.t]\n[tenants.t.dns]\nmin_ttl = 5\n"
        '[[tenants.t.connect]]\nnames = ["API.example.com.", "*.svc.example"]\nports = [443]\n'
    )
    assert p.tenants["t"].connect[0].names == ["api.example.com", "*.svc.example"]
    assert (p.tenants["t"].dns.min_ttl, parse("version = 1\n[tenants.t]\n").tenants["t"].dns.min_ttl) == (5, 30)


@pytest.mark.parametrize(
    ("text", "loc", "words"),
    [
        (
            '[tenants.t.dns]\nresolver = "off"\n[[tenants.t.connect]]\nnames = ["a.example"]\n',
            "tenants.t.connect[0].names",
            "never match",
        ),
        ("[[tenants.t.connect]]\nnames = []\n", "tenants.t.connect[0].names", "matches nothing"),
        ('[[tenants.t.connect]]\nnames = ["bad name"]\n', "tenants.t.connect[0].names[0]", "must be a DNS name"),
        ("[tenants.t.dns]\nmin_ttl = -1\n", "tenants.t.dns.min_ttl", ""),
        ('[[tenants.t.bind]]\nnames = ["a.example"]\n', "tenants.t.bind[0].names", ""),
    ],
)
def test_a_bad_name_rule_is_named_where_it_is(text, loc, words):
    from graft.policy import parse_policy as parse

    with pytest.raises(PolicyError) as e:
        parse("version = 1\n[tenants.t]\n" + text)
    assert any(i.loc == loc and words in i.msg for i in e.value.errors), e.value.errors
