"""The request both front-ends hand to the decision: pure data, no I/O.

A bind or connect of a grafted program arrives as a shim message
(shim/wire.py) or as a stopped system call (seccomp/agent.py); either way it
becomes a ``Request`` here, and core/ judges and carries out nothing else.
The op codes and flags are graft_wire.h's (cffi reads its WIRE region, so C
and Python share one definition); the shim's message layout, in the same
region, is shim/wire.py's, which takes ``ffi`` from here.

``decode_sockaddr`` reads a struct sockaddr from untrusted bytes (a shim
message, or a stopped program's memory) and raises ``BadRequest``.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass

from graft.shim import WIRE_HEADER

from ..io.cheader import ffi_of

ffi = ffi_of(WIRE_HEADER, "WIRE")
_lib = ffi.dlopen(None)  # only for the #define and enum constants; no symbols are called

OP_CONNECT = _lib.GRAFT_OP_CONNECT
OP_BIND = _lib.GRAFT_OP_BIND
OP_PREISSUE = _lib.GRAFT_OP_PREISSUE
OP_GRANT = _lib.GRAFT_OP_GRANT
OP_RESOLVER = _lib.GRAFT_OP_RESOLVER
PREISSUE_MAX = _lib.GRAFT_PREISSUE_MAX  # TCP sockets handed out ahead of their connects
REQF_SENDTO = _lib.GRAFT_REQF_SENDTO
PREISSUE_WANT_SHIFT = _lib.GRAFT_PREISSUE_WANT_SHIFT
PREISSUE_WANT_MASK = _lib.GRAFT_PREISSUE_WANT_MASK

OP_NAMES = {OP_CONNECT: "connect", OP_BIND: "bind", OP_PREISSUE: "preissue", OP_GRANT: "grant", OP_RESOLVER: "resolver"}
_PROTO_BY_TYPE = {socket.SOCK_STREAM: "tcp", socket.SOCK_DGRAM: "udp"}
SOCKADDR_SIZE = {socket.AF_INET: 16, socket.AF_INET6: 28}
FLOWLABEL_MASK = 0xFFFFF
_FAMILY_NAMES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BadRequest(Exception):
    """A request that cannot be served as it was read; ``errno`` is what its caller gets."""

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
    def wanted(self) -> int:
        """A PREISSUE's sockets wanted: what its flags say (graft_wire.h), or as many as may be issued."""
        return (self.flags & PREISSUE_WANT_MASK) >> PREISSUE_WANT_SHIFT or PREISSUE_MAX

    @property
    def family_name(self) -> str:
        return _FAMILY_NAMES[self.family]


def family_name(family: int) -> str:
    return _FAMILY_NAMES.get(family, str(family))


def decode_sockaddr(raw: bytes) -> SockAddr:
    """Parse struct sockaddr_in/sockaddr_in6 bytes (sa_family in host order)."""
    if len(raw) < 2:
        raise BadRequest(errno.EINVAL, "address too short")
    (family,) = struct.unpack_from("=H", raw)
    want = SOCKADDR_SIZE.get(family)
    if want is None:
        raise BadRequest(errno.EAFNOSUPPORT, f"address family {family} is not AF_INET/AF_INET6")
    if len(raw) < want:
        raise BadRequest(errno.EINVAL, f"address of {len(raw)} bytes is too short for {family_name(family)}")
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
