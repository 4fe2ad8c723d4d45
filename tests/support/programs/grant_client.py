"""Send to a second destination on a grafted UDP socket; prints one JSON object.

argv: PORT_A PORT_C CALL, CALL one of sendto, sendmsg, sendmmsg.
One unconnected IPv4 socket, with an option set (a GRANT must not carry
it): sendto 127.0.0.1:PORT_A grafts it, then CALL sends to 127.0.0.1:PORT_C
(sendmmsg: a batch of two). The calls go through libc's own functions
(ctypes), so that errno is read exactly as C sees it: set to EEXIST before
the call, it must still be EEXIST after a success.

{"first": R, "second": R, "errno_after": NAME, "attached_held": N}, R the
call's return value or its errno's name; attached_held counts this
process's fds open on a memfd named "graft-attached" (tests/support/programs/grant_broker.py).
"""

import ctypes
import errno
import json
import os
import socket
import struct
import sys

port_a, port_c, call = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

libc = ctypes.CDLL(None, use_errno=True)


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class MsgHdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.POINTER(IoVec)),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", MsgHdr), ("len", ctypes.c_uint)]


libc.sendto.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
libc.sendto.restype = ctypes.c_ssize_t
libc.sendmsg.argtypes = [ctypes.c_int, ctypes.POINTER(MsgHdr), ctypes.c_int]
libc.sendmsg.restype = ctypes.c_ssize_t
libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.POINTER(MMsgHdr), ctypes.c_uint, ctypes.c_int]
libc.sendmmsg.restype = ctypes.c_int


def sockaddr_in(port: int) -> ctypes.Array:
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton("127.0.0.1") + bytes(8)
    return ctypes.create_string_buffer(raw, len(raw))


def message(addr: ctypes.Array, payload: ctypes.Array, iov: IoVec) -> MsgHdr:
    iov.base, iov.len = ctypes.cast(payload, ctypes.c_void_p), len(payload)
    return MsgHdr(ctypes.cast(addr, ctypes.c_void_p), len(addr), ctypes.pointer(iov), 1, None, 0, 0)


def send(fd: int, how: str, port: int):
    addr, payload, iov = sockaddr_in(port), ctypes.create_string_buffer(b"datagram", 8), IoVec()
    ctypes.set_errno(errno.EEXIST)
    if how == "sendto":
        rc = libc.sendto(fd, payload.raw, len(payload), 0, addr.raw, len(addr))
    elif how == "sendmsg":
        msg = message(addr, payload, iov)
        rc = libc.sendmsg(fd, ctypes.byref(msg), 0)
    else:
        iov2 = IoVec()
        batch = (MMsgHdr * 2)(MMsgHdr(message(addr, payload, iov), 0), MMsgHdr(message(addr, payload, iov2), 0))
        rc = libc.sendmmsg(fd, batch, 2, 0)
    err = ctypes.get_errno()
    return (rc if rc >= 0 else errno.errorcode[err]), errno.errorcode.get(err, str(err))


def attached_held() -> int:
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            held += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:graft-attached")
        except FileNotFoundError:  # the fd listdir itself used
            pass
    return held


s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
first, _ = send(s.fileno(), "sendto", port_a)
second, errno_after = send(s.fileno(), call, port_c)
print(json.dumps({"first": first, "second": second, "errno_after": errno_after, "attached_held": attached_held()}))
