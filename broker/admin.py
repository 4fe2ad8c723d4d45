"""The admin socket: `graft status` reads the broker's state from it.

<socket_dir>/_admin.sock, mode 0600 inside the 0700 socket directory, so
only root reaches it. The name cannot clash with a tenant's socket: tenant
names start with a letter or digit. Each connection gets one JSON document
and is closed; there are no commands, so nothing here can change the broker.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
from collections.abc import Awaitable, Callable

import trio

from graft.brokerstatus import ADMIN_SOCKET  # noqa: F401  (server.py's; named where the reader is)

from .io.unixsock import accept_forever, bind_unix_listener, unlink_if_socket

Status = Callable[[], Awaitable[dict]]  # what `graft status` shows: server.Broker.status

ADMIN_TIMEOUT = 5.0  # a reader that does not read cannot hold a task for longer

log = logging.getLogger("graft.broker")


async def serve_admin(status: Status, path, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with listener:
        identity = await bind_unix_listener(listener, path, 0o600, socket.SOCK_STREAM)
        try:
            task_status.started()
            await accept_forever(listener, functools.partial(_answer, status), "admin socket")
        finally:
            unlink_if_socket(path, identity)


async def _answer(status: Status, conn) -> None:
    with conn, trio.move_on_after(ADMIN_TIMEOUT):
        try:
            data = (json.dumps(await status()) + "\n").encode()
            while data:
                sent = await conn.send(data)
                data = data[sent:]
        except OSError as e:
            log.debug("admin client went away: %s", e)
        except Exception:  # status is a convenience: it must never take the broker down
            log.exception("admin socket: cannot answer")
