"""An untrusted program under graft that tries to re-point its grafted sockets.

    escape.py TCP_PORT UDP_PORT PUBLISHED_PORT FORBIDDEN_TCP FORBIDDEN_UDP UDP6_PORT UDP2_PORT [--wait]

It gets its sockets the ordinary way (through the shim: connect, bind,
listen, accept), checks they carry traffic, then re-points them with raw
system calls made through libc's ``syscall()``, which the shim does not
interpose. Each attempt is reported as 0 (it worked: an escape) or the errno
the kernel gave. After each refused attempt it checks that the allowed
traffic on the same socket still flows. One JSON object on stdout.

It also asks the broker itself for pre-issued sockets (the fast path's
unconnected TCP sockets, issued only with confinement on), as any program
holding the tenant socket may, and tries the same on one of those; and for
a second UDP destination the policy allows (GRANT), after which one
unconnected UDP socket must reach both allowed destinations and nothing else.

Two attempts need a peer on the host: a socket made to listen takes a
fresh port on the host's wildcard address (a connected socket after a
disconnect, where the kernel allows that, and a pre-issued socket). For
each, the program prints "listening NAME PORT" and reads a line from stdin
once the test has tried to connect to it from the host, then reports
whether that connection arrived as NAME_reached. A listen() the kernel
refuses is reported with its errno, and NAME_reached is then absent.

With --wait it grafts, prints "ready", and makes its attempts only after a
line on stdin (tests restart the broker in between).
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import json
import os
import platform
import socket
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from support.harness import WireClient  # noqa: E402  (tests/: the program speaks the wire protocol like the shim)

libc = ctypes.CDLL(None, use_errno=True)
NR = {
    "x86_64": {"connect": 42, "sendto": 44, "bind": 49, "listen": 50, "getsockname": 51, "setsockopt": 54},
    "aarch64": {"connect": 203, "sendto": 206, "bind": 200, "listen": 201, "getsockname": 204, "setsockopt": 208},
}[platform.machine()]
HOST = "127.0.0.1"
MSG_FASTOPEN = 0x20000000


def sockaddr(ip: str | None, port: int = 0) -> bytes:
    """An AF_INET address (or AF_UNSPEC), whatever the socket's family: raw calls take any."""
    if ip is None:  # AF_UNSPEC: "dissolve the association"
        return bytes(16)
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(ip) + bytes(8)


def raw(call: str, fd: int, *args) -> int:
    """A raw system call; 0 (or a byte count) for success, else the errno."""
    ret = libc.syscall(NR[call], fd, *args)
    return 0 if ret >= 0 else ctypes.get_errno()


def raw_connect(fd: int, ip: str | None, port: int = 0) -> int:
    a = sockaddr(ip, port)
    return raw("connect", fd, a, len(a))


def raw_bind(fd: int, ip: str, port: int) -> int:
    a = sockaddr(ip, port)
    return raw("bind", fd, a, len(a))


def raw_sendto(fd: int, data: bytes, ip: str, port: int, flags: int = 0) -> int:
    a = sockaddr(ip, port)
    return raw("sendto", fd, data, len(data), flags, a, len(a))


def raw_port(fd: int) -> int:
    """The socket's real local port (the shim would translate getsockname)."""
    a = ctypes.create_string_buffer(16)
    n = ctypes.c_uint32(16)
    if raw("getsockname", fd, a, ctypes.byref(n)) != 0:
        return 0
    return struct.unpack("!H", a.raw[2:4])[0]


def try_listen(att: dict, name: str, fd: int) -> None:
    """listen() on fd with a raw call; if it worked, have the test connect from the host, and see what arrived."""
    att[name] = raw("listen", fd, 8)
    if att[name] != 0:
        return
    print(f"listening {name} {raw_port(fd)}", flush=True)
    sys.stdin.readline()  # the test has connected from the host, or given up
    sock = socket.socket(fileno=os.dup(fd))
    sock.setblocking(False)
    try:
        sock.accept()[0].close()
        att[f"{name}_reached"] = 0
    except OSError as e:
        att[f"{name}_reached"] = e.errno
    finally:
        sock.close()


