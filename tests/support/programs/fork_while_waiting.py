"""A fork while another thread waits for the broker's reply (test_fork_inflight.py).

argv: HOST PORT. A thread connects to HOST:PORT under graft; its round trip
waits on a broker that does not answer. On "fork" from stdin (the test's
broker has the request by then) the main thread forks, the child exits at
once, and the parent prints how many seconds fork() took.
"""

import os
import socket
import sys
import threading
import time


def connect(host: str, port: int) -> None:
    try:
        socket.create_connection((host, port), timeout=30).close()
    except OSError:
        pass  # the test's broker never answers; only the fork's duration counts


threading.Thread(target=connect, args=(sys.argv[1], int(sys.argv[2])), daemon=True).start()
assert sys.stdin.readline().strip() == "fork"
start = time.monotonic()
pid = os.fork()
if pid == 0:
    os._exit(0)
took = time.monotonic() - start
os.waitpid(pid, 0)
print(f"{took:.3f}", flush=True)
