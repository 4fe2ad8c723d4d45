"""What /proc says of a thread a seccomp filter stopped: its process and credentials, an fd's flags.

The seccomp front-end (seccomp/agent.py) reads these on every call it judges, so
each is one open and one read, with no buffered file object. A thread that
has exited reads as None (or False): its call is then answered as the
kernel would, never judged on a stale id.
"""

from __future__ import annotations

import os

from ..core.tenant import Peer


def read_proc(path: str) -> bytes | None:
    """A small /proc file in one read (no buffered file object: this is on every stopped call)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 8192)
    except OSError:
        return None
    finally:
        os.close(fd)


def field(text: bytes, name: bytes) -> list[bytes]:
    """The words of a "Name:\tvalue ..." line of a /proc file."""
    at = text.find(b"\n" + name + b":")
    if at < 0:
        at = 0 if text.startswith(name + b":") else -1
    if at < 0:
        raise ValueError(name)
    start = text.index(b":", at) + 1
    end = text.find(b"\n", start)
    return text[start : end if end >= 0 else None].split()


def proc_status(tid: int) -> Peer | None:
    """The process of a thread, with its effective uid and gid, or None if it is gone.

    /proc/<tid>/status, not the directory's owner: a process that made
    itself non-dumpable shows as root there, which the uids check must not
    believe.
    """
    text = read_proc(f"/proc/{tid}/status")
    if text is None:
        return None
    try:
        tgid = int(field(text, b"Tgid")[0])
        uid = int(field(text, b"Uid")[1])
        gid = int(field(text, b"Gid")[1])
    except (ValueError, IndexError):
        return None
    return Peer(tgid, uid, gid)


def cloexec(tid: int, fd: int) -> bool:
    """Whether the app's fd is close-on-exec (fdinfo's flags, in octal); the host socket keeps that."""
    text = read_proc(f"/proc/{tid}/fdinfo/{fd}")
    try:
        return text is not None and bool(int(field(text, b"flags")[0], 8) & os.O_CLOEXEC)
    except (ValueError, IndexError):
        return False
