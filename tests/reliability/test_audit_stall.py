"""An audit log nobody reads: the broker never blocks on it, and [audit] on_error decides the cost.

The broker's stderr is a pipe the test does not read, and the audit log
goes there. A broker that wrote with a blocking write(2) would stop dead
once the pipe (64 KiB) is full, every tenant with it; this one keeps
answering. With on_error = "drop" every request is still granted and the
records that find no room are counted as lost; with "deny" a request whose
record cannot be taken is refused with EPERM, and granted again once the
reader catches up. graft status shows both.
"""

from __future__ import annotations

import json
import os
import threading

import pytest

from graft.broker.shim import wire
from graft.brokerstatus import read_status
from support.harness import BrokerProcess, WireClient, connect_request, eventually, need_root_and_netns

pytestmark = pytest.mark.netns

# About 250 bytes of record each: twice what the pipe and the broker's 1 MiB of waiting room hold.
REQUESTS = 8000


def policy(on_error: str) -> str:
    audit = "" if on_error == "drop" else f'[audit]\non_error = "{on_error}"\n'  # "drop": the default
    return f"""version = 1
[broker]
confinement = "off"
{audit}[tenants.t]
default = "deny"
max_sockets = 100000
[[tenants.t.connect]]
to = ["127.0.0.1/32"]
ports = [9]
proto = "udp"
"""


class StalledBroker:
    """A broker whose stderr (and audit log) is a pipe; drain() starts reading it."""

    def __init__(self, tmp, on_error: str):
        self.read_fd, write_fd = os.pipe()
        self.broker = BrokerProcess(tmp, policy(on_error), stderr_fd=write_fd)
        try:
            self.broker.start("--audit-log", "stderr")
        finally:
            os.close(write_fd)
        self.lines: list[bytes] = []
        self._reader: threading.Thread | None = None

    def ask(self, client: WireClient, n: int) -> list[tuple[int, int]]:
        """n UDP connect grafts: (verdict, errno) of each; every one must be answered (10 s each at most)."""
        out = []
        for _ in range(n):
            client.send(connect_request(9, udp=True))
            reply, sock = client.reply()
            if sock is not None:
                sock.close()
            out.append((reply.verdict, reply.error))
        return out

    def drain(self) -> None:
        def read():
            buf = b""
            while chunk := os.read(self.read_fd, 65536):
                buf += chunk
            self.lines = buf.splitlines()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    def audit_status(self) -> dict:
        return read_status(self.broker.socket_dir)["audit"]

    def drained(self) -> bool:
        """Whether the broker's waiting records all reach the reader (drain() started) within 30 s.

        Polled gently: each status costs the broker a socket dump (no confinement here), and a
        broker busy answering a poll every few milliseconds on a loaded machine can miss the
        admin socket's own deadline.
        """
        return eventually(lambda: self.audit_status()["waiting_bytes"] == 0, timeout=30, interval=0.2)

    def close(self) -> int:
        if self._reader is None:
            self.drain()  # a stopping broker must not wait on the pipe either
        rc = self.broker.stop()
        self._reader.join(timeout=30)
        os.close(self.read_fd)
        return rc


def records(lines: list[bytes]) -> list[dict]:
    return [json.loads(line) for line in lines if line.startswith(b"{")]


def test_a_stalled_audit_reader_costs_records_never_the_broker(short_tmp):
    need_root_and_netns()
    stalled = StalledBroker(short_tmp / "b", "drop")
    try:
        client = WireClient(stalled.broker.socket_path)
        try:
            answers = stalled.ask(client, REQUESTS)
        finally:
            client.close()
        assert answers == [(wire.V_GRAFT, 0)] * REQUESTS
        status = stalled.audit_status()
        assert status["on_error"] == "drop" and status["lost"] > 0 and status["refused"] == 0, status
        assert status["waiting_bytes"] > 0, status
        stalled.drain()
        assert stalled.drained()
    finally:
        assert stalled.close() == 0
    # what was recorded is whole lines, in order, and all of it reached the reader
    got = records(stalled.lines)
    assert len(got) == REQUESTS - status["lost"] and all(r["action"] == "graft" for r in got)
    assert [r["ts"] for r in got] == sorted(r["ts"] for r in got)


def test_with_on_error_deny_what_cannot_be_recorded_is_refused(short_tmp):
    need_root_and_netns()
    stalled = StalledBroker(short_tmp / "b", "deny")
    try:
        client = WireClient(stalled.broker.socket_path)
        try:
            answers = stalled.ask(client, REQUESTS)
            granted = answers.index((wire.V_DENY, 1))  # EPERM from here on: no room for the record
            assert granted > 0 and answers == [(wire.V_GRAFT, 0)] * granted + [(wire.V_DENY, 1)] * (REQUESTS - granted)
            status = stalled.audit_status()
            assert status["refused"] == REQUESTS - granted and status["on_error"] == "deny", status
            stalled.drain()
            assert stalled.drained()
            assert stalled.ask(client, 1) == [(wire.V_GRAFT, 0)]  # the reader caught up: granted again
        finally:
            client.close()
    finally:
        assert stalled.close() == 0
    got = records(stalled.lines)
    assert [r["action"] for r in got] == ["graft"] * (granted + 1)
