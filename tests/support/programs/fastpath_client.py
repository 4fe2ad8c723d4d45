"""A client that connects over and over, driven by commands on stdin (e2e/test_shim_fast_path.py).

usage: fastpath_client.py HOST PORT

Commands, one per line; each answers one line on stdout:
  connect K      K connects in a row, each echoing a payload of its own
                 through an echo server and closing: "ok", or the errno name
                 of the first failure
  fork K         fork: parent and child each do `connect K` at once;
                 "ok" if both succeed, else what failed
  closeall       close every fd from 3 up with a raw close_range(2) the shim
                 never sees, then open /dev/null 32 times so the numbers
                 are taken again: "ok"
  files          "ok" if the /dev/null files opened by closeall are still
                 /dev/null (nothing was put on their numbers)
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys

SYS_CLOSE_RANGE = 436  # x86-64 and the generic table alike

held: list[int] = []


def connect(host: str, port: int, k: int) -> str:
    for i in range(k):
        payload = f"{os.getpid()}:{i}".encode()
        try:
            with socket.create_connection((host, port), timeout=10) as s:
                s.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    chunk = s.recv(len(payload) - len(got))
                    if not chunk:
                        return "EOF"
                    got += chunk
                if got != payload:
                    return "MIXED"
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
    return "ok"


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    libc = ctypes.CDLL(None, use_errno=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "connect":
            out = connect(host, port, int(args[0]))
        elif cmd == "fork":
            k = int(args[0])
            pid = os.fork()
            if pid == 0:
                os._exit(0 if connect(host, port, k) == "ok" else 1)
            mine = connect(host, port, k)
            _, status = os.waitpid(pid, 0)
            child = "ok" if os.waitstatus_to_exitcode(status) == 0 else "child failed"
            out = mine if mine != "ok" else child
        elif cmd == "closeall":
            sys.stdout.flush()
            if libc.syscall(SYS_CLOSE_RANGE, 3, ctypes.c_uint(0xFFFFFFFF), 0) != 0:
                out = errno.errorcode.get(ctypes.get_errno(), "?")
            else:
                held[:] = [os.open("/dev/null", os.O_RDWR) for _ in range(32)]
                out = "ok"
        elif cmd == "files":
            null = os.stat("/dev/null")
            same = all((st.st_dev, st.st_ino) == (null.st_dev, null.st_ino) for st in map(os.fstat, held))
            out = "ok" if held and same else "clobbered"
        else:
            out = f"unknown command {cmd}"
        print(out, flush=True)


if __name__ == "__main__":
    main()
