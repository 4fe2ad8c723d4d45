"""A socket registered with epoll before its first connect or sendto, as nginx registers its upstreams.

argv: MODE HOST PORT, MODE "tcp" (a non-blocking connect to an echo server),
"udp" (a sendto to a UDP echo server) or "many" (a non-blocking connect of
a socket in five epoll sets: what each reports). Prints one JSON line.

tcp: the socket is in three epoll instances before its connect: `a` (added
for EPOLLOUT, edge-triggered), `b` (added for EPOLLIN, then modified to
EPOLLIN|EPOLLOUT) and `gone` (added, then closed); `reused` is a fresh epoll
instance, likely on gone's old number, that never saw the socket; `dup`
has a duplicate of the socket's fd, made before the connect, added. After the
connect each instance reports what the app asked of it, as without graft,
and the app can still modify and remove its registrations.
"""

import errno
import json
import os
import select
import socket
import sys

mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET


def masks(ep: select.epoll, timeout: float) -> list[int]:
    return [mask for _, mask in ep.poll(timeout)]


if mode == "tcp":
    s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    a, b, gone = select.epoll(), select.epoll(), select.epoll()
    a.register(s.fileno(), select.EPOLLOUT | select.EPOLLET)
    b.register(s.fileno(), select.EPOLLIN)
    b.modify(s.fileno(), select.EPOLLIN | select.EPOLLOUT)
    gone.register(s.fileno(), select.EPOLLOUT)
    d = os.dup(s.fileno())
    dup = select.epoll()
    dup.register(d, select.EPOLLOUT)
    gone_fd = gone.fileno()
    gone.close()
    reused = select.epoll()
    rc = s.connect_ex((host, port))
    out = {
        "connect": errno.errorcode.get(rc, rc),
        "a": masks(a, 10),
        "b": masks(b, 10),
        "reused": masks(reused, 0),
        "reused_number": reused.fileno() == gone_fd,
        "dup": masks(dup, 10),
    }
    a.modify(s.fileno(), select.EPOLLIN)
    b.unregister(s.fileno())
    s.setblocking(True)
    s.sendall(b"registered first")
    out["a_after_send"] = masks(a, 10)  # the echo is readable on `a`, now for EPOLLIN
    out["echo"] = s.recv(100).decode()
elif mode == "many":
    s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    sets = [select.epoll() for _ in range(5)]
    for ep in sets:
        ep.register(s.fileno(), select.EPOLLOUT)
    rc = s.connect_ex((host, port))
    out = {"connect": errno.errorcode.get(rc, rc), "sets": [masks(ep, 10 if i < 4 else 0) for i, ep in enumerate(sets)]}
else:
    s = socket.socket(family, socket.SOCK_DGRAM)
    a = select.epoll()
    a.register(s.fileno(), select.EPOLLIN)
    s.sendto(b"udp first", (host, port))
    out = {"a": masks(a, 10), "echo": s.recv(100).decode()}
print(json.dumps(out))