def ask_grant(port: int) -> int:
    """Ask the broker, as the shim would, to judge another UDP destination: 0 if granted, else the errno."""
    from graft.broker.core import request
    from graft.broker.shim import wire

    client = WireClient(os.environ["GRAFT_SOCKET"])
    try:
        client.send(
            wire.encode_request(
                request.OP_GRANT,
                request.SockAddr(socket.AF_INET, ipaddress.ip_address(HOST), port),
                type=socket.SOCK_DGRAM,
                flags=request.REQF_SENDTO,
            )
        )
        reply, _ = client.reply()
    finally:
        client.close()
    return 0 if reply.verdict == wire.V_GRAFT else reply.error


def preissued_sockets() -> tuple[list[socket.socket], int]:
    """Ask the broker for pre-issued TCP sockets over the tenant socket: (sockets, errno of a refusal)."""
    client = WireClient(os.environ["GRAFT_SOCKET"])
    try:
        reply, socks = client.preissue()
    finally:
        client.close()
    return socks, 0 if socks else reply.error


def echo_ok(s: socket.socket, token: bytes) -> bool:
    try:
        s.sendall(token)
        got = b""
        while len(got) < len(token):
            chunk = s.recv(len(token) - len(got))
            if not chunk:
                return False
            got += chunk
        return got == token
    except OSError:
        return False


