"""Unix listening sockets for the broker: tenant sockets and the admin socket.

A socket file left by a broker that died (SIGKILL) is replaced; one that a
live broker still answers on is not: two brokers must never share a socket
directory.
"""
from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import trio

LISTEN_BACKLOG = 512


async def bind_unix_listener(sock, path: Path, mode: int, kind: int = socket.SOCK_SEQPACKET) -> None:
    """Bind and listen at path, replacing a stale socket file but never a live broker's."""
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise RuntimeError(f"{path} exists and is not a socket; refusing to replace it")
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


def unlink_if_socket(path: Path) -> None:
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        pass
