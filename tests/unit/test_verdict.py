"""verdict.judge: the broker's decision, pure (no sockets)."""

from __future__ import annotations

import errno
import ipaddress
import socket

from graft.broker.core import request
from graft.broker.core.verdict import judge
from graft.policy import compile_policy, parse_policy

POLICY = parse_policy("""
version = 1
[tenants.w]
default = "container"
[[tenants.w.connect]]
to = ["10.0.0.0/8"]
action = "deny"
[[tenants.w.connect]]
to = ["10.0.0.0/8", "127.0.0.1/32"]
[[tenants.w.bind]]
ports = [80]
host = "127.0.0.1:8080"
[[tenants.w.bind]]
ports = [81]
host = "::1"
[[tenants.w.bind]]
ports = [82]
action = "deny"
""")
MATCHER = compile_policy(POLICY)["w"]


def req(op, ip, port, family=None):
    a = ipaddress.ip_address(ip)
    fam = family or (socket.AF_INET6 if a.version == 6 else socket.AF_INET)
    return request.Request(op, fam, socket.SOCK_STREAM, 0, 0, request.SockAddr(fam, a, port), ())


def test_first_match_decides_and_denials_carry_the_briefs_errno():
    v = judge(req(request.OP_CONNECT, "10.1.1.1", 5432), MATCHER, 0)
    assert (v.action, v.rule, v.errno) == ("deny", "tenants.w.connect[0]", errno.EPERM)
    v = judge(req(request.OP_BIND, "0.0.0.0", 82), MATCHER, 0)
    assert (v.action, v.errno) == ("deny", errno.EACCES)


def test_graft_connect_targets_the_requested_address():
    r = req(request.OP_CONNECT, "127.0.0.1", 5432)
    v = judge(r, MATCHER, 0)
    assert (v.action, v.rule, v.target) == ("graft", "tenants.w.connect[1]", r.addr)


def test_unmatched_goes_to_the_default():
    v = judge(req(request.OP_CONNECT, "192.0.2.1", 1), MATCHER, 0)
    assert (v.action, v.rule) == ("container", "tenants.w.default")


def test_published_bind_keeps_the_apps_family():
    v = judge(req(request.OP_BIND, "0.0.0.0", 80), MATCHER, 0)
    assert str(v.target) == "127.0.0.1:8080"
    v6 = judge(req(request.OP_BIND, "::", 80), MATCHER, 0)
    assert (v6.target.family, str(v6.target)) == (socket.AF_INET6, "[::ffff:7f00:1]:8080")


def test_host_without_port_keeps_the_apps_port_and_v6_host_refuses_a_v4_socket():
    v = judge(req(request.OP_BIND, "::", 81), MATCHER, 0)
    assert str(v.target) == "[::1]:81"
    v4 = judge(req(request.OP_BIND, "0.0.0.0", 81), MATCHER, 0)
    assert (v4.action, v4.errno) == ("deny", errno.EAFNOSUPPORT)


def test_uid_allowlist_comes_first():
    matcher = compile_policy(parse_policy('version = 1\n[tenants."a.b"]\nuids = [0]\n'))["a.b"]
    v = judge(req(request.OP_CONNECT, "127.0.0.1", 1), matcher, 1000)
    assert (v.action, v.rule, v.errno) == ("deny", 'tenants."a.b".uids', errno.EPERM)
    assert judge(req(request.OP_CONNECT, "127.0.0.1", 1), matcher, 0).action == "container"


LOOPBACK_DENIED = compile_policy(
    parse_policy("""
version = 1
[tenants.w]
default = "deny"
[[tenants.w.connect]]
to = ["127.0.0.0/8", "::1/128"]
action = "deny"
[[tenants.w.connect]]
action = "graft"
""")
)["w"]


def test_the_unspecified_address_is_judged_as_the_loopback_the_kernel_sends_it_to():
    """connect(0.0.0.0:P) reaches 127.0.0.1:P: a rule denying loopback must deny it too."""
    for ip in ("0.0.0.0", "::", "::ffff:0.0.0.0"):
        v = judge(req(request.OP_CONNECT, ip, 5432), LOOPBACK_DENIED, 0)
        assert (v.action, v.rule) == ("deny", "tenants.w.connect[0]"), ip
    assert judge(req(request.OP_CONNECT, "10.1.2.3", 5432), LOOPBACK_DENIED, 0).action == "graft"
    # a bind to the wildcard is a bind, not a destination
    assert judge(req(request.OP_BIND, "0.0.0.0", 80), MATCHER, 0).action == "graft"
