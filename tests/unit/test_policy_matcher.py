"""The matcher: which rule decides a bind or connect, and what it answers.

Pure tests (no sockets).  The property test compares ``TenantMatcher.decide`` with a naive
reference written here from the documented semantics, using only ``ipaddress`` containment.
"""

from __future__ import annotations

import ipaddress
import textwrap
from ipaddress import ip_address as ip
from ipaddress import ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graft.policy import Decision, PolicyFile, TenantMatcher, compile_policy, parse_policy


def matcher(body: str, tenant: str = "web") -> TenantMatcher:
    text = f"version = 1\n[tenants.{tenant}]\n" + textwrap.dedent(body)
    return compile_policy(parse_policy(text))[tenant]


WEB = matcher("""
    default = "container"

    [[tenants.web.connect]]
    to = ["127.0.0.1/32"]
    ports = [5432]
    proto = "tcp"
    action = "deny"

    [[tenants.web.connect]]
    to = ["127.0.0.0/8", "10.0.0.0/8"]
    ports = [5432, "8000-8100"]
    proto = "tcp"

    [[tenants.web.connect]]
    to = ["2001:db8::/32"]
    proto = "udp"

    [[tenants.web.connect]]
    to = ["10.0.0.0/8"]
    action = "deny"

    [[tenants.web.bind]]
    addr = ["0.0.0.0/32", "::/128"]
    ports = [80]
    proto = "tcp"
    host = "127.0.0.1:8080"

    [[tenants.web.bind]]
    addr = ["0.0.0.0/32", "::/128"]
    ports = ["9000-9100"]
    host = "::1"

    [[tenants.web.bind]]
    ports = [0]
    proto = "udp"
    action = "deny"
""")


def test_compile_policy_gives_one_matcher_per_tenant():
    policy = parse_policy('version = 1\n[tenants.a]\n[tenants."b.c"]\ndefault = "deny"\n')
    matchers = compile_policy(policy)
    assert set(matchers) == {"a", "b.c"}
    assert all(isinstance(m, TenantMatcher) for m in matchers.values())
    assert matchers["b.c"].decide("connect", "tcp", ip("1.2.3.4"), 80) == Decision("deny", 'tenants."b.c".default')


def test_first_match_wins():
    # 127.0.0.1:5432/tcp matches rules 0 and 1: rule 0 (deny) is first.
    assert WEB.decide("connect", "tcp", ip("127.0.0.1"), 5432) == Decision("deny", "tenants.web.connect[0]")
    # 127.0.0.2 misses rule 0 and is grafted by rule 1.
    assert WEB.decide("connect", "tcp", ip("127.0.0.2"), 5432) == Decision("graft", "tenants.web.connect[1]")
    # 10.1.2.3:8050/tcp: rule 1 (graft) comes before rule 3 (deny all of 10/8).
    assert WEB.decide("connect", "tcp", ip("10.1.2.3"), 8050) == Decision("graft", "tenants.web.connect[1]")
    # Same address on a port rule 1 does not list: rule 3 denies.
    assert WEB.decide("connect", "tcp", ip("10.1.2.3"), 22) == Decision("deny", "tenants.web.connect[3]")


def test_reordering_changes_the_answer():
    rules = [
        '[[tenants.web.connect]]\nto = ["10.0.0.0/8"]\naction = "deny"\n',
        '[[tenants.web.connect]]\nto = ["10.0.0.0/16"]\n',
    ]
    deny_first = matcher("".join(rules))
    graft_first = matcher("".join(reversed(rules)))
    assert deny_first.decide("connect", "tcp", ip("10.0.1.1"), 1).action == "deny"
    assert graft_first.decide("connect", "tcp", ip("10.0.1.1"), 1) == Decision("graft", "tenants.web.connect[0]")


