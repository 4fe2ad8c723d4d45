"""core/audit.Record: the fixed fields, in their order, and a reason only when there is one."""

from __future__ import annotations

import json

from graft.broker.core.audit import Record

FIELDS = [
    "ts",
    "tenant",
    "pid",
    "uid",
    "op",
    "proto",
    "family",
    "addr",
    "port",
    "host_addr",
    "action",
    "rule",
    "errno",
    "confinement",
    "via",
]


def record(**kw) -> Record:
    base = dict(
        tenant="t",
        pid=1,
        uid=2,
        op="connect",
        proto="tcp",
        family="inet",
        addr="10.0.0.1",
        port=80,
        host_addr=None,
        action="graft",
        rule="tenants.t.connect[0]",
        errno=0,
        confinement="on",
        via="shim",
    )
    return Record(**(base | kw))


def test_a_record_is_one_json_line_with_the_fixed_fields_in_order():
    line = record().to_json("2026-12-06T00:00:00.000000+00:00")
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert list(json.loads(line)) == FIELDS


def test_a_reason_is_written_only_when_there_is_one():
    assert "reason" not in json.loads(record(reason=None).to_json("T"))
    assert "reason" not in json.loads(record(reason="").to_json("T"))
    assert json.loads(record(action="error", reason="socket(): EMFILE").to_json("T"))["reason"] == "socket(): EMFILE"
