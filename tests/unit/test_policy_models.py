"""The policy file: models, loader messages, examples, environment checks, summary, schema.

Pure tests: no sockets, no root, no files outside tmp_path.
"""

from __future__ import annotations

import ipaddress
import json
import textwrap
from pathlib import Path

import pydantic
import pytest

import graft.policy
from graft.policy import (
    PolicyError,
    PolicyFile,
    PolicyIssue,
    check_environment,
    json_schema,
    load_policy,
    parse_policy,
    summarize,
)

EXAMPLES = Path(graft.policy.__file__).parent / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.toml"))


def toml(text: str) -> str:
    return textwrap.dedent(text).lstrip()


def errors_of(text: str) -> dict[str, str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(toml(text), "test.toml")
    issues = info.value.errors
    assert all(isinstance(i, PolicyIssue) for i in issues)
    by_loc = {i.loc: i.msg for i in issues}
    assert len(by_loc) == len(issues), f"one issue per place expected: {issues}"
    return by_loc


MINIMAL = """
    version = 1
    [tenants.web]
"""


# --------------------------------------------------------------------------- examples


def test_there_are_examples():
    names = {p.name for p in EXAMPLE_FILES}
    assert {"demo.toml", "web.toml", "strict.toml", "multi-tenant.toml"} <= names
    assert (EXAMPLES / "README.md").is_file()


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_every_example_validates_and_summarizes(path):
    policy = load_policy(path, check_env=False)
    assert isinstance(policy, PolicyFile)
    text = summarize(policy, str(path))
    assert text.startswith(f"{path}: OK")
    for name in policy.tenants:
        assert f"tenant {name}" in text
    # Every example is described in the README.
    assert f"`{path.name}`" in (EXAMPLES / "README.md").read_text()


def test_demo_example_is_what_make_demo_expects():
    demo = load_policy(EXAMPLES / "demo.toml")
    assert list(demo.tenants) == ["demo", "static"]
    assert (demo.tenants["demo"].mode, demo.tenants["static"].mode) == ("preload", "seccomp")
    assert demo.tenants["static"].connect == demo.tenants["demo"].connect
    t = demo.tenants["demo"]
    assert (t.netns, t.default) == ("host", "deny")
    [connect] = t.connect
    assert connect.to == [ipaddress.ip_network("127.0.0.1/32")]
    assert [(p.lo, p.hi) for p in connect.ports] == [(8000, 8000)]
    assert (connect.proto, connect.action) == ("tcp", "graft")
    [bind] = t.bind
    assert bind.addr == [ipaddress.ip_network("0.0.0.0/32"), ipaddress.ip_network("::/128")]
    assert [(p.lo, p.hi) for p in bind.ports] == [(80, 80)]
    assert (bind.host.addr, bind.host.port) == (ipaddress.ip_address("127.0.0.1"), 8080)


# --------------------------------------------------------------------------- defaults and values


def test_defaults():
    p = parse_policy(toml(MINIMAL))
    assert p.version == 1
    assert (p.broker.socket_dir, p.broker.audit_log, p.broker.confinement) == ("/run/graft", "stderr", "auto")
    t = p.tenants["web"]
    assert t.netns == "host"
    assert t.default == "container"
    assert t.socket_mode == "0666" and t.socket_mode_int == 0o666
    assert t.max_sockets == 1024
    assert t.uids is None
    assert t.connect == [] and t.bind == []


def test_rule_defaults():
    p = parse_policy(
        toml("""
        version = 1
        [[tenants.web.connect]]
        [[tenants.web.bind]]
    """)
    )
    c, b = p.tenants["web"].connect[0], p.tenants["web"].bind[0]
    assert (c.to, c.ports, c.proto, c.action) == (None, None, "any", "graft")
    assert (b.addr, b.ports, b.proto, b.action, b.host) == (None, None, "any", "graft", None)


def test_values_are_parsed():
    p = parse_policy(
        toml("""
        version = 1
        [tenants.web]
        socket_mode = "660"
        netns = "/proc/1/ns/net"
        uids = [0, 1000]
        [[tenants.web.connect]]
        to = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7", "::1"]
        ports = [5432, "8000-8100", " 1-2 "]
        [[tenants.web.bind]]
        ports = [0, "0-1023"]
        host = "[::1]:8080"
        [[tenants.web.bind]]
        host = "::1"
        [[tenants.web.bind]]
        host = "127.0.0.1"
    """)
    )
    t = p.tenants["web"]
    assert t.socket_mode_int == 0o660
    assert t.netns_path() == "/proc/1/ns/net"
    assert t.uids == [0, 1000]
    c = t.connect[0]
    assert [str(n) for n in c.to] == ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32", "::1/128"]
    assert [(r.lo, r.hi) for r in c.ports] == [(5432, 5432), (8000, 8100), (1, 2)]
    b0, b1, b2 = t.bind
    assert [(r.lo, r.hi) for r in b0.ports] == [(0, 0), (0, 1023)]
    assert (b0.host.addr, b0.host.port) == (ipaddress.ip_address("::1"), 8080)
    assert (b1.host.addr, b1.host.port) == (ipaddress.ip_address("::1"), None)
    assert (b2.host.addr, b2.host.port) == (ipaddress.ip_address("127.0.0.1"), None)
    assert str(b0.host) == "[::1]:8080" and str(b2.host) == "127.0.0.1"


def test_round_trip_through_json_dump():
    text = (EXAMPLES / "web.toml").read_text()
    p = parse_policy(text)
    again = PolicyFile.model_validate(p.model_dump(mode="json", exclude_none=True))
    assert again == p


def test_netns_name_resolves_under_run_netns():
    p = parse_policy(
        toml("""
        version = 1
        [tenants.a]
        netns = "blue"
    """)
    )
    assert p.tenants["a"].netns_path() == "/run/netns/blue"
    assert p.tenants["a"].netns_path("/x") == "/x/blue"
    assert parse_policy(toml(MINIMAL)).tenants["web"].netns_path() is None


# --------------------------------------------------------------------------- errors


BROKEN = """
    version = 1

    [broker]
    socket_dir = "run/graft"

    [tenants.web]
    socket_mode = "0999"
    colour = "blue"

    [[tenants.web.connect]]
    to = ["127.0.0.1/32"]

    [[tenants.web.connect]]
    to = ["10.0.0.1/8", "::1/128"]
    ports = [80, 70000]

    [[tenants.web.connect]]
    ports = [443, "9-3"]
    action = "allow"

    [[tenants.web.bind]]
    ports = [80]
    host = "127.0.0.1:8080"
    action = "deny"

    [tenants."bad name!"]
    default = "graft"
"""


def test_broken_file_reports_every_error_at_its_place():
    errs = errors_of(BROKEN)
    assert set(errs) == {
        "broker.socket_dir",
        "tenants.web.socket_mode",
        "tenants.web.colour",
        "tenants.web.connect[1].to[0]",
        "tenants.web.connect[1].ports[1]",
        "tenants.web.connect[2].ports[1]",
        "tenants.web.connect[2].action",
        "tenants.web.bind[0].host",
        'tenants."bad name!"',
        'tenants."bad name!".default',
    }
    assert "absolute path" in errs["broker.socket_dir"]
    assert "octal" in errs["tenants.web.socket_mode"]
    assert errs["tenants.web.colour"].startswith("unknown key")
    assert "host bits set" in errs["tenants.web.connect[1].to[0]"]
    assert '"10.0.0.0/8"' in errs["tenants.web.connect[1].to[0]"]
    assert errs["tenants.web.connect[1].ports[1]"] == "port must be an integer 1-65535 or a range 'a-b' (got 70000)"
    assert "reversed" in errs["tenants.web.connect[2].ports[1]"]
    assert errs["tenants.web.connect[2].action"] == "must be 'graft', 'deny' or 'container' (got \"allow\")"
    assert "only allowed with action 'graft'" in errs["tenants.web.bind[0].host"]
    assert "invalid tenant name" in errs['tenants."bad name!"']
    assert "'container' or 'deny'" in errs['tenants."bad name!".default']


def test_policy_error_text():
    with pytest.raises(PolicyError) as info:
        parse_policy(toml(BROKEN), "broken.toml")
    lines = str(info.value).splitlines()
    assert lines[0] == "broken.toml: 10 errors"
    assert len(lines) == 11
    assert "  tenants.web.connect[1].ports[1]: port must be an integer 1-65535 or a range 'a-b' (got 70000)" in lines
    assert all(line.startswith("  ") for line in lines[1:])
    assert info.value.source == "broken.toml"


def test_messages_carry_no_pydantic_noise():
    with pytest.raises(PolicyError) as info:
        parse_policy(toml(BROKEN))
    text = str(info.value)
    for noise in ("http", "Value error", "function-", "[key]", "pydantic", "type=", "input_value"):
        assert noise not in text


def test_one_error_is_singular():
    with pytest.raises(PolicyError) as info:
        parse_policy("version = 2\n[tenants.a]\n", "x.toml")
    assert str(info.value).splitlines() == ["x.toml: 1 error", "  version: must be 1 (got 2)"]


@pytest.mark.parametrize(
    "snippet, loc, fragment",
    [
        ('[[tenants.web.connect]]\nports = ["80"]', "tenants.web.connect[0].ports[0]", "port must be an integer"),
        ("[[tenants.web.connect]]\nports = [0]", "tenants.web.connect[0].ports[0]", "1-65535"),
        ("[[tenants.web.connect]]\nports = [true]", "tenants.web.connect[0].ports[0]", "(got true)"),
        ('[[tenants.web.connect]]\nports = ["1-65536"]', "tenants.web.connect[0].ports[0]", "outside 1-65535"),
        ("[[tenants.web.bind]]\nports = [65536]", "tenants.web.bind[0].ports[0]", "integer 0-65535"),
        ("[[tenants.web.connect]]\nto = []", "tenants.web.connect[0].to", "matches nothing"),
        ("[[tenants.web.connect]]\nports = []", "tenants.web.connect[0].ports", "matches nothing"),
        ("[[tenants.web.bind]]\naddr = []", "tenants.web.bind[0].addr", "omit the key to match any"),
        ('[[tenants.web.connect]]\nto = "10.0.0.0/8"', "tenants.web.connect[0].to", "must be an array"),
        ('[[tenants.web.connect]]\nto = ["10.0.0.0/33"]', "tenants.web.connect[0].to[0]", "not an IPv4 or IPv6"),
        ('[[tenants.web.connect]]\nto = ["2001:db8::1/32"]', "tenants.web.connect[0].to[0]", '"2001:db8::/32"'),
        ("[[tenants.web.connect]]\nto = [10]", "tenants.web.connect[0].to[0]", "must be a string"),
        ('[[tenants.web.connect]]\nto = ["fe80::1%eth0"]', "tenants.web.connect[0].to[0]", "zone indexes"),
        ('[[tenants.web.bind]]\nhost = "[fe80::1%eth0]:80"', "tenants.web.bind[0].host", "zone indexes"),
        ('[[tenants.web.connect]]\nproto = "sctp"', "tenants.web.connect[0].proto", "'tcp', 'udp' or 'any'"),
        ('[[tenants.web.connect]]\nhost = "127.0.0.1:1"', "tenants.web.connect[0].host", "unknown key"),
        ('[[tenants.web.connect]]\ntoo = ["::1"]', "tenants.web.connect[0].too", "did you mean 'to'"),
        ('[[tenants.web.bind]]\nhost = "127.0.0.1:0"', "tenants.web.bind[0].host", "1-65535"),
        ('[[tenants.web.bind]]\nhost = "localhost:80"', "tenants.web.bind[0].host", "ADDR:PORT"),
        ('[[tenants.web.bind]]\nhost = "[::1"', "tenants.web.bind[0].host", "ADDR:PORT"),
        ('[[tenants.web.bind]]\nhost = "::1:80:"', "tenants.web.bind[0].host", "ADDR:PORT"),
        ('[[tenants.web.bind]]\nhost = "127.0.0.1"\naction = "container"', "tenants.web.bind[0].host", "only allowed"),
        ('[tenants.web.connect]\nto = ["::1"]', "tenants.web.connect", "[[tenants.web.connect]]"),
        ("[tenants.web]\nsocket_mode = 438", "tenants.web.socket_mode", "octal string in quotes"),
        ('[tenants.web]\nsocket_mode = "06666"', "tenants.web.socket_mode", "not an octal mode"),
        ("[tenants.web]\nmax_sockets = 0", "tenants.web.max_sockets", "greater than or equal to 1"),
        ('[tenants.web]\nmax_sockets = "10"', "tenants.web.max_sockets", "must be an integer"),
        ("[tenants.web]\nmax_rate = 0", "tenants.web.max_rate", "greater than or equal to 1"),
        ("[tenants.web]\nuids = []", "tenants.web.uids", "omit the key to allow any uid"),
        ("[tenants.web]\nuids = [-1]", "tenants.web.uids[0]", "greater than or equal to 0"),
        ("[tenants.web]\nuids = [4294967295]", "tenants.web.uids[0]", "less than or equal"),
        ('[tenants.web]\nnetns = "a/b"', "tenants.web.netns", "absolute"),
        ('[tenants.web]\nnetns = ".."', "tenants.web.netns", "a name in /run/netns"),
        ("[tenants.web]\nsocket_uid = -1", "tenants.web.socket_uid", "greater than or equal to 0"),
        ('[tenants.web]\nsocket_uid = "1000"', "tenants.web.socket_uid", "must be an integer"),
        (
            "[tenants.web]\nsocket_uid = 7\n[tenants.api]\nsocket_uid = 7",
            "tenants.api.socket_uid",
            "tenant 'web' already owns its host sockets as uid 7",
        ),
        ('[audit]\non_error = "ignore"', "audit.on_error", "'drop' or 'deny'"),
        ('[broker]\naudit_log = "audit.log"', "broker.audit_log", "absolute file path"),
        ('[broker]\nconfinement = "yes"', "broker.confinement", "'auto', 'required' or 'off'"),
        ('[broker]\nconfinment = "off"', "broker.confinment", "did you mean 'confinement'"),
        ("[tenants.web]\nports = [80]", "tenants.web.ports", "unknown key (allowed: netns,"),
        ('[tenants."-web"]', "tenants.-web", "invalid tenant name"),  # a TOML bare key: unquoted
        ('[tenants."w eb"]', 'tenants."w eb"', "invalid tenant name"),
        (f"[tenants.{'a' * 65}]", "tenants." + "a" * 65, "invalid tenant name"),
    ],
)
def test_single_error(snippet, loc, fragment):
    errs = errors_of(
        "version = 1\n[tenants.web]\n" + snippet
        if not snippet.startswith("[tenants.web]\n")
        else "version = 1\n" + snippet
    )
    assert list(errs) == [loc]
    assert fragment in errs[loc]


def test_longest_tenant_name_is_fine():
    name = "a" * 64
    assert name in parse_policy(f"version = 1\n[tenants.{name}]\n").tenants
    assert "a.b_c-d" in parse_policy('version = 1\n[tenants."a.b_c-d"]\n').tenants


def test_tenant_names_with_dots_are_quoted_in_places():
    errs = errors_of("""
        version = 1
        [tenants."db.internal"]
        default = "nope"
    """)
    assert list(errs) == ['tenants."db.internal".default']


def test_version_and_tenants_are_required():
    assert errors_of("") == {"version": "required key is missing", "tenants": "required key is missing"}
    errs = errors_of("version = true\n[tenants]\n")
    assert set(errs) == {"version", "tenants"}
    assert "integer 1" in errs["version"]
    assert "at least one tenant" in errs["tenants"]


def test_toml_syntax_error_is_one_issue_with_position():
    with pytest.raises(PolicyError) as info:
        parse_policy('version = 1\n[tenants.web]\nnetns = "host\n', "bad.toml")
    [issue] = info.value.errors
    assert issue.loc == "<toml>"
    assert "line 3" in issue.msg
    assert str(info.value).startswith("bad.toml: 1 error\n  <toml>: ")


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "missing.toml")
    [issue] = info.value.errors
    assert issue.loc == "<file>" and "No such file" in issue.msg
    assert info.value.source == str(tmp_path / "missing.toml")

    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path)  # a directory
    assert info.value.errors[0].loc == "<file>"

    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"version = 1\n# caf\xe9\n[tenants.a]\n")
    with pytest.raises(PolicyError) as info:
        load_policy(latin1)
    assert "UTF-8" in info.value.errors[0].msg


