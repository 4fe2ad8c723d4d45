"""systemd's notify protocol (sd_notify), for Type=notify units.

One datagram per state change to $NOTIFY_SOCKET; a name starting with "@"
is in the abstract namespace. Without $NOTIFY_SOCKET this does nothing.
"""
from __future__ import annotations

import os
import socket


def sd_notify(state: str) -> bool:
    """Send state (e.g. "READY=1"); return whether a notify socket took it."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(state.encode(), addr)
    return True
