"""What the running kernel itself allows, probed on plain sockets graft never touched.

The escape suite (test_confinement.py) credits graft's confinement only with
refusals the kernel would not make on its own. A step that this kernel
refuses anyway is reported as "refused by the kernel", and so is an escape
that needs such a step (escape.py does not attempt it): neither is a pass
for confinement, nor a failure of the control run.

Kernels differ here (docs/security.md, "Verified on this machine kind").
Before 6.18, a TCP socket that ``connect(AF_UNSPEC)`` had dissolved could
do anything a new one could: ``listen()`` on a once-connected one autobound
a fresh ephemeral port, and a once-listening one could ``connect()``
anywhere. 6.18 fails both with ``EINVAL`` (the ``listen()`` still leaves
the socket holding a fresh port, not listening). A socket that was never
connected autobinds and listens on every kernel.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import socket

_libc = ctypes.CDLL(None, use_errno=True)


def _disconnect(sock: socket.socket) -> None:
    """connect(AF_UNSPEC): Python's socket.connect cannot name that family."""
    unspec = bytes(16)
    if _libc.connect(sock.fileno(), unspec, len(unspec)) != 0:
        raise OSError(ctypes.get_errno(), "connect(AF_UNSPEC)")


def _listener_works(sock: socket.socket) -> bool:
    """Whether a connection to sock's port completes and can be accepted."""
    port = sock.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        sock.settimeout(2)
        conn, _ = sock.accept()
        conn.close()
    return True


def _errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno))


def listen_after_disconnect(server: socket.socket) -> str | None:
    """Whether a dissolved connected TCP socket can listen on a fresh port: None if so, else the errno name."""
    with socket.create_connection(server.getsockname(), timeout=2) as victim:
        _disconnect(victim)
        try:
            victim.listen(1)
        except OSError as e:
            return _errname(e)
        return None if _listener_works(victim) else "no connection arrived"


def connect_after_listener_disconnect(server: socket.socket) -> str | None:
    """Whether a dissolved listener can connect elsewhere: None if so, else the errno name."""
    with socket.socket() as victim:
        victim.bind(("127.0.0.1", 0))
        victim.listen(1)
        _disconnect(victim)
        victim.settimeout(2)
        try:
            victim.connect(server.getsockname())
        except OSError as e:
            return _errname(e)
        return None


# The escape suite's steps whose outcome is the kernel's own business, and their probes.
PROBES = {
    "listen_after_unspec": listen_after_disconnect,
    "listener_connect_forbidden": connect_after_listener_disconnect,
}
# Escapes that need an earlier step to succeed: if the kernel refuses the step, they are not attempted.
NEEDS = {"listen_reached": "listen_after_unspec"}


@functools.cache
def refusals() -> dict[str, str]:
    """The kernel-dependent steps this kernel refuses by itself: step -> errno name."""
    out = {}
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        for step, probe in PROBES.items():
            refused = probe(server)
            if refused is not None:
                out[step] = refused
    return out


def kernel_refused(escape: str) -> str | None:
    """Why the kernel itself stops escape on this kernel ("step: ERRNO"), or None if it does not."""
    step = NEEDS.get(escape, escape)
    if step in refusals():
        return f"{step}: {refusals()[step]}"
    return None
