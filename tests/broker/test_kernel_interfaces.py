"""What the broker reads from and asks of the kernel directly, checked against the kernel itself.

The codecs they complement are tested pure in tests/unit/ (test_wire_codec.py,
unit/test_seccomp_abi.py); these open a socket, or install a seccomp filter in a
child, to show the running kernel agrees.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from graft.broker.core import request
from graft.broker.seccomp import abi


def test_sockaddr_matches_the_socket_module():
    """Our sockaddr bytes are what the kernel would hand back for the same address."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    raw = request.encode_sockaddr(request.SockAddr(socket.AF_INET6, ipaddress.ip_address("::1"), port))
    assert request.decode_sockaddr(raw).to_python() == ("::1", port, 0, 0)
    assert raw[2:4] == port.to_bytes(2, "big")


def test_the_ioctls_the_headers_here_lack_are_accepted_by_the_kernel():
    """SECCOMP_IOCTL_NOTIF_SET_FLAGS (Linux 6.6) is newer than the C headers: the kernel checks it."""
    from graft.broker.seccomp import syscalls

    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only holds its filter until told to exit
        try:
            listener = syscalls.install_notify_filter(abi.notify_filter(abi.native_arch()))
            os.write(ready_w, struct.pack("=i", listener))
            os.read(go_r, 1)
        finally:
            os._exit(0)
    try:
        (number,) = struct.unpack("=i", os.read(ready_r, 4))
        pidfd = syscalls.pidfd_open(pid)
        try:
            listener = syscalls.pidfd_getfd(pidfd, number)
        finally:
            os.close(pidfd)
        try:
            assert os.readlink(f"/proc/self/fd/{listener}") == "anon_inode:seccomp notify"
            syscalls.notif_sync_wake_up(listener)
            assert syscalls.notif_id_valid(listener, 12345) is False
        finally:
            os.close(listener)
    finally:
        os.write(go_w, b"g")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
