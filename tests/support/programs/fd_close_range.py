"""close_range on placeholders; prints one JSON object. Argv: HOST PORT."""

import ctypes
import fcntl
import json
import os
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
CLOSE_RANGE_CLOEXEC = 4

out = {}
# CLOSE_RANGE_CLOEXEC closes nothing: the placeholder stays tracked and grafts, keeping FD_CLOEXEC.
s = socket.socket()
s.set_inheritable(True)
fd = s.fileno()
placeholder = os.fstat(fd).st_ino
assert libc.close_range(fd, fd, CLOSE_RANGE_CLOEXEC) == 0, ctypes.get_errno()
s.connect((host, port))
s.sendall(b"cloexec")
out["cloexec_range"] = {
    "grafted": os.fstat(fd).st_ino != placeholder,
    "cloexec": bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
    "echo": s.recv(100).decode(),
}
s.close()

# close_range without flags closes a block of placeholders; the numbers are reused by new sockets.
socks = [socket.socket() for _ in range(4)]
fds = [x.fileno() for x in socks]
assert libc.close_range(min(fds), max(fds), 0) == 0, ctypes.get_errno()
for x in socks:
    x.detach()
fresh = [socket.socket() for _ in range(4)]
reused = sorted(set(fds) & {x.fileno() for x in fresh})
for x in fresh:
    x.connect((host, port))
    x.sendall(b"r")
out["closed_range"] = {"reused": reused, "echo": [x.recv(1).decode() for x in fresh]}
for x in fresh:
    x.close()
print(json.dumps(out), flush=True)
