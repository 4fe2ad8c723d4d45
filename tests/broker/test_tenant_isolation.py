"""Tenant isolation: a tenant's host sockets never join another's, or a host service's, SO_REUSEPORT group.

The kernel lets a socket join a port's SO_REUSEPORT group only if it has
the same owner uid as the group; the broker creates each tenant's sockets
under an owner of its own (the policy's socket_uid, by default derived
from the tenant's name). A root-owned broker socket would have joined a
root service's group and taken a share of its connections.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

import pytest

from graft.broker.core import request
from graft.broker.shim import wire
from graft.policy import parse_policy
from support.harness import BrokerProcess, WireClient, free_port, need_root_and_netns

pytestmark = pytest.mark.netns

CONNECTIONS = 1000
REUSEPORT = request.SockOpt(socket.SOL_SOCKET, socket.SO_REUSEPORT, struct.pack("=i", 1))


def policy(port: int, tenants=("a",)) -> str:
    text = "version = 1\n"
    for t in tenants:
        text += f"""[tenants.{t}]
default = "deny"
[[tenants.{t}.bind]]
addr = ["0.0.0.0/32"]
ports = [80]
host = "127.0.0.1:{port}"
proto = "tcp"
"""
    return text


def bind_with_reuseport(path) -> tuple[wire.Reply, socket.socket | None]:
    """A tenant's bind of :80 with SO_REUSEPORT set, as the shim sends it."""
    client = WireClient(path)
    try:
        client.send(
            wire.encode_request(
                request.OP_BIND,
                request.SockAddr(socket.AF_INET, ipaddress.ip_address("0.0.0.0"), 80),
                opts=(REUSEPORT,),
            )
        )
        return client.reply()
    finally:
        client.close()


def host_service(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(CONNECTIONS)
    return s


def connect_all(port: int) -> None:
    for _ in range(CONNECTIONS):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def accept_all(listener: socket.socket) -> int:
    listener.setblocking(False)
    n = 0
    while True:
        try:
            listener.accept()[0].close()
        except BlockingIOError:
            return n
        n += 1


def test_a_tenant_cannot_join_a_root_services_reuseport_group(short_tmp):
    need_root_and_netns()
    port = free_port()
    with host_service(port) as service:
        broker = BrokerProcess(short_tmp / "b", policy(port), tenant="a").start()
        try:
            reply, sock = bind_with_reuseport(broker.socket_path)
        finally:
            assert broker.stop() == 0, broker.stderr()
        assert sock is None and (reply.verdict, reply.error) == (wire.V_ERROR, errno.EADDRINUSE), reply
        connect_all(port)
        assert accept_all(service) == CONNECTIONS  # every one: no share went anywhere else


def test_two_tenants_never_share_a_reuseport_group(short_tmp):
    need_root_and_netns()
    port = free_port()
    broker = BrokerProcess(short_tmp / "b", policy(port, ("a", "b")), tenant="a").start()
    try:
        reply_a, first = bind_with_reuseport(broker.socket_path)
        reply_b, second = bind_with_reuseport(broker.socket_dir / "b.sock")
    finally:
        assert broker.stop() == 0, broker.stderr()
    assert first is not None and reply_a.verdict == wire.V_GRAFT, reply_a
    with first:
        # owned by tenant a's own uid, derived from its name (a socket's inode carries its owner)
        assert os.fstat(first.fileno()).st_uid == parse_policy(policy(port)).tenants["a"].socket_owner("a") != 0
        assert second is None and (reply_b.verdict, reply_b.error) == (wire.V_ERROR, errno.EADDRINUSE), reply_b
        first.listen(CONNECTIONS)
        connect_all(port)
        assert accept_all(first) == CONNECTIONS
