"""The dup family on placeholders and grafted sockets; prints one JSON object.

For each method, a placeholder is duplicated, then connected through one of
the two numbers: both numbers must end up on the same host socket (one of
another network namespace than the program's), with their own FD_CLOEXEC,
and data written on one is read back on the other. A placeholder is a
container socket until the process's connects take the fast way, and a
pre-issued host socket after: "on_host" says which it was. Argv: HOST PORT.
"""

import ctypes
import fcntl
import json
import os
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
O_CLOEXEC = os.O_CLOEXEC


def check(rc):
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc


HIGH = 500  # dup2/dup3/F_DUPFD target: above anything the program opens by itself
METHODS = {
    "dup": lambda fd: check(libc.dup(fd)),
    "dup2": lambda fd: check(libc.dup2(fd, HIGH)),
    "dup3_cloexec": lambda fd: check(libc.dup3(fd, HIGH, O_CLOEXEC)),
    "fcntl_dupfd": lambda fd: check(libc.fcntl(fd, fcntl.F_DUPFD, HIGH)),
    "fcntl_dupfd_cloexec": lambda fd: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, HIGH),  # Python's own fcntl
    "os_dup": os.dup,  # CPython: fcntl(F_DUPFD_CLOEXEC)
}


SO_NETNS_COOKIE = 71


def netns(fd: int) -> int:
    cookie, size = ctypes.c_uint64(0), ctypes.c_uint32(8)
    check(libc.getsockopt(fd, socket.SOL_SOCKET, SO_NETNS_COOKIE, ctypes.byref(cookie), ctypes.byref(size)))
    return cookie.value


with socket.socket(socket.AF_UNIX) as probe:  # the shim leaves AF_UNIX alone: the program's own netns
    OWN_NETNS = netns(probe.fileno())


def roundtrip(a: int, b: int, msg: bytes) -> bool:
    os.write(a, msg)
    got = b""
    while len(got) < len(msg):
        chunk = os.read(b, len(msg) - len(got))
        if not chunk:
            break
        got += chunk
    return got == msg


def cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


out = {}
for i, (name, method) in enumerate(METHODS.items()):
    s = socket.socket()
    fd = s.fileno()
    on_host = netns(fd) != OWN_NETNS
    d = method(fd)
    via_dup = i % 2 == 1  # connect through the duplicate half of the time
    conn_fd, other_fd = (d, fd) if via_dup else (fd, d)
    # An option set through the other number belongs to the same socket: the broker replays it.
    one = ctypes.c_int(1)
    check(libc.setsockopt(other_fd, socket.IPPROTO_TCP, socket.TCP_NODELAY, ctypes.byref(one), 4))
    conn = socket.socket(fileno=conn_fd) if via_dup else s
    conn.connect((host, port))
    ino_a, ino_b = os.fstat(fd).st_ino, os.fstat(d).st_ino
    val, size = ctypes.c_int(0), ctypes.c_uint32(4)
    check(libc.getsockopt(conn_fd, socket.IPPROTO_TCP, socket.TCP_NODELAY, ctypes.byref(val), ctypes.byref(size)))
    out[name] = {
        "same_socket": ino_a == ino_b,
        "grafted": netns(fd) != OWN_NETNS,
        "on_host": on_host,
        "echo": roundtrip(other_fd, conn_fd, b"hi " + name.encode()),
        "cloexec": [cloexec(fd), cloexec(d)],
        "nodelay": val.value != 0,
    }
    if via_dup:
        conn.detach()
    os.close(d)
    s.close()

# Closing the original placeholder before connecting through the duplicate.
s = socket.socket()
d = os.dup(s.fileno())
s.close()
t = socket.socket(fileno=d)
t.connect((host, port))
out["dup_then_close_original"] = roundtrip(d, d, b"alone")
t.close()

# Duplicating a grafted socket is a plain dup.
s = socket.create_connection((host, port))
d = os.dup(s.fileno())
out["dup_of_grafted"] = os.fstat(d).st_ino == os.fstat(s.fileno()).st_ino and roundtrip(d, s.fileno(), b"g")
os.close(d)
s.close()
print(json.dumps(out), flush=True)
