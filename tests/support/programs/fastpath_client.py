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
  where          where a new TCP socket lives before any use: "host" (a
                 pre-issued socket the shim put under it) or "container"
  bind0          a new socket bound to 127.0.0.1 port 0, then connected and
                 echoed through: where it was after the bind, and the
                 connect's answer ("container ok")
  opts           a new socket given 17 distinct options (one more than the
                 shim records), then connected and echoed through: where it
                 was after them, and the connect's answer
  device NAME    a new socket bound to device NAME with SO_BINDTODEVICE:
                 where it was after, or the errno name
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys

SYS_CLOSE_RANGE = 436  # x86-64 and the generic table alike
SO_NETNS_COOKIE = 71

# 17 options a TCP socket takes before it connects, none of them changing where it may connect
OPTIONS = [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.SOL_SOCKET, socket.SO_REUSEADDR, 1),
    (socket.SOL_SOCKET, socket.SO_OOBINLINE, 1),
    (socket.SOL_SOCKET, socket.SO_RCVBUF, 65536),
    (socket.SOL_SOCKET, socket.SO_SNDBUF, 65536),
    (socket.SOL_SOCKET, socket.SO_PRIORITY, 1),
    (socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1),
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
    (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 30000),
    (socket.IPPROTO_TCP, socket.TCP_SYNCNT, 3),
    (socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP, 65536),
    (socket.IPPROTO_TCP, socket.TCP_LINGER2, 10),
    (socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 65536),
    (socket.IPPROTO_IP, socket.IP_TOS, 0x10),
]


def netns_cookie(s: socket.socket) -> int:
    return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), sys.byteorder)


def where(s: socket.socket) -> str:
    with socket.socket(socket.AF_UNIX) as own:  # the shim leaves AF_UNIX alone: the program's netns
        return "container" if netns_cookie(s) == netns_cookie(own) else "host"


def echo(s: socket.socket, host: str, port: int) -> str:
    """s connected to the echo server and a payload through it: "ok" or the errno name."""
    try:
        s.connect((host, port))
        s.sendall(b"hello")
        return "ok" if s.recv(5) == b"hello" else "MIXED"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


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
        elif cmd == "where":
            with socket.socket() as s:
                out = where(s)
        elif cmd == "bind0":
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                out = f"{where(s)} {echo(s, host, port)}"
        elif cmd == "opts":
            with socket.socket() as s:
                for level, name, value in OPTIONS:
                    s.setsockopt(level, name, value)
                out = f"{where(s)} {echo(s, host, port)}"
        elif cmd == "device":
            with socket.socket() as s:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, args[0].encode())
                    out = where(s)
                except OSError as e:
                    out = errno.errorcode.get(e.errno, str(e.errno))
        else:
            out = f"unknown command {cmd}"
        print(out, flush=True)


if __name__ == "__main__":
    main()
