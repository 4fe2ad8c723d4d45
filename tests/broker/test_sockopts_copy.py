"""sockopts.copy_options: what seccomp mode carries from the app's socket to the host socket.

Plain sockets on this host, no root: only options the app changed go over,
buffer sizes only when the app fixed them (autotuning stays on otherwise),
and nothing outside the allowlist.
"""

from __future__ import annotations

import socket
import struct

from graft.broker.core.sockopts import SO_BUF_LOCK, copy_options, option_defaults


def pair(family=socket.AF_INET, kind=socket.SOCK_STREAM):
    return socket.socket(family, kind), socket.socket(family, kind)


def as_int(sock: socket.socket, level: int, name: int) -> int:
    return struct.unpack("=i", sock.getsockopt(level, name, 4))[0]


def test_changed_options_go_over_and_defaults_stay_defaults():
    app, host = pair()
    with app, host:
        defaults = option_defaults(host)
        app.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        app.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        app.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77)
        assert copy_options(app, host, defaults) == []
        assert as_int(host, socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert as_int(host, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert as_int(host, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 77
        # TCP_MAXSEG reads 536 on any unconnected socket: copying it would clamp the MSS
        assert app.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) == host.getsockopt(
            socket.IPPROTO_TCP, socket.TCP_MAXSEG
        )


def test_buffer_sizes_go_over_only_when_the_app_fixed_them():
    app, host = pair()
    with app, host:
        defaults = option_defaults(host)
        app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 50000)  # not what a fresh socket has
        copy_options(app, host, defaults)
        # the kernel doubles what is set, on both: the same size, fixed (SOCK_RCVBUF_LOCK) on the host
        # too, and the send buffer, which the app left alone, still autotuned
        assert as_int(host, socket.SOL_SOCKET, socket.SO_RCVBUF) == as_int(app, socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert as_int(host, socket.SOL_SOCKET, SO_BUF_LOCK) == 2


def test_options_outside_the_allowlist_never_go_over():
    app, host = pair()
    with app, host:
        defaults = option_defaults(host)
        app.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, 5)  # not admitted: the broker is root
        copy_options(app, host, defaults)
        assert as_int(host, socket.SOL_SOCKET, socket.SO_PRIORITY) == 0


def test_udp_and_ipv6_have_their_own_options():
    app, host = pair(socket.AF_INET6, socket.SOCK_DGRAM)
    with app, host:
        defaults = option_defaults(host)
        assert (socket.IPPROTO_TCP, socket.TCP_NODELAY) not in defaults  # not a UDP option
        app.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        app.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        assert copy_options(app, host, defaults) == []
        assert as_int(host, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert as_int(host, socket.SOL_SOCKET, socket.SO_BROADCAST) == 1


def test_a_buffer_fixed_at_the_default_size_stays_fixed():
    app, host = pair()
    with app, host:
        defaults = option_defaults(host)
        default = as_int(host, socket.SOL_SOCKET, socket.SO_SNDBUF)
        app.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, default // 2)  # reads back as the default
        assert as_int(app, socket.SOL_SOCKET, socket.SO_SNDBUF) == default
        copy_options(app, host, defaults)
        assert as_int(host, socket.SOL_SOCKET, SO_BUF_LOCK) == 1  # SOCK_SNDBUF_LOCK: no autotuning, as the app
