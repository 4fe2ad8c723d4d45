"""Which recorded socket options the broker applies to a grafted socket.

The application set these on its placeholder before bind/connect; the broker
replays them on the host socket before it binds or connects, because some
only work then (SO_REUSEADDR, SO_REUSEPORT, IPV6_V6ONLY, buffer sizes that
fix the TCP window scale). The broker runs as root, so it must never apply
an option that needs privilege (IP_TRANSPARENT, SO_MARK, SO_BINDTODEVICE,
SO_*BUFFORCE, SO_PRIORITY above 6, ...): the allowlist below admits only
options any unprivileged process may set on its own socket, each with the
exact value size the kernel expects. Anything else is dropped and reported.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from .request import SockOpt

_INT = 4
_S, _T, _IP, _IP6 = socket.SOL_SOCKET, socket.IPPROTO_TCP, socket.IPPROTO_IP, socket.IPPROTO_IPV6

# (level, name) -> admitted value length in bytes.
ALLOWED: dict[tuple[int, int], int] = {
    (_S, socket.SO_REUSEADDR): _INT,
    (_S, socket.SO_REUSEPORT): _INT,
    (_S, socket.SO_KEEPALIVE): _INT,
    (_S, socket.SO_BROADCAST): _INT,
    (_S, socket.SO_OOBINLINE): _INT,
    (_S, socket.SO_SNDBUF): _INT,
    (_S, socket.SO_RCVBUF): _INT,
    (_S, socket.SO_RCVLOWAT): _INT,
    (_S, socket.SO_LINGER): 8,  # struct linger
    (_S, socket.SO_RCVTIMEO): 16,  # struct timeval
    (_S, socket.SO_SNDTIMEO): 16,
    (_T, socket.TCP_NODELAY): _INT,
    (_T, socket.TCP_KEEPIDLE): _INT,
    (_T, socket.TCP_KEEPINTVL): _INT,
    (_T, socket.TCP_KEEPCNT): _INT,
    (_T, socket.TCP_USER_TIMEOUT): _INT,
    (_T, socket.TCP_MAXSEG): _INT,
    (_T, socket.TCP_FASTOPEN): _INT,
    (_T, socket.TCP_QUICKACK): _INT,
    (_T, socket.TCP_NOTSENT_LOWAT): _INT,
    (_T, socket.TCP_DEFER_ACCEPT): _INT,
    (_T, 30): _INT,  # TCP_FASTOPEN_CONNECT (not exported by Python 3.11)
    (_IP, socket.IP_TOS): _INT,
    (_IP, socket.IP_TTL): _INT,
    (_IP, 24): _INT,  # IP_BIND_ADDRESS_NO_PORT
    (_IP6, socket.IPV6_V6ONLY): _INT,
    (_IP6, socket.IPV6_TCLASS): _INT,
    (_IP6, socket.IPV6_UNICAST_HOPS): _INT,
}


@dataclass(frozen=True, slots=True)
class Split:
    admitted: tuple[SockOpt, ...]
    dropped: tuple[SockOpt, ...]


def split_options(opts: tuple[SockOpt, ...]) -> Split:
    """Partition recorded options into those the allowlist admits and the rest."""
    admitted, dropped = [], []
    for o in opts:
        (admitted if ALLOWED.get((o.level, o.name)) == len(o.value) else dropped).append(o)
    return Split(tuple(admitted), tuple(dropped))


def apply_options(sock: socket.socket, opts: tuple[SockOpt, ...]) -> list[tuple[SockOpt, OSError]]:
    """Apply admitted options; return the ones the kernel refused, with why."""
    failed = []
    for o in opts:
        try:
            sock.setsockopt(o.level, o.name, o.value)
        except OSError as e:
            failed.append((o, e))
    return failed


SO_BUF_LOCK = getattr(socket, "SO_BUF_LOCK", 72)  # Linux 5.14: which buffer sizes the app fixed
_LOCK_BIT = {(_S, socket.SO_SNDBUF): 1, (_S, socket.SO_RCVBUF): 2}  # SOCK_SNDBUF_LOCK, SOCK_RCVBUF_LOCK

Defaults = dict[tuple[int, int], bytes]


@dataclass(frozen=True, slots=True)
class Allowed:
    """One admitted option, with the SO_BUF_LOCK bit that says the app fixed it (0: not a buffer size)."""

    level: int
    name: int
    size: int
    lock_bit: int


def allowlist() -> list[Allowed]:
    """ALLOWED as copy_options reads it: what the seccomp agent's C loop copies (seccomp_fast.c)."""
    return [Allowed(level, name, size, _LOCK_BIT.get((level, name), 0)) for (level, name), size in ALLOWED.items()]


def option_defaults(fresh: socket.socket) -> Defaults:
    """The admitted options that apply to a fresh socket's family and protocol, with its values.

    The same for every socket of one family and type in one namespace (but
    for sysctl changes), so the seccomp agent reads them once per kind.
    """
    out = {}
    for (level, name), size in ALLOWED.items():
        try:
            out[(level, name)] = fresh.getsockopt(level, name, size)
        except OSError:  # not an option of this family or protocol
            pass
    return out


def copy_options(src: socket.socket, dst: socket.socket, defaults: Defaults) -> list[tuple[SockOpt, OSError]]:
    """Give dst the admitted options the app set on src (seccomp mode has no record of them).

    An option is copied when src's value differs from a fresh socket's
    (defaults, from option_defaults). Buffer sizes are copied when, and only
    when, the app fixed them (SO_BUF_LOCK), even to the default size:
    otherwise the kernel autotunes them, and setting them would turn that
    off; getsockopt reports twice what was set, so half is set. Returns the
    ones the kernel refused on dst, with why.
    """
    try:
        locks = struct.unpack("=i", src.getsockopt(_S, SO_BUF_LOCK, _INT))[0]
    except OSError:  # before 5.14: whether a size was set cannot be told, so none is copied
        locks = 0
    failed = []
    for (level, name), default in defaults.items():
        bit = _LOCK_BIT.get((level, name))
        if bit is not None and not locks & bit:
            continue  # the kernel's autotuned size, not the app's
        try:
            value = src.getsockopt(level, name, len(default))
        except OSError:
            continue
        if bit is not None:
            value = struct.pack("=i", struct.unpack("=i", value)[0] // 2)
        elif value == default:
            continue
        try:
            dst.setsockopt(level, name, value)
        except OSError as e:
            failed.append((SockOpt(level, name, value), e))
    return failed