def test_default_when_nothing_matches():
    assert WEB.decide("connect", "tcp", ip("192.0.2.1"), 443) == Decision("container", "tenants.web.default")
    assert WEB.decide("bind", "tcp", ip("0.0.0.0"), 81) == Decision("container", "tenants.web.default")
    deny = matcher('default = "deny"\n')
    assert deny.decide("connect", "udp", ip("::1"), 53) == Decision("deny", "tenants.web.default")
    assert deny.decide("bind", "tcp", ip("0.0.0.0"), 0) == Decision("deny", "tenants.web.default")


def test_connect_rules_do_not_judge_binds_and_vice_versa():
    m = matcher('default = "deny"\n[[tenants.web.connect]]\n')
    assert m.decide("connect", "tcp", ip("1.1.1.1"), 1).action == "graft"
    assert m.decide("bind", "tcp", ip("1.1.1.1"), 1).action == "deny"
    m = matcher('default = "deny"\n[[tenants.web.bind]]\n')
    assert m.decide("bind", "udp", ip("::"), 0) == Decision("graft", "tenants.web.bind[0]")
    assert m.decide("connect", "udp", ip("::"), 1).action == "deny"


def test_empty_rule_matches_everything():
    m = matcher('default = "deny"\n[[tenants.web.connect]]\naction = "container"\n')
    for addr in ("0.0.0.0", "255.255.255.255", "::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::ffff:1.2.3.4"):
        for proto in ("tcp", "udp"):
            for port in (0, 1, 65535):
                assert m.decide("connect", proto, ip(addr), port) == Decision("container", "tenants.web.connect[0]")


@pytest.mark.parametrize("proto, expected", [("tcp", "tenants.web.connect[0]"), ("udp", "tenants.web.connect[1]")])
def test_proto_filtering(proto, expected):
    m = matcher("""
        default = "deny"
        [[tenants.web.connect]]
        proto = "tcp"
        ports = [1]
        [[tenants.web.connect]]
        proto = "udp"
        ports = [1]
        action = "container"
        [[tenants.web.connect]]
        proto = "any"
        ports = [2]
    """)
    assert m.decide("connect", proto, ip("10.0.0.1"), 1).rule == expected
    assert m.decide("connect", proto, ip("10.0.0.1"), 2) == Decision("graft", "tenants.web.connect[2]")
    assert m.decide("connect", proto, ip("10.0.0.1"), 3).rule == "tenants.web.default"


def test_udp_rule_ignores_tcp():
    assert WEB.decide("connect", "udp", ip("2001:db8::5"), 53) == Decision("graft", "tenants.web.connect[2]")
    assert WEB.decide("connect", "tcp", ip("2001:db8::5"), 53) == Decision("container", "tenants.web.default")


@pytest.mark.parametrize(
    "port, action",
    [
        (7999, "deny"),
        (8000, "graft"),
        (8001, "graft"),
        (8099, "graft"),
        (8100, "graft"),
        (8101, "deny"),
        (5431, "deny"),
        (5432, "graft"),
        (5433, "deny"),
    ],
)
def test_port_range_edges(port, action):
    # 10.9.9.9/tcp: connect[1] lists 5432 and 8000-8100; anything else falls to connect[3] (deny).
    assert WEB.decide("connect", "tcp", ip("10.9.9.9"), port).action == action


def test_port_edges_of_the_whole_range():
    m = matcher("""
        default = "deny"
        [[tenants.web.connect]]
        ports = ["1-1", 65535]
        [[tenants.web.bind]]
        ports = ["0-0"]
    """)
    assert m.decide("connect", "tcp", ip("1.2.3.4"), 1).action == "graft"
    assert m.decide("connect", "tcp", ip("1.2.3.4"), 2).action == "deny"
    assert m.decide("connect", "tcp", ip("1.2.3.4"), 65534).action == "deny"
    assert m.decide("connect", "tcp", ip("1.2.3.4"), 65535).action == "graft"
    assert m.decide("connect", "tcp", ip("1.2.3.4"), 0).action == "deny"
    assert m.decide("bind", "tcp", ip("0.0.0.0"), 0).action == "graft"
    assert m.decide("bind", "tcp", ip("0.0.0.0"), 1).action == "deny"


