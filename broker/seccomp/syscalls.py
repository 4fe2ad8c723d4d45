"""The system calls of seccomp mode that Python lacks, through cffi.

The seccomp notify ioctls the broker makes itself (SEND, ID_VALID, ADDFD,
SET_FLAGS; RECV is the C loop's, seccomp_fast.c), pidfd_open, pidfd_getfd,
process_vm_readv (reading an address from the stopped program's memory), and
installing a filter with a listener (for ``graft run --seccomp``). Layouts and numbers come from seccomp/abi.py;
this module only moves bytes. Every function raises OSError with the errno.
"""

from __future__ import annotations

import os
import platform

import cffi

from . import abi

ffi = cffi.FFI()
ffi.cdef(
    """
    long syscall(long number, ...);
    int ioctl(int fd, unsigned long request, ...);
    int prctl(int option, ...);
    struct iovec { void *iov_base; size_t iov_len; };
    ssize_t process_vm_readv(int pid, const struct iovec *local_iov, unsigned long liovcnt,
                             const struct iovec *remote_iov, unsigned long riovcnt, unsigned long flags);
    struct sock_fprog { unsigned short len; void *filter; };
    """
)
_libc = ffi.dlopen(None)

# The same number on every architecture (system calls added since 5.x are unified).
_SYS_PIDFD_OPEN = 434
_SYS_PIDFD_GETFD = 438
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}
_PR_SET_NO_NEW_PRIVS = 38
PIDFD_THREAD = os.O_EXCL  # pidfd_open of a thread, not only a process (Linux 6.9)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ffi.errno
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _ioctl(fd: int, request: int, buf, what: str) -> int:
    return _check(_libc.ioctl(fd, ffi.cast("unsigned long", request), buf), what)


def notif_send(fd: int, response: bytes) -> None:
    _ioctl(fd, abi.IOCTL_NOTIF_SEND, ffi.from_buffer(bytearray(response)), "SECCOMP_IOCTL_NOTIF_SEND")


def notif_id_valid(fd: int, nid: int) -> bool:
    """Whether the notification is still pending: its thread has not gone on (or died)."""
    try:
        _ioctl(fd, abi.IOCTL_NOTIF_ID_VALID, ffi.new("uint64_t *", nid), "SECCOMP_IOCTL_NOTIF_ID_VALID")
    except OSError as e:
        if e.errno == 2:  # ENOENT
            return False
        raise
    return True


def notif_addfd(fd: int, request: bytes) -> int:
    """Install an fd in the target (SECCOMP_IOCTL_NOTIF_ADDFD); returns its number there."""
    return _ioctl(fd, abi.IOCTL_NOTIF_ADDFD, ffi.from_buffer(bytearray(request)), "SECCOMP_IOCTL_NOTIF_ADDFD")


def notif_sync_wake_up(fd: int) -> None:
    """Ask for synchronous wake-ups between agent and stopped thread (SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)."""
    _ioctl(
        fd,
        abi.IOCTL_NOTIF_SET_FLAGS,
        ffi.cast("unsigned long", abi.USER_NOTIF_FD_SYNC_WAKE_UP),
        "SECCOMP_IOCTL_NOTIF_SET_FLAGS",
    )


def pidfd_open(pid: int, flags: int = 0) -> int:
    return _check(
        _libc.syscall(ffi.cast("long", _SYS_PIDFD_OPEN), ffi.cast("int", pid), ffi.cast("unsigned int", flags)),
        "pidfd_open",
    )


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """A copy of another process's fd (close-on-exec), as a dup across processes."""
    return _check(
        _libc.syscall(
            ffi.cast("long", _SYS_PIDFD_GETFD),
            ffi.cast("int", pidfd),
            ffi.cast("int", targetfd),
            ffi.cast("unsigned int", 0),
        ),
        "pidfd_getfd",
    )


def read_memory(pid: int, addr: int, length: int) -> bytes:
    """Up to length bytes at addr in pid's memory (fewer at the end of a mapping)."""
    buf = ffi.new("char[]", length)
    local = ffi.new("struct iovec *", {"iov_base": buf, "iov_len": length})
    remote = ffi.new("struct iovec *", {"iov_base": ffi.cast("void *", addr), "iov_len": length})
    n = _check(_libc.process_vm_readv(pid, local, 1, remote, 1, 0), "process_vm_readv")
    return bytes(ffi.buffer(buf, n))


def install_notify_filter(program: bytes) -> int:
    """Set no_new_privs and install the filter on this thread; returns its listener fd.

    For a child about to exec the grafted program (graft run --seccomp):
    the filter applies to it and everything it starts, for good.
    """
    try:
        number = _SYS_SECCOMP[platform.machine()]
    except KeyError:
        raise OSError(38, f"seccomp mode does not know {platform.machine()}") from None  # ENOSYS
    _check(
        _libc.prctl(
            _PR_SET_NO_NEW_PRIVS,
            ffi.cast("unsigned long", 1),
            ffi.cast("unsigned long", 0),
            ffi.cast("unsigned long", 0),
            ffi.cast("unsigned long", 0),
        ),
        "prctl(PR_SET_NO_NEW_PRIVS)",
    )
    insns = ffi.from_buffer(program)
    prog = ffi.new("struct sock_fprog *", {"len": len(program) // abi.SOCK_FILTER.size, "filter": insns})
    return _check(
        _libc.syscall(
            ffi.cast("long", number),
            ffi.cast("unsigned int", abi.SET_MODE_FILTER),
            ffi.cast("unsigned int", abi.FILTER_FLAG_NEW_LISTENER),
            prog,
        ),
        "seccomp",
    )
