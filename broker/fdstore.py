"""Tenant listeners kept in systemd's file descriptor store across restarts.

A container reaches its tenant socket through a bind mount of the socket
file. A restarted broker that bound a new socket at the same path would make
a new inode, and the container's mount would keep pointing at the old, dead
one. With the store, the listening socket itself outlives the broker:

* each listener the broker binds is pushed to the service manager
  (``FDSTORE=1``, ``FDNAME=tenant.<name>``), which keeps a duplicate;
* the next broker gets them back (``LISTEN_FDS``, ``LISTEN_FDNAMES``,
  ``LISTEN_PID``; sd_listen_fds(3)) and adopts each one whose address is
  still its tenant's socket path, instead of binding anew;
* at stop the socket file is left in place (the stored listener still owns
  it); a tenant removed by a reload, or gone from the policy at a restart,
  is dropped from the store (``FDSTOREREMOVE=1``) and its file removed.

Connects made while no broker runs wait in the listener's backlog and are
answered by the next broker. The store is used only when ``$FDSTORE`` is a
positive number (systemd 254 and later set it from
``FileDescriptorStoreMax=``; graft's unit sets both, for older systemd) and
``$NOTIFY_SOCKET`` is set. docs/systemd.md has the operator's side.
"""
from __future__ import annotations

import logging
import os
import socket
import stat

from .notify import sd_notify

log = logging.getLogger("graft.broker")

FDNAME_PREFIX = "tenant."  # names may not contain ":" (LISTEN_FDNAMES is ":"-separated)
LISTEN_FDS_START = 3


class FdStore:
    """The broker's view of the store: listeners passed in at start, and pushes and removals."""

    def __init__(self, enabled: bool, inherited: dict[str, socket.socket] | None = None):
        self.enabled = enabled
        self._inherited = inherited or {}  # tenant name -> listener passed in at start

    @classmethod
    def from_environment(cls) -> "FdStore":
        """Read (and unset) what the service manager passed; close what is not a tenant listener."""
        env = os.environ
        try:
            enabled = int(env.get("FDSTORE", "0")) > 0 and bool(env.get("NOTIFY_SOCKET"))
        except ValueError:
            enabled = False
        inherited: dict[str, socket.socket] = {}
        for fd, name in _listen_fds(env):
            os.set_inheritable(fd, False)
            if name.startswith(FDNAME_PREFIX) and _is_socket(fd):
                inherited[name[len(FDNAME_PREFIX):]] = socket.socket(fileno=fd)
            else:
                log.warning("closing fd %d passed in as %r: not a tenant listener", fd, name)
                os.close(fd)
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(var, None)
        if inherited and not enabled:
            log.warning("listeners were passed in but $FDSTORE is not set: adopting them, storing no new ones")
        return cls(enabled, inherited)

    def take(self, tenant: str) -> socket.socket | None:
        """The listener passed in for tenant, once."""
        return self._inherited.pop(tenant, None)

    def leftovers(self) -> dict[str, socket.socket]:
        """Listeners passed in that no tenant took (removed from the policy meanwhile), handed over."""
        left, self._inherited = self._inherited, {}
        return left

    def push(self, tenant: str, sock) -> bool:
        """Have the service manager keep sock for the next broker; whether it was sent."""
        if not self.enabled:
            return False
        try:
            return sd_notify(f"FDSTORE=1\nFDNAME={FDNAME_PREFIX}{tenant}", (sock.fileno(),))
        except OSError as e:
            log.warning("tenant %s: cannot store the listener with the service manager: %s", tenant, e)
            return False

    def remove(self, tenant: str) -> None:
        if not self.enabled:
            return
        try:
            sd_notify(f"FDSTOREREMOVE=1\nFDNAME={FDNAME_PREFIX}{tenant}")
        except OSError as e:
            log.warning("tenant %s: cannot drop the stored listener: %s", tenant, e)


def _listen_fds(env) -> list[tuple[int, str]]:
    """(fd, name) pairs passed by the service manager, if they are meant for this process."""
    try:
        if int(env.get("LISTEN_PID", "0")) != os.getpid():
            return []
        n = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":")
    return [(LISTEN_FDS_START + i, names[i] if i < len(names) else "unknown") for i in range(max(n, 0))]


def _is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False
