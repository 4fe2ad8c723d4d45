"""Opening sockets in a tenant's network namespace.

A socket belongs to the namespace it was created in, for life; bind, connect
and everything after act there whichever namespace the caller is in. So only
socket creation has to happen in the tenant's namespace, and the broker's
event loop never leaves its own: for a tenant whose ``netns`` is not "host",
a worker thread enters the namespace with pyroute2 (setns is per thread),
creates the socket, and returns to the broker's namespace before trio can
reuse the thread. For "host" the socket is created inline, with no thread.

Sockets are created under the tenant's owner uid (the policy's socket_uid):
the thread's filesystem uid is set around socket() and put back at once, so
the kernel records that uid as the socket's owner. setfsuid is per thread
and changes nothing else the broker can do (it keeps its capabilities), and
no other code runs on the thread in between. The owner is what keeps
SO_REUSEPORT groups apart: a tenant can never join a host service's group,
or another tenant's, and take a share of its connections.

The same per-namespace entry point serves the sock_diag dump that tells which
grafted sockets are still alive, for ``max_sockets``.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from contextlib import contextmanager
from typing import TypeVar

import cffi
import trio
from pyroute2 import DiagSocket
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

_ffi = cffi.FFI()
_ffi.cdef("int setfsuid(unsigned int fsuid);")
_libc = _ffi.dlopen(None)

T = TypeVar("T")

HOST = "host"
NETNS_RUN_DIR = "/run/netns"
_SOCK_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


def netns_path(netns: str) -> str | None:
    """The file of a policy's ``netns`` value; None for the broker's own ("host")."""
    if netns == HOST:
        return None
    return netns if netns.startswith("/") else os.path.join(NETNS_RUN_DIR, netns)


class NetnsError(OSError):
    """The tenant's namespace is gone or cannot be entered."""


class Namespace:
    """Runs socket-creating work in one network namespace, for one owner uid."""

    def __init__(self, netns: str, owner: int = 0):
        self.netns = netns
        self.path = netns_path(netns)
        self.owner = owner

    def _in_netns(self, fn: Callable[[], T]) -> T:
        """Run fn with this thread inside the namespace, then come back.

        Runs in a worker thread only. If the way back fails the thread would
        serve trio in the wrong namespace, so that aborts the process.
        """
        own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                target = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise NetnsError(e.errno, f"network namespace {self.netns}: {e.strerror}") from None
            try:
                pyroute2_netns.setns(target, flags=0)
            except OSError as e:
                raise NetnsError(e.errno, f"cannot enter network namespace {self.netns}: {e.strerror}") from None
            finally:
                os.close(target)
            try:
                return fn()
            finally:
                try:
                    pyroute2_netns.setns(own, flags=0)
                except OSError:  # pragma: no cover - the kernel does not refuse this
                    os.abort()
        finally:
            os.close(own)

    async def socket(self, family: int, type: int, proto: int) -> socket.socket:
        """A new non-blocking, close-on-exec socket in this namespace."""
        return (await self.sockets(family, type, proto, 1))[0]

    async def sockets(self, family: int, type: int, proto: int, n: int) -> list[socket.socket]:
        """n of them, with one trip into the namespace; all or none (the OSError)."""

        def make() -> list[socket.socket]:
            out: list[socket.socket] = []
            try:
                with owned_by(self.owner):
                    for _ in range(n):
                        out.append(socket.socket(family, type | _SOCK_FLAGS, proto))
            except BaseException:
                for s in out:
                    s.close()
                raise
            return out

        return await self.run(make)

    async def run(self, fn: Callable[[], T]) -> T:
        """fn's result, run with the thread in this namespace: inline in the broker's own, else on a worker thread.

        fn makes sockets and returns at once (for the broker's own namespace
        it runs on trio's thread); the owner uid is fn's to set (owned_by).
        """
        if self.path is None:
            return fn()
        return await trio.to_thread.run_sync(self._in_netns, fn)

    async def live_inodes(self) -> set[int]:
        """Inodes of every TCP and UDP socket, v4 and v6, in this namespace."""
        if self.path is None:
            return await trio.to_thread.run_sync(_dump_inodes)  # a dump takes a while: off trio's thread
        return await trio.to_thread.run_sync(self._in_netns, _dump_inodes)


@contextmanager
def owned_by(uid: int):
    """Sockets this thread creates inside are owned by uid (setfsuid; put back on the way out)."""
    before = _libc.setfsuid(uid)
    if _libc.setfsuid(uid) != uid:  # setfsuid reports no error, only the fsuid in force
        _libc.setfsuid(before)
        raise PermissionError(errno.EPERM, f"cannot create sockets owned by uid {uid} (needs CAP_SETUID)")
    try:
        yield
    finally:
        _libc.setfsuid(before)


# TCP states whose sockets an app can still hold. TIME_WAIT and NEW_SYN_RECV
# entries are not full sockets (their inode is 0) and a busy host has tens of
# thousands of them: asking the kernel to skip them keeps the dump cheap.
_TCP_TIME_WAIT, _TCP_NEW_SYN_RECV = 6, 12
_HELD_STATES = ((1 << 16) - 1) & ~(1 << _TCP_TIME_WAIT) & ~(1 << _TCP_NEW_SYN_RECV)


# A dump the kernel marks interrupted (the socket table changed under it: common on a busy host)
# is taken again, this many times at most.
_DUMP_TRIES = 5


def _dump_inodes() -> set[int]:
    """The inodes of every held TCP/UDP socket here; OSError if no consistent dump can be had.

    pyroute2 raises its own NetlinkError family, not OSError: callers handle
    OSError (a failed dump refuses a request or leaves a count inexact), so
    a netlink failure must not escape as anything else.
    """
    for attempt in range(_DUMP_TRIES):
        try:
            return _dump_once()
        except NetlinkDumpInterrupted:
            if attempt == _DUMP_TRIES - 1:
                raise OSError(errno.EAGAIN, f"sock_diag dump interrupted {_DUMP_TRIES} times in a row") from None
        except NetlinkError as e:
            raise OSError(e.code or errno.EIO, f"sock_diag: {e}") from None
    raise AssertionError("unreachable")


def _dump_once() -> set[int]:
    inodes: set[int] = set()
    with DiagSocket() as ds:
        ds.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
                for msg in ds.get_sock_stats(family=family, protocol=proto, states=_HELD_STATES):
                    inodes.add(msg["idiag_inode"])
    return inodes
