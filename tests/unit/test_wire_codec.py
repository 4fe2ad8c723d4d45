"""The wire codec: pure tests, no sockets; plus one check against the C compiler."""

from __future__ import annotations

import errno
import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graft.broker.core import request
from graft.broker.shim import wire
from graft.shim import WIRE_HEADER
from support.c_layout import layouts

V4 = request.SockAddr(socket.AF_INET, ipaddress.ip_address("10.1.2.3"), 5432)
V6 = request.SockAddr(socket.AF_INET6, ipaddress.ip_address("fd00::1"), 443, flowinfo=7, scope_id=3)


def test_cffi_layout_is_the_c_compilers(tmp_path):
    """cffi's idea of the structs equals what cc compiles libgraft.so with."""
    structs = ["struct graft_request", "struct graft_reply", "struct graft_sockopt"]
    from_c, from_cffi = layouts(request.ffi, WIRE_HEADER, structs, tmp_path)
    assert from_cffi == from_c
    assert len(from_c["struct graft_request"][1]) == 11  # every field of the request, not a subset


@pytest.mark.parametrize("addr", [V4, V6])
def test_request_round_trip(addr):
    opts = (request.SockOpt(socket.SOL_SOCKET, socket.SO_REUSEADDR, (1).to_bytes(4, "little")),)
    raw = wire.encode_request(request.OP_BIND, addr, type=socket.SOCK_DGRAM, protocol=socket.IPPROTO_UDP, opts=opts)
    req = wire.decode_request(raw)
    assert (req.op_name, req.proto, req.family, req.addr, req.opts) == ("bind", "udp", addr.family, addr, opts)


def test_reply_round_trip():
    rep = wire.decode_reply(wire.encode_reply(wire.V_GRAFT, errno.EINPROGRESS, V6))
    assert (rep.verdict, rep.error, rep.addr) == (wire.V_GRAFT, errno.EINPROGRESS, V6)
    assert wire.decode_reply(wire.encode_reply(wire.V_DENY, errno.EPERM)).addr is None


def _mutate(raw: bytes, field: str, value) -> bytes:
    buf = wire.ffi.new("struct graft_request *")
    wire.ffi.memmove(buf, raw, len(raw))
    setattr(buf, field, value)
    return bytes(wire.ffi.buffer(buf))


GOOD = wire.encode_request(request.OP_CONNECT, V4)
PREISSUE = wire.encode_request(request.OP_PREISSUE, None, family=socket.AF_INET6)


GRANT = wire.encode_request(
    request.OP_GRANT,
    request.SockAddr(socket.AF_INET, ipaddress.ip_address("127.0.0.1"), 53),
    type=socket.SOCK_DGRAM,
    flags=request.REQF_SENDTO,
)


def test_grant_request_is_judged_as_its_sendto():
    req = wire.decode_request(GRANT)
    assert (req.op_name, req.judged_as, req.type, req.flags, req.addr.port) == (
        "grant",
        "connect",
        socket.SOCK_DGRAM,
        request.REQF_SENDTO,
        53,
    )


def test_preissue_request_names_only_the_socket():
    req = wire.decode_request(PREISSUE)
    assert (req.op_name, req.family, req.type, req.protocol, req.addr, req.opts) == (
        "preissue",
        socket.AF_INET6,
        socket.SOCK_STREAM,
        0,
        None,
        (),
    )


def test_a_preissue_request_may_say_how_many_sockets_it_wants():
    assert wire.decode_request(PREISSUE).wanted == request.PREISSUE_MAX  # unsaid: as many as may be issued
    for want in (1, 4, request.PREISSUE_MAX):
        raw = _mutate(PREISSUE, "flags", want << request.PREISSUE_WANT_SHIFT)
        assert wire.decode_request(raw).wanted == want


