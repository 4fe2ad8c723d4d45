"""`graft run`'s part in name resolution: the broker's resolver for its program (docs/dns.md).

Before the program starts, from inside the network namespace it will run
in, ``graft run`` asks the broker to serve the tenant's resolver there (a
RESOLVER request on the tenant's socket; the broker learns the namespace
from this process, which then becomes the program), and points the
program's resolv.conf at it: in a mount namespace of its own, a copy of
resolv.conf is mounted over the original, naming the resolver and keeping
the original's ``search``, ``domain`` and ``options`` lines.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys
import tempfile

from graft.broker.core import request
from graft.broker.shim import wire

RESOLV_CONF = "/etc/resolv.conf"
_CLONE_NEWNS = 0x00020000
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_libc = ctypes.CDLL(None, use_errno=True)


def ask_resolver(socket_path: str, timeout: float = 10.0) -> str | None:
    """The resolver's address the broker serves in this process's namespace; None if the tenant has none.

    Raises OSError when the broker cannot be reached or cannot serve one.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(socket_path)
        s.send(wire.encode_request(request.OP_RESOLVER, None, type=socket.SOCK_DGRAM, family=socket.AF_INET))
        data = s.recv(wire.REPLY_SIZE + 1)
    try:
        rep = wire.decode_reply(data)
    except request.BadRequest as e:  # the broker closed the connection, or is not one
        raise OSError(errno.EPROTO, f"no answer from the broker ({e.reason})") from None
    if rep.verdict == wire.V_CONTAINER:
        return None
    if rep.verdict != wire.V_GRAFT or rep.addr is None:
        raise OSError(rep.error or 5, f"the broker cannot serve a resolver here: {os.strerror(rep.error or 5)}")
    return str(rep.addr.ip)


# Set where the resolver is served: the shim (libgraft.c, announce) then only says it is there too.
RESOLVER_NETNS_ENV = "GRAFT_RESOLVER_NETNS"


def netns_id() -> str:
    """This process's network namespace as the shim writes it in GRAFT_RESOLVER_NETNS: "dev:inode"."""
    st = os.stat("/proc/self/ns/net")
    return f"{st.st_dev}:{st.st_ino}"


def use_broker_resolver(socket_path: str, env: dict[str, str] | None = None) -> None:
    """Point this process's resolv.conf at the tenant's resolver, served where it runs; warn if it cannot be.

    env, the program's environment, learns that it is served here
    (GRAFT_RESOLVER_NETNS): the shim's ask as the program loads need not
    wait. The program runs either way: what it reaches by address works
    without names.
    """
    try:
        resolver = ask_resolver(socket_path)
        if resolver is not None:
            point_resolv_conf_at(resolver)
            if env is not None:
                env[RESOLVER_NETNS_ENV] = netns_id()
    except OSError as e:
        print(f"graft run: no resolver for the program ({e.strerror or e}); names will not resolve", file=sys.stderr)


def resolv_conf_text(original: str, resolver: str) -> str:
    """resolv.conf naming only the resolver, with the original's search, domain and options lines."""
    kept = [line for line in original.splitlines() if line.split()[:1] in (["search"], ["domain"], ["options"])]
    return "\n".join([f"nameserver {resolver}", *kept]) + "\n"


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def point_resolv_conf_at(resolver: str, path: str = RESOLV_CONF) -> None:
    """From now on this process (and what it executes) reads a resolv.conf naming resolver; others see no change."""
    try:
        with open(path) as f:
            original = f.read()
    except FileNotFoundError:
        original = ""
    target = os.path.realpath(path)  # a link (systemd-resolved's stub): the file it names is mounted over
    _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "making / private")
    fd, copy = tempfile.mkstemp(prefix="graft-resolv-", suffix=".conf")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(resolv_conf_text(original, resolver))
        os.chmod(copy, 0o644)
        if not os.path.exists(target):
            raise OSError(2, f"{path} does not exist to be mounted over")
        _check(_libc.mount(copy.encode(), target.encode(), None, _MS_BIND, None), f"mounting over {target}")
    finally:
        os.unlink(copy)  # the mount holds the file; nothing is left behind
