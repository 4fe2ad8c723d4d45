"""Grafted connects around posix_spawn and vfork (subprocess): parent, spawned
child, vfork'ed child, parent again. Each child is a fresh program under the
shim; the parent's broker connection must stay its own throughout.

argv: HOST PORT [child]. Prints one line per connect: "<who> <pid> <echo>".
"""

import os
import socket
import subprocess
import sys

host, port = sys.argv[1], int(sys.argv[2])


def connect(who: str) -> None:
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(who.encode())
        print(who, os.getpid(), s.recv(100).decode(), flush=True)


if len(sys.argv) > 3:
    connect(sys.argv[3])
    sys.exit(0)

connect("parent")
child = [sys.executable, __file__, host, str(port)]
pid = os.posix_spawn(sys.executable, child + ["spawned"], os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, 1, 1)])
_, status = os.waitpid(pid, 0)
assert status == 0, status
# subprocess forks with vfork() on Linux where it can (CPython 3.10+).
subprocess.run(child + ["vforked"], check=True)
connect("parent-again")