def test_ipv4_cidr_edges():
    m = matcher('default = "deny"\n[[tenants.web.connect]]\nto = ["192.168.4.0/22"]\n')
    for addr, action in [
        ("192.168.3.255", "deny"),
        ("192.168.4.0", "graft"),
        ("192.168.7.255", "graft"),
        ("192.168.8.0", "deny"),
    ]:
        assert m.decide("connect", "tcp", ip(addr), 1).action == action, addr


def test_ipv6_cidrs():
    m = matcher("""
        default = "deny"
        [[tenants.web.connect]]
        to = ["2001:db8:1::/48", "::1"]
    """)
    assert m.decide("connect", "tcp", ip("2001:db8:1::"), 1).action == "graft"
    assert m.decide("connect", "tcp", ip("2001:db8:1:ffff:ffff:ffff:ffff:ffff"), 1).action == "graft"
    assert m.decide("connect", "tcp", ip("2001:db8:2::"), 1).action == "deny"
    assert m.decide("connect", "tcp", ip("2001:db8:0:ffff:ffff:ffff:ffff:ffff"), 1).action == "deny"
    assert m.decide("connect", "tcp", ip("::1"), 1).action == "graft"
    assert m.decide("connect", "tcp", ip("::2"), 1).action == "deny"
    # An IPv6 CIDR does not match IPv4 addresses, not even 0.0.0.1 ~ ::1.
    assert m.decide("connect", "tcp", ip("0.0.0.1"), 1).action == "deny"
    assert m.decide("connect", "tcp", ip("127.0.0.1"), 1).action == "deny"


def test_v4_mapped_ipv6_is_matched_by_ipv4_cidrs():
    m = matcher('default = "deny"\n[[tenants.web.connect]]\nto = ["10.0.0.0/8"]\nports = [5432]\n')
    assert m.decide("connect", "tcp", ip("::ffff:10.1.2.3"), 5432) == Decision("graft", "tenants.web.connect[0]")
    assert m.decide("connect", "tcp", ip("::ffff:11.1.2.3"), 5432).action == "deny"
    # Not other embeddings: IPv4-compatible (::a.b.c.d) and NAT64 are plain IPv6.
    assert m.decide("connect", "tcp", ip("::10.1.2.3"), 5432).action == "deny"
    assert m.decide("connect", "tcp", ip("64:ff9b::10.1.2.3"), 5432).action == "deny"


def test_wide_ipv6_cidrs_do_not_cover_ipv4():
    m = matcher('default = "deny"\n[[tenants.web.connect]]\nto = ["::/0"]\n')
    assert m.decide("connect", "tcp", ip("2001:db8::1"), 1).action == "graft"
    assert m.decide("connect", "tcp", ip("::"), 1).action == "graft"
    assert m.decide("connect", "tcp", ip("::fffe:ffff:ffff"), 1).action == "graft"  # just below ::ffff:0:0
    assert m.decide("connect", "tcp", ip("::1:0:0:0"), 1).action == "graft"  # just above ::ffff:ffff:ffff
    assert m.decide("connect", "tcp", ip("::ffff:1.2.3.4"), 1).action == "deny"
    assert m.decide("connect", "tcp", ip("1.2.3.4"), 1).action == "deny"


def test_v4_mapped_cidr_is_an_ipv4_range():
    m = matcher('default = "deny"\n[[tenants.web.connect]]\nto = ["::ffff:10.0.0.0/104"]\n')
    assert m.decide("connect", "tcp", ip("10.200.0.1"), 1).action == "graft"
    assert m.decide("connect", "tcp", ip("::ffff:10.200.0.1"), 1).action == "graft"
    assert m.decide("connect", "tcp", ip("11.0.0.0"), 1).action == "deny"
    whole = matcher('default = "deny"\n[[tenants.web.connect]]\nto = ["::ffff:0:0/96"]\n')
    assert whole.decide("connect", "tcp", ip("0.0.0.0"), 1).action == "graft"
    assert whole.decide("connect", "tcp", ip("255.255.255.255"), 1).action == "graft"
    assert whole.decide("connect", "tcp", ip("::1"), 1).action == "deny"


