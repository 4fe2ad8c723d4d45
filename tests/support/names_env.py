"""What the names tests share (tests/e2e/test_names*.py): a tenant whose upstream is the test's own responder.

Tenant "t" denies by default, resolves the names its `names` admit (by
default `*.graft.test`) through the tests' DNS responder on the host's
127.0.0.1 (never the host's resolvers), and may connect to one host TCP
port. With seccomp, it is in seccomp mode, which the broker serves only
with its kernel confinement on.
"""

from __future__ import annotations


def names_policy(
    dns_port: int, http_port: int | None = None, names: str = '["*.graft.test"]', extra: str = "", seccomp: bool = False
) -> str:
    """The policy text; extra: more keys of [tenants.t.dns]."""
    broker = '[broker]\nconfinement = "required"\n' if seccomp else ""
    mode = 'mode = "seccomp"\n' if seccomp else ""
    text = f"""
version = 1
{broker}[tenants.t]
{mode}default = "deny"
[tenants.t.dns]
upstream = ["127.0.0.1:{dns_port}"]
names = {names}
{extra}
"""
    if http_port is not None:
        text += f"""[[tenants.t.connect]]
to = ["127.0.0.1/32"]
ports = [{http_port}]
proto = "tcp"
"""
    return text
