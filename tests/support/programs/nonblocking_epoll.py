"""A client that connects non-blocking and waits with epoll, as event loops do.

argv: HOST PORT. Prints one JSON line with what each step returned.
"""

import errno
import json
import select
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
rc = s.connect_ex((host, port))
ep = select.epoll()
ep.register(s.fileno(), select.EPOLLOUT)
events = ep.poll(10)
so_error = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
still_nonblocking = not s.getblocking()
s.setblocking(True)
s.sendall(b"epoll says hi")
echo = s.recv(100).decode()
print(
    json.dumps(
        {
            "connect": errno.errorcode.get(rc, rc),
            "events": len(events),
            "so_error": so_error,
            "nonblocking": still_nonblocking,
            "echo": echo,
        }
    )
)
