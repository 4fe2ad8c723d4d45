"""The tenant key `mode` ("preload" | "seccomp"): validation, summary, schema, broker status.

Pure policy tests, plus one in-process broker (no root) for the status
document that the OCI runtime wrapper reads.
"""

from __future__ import annotations

import json
import socket
import textwrap

import pytest
import trio

from graft.broker.core.audit import AuditLog
from graft.broker.server import Broker
from graft.policy import PolicyError, json_schema, parse_policy, summarize


def policy(tenant_body: str, name: str = "web") -> str:
    return textwrap.dedent(f"""
        version = 1
        [tenants.{name}]
        {tenant_body}
    """)


def test_mode_defaults_to_preload():
    assert parse_policy(policy("")).tenants["web"].mode == "preload"


def test_seccomp_mode_parses():
    assert parse_policy(policy('mode = "seccomp"')).tenants["web"].mode == "seccomp"


@pytest.mark.parametrize(
    "value, words",
    [('"ptrace"', "'preload' or 'seccomp'"), ("1", "'preload' or 'seccomp'"), ('"Seccomp"', "'preload' or 'seccomp'")],
)
def test_bad_mode_is_refused_at_its_place(value, words):
    with pytest.raises(PolicyError) as e:
        parse_policy(policy(f"mode = {value}"), "p.toml")
    (issue,) = e.value.errors
    assert issue.loc == "tenants.web.mode"
    assert words in issue.msg


def test_the_seccomp_agent_socket_name_is_no_tenant_name():
    with pytest.raises(PolicyError) as e:
        parse_policy(policy("", name="seccomp"), "p.toml")
    (issue,) = e.value.errors
    assert issue.loc == "tenants.seccomp"
    assert "reserved" in issue.msg and "seccomp agent" in issue.msg


def test_summary_and_schema_show_the_mode():
    text = summarize(parse_policy(policy('mode = "seccomp"')), "p.toml")
    assert "mode seccomp" in text
    prop = json_schema()["$defs"]["Tenant"]["properties"]["mode"]
    assert prop["enum"] == ["preload", "seccomp"] and prop["default"] == "preload"


async def test_broker_status_carries_each_tenants_mode(nursery, short_tmp):
    text = textwrap.dedent("""
        version = 1
        [tenants.a]
        [tenants.b]
        mode = "seccomp"
    """)
    audit = AuditLog("off")
    broker = Broker(parse_policy(text), short_tmp / "sock", audit)
    await nursery.start(broker.run)
    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with s:
        await s.connect(str(short_tmp / "sock" / "_admin.sock"))
        chunks = []
        while chunk := await s.recv(65536):
            chunks.append(chunk)
    tenants = json.loads(b"".join(chunks))["tenants"]
    assert {name: t["mode"] for name, t in tenants.items()} == {"a": "preload", "b": "seccomp"}
