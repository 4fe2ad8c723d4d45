"""The shim <-> broker wire codec: pure functions, no sockets.

The layout comes from shim/graft_wire.h, the one C header libgraft.so is
compiled against: cffi parses the header's WIRE-BEGIN..WIRE-END region, so
the struct sizes, field offsets and constants here are the C compiler's own
and the two sides cannot drift apart. Everything that arrives is untrusted:
``decode_request`` validates every field and raises ``WireError`` carrying
the errno the broker answers with.
"""
from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass

from graft.shim import WIRE_HEADER

from .cheader import ffi_of

ffi = ffi_of(WIRE_HEADER, "WIRE")
_lib = ffi.dlopen(None)  # only for the #define and enum constants; no symbols are called

MAGIC = _lib.GRAFT_WIRE_MAGIC
VERSION = _lib.GRAFT_WIRE_VERSION
MAX_OPTS = _lib.GRAFT_MAX_OPTS
OPT_VAL_MAX = _lib.GRAFT_OPT_VAL_MAX
ADDR_MAX = _lib.GRAFT_ADDR_MAX
OP_CONNECT = _lib.GRAFT_OP_CONNECT
OP_BIND = _lib.GRAFT_OP_BIND
OP_PREISSUE = _lib.GRAFT_OP_PREISSUE
OP_GRANT = _lib.GRAFT_OP_GRANT
PREISSUE_MAX = _lib.GRAFT_PREISSUE_MAX
REQF_SENDTO = _lib.GRAFT_REQF_SENDTO
V_GRAFT = _lib.GRAFT_V_GRAFT
V_CONTAINER = _lib.GRAFT_V_CONTAINER
V_DENY = _lib.GRAFT_V_DENY
V_ERROR = _lib.GRAFT_V_ERROR

REQUEST_SIZE = ffi.sizeof("struct graft_request")
REPLY_SIZE = ffi.sizeof("struct graft_reply")

OP_NAMES = {OP_CONNECT: "connect", OP_BIND: "bind", OP_PREISSUE: "preissue", OP_GRANT: "grant"}
_KNOWN_FLAGS = REQF_SENDTO
_PROTO_BY_TYPE = {socket.SOCK_STREAM: "tcp", socket.SOCK_DGRAM: "udp"}
# What socket(2) accepts as protocol for each type: 0 means the default.
_PROTOCOLS = {
    socket.SOCK_STREAM: (0, socket.IPPROTO_TCP),
    socket.SOCK_DGRAM: (0, socket.IPPROTO_UDP),
}
_SOCKADDR_SIZE = {socket.AF_INET: 16, socket.AF_INET6: 28}
FLOWLABEL_MASK = 0xFFFFF
_FAMILY_NAMES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class WireError(Exception):
    """A request that cannot be served; ``errno`` goes back in the reply."""

    def __init__(self, err: int, reason: str):
        super().__init__(reason)
        self.errno = err
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SockAddr:
    """An IPv4 or IPv6 socket address; flowinfo and scope_id only for IPv6."""

    family: int
    ip: IPAddress
    port: int
    flowinfo: int = 0
    scope_id: int = 0

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.family == socket.AF_INET6 else f"{self.ip}:{self.port}"

    def to_python(self) -> tuple:
        """The address tuple Python's socket module takes for this family."""
        if self.family == socket.AF_INET6:
            return (str(self.ip), self.port, self.flowinfo, self.scope_id)
        return (str(self.ip), self.port)


@dataclass(frozen=True, slots=True)
class SockOpt:
    level: int
    name: int
    value: bytes


@dataclass(frozen=True, slots=True)
class Request:
    op: int
    family: int
    type: int
    protocol: int
    flags: int
    addr: SockAddr | None  # None for PREISSUE, which names no address
    opts: tuple[SockOpt, ...]

    @property
    def op_name(self) -> str:
        return OP_NAMES[self.op]

    @property
    def judged_as(self) -> str:
        """Which rules judge it: "bind", or "connect" (a GRANT is judged as its sendto's connect)."""
        return "bind" if self.op == OP_BIND else "connect"

    @property
    def proto(self) -> str:
        return _PROTO_BY_TYPE[self.type]

    @property
    def family_name(self) -> str:
        return _FAMILY_NAMES[self.family]


def family_name(family: int) -> str:
    return _FAMILY_NAMES.get(family, str(family))


