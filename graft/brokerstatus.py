"""Reading a running broker's status document from its admin socket.

The broker side is broker/admin.py: each connection to
<socket_dir>/_admin.sock gets one JSON document, then EOF. `graft status`
prints it; graft-runtime checks that a container's tenant exists, and its
mode, before it grafts the container.
"""

from __future__ import annotations

import errno
import json
import os
import socket

# The name both sides use (broker/admin.py imports it from here). This module
# imports nothing but the standard library: graft-runtime reads the status on
# every container's create, and the broker's modules would cost it trio and
# pyroute2 (half a second) each time.
ADMIN_SOCKET = "_admin.sock"
READ_TIMEOUT = 10.0  # the broker gives up on a reader after 5 s; this only bounds a wedged one


class BrokerUnreachable(Exception):
    """No broker answered with a status document; the message says where and why."""


def read_status(socket_dir: str, timeout: float = READ_TIMEOUT) -> dict:
    """The status document of the broker serving socket_dir."""
    path = os.path.join(socket_dir, ADMIN_SOCKET)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(timeout)
            s.connect(path)
            raw = b"".join(iter(lambda: s.recv(65536), b""))
        status = json.loads(raw)
    except OSError as e:
        raise BrokerUnreachable(f"no broker answers at {path}: {_why(e)}") from None
    except ValueError as e:
        raise BrokerUnreachable(f"no broker answers at {path}: its answer is not JSON ({e})") from None
    if not isinstance(status, dict) or not isinstance(status.get("tenants"), dict):
        raise BrokerUnreachable(f"{path} did not answer with a graft-broker status document")
    return status


def _why(e: OSError) -> str:
    # In our own words for the common cases: engines classify a runtime's error by its
    # text, and podman reports strerror(ENOENT) as "a command that was not found".
    if e.errno == errno.ENOENT:
        return "the socket does not exist (is graft-broker running with this --socket-dir?)"
    if e.errno == errno.ECONNREFUSED:
        return "nothing listens on the socket (is graft-broker running?)"
    return e.strerror or str(e) or type(e).__name__
