"""Try one blocking connect to HOST:PORT; print its errno name, the time it
took and the process's fd count before and after (socket closed).

Unix sockets are not counted: the shim keeps a pooled connection to the
broker open for the next call, and that is not a leak.
argv: HOST PORT
"""

import errno
import os
import socket
import sys
import time


def fds_but_unix_sockets() -> int:
    with open("/proc/self/net/unix") as f:
        unix = {line.split()[6] for line in list(f)[1:]}
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the fd listdir itself used
            continue
        count += not (link.startswith("socket:[") and link[8:-1] in unix)
    return count


before = fds_but_unix_sockets()
s = socket.socket()
t0 = time.monotonic()
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    result = "OK"
except OSError as e:
    result = errno.errorcode.get(e.errno, str(e.errno))
took = time.monotonic() - t0
s.close()
print(result, f"{took:.3f}", before, fds_but_unix_sockets(), flush=True)
