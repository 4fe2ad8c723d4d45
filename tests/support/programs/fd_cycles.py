"""N connect/echo/close cycles after WARMUP ones; prints fd counts and VmRSS before and after.

Argv: HOST PORT WARMUP N.

The fds are counted as sockets and others. Between cycles the program holds
no socket of its own, so the sockets are the shim's (its pooled pre-issued
sockets and broker connections, as many as its pools hold at that moment).
"""

import json
import os
import socket
import sys

host, port, warmup, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def fds() -> dict[str, int]:
    kinds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            kinds.append(os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"))
        except FileNotFoundError:  # the directory listdir read, closed since
            continue
    return {"sockets": sum(kinds), "others": len(kinds) - sum(kinds)}


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
