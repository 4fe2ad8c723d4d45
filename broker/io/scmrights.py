"""Fds that clients pass in SCM_RIGHTS: found in ancillary data, and closed.

No client of the broker has a reason to pass fds (a shim's request carries
none; a runtime's handshake carries one notify fd), so both front-ends
close whatever else arrives: off the event loop, because a close can block
(``close_all``), and at most ``STRAY_FD_CLOSERS`` at once per front-end.
"""

from __future__ import annotations

import array
import os
import socket
import struct

STRAY_FD_CLOSERS = 4  # worker threads closing fds clients passed, at most this many at once


def passed_fds(ancdata) -> list[int]:
    """The fds a client passed in SCM_RIGHTS (clients must pass none)."""
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(fds)


_NO_LINGER = struct.pack("ii", 1, 0)


def close_all(fds: list[int]) -> None:
    """Close fds a client passed.

    Closing the last reference to a socket with SO_LINGER set blocks for as
    long as its sender chose (an hour, behind a zero window): each socket
    gets SO_LINGER {1, 0} first, so its close is immediate.
    """
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # not a socket
            os.close(fd)
            continue
        with sock:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
            except OSError:
                pass  # not one that lingers (a Unix socket)
