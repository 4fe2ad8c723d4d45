"""Tenant listeners and resolver sockets kept in systemd's file descriptor store across restarts.

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
answered by the next broker.

A tenant's resolvers (dns/resolver.py) live in the store the same way: the
UDP and TCP sockets one serves in a program's namespace are pushed together
under ``resolver.<tenant>.<namespace inode>``, taken back by the next broker
(``take_resolvers``), and removed when the resolver closes for good (its
programs gone, its tenant removed). Queries sent while no broker runs wait
in those sockets. The store is used only when ``$FDSTORE`` is a
positive number (systemd 254 and later set it from
``FileDescriptorStoreMax=``; graft's unit sets both, for older systemd) and
``$NOTIFY_SOCKET`` is set. docs/systemd.md has the operator's side.
"""

from __future__ import annotations

import logging
import os
import socket
import stat

from .sdnotify import sd_notify

log = logging.getLogger("graft.broker")

FDNAME_PREFIX = "tenant."  # names may not contain ":" (LISTEN_FDNAMES is ":"-separated)
RESOLVER_PREFIX = "resolver."
LISTEN_FDS_START = 3


class FdStore:
    """The broker's view of the store: listeners passed in at start, and pushes and removals."""

    def __init__(self, capacity: int = 0):
        self.capacity = capacity  # $FDSTORE: how many fds the service manager keeps; 0: no store
        # tenant name -> listeners passed in at start under its name (normally one)
        self._inherited: dict[str, list[socket.socket]] = {}
        # resolver key ("<tenant>.<namespace inode>") -> its sockets passed in at start
        self._resolvers: dict[str, list[socket.socket]] = {}

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @classmethod
    def from_environment(cls) -> FdStore:
        """Read (and unset) what the service manager passed; close what is not a tenant listener."""
        env = os.environ
        try:
            capacity = int(env.get("FDSTORE", "0")) if env.get("NOTIFY_SOCKET") else 0
        except ValueError:
            capacity = 0
        store = cls(max(capacity, 0))
        for fd, name in _listen_fds(env):
            for prefix, kept in ((FDNAME_PREFIX, store._inherited), (RESOLVER_PREFIX, store._resolvers)):
                if name.startswith(prefix) and _is_socket(fd):
                    os.set_inheritable(fd, False)
                    kept.setdefault(name[len(prefix) :], []).append(socket.socket(fileno=fd))
                    break
            else:
                store._drop_stray(fd, name)
        for var in ("LISTEN_PID", "LISTEN_PIDFDID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(var, None)
        if (store._inherited or store._resolvers) and not store.enabled:
            log.warning("listeners were passed in but $FDSTORE is not set: adopting them, storing no new ones")
        return store

    def _drop_stray(self, fd: int, name: str) -> None:
        log.warning("fd %d passed in as %r is not a tenant listener: closed, and dropped from the store", fd, name)
        try:
            os.close(fd)
        except OSError:  # LISTEN_FDS counted more fds than were passed
            pass
        self._notify(f"FDSTOREREMOVE=1\nFDNAME={name}", "drop a stray fd")

    def take(self, tenant: str) -> list[socket.socket]:
        """The listeners passed in under tenant's name (normally one), once."""
        return self._inherited.pop(tenant, [])

    def leftovers(self) -> dict[str, list[socket.socket]]:
        """Listeners passed in that no tenant took (removed from the policy meanwhile), handed over."""
        left, self._inherited = self._inherited, {}
        return left

    def take_resolvers(self, tenant: str) -> dict[str, list[socket.socket]]:
        """The resolvers' sockets passed in for tenant, by resolver key, once."""
        mine = {key: socks for key, socks in self._resolvers.items() if key.rpartition(".")[0] == tenant}
        for key in mine:
            del self._resolvers[key]
        return mine

    def leftover_resolvers(self) -> dict[str, list[socket.socket]]:
        """Resolvers' sockets passed in that no tenant took, handed over."""
        left, self._resolvers = self._resolvers, {}
        return left

    def push_resolver(self, key: str, socks: list) -> bool:
        """Have the service manager keep a resolver's sockets, and only them, under its key; whether it did."""
        name, fds = RESOLVER_PREFIX + key, tuple(s.fileno() for s in socks)
        return self._notify(f"FDSTOREREMOVE=1\nFDNAME={name}", f"resolver {key}: replace its stored sockets") and (
            self._notify(f"FDSTORE=1\nFDNAME={name}", f"resolver {key}: store its sockets", fds)
        )

    def remove_resolver(self, key: str) -> None:
        self._notify(f"FDSTOREREMOVE=1\nFDNAME={RESOLVER_PREFIX}{key}", f"resolver {key}: drop its stored sockets")

    def check_capacity(self, tenants: int) -> None:
        if self.enabled and tenants > self.capacity:
            log.warning(
                "%d tenants but the fd store keeps %d ($FDSTORE, FileDescriptorStoreMax=): the "
                "listeners beyond it will not survive a restart",
                tenants,
                self.capacity,
            )

    def push(self, tenant: str, sock) -> bool:
        """Have the service manager keep sock, and only it, under tenant's name; whether it was sent.

        systemd keeps every fd pushed under a name: the old ones go first.
        """
        name = FDNAME_PREFIX + tenant
        return self._notify(
            f"FDSTOREREMOVE=1\nFDNAME={name}", f"tenant {tenant}: replace the stored listener"
        ) and self._notify(f"FDSTORE=1\nFDNAME={name}", f"tenant {tenant}: store the listener", (sock.fileno(),))

    def remove(self, tenant: str) -> None:
        self._notify(f"FDSTOREREMOVE=1\nFDNAME={FDNAME_PREFIX}{tenant}", f"tenant {tenant}: drop the stored listener")

    def _notify(self, state: str, what: str, fds: tuple[int, ...] = ()) -> bool:
        if not self.enabled:
            return False
        try:
            return sd_notify(state, fds)
        except OSError as e:
            log.warning("%s with the service manager: %s", what, e)
            return False


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