@pytest.mark.parametrize(
    "raw, err",
    [
        (b"", errno.EBADMSG),
        (GOOD[:-1], errno.EBADMSG),
        (GOOD + b"\0", errno.EBADMSG),
        (bytes(len(GOOD)), errno.EBADMSG),  # all zeroes: bad magic
        (_mutate(GOOD, "version", 99), errno.EPROTO),
        (_mutate(GOOD, "op", 7), errno.EOPNOTSUPP),
        (_mutate(GOOD, "family", socket.AF_UNIX), errno.EAFNOSUPPORT),
        (_mutate(GOOD, "family", socket.AF_INET6), errno.EAFNOSUPPORT),  # v4 address on a v6 socket
        (_mutate(GOOD, "type", socket.SOCK_RAW), errno.ESOCKTNOSUPPORT),
        (_mutate(GOOD, "protocol", socket.IPPROTO_UDP), errno.EPROTONOSUPPORT),
        (_mutate(GOOD, "flags", 0x80), errno.EINVAL),
        (_mutate(GOOD, "flags", request.REQF_SENDTO), errno.EINVAL),  # sendto on a TCP socket
        (_mutate(GOOD, "addr_len", 0), errno.EINVAL),
        (_mutate(GOOD, "addr_len", 4), errno.EINVAL),
        (_mutate(GOOD, "addr_len", wire.ADDR_MAX + 1), errno.EINVAL),
        (_mutate(GOOD, "n_opts", wire.MAX_OPTS + 1), errno.EINVAL),
        (_mutate(PREISSUE, "type", socket.SOCK_DGRAM), errno.ESOCKTNOSUPPORT),  # TCP only
        (_mutate(PREISSUE, "addr_len", 16), errno.EINVAL),
        (_mutate(PREISSUE, "n_opts", 1), errno.EINVAL),
        (_mutate(PREISSUE, "flags", request.REQF_SENDTO), errno.EINVAL),
        (_mutate(PREISSUE, "flags", (request.PREISSUE_MAX + 1) << request.PREISSUE_WANT_SHIFT), errno.EINVAL),
        (_mutate(GOOD, "flags", 4 << request.PREISSUE_WANT_SHIFT), errno.EINVAL),  # a count only on a preissue
        (_mutate(PREISSUE, "family", socket.AF_UNIX), errno.EAFNOSUPPORT),
        (_mutate(GRANT, "type", socket.SOCK_STREAM), errno.EINVAL),  # UDP only
        (_mutate(GRANT, "flags", 0), errno.EINVAL),  # as a sendto
        (_mutate(GRANT, "n_opts", 1), errno.EINVAL),  # nothing to set on a socket already made
        (_mutate(GRANT, "addr_len", 0), errno.EINVAL),
    ],
)
def test_bad_requests_are_refused_with_an_errno(raw, err):
    with pytest.raises(request.BadRequest) as e:
        wire.decode_request(raw)
    assert e.value.errno == err


def test_oversized_option_is_refused():
    raw = wire.encode_request(request.OP_CONNECT, V4, opts=(request.SockOpt(1, 2, b"\1\0\0\0"),))
    buf = wire.ffi.new("struct graft_request *")
    wire.ffi.memmove(buf, raw, len(raw))
    buf.opts[0].len = wire.OPT_VAL_MAX + 1
    with pytest.raises(request.BadRequest) as e:
        wire.decode_request(bytes(wire.ffi.buffer(buf)))
    assert e.value.errno == errno.EINVAL


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(4, len(GOOD) - 1), st.integers(0, 255)), max_size=12))
def test_mutated_requests_decode_or_raise_wire_error_only(flips):
    """Past a valid magic, any bytes either decode to a valid request or raise WireError."""
    raw = bytearray(GOOD)
    for i, b in flips:
        raw[i] = b
    try:
        req = wire.decode_request(bytes(raw))
    except request.BadRequest:
        return
    assert req.op in request.OP_NAMES and req.addr.family == req.family
