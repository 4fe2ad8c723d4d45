"""The broker's side of the seccomp agent's C loop (seccomp_fast.c, libgraft_seccomp.so).

The loop receives every notification of one notify fd on a thread of its
own and answers what needs no decision (see seccomp_fast.c); the rest it
hands to the broker over a SOCK_SEQPACKET control socket, one
``struct graft_fast_msg`` per message. This module holds the codec of those
messages (pure) and starts the loop; seccomp/agent.py does the rest of the I/O.

The layouts come from seccomp_fast.h through cffi, as wire.py's come from
the shim's header; the kernel maps' layouts the loop reads are
confine/graft_maps.h's, which seccomp_fast.h includes and confine/maps.py
reads, so there is one definition of each.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from ..core import request, sockopts
from ..io.cheader import ffi_of, lazy_library
from . import abi

HEADER = Path(__file__).with_name("seccomp_fast.h")
LIBRARY = Path(__file__).with_name("libgraft_seccomp.so")


ffi = ffi_of(HEADER, "FAST")
_consts = ffi.dlopen(None)  # only for the #define constants
HANDOFF = _consts.GRAFT_FAST_HANDOFF
REFILL = _consts.GRAFT_FAST_REFILL
POOL = _consts.GRAFT_FAST_POOL
POOL_MAX = _consts.GRAFT_FAST_POOL_MAX
POOL_AGAIN = _consts.GRAFT_FAST_POOL_AGAIN
MSG_SIZE = ffi.sizeof("struct graft_fast_msg")

if abi.NOTIF.size != _consts.GRAFT_FAST_NOTIF_SIZE:  # the kernel's struct, which both read
    raise RuntimeError(
        f"{HEADER}: struct seccomp_notif is {_consts.GRAFT_FAST_NOTIF_SIZE} bytes, abi.py reads {abi.NOTIF.size}"
    )
if POOL_MAX != request.PREISSUE_MAX:  # one POOL message carries what Grants.preissue gives at most
    raise RuntimeError(f"{HEADER}: GRAFT_FAST_POOL_MAX {POOL_MAX} != GRAFT_PREISSUE_MAX {request.PREISSUE_MAX}")
if len(sockopts.ALLOWED) > _consts.GRAFT_FAST_MAX_OPTS:
    raise RuntimeError(
        f"{HEADER}: the loop reads {_consts.GRAFT_FAST_MAX_OPTS} options, the allowlist has {len(sockopts.ALLOWED)}"
    )


class Unavailable(Exception):
    """The loop's library is not there (not built) or does not load."""


library = lazy_library(ffi, LIBRARY, Unavailable)  # libgraft_seccomp.so, loaded once


# ---- messages ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """A message of the loop: a notification handed off, or a pool to refill."""

    kind: int
    family: int
    uid: int
    pid: int
    notification: abi.Notification | None  # HANDOFF's


def decode_message(raw: bytes) -> Message:
    if len(raw) != MSG_SIZE:
        raise ValueError(f"a loop message is {MSG_SIZE} bytes, got {len(raw)}")
    m = ffi.from_buffer("struct graft_fast_msg *", raw)
    if m.kind not in (HANDOFF, REFILL):
        raise ValueError(f"unknown loop message kind {m.kind}")
    if m.kind == REFILL and m.family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"a refill of family {m.family}")
    n = abi.decode_notification(bytes(ffi.buffer(m.notif))) if m.kind == HANDOFF else None
    return Message(m.kind, m.family, m.uid, m.pid, n)


def encode_pool(family: int, uid: int, grant_id: int, again: bool = False) -> bytes:
    """The header of a POOL message; the sockets go with it in SCM_RIGHTS.

    None: refused (the loop holds further refills off), or with again, not
    refused but not issued either (the asking thread was gone).
    """
    m = ffi.new(
        "struct graft_fast_msg *",
        {"kind": POOL, "family": family, "uid": uid, "grant_id": grant_id, "flags": POOL_AGAIN if again else 0},
    )
    return bytes(ffi.buffer(m))


def encode_refill(family: int, uid: int, pid: int) -> bytes:
    """What the loop sends when a pool runs low (for tests and tools that play the loop)."""
    m = ffi.new("struct graft_fast_msg *", {"kind": REFILL, "family": family, "uid": uid, "pid": pid})
    return bytes(ffi.buffer(m))


# ---- the loop --------------------------------------------------------------------------


class Loop:
    """One notify fd's loop, set up to run on a thread: ``run()`` returns when it ends."""

    def __init__(self, notify_fd: int, ctl: socket.socket, marks_fd: int, grants_fd: int):
        self._lib = library()
        arch = abi.native_arch()
        allow = sockopts.allowlist()
        # Kept referenced: the loop reads these while it runs.
        self._opts = ffi.new(
            "struct graft_fast_opt[]",
            [{"level": o.level, "name": o.name, "size": o.size, "lock_bit": o.lock_bit} for o in allow],
        )
        self._config = ffi.new(
            "struct graft_fast_config *",
            {
                "notify_fd": notify_fd,
                "ctl_fd": ctl.fileno(),
                "marks_fd": marks_fd,
                "grants_fd": grants_fd,
                "arch": arch,
                "nr_connect": abi.SYSCALLS[arch]["connect"],
                "nr_sendto": abi.SYSCALLS[arch]["sendto"],
                "opts": self._opts,
                "n_opts": len(allow),
            },
        )
        self._stats = ffi.new("struct graft_fast_stats *")

    def run(self) -> int:
        """Serve until every process of the filter is gone or the control socket closes; 0 or -errno."""
        return self._lib.graft_fast_serve(self._config, self._stats)  # cffi lets go of the GIL meanwhile

    @property
    def stats(self) -> dict[str, int]:
        return {
            "continued": self._stats.continued,
            "installed": self._stats.installed,
            "handed_off": self._stats.handed_off,
        }