def test_bind_publishing_with_a_host_port():
    d = WEB.decide("bind", "tcp", ip("0.0.0.0"), 80)
    assert d == Decision("graft", "tenants.web.bind[0]", (ip("127.0.0.1"), 8080))
    assert WEB.decide("bind", "tcp", ip("::"), 80) == d
    # Not the wildcard: bind[0] does not match a specific address.
    assert WEB.decide("bind", "tcp", ip("10.0.0.5"), 80) == Decision("container", "tenants.web.default")
    # bind[0] is tcp only.
    assert WEB.decide("bind", "udp", ip("0.0.0.0"), 80).rule == "tenants.web.default"


def test_bind_publishing_without_a_host_port_keeps_the_apps_port():
    for port in (9000, 9050, 9100):
        for wildcard in ("0.0.0.0", "::"):
            d = WEB.decide("bind", "udp", ip(wildcard), port)
            assert d == Decision("graft", "tenants.web.bind[1]", (ip("::1"), port))
    assert WEB.decide("bind", "tcp", ip("::"), 9101).rule == "tenants.web.default"


def test_bind_port_zero_rule():
    assert WEB.decide("bind", "udp", ip("10.0.0.1"), 0) == Decision("deny", "tenants.web.bind[2]")
    assert WEB.decide("bind", "tcp", ip("10.0.0.1"), 0) == Decision("container", "tenants.web.default")


def test_decisions_without_host_are_reused():
    a = WEB.decide("connect", "tcp", ip("10.1.2.3"), 8000)
    b = WEB.decide("connect", "tcp", ip("10.4.5.6"), 8100)
    assert a is b
    assert WEB.decide("bind", "tcp", ip("::"), 80) is WEB.decide("bind", "tcp", ip("0.0.0.0"), 80)
    assert a.host is None
    with pytest.raises(AttributeError):
        a.action = "deny"  # frozen


def test_uid_allowlist():
    m = matcher("uids = [0, 1000]\n")
    assert m.uid_allowed(0) and m.uid_allowed(1000)
    assert not m.uid_allowed(1001)
    assert matcher("").uid_allowed(12345)


def test_bad_requests_are_programming_errors():
    with pytest.raises(ValueError):
        WEB.decide("listen", "tcp", ip("::"), 80)
    with pytest.raises(ValueError):
        WEB.decide("connect", "sctp", ip("::"), 80)
    with pytest.raises(ValueError):
        WEB.decide("connect", "tcp", ip("::"), 65536)
    with pytest.raises(ValueError):
        WEB.decide("connect", "tcp", ip("::"), -1)
    with pytest.raises(TypeError):
        WEB.decide("connect", "tcp", "127.0.0.1", 80)


# --------------------------------------------------------------------------- property test

MAPPED = ip_network("::ffff:0:0/96")


def ref_net_contains(net, addr) -> bool:
    """The documented address semantics, spelled out with ipaddress containment."""
    if net.version == 6 and net.subnet_of(MAPPED):
        # An IPv4 range written as v4-mapped IPv6.
        net = ip_network(f"{ipaddress.IPv4Address(int(net.network_address) & 0xFFFFFFFF)}/{net.prefixlen - 96}")
    if net.version == 4:
        if addr.version == 6:
            if addr.ipv4_mapped is None:
                return False
            addr = addr.ipv4_mapped
        return addr in net
    return addr.version == 6 and addr.ipv4_mapped is None and addr in net