def decode_sockaddr(raw: bytes) -> SockAddr:
    """Parse struct sockaddr_in/sockaddr_in6 bytes (sa_family in host order)."""
    if len(raw) < 2:
        raise WireError(errno.EINVAL, "address too short")
    (family,) = struct.unpack_from("=H", raw)
    want = _SOCKADDR_SIZE.get(family)
    if want is None:
        raise WireError(errno.EAFNOSUPPORT, f"address family {family} is not AF_INET/AF_INET6")
    if len(raw) < want:
        raise WireError(errno.EINVAL, f"address of {len(raw)} bytes is too short for {family_name(family)}")
    if family == socket.AF_INET:
        port, packed = struct.unpack_from("!H4s", raw, 2)
        return SockAddr(family, ipaddress.IPv4Address(packed), port)
    port, flowinfo, packed, scope_id = struct.unpack_from("!HI16s", raw, 2) + struct.unpack_from("=I", raw, 24)
    # Only the 20-bit flow label is an address property (the traffic class
    # bits above it are not, and the kernel ignores both for connect and
    # bind unless IPV6_FLOWINFO_SEND is set); apps often leave it garbage.
    return SockAddr(family, ipaddress.IPv6Address(packed), port, flowinfo & FLOWLABEL_MASK, scope_id)


def encode_sockaddr(addr: SockAddr) -> bytes:
    if addr.family == socket.AF_INET:
        return struct.pack("=H", addr.family) + struct.pack("!H4s", addr.port, addr.ip.packed) + bytes(8)
    return (
        struct.pack("=H", addr.family)
        + struct.pack("!HI16s", addr.port, addr.flowinfo, addr.ip.packed)
        + struct.pack("=I", addr.scope_id)
    )


def decode_request(data: bytes) -> Request:
    """Validate and parse one request message; raise WireError if it is bad."""
    if len(data) != REQUEST_SIZE:
        raise WireError(errno.EBADMSG, f"request of {len(data)} bytes, expected {REQUEST_SIZE}")
    req = ffi.cast("struct graft_request *", ffi.from_buffer(data))
    if req.magic != MAGIC:
        raise WireError(errno.EBADMSG, f"bad magic {req.magic:#x}")
    if req.version != VERSION:
        raise WireError(errno.EPROTO, f"wire version {req.version}, broker speaks {VERSION}")
    if req.op not in OP_NAMES:
        raise WireError(errno.EOPNOTSUPP, f"unknown op {req.op}")
    if req.family not in _SOCKADDR_SIZE:
        raise WireError(errno.EAFNOSUPPORT, f"socket family {req.family} is not AF_INET/AF_INET6")
    if req.type not in _PROTOCOLS:
        raise WireError(errno.ESOCKTNOSUPPORT, f"socket type {req.type} is not SOCK_STREAM/SOCK_DGRAM")
    if req.protocol not in _PROTOCOLS[req.type]:
        raise WireError(errno.EPROTONOSUPPORT, f"protocol {req.protocol} does not fit socket type {req.type}")
    if req.flags & ~_KNOWN_FLAGS:
        raise WireError(errno.EINVAL, f"unknown flags {req.flags:#x}")
    if req.flags & REQF_SENDTO and (req.op not in (OP_CONNECT, OP_GRANT) or req.type != socket.SOCK_DGRAM):
        raise WireError(errno.EINVAL, "the sendto flag needs a UDP connect")
    if req.op == OP_GRANT and (req.type != socket.SOCK_DGRAM or not req.flags & REQF_SENDTO or req.n_opts):
        raise WireError(errno.EINVAL, "a grant request names a UDP destination with the sendto flag and no options")
    if req.op == OP_PREISSUE:
        if req.type != socket.SOCK_STREAM:
            raise WireError(errno.ESOCKTNOSUPPORT, "only TCP sockets are pre-issued")
        if req.flags or req.addr_len or req.n_opts:
            raise WireError(errno.EINVAL, "a preissue request names no flags, address or options")
        return Request(req.op, req.family, req.type, req.protocol, 0, None, ())
    if not 0 < req.addr_len <= ADDR_MAX:
        raise WireError(errno.EINVAL, f"addr_len {req.addr_len} out of range")
    addr = decode_sockaddr(bytes(ffi.buffer(req.addr, req.addr_len)))
    if addr.family != req.family:
        # The kernel refuses an AF_INET address on an AF_INET6 socket for
        # bind and connect (v4 peers of a v6 socket are v4-mapped); so do we.
        raise WireError(errno.EAFNOSUPPORT, "address family does not match the socket")
    if req.n_opts > MAX_OPTS:
        raise WireError(errno.EINVAL, f"{req.n_opts} socket options, at most {MAX_OPTS}")
    opts = []
    for i in range(req.n_opts):
        o = req.opts[i]
        if o.len > OPT_VAL_MAX:
            raise WireError(errno.EINVAL, f"socket option {i} has length {o.len}")
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
        raise WireError(errno.EBADMSG, f"reply of {len(data)} bytes, expected {REPLY_SIZE}")
    rep = ffi.cast("struct graft_reply *", ffi.from_buffer(data))
    if rep.magic != MAGIC or rep.version != VERSION:
        raise WireError(errno.EBADMSG, "bad reply header")
    addr = decode_sockaddr(bytes(ffi.buffer(rep.addr, rep.addr_len))) if rep.addr_len else None
    return Reply(rep.verdict, rep.error, addr)