def test_load_policy_reads_a_file(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text(toml(MINIMAL))
    assert load_policy(f) == load_policy(str(f)) == parse_policy(toml(MINIMAL))


def test_models_are_immutable():
    p = parse_policy(toml(MINIMAL))
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        p.tenants["web"].default = "deny"


# --------------------------------------------------------------------------- environment


def env_policy(**netns: str) -> PolicyFile:
    lines = ["version = 1"]
    for name, value in netns.items():
        lines += [f"[tenants.{name}]", f"netns = {json.dumps(value)}"]
    return parse_policy("\n".join(lines) + "\n")


def test_check_environment_flags_missing_named_and_path_netns(tmp_path):
    policy = env_policy(host="host", named="blue", path=str(tmp_path / "nope"), real="/proc/self/ns/net")
    issues = check_environment(policy, netns_dir=str(tmp_path))
    assert [i.loc for i in issues] == ["tenants.named.netns", "tenants.path.netns"]
    assert f"{tmp_path}/blue does not exist" in issues[0].msg
    assert f"{tmp_path}/nope does not exist" in issues[1].msg


def test_check_environment_rejects_files_that_are_not_network_namespaces(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("")
    policy = env_policy(plain=str(plain), uts="/proc/self/ns/uts")
    issues = {i.loc: i.msg for i in check_environment(policy)}
    assert "not a namespace file" in issues["tenants.plain.netns"]
    assert "not a network namespace" in issues["tenants.uts.netns"]


def test_load_policy_check_env_reports_in_one_error(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('version = 1\n[tenants.a]\nnetns = "/nonexistent/graft-test-ns"\n')
    assert load_policy(f).tenants["a"].netns == "/nonexistent/graft-test-ns"  # default: no env check
    with pytest.raises(PolicyError) as info:
        load_policy(f, check_env=True)
    assert [i.loc for i in info.value.errors] == ["tenants.a.netns"]
    assert str(info.value).startswith(f"{f}: 1 error\n  tenants.a.netns: ")


def test_examples_with_host_netns_pass_the_environment_check():
    for path in EXAMPLE_FILES:
        policy = load_policy(path)
        if all(t.netns == "host" for t in policy.tenants.values()):
            assert check_environment(policy) == []


# --------------------------------------------------------------------------- summary and schema


def test_summary_lines():
    text = summarize(parse_policy((EXAMPLES / "web.toml").read_text()), "web.toml")
    lines = text.splitlines()
    assert lines[0] == "web.toml: OK (policy version 1, 1 tenant)"
    assert "  broker  socket_dir /run/graft  audit_log stderr  confinement auto" in lines
    assert "  audit  on_error drop" in lines
    assert any(
        line.split() == ["connect[0]", "graft", "tcp", "to", "127.0.0.1/32,::1/128", "ports", "5432,6379"]
        for line in lines
    )
    assert any(line.split()[:2] == ["connect[2]", "deny"] and "ports any" in line for line in lines)
    assert any(line.split()[0] == "bind[0]" and line.endswith("host 127.0.0.1:8080") for line in lines)
    assert any(line.split()[0] == "bind[1]" and "host 127.0.0.1 (app's port)" in line for line in lines)
    assert "uids any" in text and "max_sockets 4096" in text and "socket_mode 0660" in text
    assert len(lines) <= 40


def test_json_schema():
    schema = json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert "graft" in schema["title"]
    assert schema["required"] == ["version", "tenants"]
    tenant = schema["$defs"]["Tenant"]
    assert tenant["additionalProperties"] is False
    assert set(tenant["properties"]) == {
        "netns",
        "default",
        "mode",
        "socket_mode",
        "max_sockets",
        "max_rate",
        "uids",
        "socket_uid",
        "dns",
        "connect",
        "bind",
    }
    assert set(schema["$defs"]["DnsSettings"]["properties"]) == {
        "resolver",
        "upstream",
        "names",
        "on_refused",
        "min_ttl",
    }
    assert "null" not in json.dumps(schema)  # TOML has no null
    json.dumps(schema)  # serialisable


def test_tenant_name_with_a_trailing_newline_is_refused():
    """A socket file name must be exactly the validated name: `$` would admit "web\\n"."""
    with pytest.raises(PolicyError) as e:
        parse_policy('version = 1\n[tenants."web\\n"]\n')
    assert any(i.loc.startswith("tenants.") for i in e.value.errors)


def test_each_tenant_gets_a_socket_owner_of_its_own_by_default():
    p = parse_policy("version = 1\n[tenants.web]\n[tenants.api]\n[tenants.db]\nsocket_uid = 0\n")
    owners = {name: t.socket_owner(name) for name, t in p.tenants.items()}
    base = graft.policy.models.SOCKET_UID_BASE
    assert all(base <= owners[n] < base + (1 << 24) for n in ("web", "api")) and owners["web"] != owners["api"]
    assert owners["db"] == 0  # explicit: root-owned, as before
    # derived from the name alone: the same across restarts and reorderings of the file
    again = parse_policy("version = 1\n[tenants.api]\n[tenants.web]\n")
    assert {n: t.socket_owner(n) for n, t in again.tenants.items()} == {"api": owners["api"], "web": owners["web"]}