def ref_decide(policy: PolicyFile, tenant: str, op: str, proto: str, addr, port: int) -> Decision:
    t = policy.tenants[tenant]
    for i, rule in enumerate(getattr(t, op)):
        nets = rule.to if op == "connect" else rule.addr
        if rule.proto not in ("any", proto):
            continue
        if rule.ports is not None and not any(r.lo <= port <= r.hi for r in rule.ports):
            continue
        if nets is not None and not any(ref_net_contains(n, addr) for n in nets):
            continue
        host = getattr(rule, "host", None)
        target = None if host is None else (host.addr, port if host.port is None else host.port)
        return Decision(rule.action, f"tenants.{tenant}.{op}[{i}]", target)
    return Decision(t.default, f"tenants.{tenant}.default")


# Networks and addresses are drawn near a few anchors so that matches are common.
ANCHORS = [
    "10.0.0.0",
    "127.0.0.1",
    "0.0.0.0",
    "255.255.255.255",
    "::",
    "::1",
    "2001:db8::",
    "::ffff:10.0.0.0",
    "::ffff:0:0",
    "fe80::1",
]


@st.composite
def networks(draw):
    base = ip(draw(st.sampled_from(ANCHORS)))
    bits = base.max_prefixlen
    offset = draw(st.integers(0, 2 ** draw(st.integers(0, 16)) - 1))
    addr = type(base)(min(int(base) + offset, 2**bits - 1))
    prefix = draw(st.integers(0, bits))
    return ip_network(f"{addr}/{prefix}", strict=False)


@st.composite
def addresses(draw):
    kind = draw(st.sampled_from(["near", "v4", "v6", "mapped"]))
    if kind == "v4":
        return draw(st.ip_addresses(v=4))
    if kind == "v6":
        return draw(st.ip_addresses(v=6))
    if kind == "mapped":
        return ipaddress.IPv6Address(f"::ffff:{draw(st.ip_addresses(v=4))}")
    base = ip(draw(st.sampled_from(ANCHORS)))
    delta = draw(st.integers(-300, 300))
    return type(base)(max(0, min(int(base) + delta, 2**base.max_prefixlen - 1)))


ports_st = st.lists(
    st.one_of(
        st.integers(1, 65535),
        st.tuples(st.integers(1, 65535), st.integers(0, 200)).map(lambda t: f"{t[0]}-{min(t[0] + t[1], 65535)}"),
    ),
    min_size=1,
    max_size=3,
)


@st.composite
def rules(draw, op):
    rule: dict = {}
    if draw(st.booleans()):
        rule["to" if op == "connect" else "addr"] = [str(n) for n in draw(st.lists(networks(), min_size=1, max_size=3))]
    if draw(st.booleans()):
        rule["ports"] = draw(ports_st)
    rule["proto"] = draw(st.sampled_from(["tcp", "udp", "any"]))
    rule["action"] = draw(st.sampled_from(["graft", "deny", "container"]))
    if op == "bind" and rule["action"] == "graft" and draw(st.booleans()):
        host = draw(st.sampled_from(["127.0.0.1", "::1", "0.0.0.0"]))
        port = draw(st.none() | st.integers(1, 65535))
        if port is not None:
            host = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        rule["host"] = host
    return rule


@st.composite
def policies(draw):
    tenant = {
        "default": draw(st.sampled_from(["container", "deny"])),
        "connect": draw(st.lists(rules("connect"), max_size=5)),
        "bind": draw(st.lists(rules("bind"), max_size=5)),
    }
    return PolicyFile.model_validate({"version": 1, "tenants": {"t": tenant}})


@settings(max_examples=400, deadline=None)
@given(
    policy=policies(),
    op=st.sampled_from(["connect", "bind"]),
    proto=st.sampled_from(["tcp", "udp"]),
    addr=addresses(),
    port=st.one_of(st.integers(0, 65535), st.sampled_from([0, 1, 80, 65535])),
)
def test_decide_equals_reference(policy, op, proto, addr, port):
    got = compile_policy(policy)["t"].decide(op, proto, addr, port)
    assert got == ref_decide(policy, "t", op, proto, addr, port)


