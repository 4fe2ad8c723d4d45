"""Fuzzing: random and mutated input never crashes the broker nor leaks an fd,
and random policy files only ever give clean validation errors.

The broker is a real graft-broker process; after every example a well-formed
request on a fresh connection must still be answered, and at the end the
broker's fd count is what it was before the fuzzing.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graft.broker.core import request
from graft.broker.shim import wire
from graft.policy import PolicyError, parse_policy
from support.harness import WireClient, echo_server, eventually

POLICY = """
version = 1
[tenants.t]
default = "deny"
[[tenants.t.connect]]
to = ["127.0.0.1/32"]
ports = [{port}]
"""

HEAVY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    """One broker for the module (its startup is not what is being fuzzed)."""
    import shutil
    import tempfile
    from pathlib import Path

    from support.harness import BrokerProcess

    d = Path(tempfile.mkdtemp(prefix="graft-fz-", dir="/tmp"))
    with echo_server() as port:
        broker = BrokerProcess(d, POLICY.format(port=port)).start()
        broker.idle_fds = broker_fds(broker)  # listener, audit log, trio's own: nothing per client
        good = wire.encode_request(
            request.OP_CONNECT, request.SockAddr(socket.AF_INET, ipaddress.ip_address("127.0.0.1"), port)
        )
        try:
            yield broker, good
        finally:
            rc = broker.stop()
            shutil.rmtree(d, ignore_errors=True)
            assert rc == 0, broker.stderr()


def broker_fds(broker) -> int:
    return len(os.listdir(f"/proc/{broker.proc.pid}/fd"))


def still_serves(broker, good: bytes) -> None:
    c = WireClient(broker.socket_path)
    try:
        c.send(good)
        rep, sock = c.reply()
        assert rep is not None and rep.verdict == wire.V_GRAFT, rep
        sock.close()
    finally:
        c.close()


def mutate(good: bytes, flips) -> bytes:
    raw = bytearray(good)
    for i, b in flips:
        raw[i % len(raw)] = b
    return bytes(raw)


messages = st.one_of(
    st.binary(max_size=2 * wire.REQUEST_SIZE),  # any length, any bytes
    st.lists(st.tuples(st.integers(0, wire.REQUEST_SIZE - 1), st.integers(0, 255)), max_size=16).map(
        lambda flips: ("mutate", flips)
    ),
    st.integers(wire.REQUEST_SIZE + 1, 64 * 1024).map(lambda n: b"\x54" * n),  # huge
)


@HEAVY
@given(st.lists(st.tuples(messages, st.booleans(), st.booleans()), min_size=1, max_size=4))
def test_random_and_mutated_requests(fuzz_target, script):
    """Each step sends one message, maybe with fds attached, maybe hanging up without reading."""
    broker, good = fuzz_target
    c = WireClient(broker.socket_path)
    pipe_r, pipe_w = os.pipe()
    try:
        for msg, with_fds, hang_up in script:
            raw = mutate(good, msg[1]) if isinstance(msg, tuple) else msg
            try:
                c.send(raw, [pipe_r, pipe_w] if with_fds else ())
            except OSError:
                break  # the broker closed this connection after an earlier bad message
            if hang_up:
                break
            try:
                rep, sock = c.reply()
            except OSError:
                break
            if sock is not None:
                sock.close()
            if rep is None:
                break
    finally:
        c.close()
        os.close(pipe_r)
        os.close(pipe_w)
    assert broker.proc.poll() is None, broker.stderr()
    still_serves(broker, good)


def test_fd_count_is_flat_after_abuse(fuzz_target):
    """After the fuzzer, bad requests with fds attached, and clients that vanish,
    the broker's fds return to what it held idle at start."""
    broker, good = fuzz_target
    for _ in range(200):
        c = WireClient(broker.socket_path)
        c.send(mutate(good, [(12, 99)]), [0])  # bogus type, plus a passed fd
        c.reply()
        c.close()
        c = WireClient(broker.socket_path)
        c.send(good)
        c.close()  # gone before the reply
    still_serves(broker, good)
    # The broker closes each connection when it sees the client's hang-up,
    # asynchronously: wait for that, bounded.
    assert eventually(lambda: broker_fds(broker) <= broker.idle_fds), (broker_fds(broker), broker.idle_fds)


# ---- random policy files ------------------------------------------------------------

toml_scalars = st.one_of(
    st.integers(-(2**40), 2**40),
    st.text(max_size=20),
    st.booleans(),
    st.sampled_from(
        [
            "127.0.0.1/32",
            "::/0",
            "10.0.0.0/8",
            "8000-8100",
            "9-3",
            "graft",
            "deny",
            "container",
            "tcp",
            "udp",
            "any",
            "0666",
            "host",
            "127.0.0.1:8080",
            "[::1]:80",
            "/run/graft",
            "stderr",
            "auto",
        ]
    ),
)
keys = st.sampled_from(
    [
        "version",
        "broker",
        "tenants",
        "socket_dir",
        "audit_log",
        "confinement",
        "netns",
        "default",
        "socket_mode",
        "max_sockets",
        "uids",
        "connect",
        "bind",
        "to",
        "ports",
        "proto",
        "action",
        "addr",
        "host",
        "web",
        "db",
        "x",
    ]
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=25,
)


def to_toml(d: dict, prefix: str = "") -> str:
    """A small TOML writer: enough for dicts of scalars, lists and tables."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').encode("unicode_escape").decode() + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return "{" + ", ".join(f'"{k}" = {value(x)}' for k, x in v.items()) + "}"

    return "".join(f'"{k}" = {value(v)}\n' for k, v in d.items())


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(keys, toml_values, max_size=6))
def test_random_policies_give_clean_errors(doc):
    text = to_toml(doc)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return  # our tiny writer produced something TOML rejects: not what is tested
    try:
        parse_policy(text)
    except PolicyError as e:
        assert e.errors and all(i.loc and i.msg for i in e.errors)
        assert "Traceback" not in str(e) and "pydantic" not in str(e).lower()
