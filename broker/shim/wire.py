"""The shim <-> broker wire codec: pure functions, no sockets.

The layout comes from shim/graft_wire.h (read once, by core/request.py), the one C header libgraft.so is
compiled against: cffi parses the header's WIRE-BEGIN..WIRE-END region, so
the struct sizes, field offsets and constants here are the C compiler's own
and the two sides cannot drift apart. Everything that arrives is untrusted:
``decode_request`` validates every field and raises ``BadRequest`` carrying
the errno the broker answers with.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from ..core.request import (
    OP_CONNECT,
    OP_GRANT,
    OP_NAMES,
    OP_PREISSUE,
    OP_RESOLVER,
    PREISSUE_MAX,
    PREISSUE_WANT_MASK,
    REQF_SENDTO,
    SOCKADDR_SIZE,
    BadRequest,
    Request,
    SockAddr,
    SockOpt,
    decode_sockaddr,
    encode_sockaddr,
    ffi,
)

_lib = ffi.dlopen(None)  # only for the #define and enum constants; no symbols are called

MAGIC = _lib.GRAFT_WIRE_MAGIC
VERSION = _lib.GRAFT_WIRE_VERSION
MAX_OPTS = _lib.GRAFT_MAX_OPTS
OPT_VAL_MAX = _lib.GRAFT_OPT_VAL_MAX
ADDR_MAX = _lib.GRAFT_ADDR_MAX
V_GRAFT = _lib.GRAFT_V_GRAFT
V_CONTAINER = _lib.GRAFT_V_CONTAINER
V_DENY = _lib.GRAFT_V_DENY
V_ERROR = _lib.GRAFT_V_ERROR

REQUEST_SIZE = ffi.sizeof("struct graft_request")
REPLY_SIZE = ffi.sizeof("struct graft_reply")

_KNOWN_FLAGS = REQF_SENDTO | PREISSUE_WANT_MASK
# What socket(2) accepts as protocol for each type: 0 means the default.
_PROTOCOLS = {
    socket.SOCK_STREAM: (0, socket.IPPROTO_TCP),
    socket.SOCK_DGRAM: (0, socket.IPPROTO_UDP),
}


def decode_request(data: bytes) -> Request:
    """Validate and parse one request message; raise BadRequest if it is bad."""
    if len(data) != REQUEST_SIZE:
        raise BadRequest(errno.EBADMSG, f"request of {len(data)} bytes, expected {REQUEST_SIZE}")
    req = ffi.cast("struct graft_request *", ffi.from_buffer(data))
    if req.magic != MAGIC:
        raise BadRequest(errno.EBADMSG, f"bad magic {req.magic:#x}")
    if req.version != VERSION:
        raise BadRequest(errno.EPROTO, f"wire version {req.version}, broker speaks {VERSION}")
    if req.op not in OP_NAMES:
        raise BadRequest(errno.EOPNOTSUPP, f"unknown op {req.op}")
    if req.family not in SOCKADDR_SIZE:
        raise BadRequest(errno.EAFNOSUPPORT, f"socket family {req.family} is not AF_INET/AF_INET6")
    if req.type not in _PROTOCOLS:
        raise BadRequest(errno.ESOCKTNOSUPPORT, f"socket type {req.type} is not SOCK_STREAM/SOCK_DGRAM")
    if req.protocol not in _PROTOCOLS[req.type]:
        raise BadRequest(errno.EPROTONOSUPPORT, f"protocol {req.protocol} does not fit socket type {req.type}")
    if req.flags & ~_KNOWN_FLAGS:
        raise BadRequest(errno.EINVAL, f"unknown flags {req.flags:#x}")
    if req.flags & PREISSUE_WANT_MASK and req.op != OP_PREISSUE:
        raise BadRequest(errno.EINVAL, "only a preissue request says how many sockets it wants")
    if req.flags & REQF_SENDTO and (req.op not in (OP_CONNECT, OP_GRANT) or req.type != socket.SOCK_DGRAM):
        raise BadRequest(errno.EINVAL, "the sendto flag needs a UDP connect")
    if req.op == OP_GRANT and (req.type != socket.SOCK_DGRAM or not req.flags & REQF_SENDTO or req.n_opts):
        raise BadRequest(errno.EINVAL, "a grant request names a UDP destination with the sendto flag and no options")
    if req.op == OP_RESOLVER:
        if req.type != socket.SOCK_DGRAM or req.flags or req.addr_len or req.n_opts:
            raise BadRequest(errno.EINVAL, "a resolver request is UDP and names no flags, address or options")
        return Request(req.op, req.family, req.type, req.protocol, 0, None, ())
    if req.op == OP_PREISSUE:
        if req.type != socket.SOCK_STREAM:
            raise BadRequest(errno.ESOCKTNOSUPPORT, "only TCP sockets are pre-issued")
        if req.flags & ~PREISSUE_WANT_MASK or req.addr_len or req.n_opts:
            raise BadRequest(errno.EINVAL, "a preissue request names no flags but its count, no address or options")
        preissue = Request(req.op, req.family, req.type, req.protocol, req.flags, None, ())
        if preissue.wanted > PREISSUE_MAX:
            raise BadRequest(errno.EINVAL, f"a preissue request wants {preissue.wanted}, at most {PREISSUE_MAX}")
        return preissue
    if not 0 < req.addr_len <= ADDR_MAX:
        raise BadRequest(errno.EINVAL, f"addr_len {req.addr_len} out of range")
    addr = decode_sockaddr(bytes(ffi.buffer(req.addr, req.addr_len)))
    if addr.family != req.family:
        # The kernel refuses an AF_INET address on an AF_INET6 socket for
        # bind and connect (v4 peers of a v6 socket are v4-mapped); so do we.
        raise BadRequest(errno.EAFNOSUPPORT, "address family does not match the socket")
    if req.n_opts > MAX_OPTS:
        raise BadRequest(errno.EINVAL, f"{req.n_opts} socket options, at most {MAX_OPTS}")
    opts = []
    for i in range(req.n_opts):
        o = req.opts[i]
        if o.len > OPT_VAL_MAX:
            raise BadRequest(errno.EINVAL, f"socket option {i} has length {o.len}")
        opts.append(SockOpt(o.level, o.name, bytes(ffi.buffer(o.val, o.len))))
    return Request(req.op, req.family, req.type, req.protocol, req.flags, addr, tuple(opts))


def encode_request(
    op: int,
    addr: SockAddr | None,
    *,
    type: int = socket.SOCK_STREAM,
    protocol: int = 0,
    family: int | None = None,
    flags: int = 0,
    opts: tuple[SockOpt, ...] = (),
) -> bytes:
    """Build a request as the shim would; used by tests and benchmarks."""
    req = ffi.new("struct graft_request *")
    req.magic, req.version, req.op = MAGIC, VERSION, op
    if family is None:
        assert addr is not None, "a request with no address names its family"
        family = addr.family
    req.family = family
    req.type, req.protocol, req.flags = type, protocol, flags
    raw = encode_sockaddr(addr) if addr is not None else b""
    req.addr_len = len(raw)
    ffi.memmove(req.addr, raw, len(raw))
    req.n_opts = len(opts)
    for i, o in enumerate(opts):
        req.opts[i].level, req.opts[i].name, req.opts[i].len = o.level, o.name, len(o.value)
        ffi.memmove(req.opts[i].val, o.value, len(o.value))
    return bytes(ffi.buffer(req))


def encode_reply(verdict: int, error: int = 0, addr: SockAddr | None = None) -> bytes:
    rep = ffi.new("struct graft_reply *")
    rep.magic, rep.version, rep.verdict, rep.error = MAGIC, VERSION, verdict, error
    if addr is not None:
        raw = encode_sockaddr(addr)
        rep.addr_len = len(raw)
        ffi.memmove(rep.addr, raw, len(raw))
    return bytes(ffi.buffer(rep))


@dataclass(frozen=True, slots=True)
class Reply:
    verdict: int
    error: int
    addr: SockAddr | None


def decode_reply(data: bytes) -> Reply:
    """Parse a reply as the shim would; used by tests and benchmarks."""
    if len(data) != REPLY_SIZE:
        raise BadRequest(errno.EBADMSG, f"reply of {len(data)} bytes, expected {REPLY_SIZE}")
    rep = ffi.cast("struct graft_reply *", ffi.from_buffer(data))
    if rep.magic != MAGIC or rep.version != VERSION:
        raise BadRequest(errno.EBADMSG, "bad reply header")
    addr = decode_sockaddr(bytes(ffi.buffer(rep.addr, rep.addr_len))) if rep.addr_len else None
    return Reply(rep.verdict, rep.error, addr)