@settings(max_examples=200, deadline=None)
@given(net=networks(), addr=addresses())
def test_single_cidr_equals_reference(net, addr):
    # Focused on address semantics alone: one rule, one network, one address.
    policy = PolicyFile.model_validate(
        {"version": 1, "tenants": {"t": {"default": "deny", "connect": [{"to": [str(net)]}]}}}
    )
    got = compile_policy(policy)["t"].decide("connect", "tcp", addr, 1).action == "graft"
    assert got == ref_net_contains(net, addr)


def test_grafts_everything_only_when_no_rule_before_the_catch_all_decides_otherwise():
    from graft.policy import compile_policy, parse_policy

    def m(rules: str):
        return compile_policy(parse_policy("version = 1\n[tenants.t]\n" + rules))["t"]

    assert m('[[tenants.t.connect]]\nproto = "udp"\n').grafts_everything("connect", "udp")
    assert not m('[[tenants.t.connect]]\nproto = "udp"\n').grafts_everything("connect", "tcp")
    assert not m("[[tenants.t.connect]]\nports = [53]\n").grafts_everything("connect", "udp")
    deny_first = '[[tenants.t.connect]]\nto = ["10.0.0.0/8"]\naction = "deny"\n[[tenants.t.connect]]\n'
    assert not m(deny_first).grafts_everything("connect", "udp")
    tcp_deny_first = '[[tenants.t.connect]]\nproto = "tcp"\naction = "deny"\n[[tenants.t.connect]]\n'
    assert m(tcp_deny_first).grafts_everything("connect", "udp")
    assert not m("").grafts_everything("connect", "udp")


# ---- names: destinations by what the tenant's lookups returned (docs/dns.md) ----------

NAMED = matcher("""
    default = "deny"

    [[tenants.web.connect]]
    names = ["api.example.com"]
    ports = [443]
    proto = "tcp"

    [[tenants.web.connect]]
    names = ["*.svc.example"]
    to = ["10.9.0.0/16"]
    proto = "tcp"
""")


def test_a_name_rule_matches_only_an_address_a_lookup_of_its_name_returned():
    assert NAMED.has_names and not WEB.has_names
    anywhere = ip("192.0.2.7")
    assert NAMED.decide("connect", "tcp", anywhere, 443) == Decision("deny", "tenants.web.default")
    got = NAMED.decide("connect", "tcp", anywhere, 443, {"api.example.com": 99.5})
    assert got == Decision("graft", "tenants.web.connect[0]", name="api.example.com", expires=99.5)
    assert NAMED.decide("connect", "tcp", anywhere, 80, {"api.example.com": 99.5}).action == "deny"  # its ports
    assert NAMED.decide("connect", "tcp", anywhere, 443, {"www.example.com": 99.5}).action == "deny"


def test_a_suffix_pattern_is_a_name_under_it_and_to_beside_names_matches_either():
    addr = ip("192.0.2.8")
    got = NAMED.decide("connect", "tcp", addr, 8080, {"svc.example": 1.0, "db.svc.example": 5.0, "x.svc.example": 7.0})
    assert (got.rule, got.name, got.expires) == ("tenants.web.connect[1]", "x.svc.example", 7.0)  # the longest-lived
    by_address = NAMED.decide("connect", "tcp", ip("10.9.1.1"), 8080)
    assert by_address == Decision("graft", "tenants.web.connect[1]")  # no name needed, none reported
    assert NAMED.decide("connect", "tcp", addr, 8080, {"svc.example": 9.0}).action == "deny"  # not under it


def test_names_never_match_binds():
    assert NAMED.decide("bind", "tcp", ip("0.0.0.0"), 443, {"api.example.com": 9.0}).action == "deny"