def main() -> int:
    tcp_port, udp_port, published, bad_tcp, bad_udp, udp6_port, udp2_port = map(int, sys.argv[1:8])
    wait = "--wait" in sys.argv
    out: dict = {"attempts": {}, "flows": {}}
    att, flows = out["attempts"], out["flows"]

    # --- get grafted sockets, the way an ordinary program does -------------------
    client = socket.create_connection((HOST, tcp_port), timeout=10)
    victim_bind = socket.create_connection((HOST, tcp_port), timeout=10)
    victim_listen = socket.create_connection((HOST, tcp_port), timeout=10)
    victim_fastopen = socket.create_connection((HOST, tcp_port), timeout=10)
    listener = socket.socket()
    listener.bind(("0.0.0.0", 80))  # published as HOST:published
    listener.listen(8)
    peer = socket.create_connection((HOST, published), timeout=10)
    accepted, _ = listener.accept()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.connect((HOST, udp_port))
    udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)  # dual-stack: it takes AF_INET addresses too
    udp6.connect(("::1", udp6_port))
    preissued, out["preissue_refused"] = preissued_sockets()
    for s in (client, victim_bind, victim_listen, victim_fastopen, listener, accepted, peer, udp, udp6):
        # Blocking, so raw connect()s complete in the call; kernel timeouts keep a failure from hanging.
        s.settimeout(None)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 10, 0))
    flows["tcp_before"] = echo_ok(client, b"before")
    accepted.sendall(b"hello")
    flows["accepted_before"] = peer.recv(5) == b"hello"
    udp.send(b"ping")
    flows["udp_before"] = udp.recv(16) == b"ping"
    udp6.send(b"ping6")
    flows["udp6_before"] = udp6.recv(16) == b"ping6"
    if wait:
        print("ready", flush=True)
        sys.stdin.readline()

    # --- a grafted, connected TCP socket --------------------------------------------
    att["tcp_unspec"] = raw_connect(client.fileno(), None)
    att["tcp_connect_forbidden"] = raw_connect(client.fileno(), HOST, bad_tcp)
    if att["tcp_connect_forbidden"] != 0:  # refused: the allowed destination still works
        flows["tcp_after"] = raw_connect(client.fileno(), HOST, tcp_port) == 0 and echo_ok(client, b"after")

    # --- the grafted listener ----------------------------------------------------------
    att["listener_unspec"] = raw_connect(listener.fileno(), None)
    att["listener_connect_forbidden"] = raw_connect(listener.fileno(), HOST, bad_tcp)
    if att["listener_connect_forbidden"] != 0:  # refused: what it accepted still flows
        accepted.sendall(b"still")
        flows["accepted_after_listener"] = peer.recv(5) == b"still"

    # --- a socket accepted from the grafted listener -----------------------------------
    att["accepted_unspec"] = raw_connect(accepted.fileno(), None)
    att["accepted_connect_forbidden"] = raw_connect(accepted.fileno(), HOST, bad_tcp)

    # --- bind to another address (after a disconnect, the socket is unbound) ----------
    raw_connect(victim_bind.fileno(), None)
    att["bind_other"] = raw_bind(victim_bind.fileno(), HOST, 0)

    # --- TCP Fast Open: a sendto() with an address connects, like connect() ----------
    raw_connect(victim_fastopen.fileno(), None)
    att["tcp_fastopen_forbidden"] = raw_sendto(victim_fastopen.fileno(), b"escaped", HOST, bad_tcp, MSG_FASTOPEN)

    # --- listen() on a disconnected socket takes a fresh port on the host, where the kernel allows it
    att["listen_unspec"] = raw_connect(victim_listen.fileno(), None)
    # whatever filter the broker may have put on the socket: off with it (SO_DETACH_FILTER)
    zero = ctypes.c_int(0)
    out["detach_filter"] = raw("setsockopt", victim_listen.fileno(), socket.SOL_SOCKET, 27, ctypes.byref(zero), 4)
    try_listen(att, "listen_after_unspec", victim_listen.fileno())
    if "listen_after_unspec_reached" in att:
        att["listen_reached"] = att.pop("listen_after_unspec_reached")

    # --- a pre-issued socket: never connected, so listen() autobinds on any kernel -----
    if len(preissued) >= 2:
        first, second = preissued[:2]
        att["preissued_bind"] = raw_bind(first.fileno(), HOST, 0)
        att["preissued_connect_forbidden"] = raw_connect(first.fileno(), HOST, bad_tcp)
        try_listen(att, "preissued_listen", first.fileno())
        # the same kind of socket still connects where the broker granted
        second.setblocking(True)  # issued non-blocking; a blocking raw connect completes in the call
        second.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
        flows["preissued_granted"] = raw_connect(second.fileno(), HOST, tcp_port) == 0 and echo_ok(second, b"pre")

    # --- UDP: connect re-point and sendto a forbidden destination ---------------------
    att["udp_connect_forbidden"] = raw_connect(udp.fileno(), HOST, bad_udp)
    if att["udp_connect_forbidden"] != 0:
        udp.send(b"still")
        flows["udp_after_connect"] = udp.recv(16) == b"still"
    att["udp_sendto_forbidden"] = raw_sendto(udp.fileno(), b"escaped", HOST, bad_udp)
    if att["udp_sendto_forbidden"] != 0 and att["udp_connect_forbidden"] != 0:
        udp.send(b"again")
        flows["udp_after_sendto"] = udp.recv(16) == b"again"
    raw_connect(udp.fileno(), None)
    att["udp_unspec_sendto_forbidden"] = raw_sendto(udp.fileno(), b"escaped", HOST, bad_udp)

    # --- one unconnected UDP socket, several peers: where the policy allows, and nowhere else
    multi = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    multi.settimeout(10)
    multi.sendto(b"first", (HOST, udp_port))  # through the shim: grafted by its first sendto
    flows["udp_multi_first"] = multi.recv(16) == b"first"
    out["grant_udp2"] = ask_grant(udp2_port)
    flows["udp_multi_other"] = raw_sendto(multi.fileno(), b"other", HOST, udp2_port) == 0 and multi.recv(16) == b"other"
    att["udp_multi_sendto_forbidden"] = raw_sendto(multi.fileno(), b"escaped", HOST, bad_udp)

    # --- an IPv6 UDP socket, given an IPv4 address: 0.0.0.0 reaches the host's 127.0.0.1 -
    att["udp6_sendto_v4_wildcard"] = raw_sendto(udp6.fileno(), b"escaped", "0.0.0.0", udp6_port)
    att["udp6_connect_v4_wildcard"] = raw_connect(udp6.fileno(), "0.0.0.0", udp6_port)
    if att["udp6_connect_v4_wildcard"] != 0:
        udp6.send(b"still6")
        flows["udp6_after"] = udp6.recv(16) == b"still6"

    out["errnames"] = {k: errno.errorcode.get(v, "OK") for k, v in att.items()}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
