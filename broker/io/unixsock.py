"""Unix listening sockets for the broker: tenant sockets and the admin socket.

A socket file left by a broker that died (SIGKILL) is replaced; one that a
live broker still answers on is not: two brokers must never share a socket
directory. A listener handed over by the service manager (fdstore.py) is
adopted only if it is still the one at its path.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from pyroute2 import DiagSocket
from pyroute2.netlink.diag import UDIAG_SHOW_VFS

log = logging.getLogger("graft.broker")

LISTEN_BACKLOG = 512
ACCEPT_BACKOFF = 0.1  # after a failed accept (out of fds): pause, do not spin
TRANSIENT_ACCEPT_ERRORS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO, errno.EPERM}
)
_LISTENING = 1 << 10  # TCP_LISTEN, as unix_diag counts states


def check_socket_path(path: Path) -> None:
    """Refuse a path a listener may not take: something other than a socket is there."""
    if (path.exists() or path.is_symlink()) and not stat.S_ISSOCK(path.lstat().st_mode):
        raise RuntimeError(f"{path} exists and is not a socket; refusing to replace it")


async def bind_unix_listener(sock, path: Path, mode: int, kind: int = socket.SOCK_SEQPACKET) -> tuple[int, int]:
    """Bind and listen at path, replacing a stale socket file but never a live broker's.

    Returns the socket file's (st_dev, st_ino), for unlink_if_socket.
    """
    check_socket_path(path)
    if path.exists() or path.is_symlink():
        probe = trio.socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
        with probe:
            try:
                await probe.connect(str(path))
            except OSError:
                path.unlink()  # nobody answers: left over from a broker that died
            else:
                raise RuntimeError(f"{path} is served by a running broker")
    await sock.bind(str(path))
    os.chmod(path, mode)
    sock.listen(LISTEN_BACKLOG)
    st = path.lstat()
    return st.st_dev, st.st_ino


def adopt_unix_listener(
    sock: socket.socket, path: Path, mode: int, kind: int = socket.SOCK_SEQPACKET
) -> tuple[int, int]:
    """Take over a listener bound and listening at path by an earlier broker.

    Returns the socket file's (st_dev, st_ino), like bind_unix_listener;
    raises ValueError if sock is not such a listener, or path is no longer a
    socket file (then sock is not ours to serve on).
    """
    if sock.family != socket.AF_UNIX or sock.type != kind:
        raise ValueError(f"not an AF_UNIX socket of type {kind}")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ValueError("not listening")
    bound = sock.getsockname()
    if bound != str(path):
        raise ValueError(f"bound to {bound!r}, not {str(path)!r}")
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise ValueError(f"{path} no longer exists") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"{path} is no longer a socket file")
    # getsockname() keeps the path after the file was removed and another
    # socket bound there: only the file's inode says whom connects reach.
    if bound_file_inode(sock) != st.st_ino:
        raise ValueError(f"{path} now belongs to another socket")
    os.chmod(path, mode)
    return st.st_dev, st.st_ino


def bound_file_inode(sock: socket.socket) -> int | None:
    """The inode of the file a listening Unix socket is bound to (sock_diag), or None."""
    ino = os.fstat(sock.fileno()).st_ino
    with DiagSocket() as ds:
        ds.bind()
        for msg in ds.get_sock_stats(family=socket.AF_UNIX, states=_LISTENING, show=UDIAG_SHOW_VFS):
            if msg["udiag_ino"] == ino:
                vfs = msg.get_attr("UNIX_DIAG_VFS")
                return vfs["udiag_vfs_ino"] if vfs else None
    return None


def unlink_if_socket(path: Path, identity: tuple[int, int] | None = None) -> None:
    """Remove the socket file at path, if it is (still) the one identity names.

    A tenant removed and re-added by quick reloads may have a new listener
    at the same path by the time the old one is torn down.
    """
    try:
        st = path.lstat()
        if stat.S_ISSOCK(st.st_mode) and (identity is None or identity == (st.st_dev, st.st_ino)):
            path.unlink()
    except FileNotFoundError:
        pass


async def accept_forever(
    listener,
    handler: Callable[[trio.socket.SocketType], Awaitable[None]],
    what: str,
    limiter: trio.CapacityLimiter | None = None,
) -> None:
    """Accept on listener until cancelled; each connection is served by handler(conn) in a task of its own.

    An accept that fails for want of resources, or for a connection that
    went before it was taken (TRANSIENT_ACCEPT_ERRORS), is logged and
    retried after ACCEPT_BACKOFF. Any other error means the listener itself
    is broken: it is raised, so that the broker exits and its service
    manager restarts it, rather than run on accepting nothing.

    With a limiter, a slot is taken before each accept and held until that
    connection's handler returns, so at most that many are served at once
    and the rest wait in the backlog.
    """
    async with trio.open_nursery() as nursery:
        while True:
            token = object()
            if limiter is not None:
                await limiter.acquire_on_behalf_of(token)
            try:
                conn, _ = await listener.accept()
            except BaseException as e:  # a cancel too: the slot taken for this accept is given back
                if limiter is not None:
                    limiter.release_on_behalf_of(token)
                if not isinstance(e, OSError) or e.errno not in TRANSIENT_ACCEPT_ERRORS:
                    raise
                log.error("%s: accept failed: %s", what, e)
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            nursery.start_soon(_serve_one, handler, conn, limiter, token)


async def _serve_one(handler, conn, limiter: trio.CapacityLimiter | None, token: object) -> None:
    try:
        await handler(conn)
    finally:
        if limiter is not None:
            limiter.release_on_behalf_of(token)
