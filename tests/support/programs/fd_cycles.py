"""N connect/echo/close cycles after WARMUP ones; prints fd count and VmRSS before and after.

Argv: HOST PORT WARMUP N.
"""

import json
import os
import socket
import sys

host, port, warmup, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def cycle():
    s = socket.socket()
    s.connect((host, port))
    s.sendall(b"x")
    assert s.recv(1) == b"x"
    s.close()


for _ in range(warmup):
    cycle()
before = {"fds": fds(), "rss_kib": rss_kib()}
for _ in range(n):
    cycle()
after = {"fds": fds(), "rss_kib": rss_kib()}
print(json.dumps({"before": before, "after": after}), flush=True)
