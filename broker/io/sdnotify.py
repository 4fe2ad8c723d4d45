"""systemd's notify protocol (sd_notify), for Type=notify units.

One datagram per state change to $NOTIFY_SOCKET; a name starting with "@"
is in the abstract namespace. Without $NOTIFY_SOCKET this does nothing.
File descriptors ride along with SCM_RIGHTS (the fd store, fdstore.py).
"""

from __future__ import annotations

import array
import os
import socket


def sd_notify(state: str, fds: tuple[int, ...] = ()) -> bool:
    """Send state (e.g. "READY=1"), and fds if any; return whether a notify socket took it."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendmsg([state.encode()], anc, 0, addr)
    return True
