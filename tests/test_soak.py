"""100,000 grafts: the broker's fd count and memory stay flat."""
from __future__ import annotations

import ipaddress
import os
import socket
import threading

from graft.broker import wire
from harness import WireClient, eventually

GRAFTS = 100_000
CLIENTS = 4
# The broker's RSS may grow while allocator arenas and caches warm up; after
# that, 80,000 more grafts may add at most this much (a leak of even 64
# bytes per graft would add 5 MB).
RSS_SLACK_KB = 2048


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def graft_udp(path, n: int, errors: list) -> None:
    """n UDP connect grafts on one connection (UDP: no TIME_WAIT to run out of ports)."""
    req = wire.encode_request(wire.OP_CONNECT, wire.SockAddr(socket.AF_INET, ipaddress.ip_address("127.0.0.1"), 9),
                              type=socket.SOCK_DGRAM)
    c = WireClient(path)
    try:
        for _ in range(n):
            c.send(req)
            rep, sock = c.reply()
            if rep is None or rep.verdict != wire.V_GRAFT or sock is None:
                errors.append(rep)
                return
            sock.close()
    finally:
        c.close()


def run_grafts(path, total: int) -> list:
    errors: list = []
    threads = [threading.Thread(target=graft_udp, args=(path, total // CLIENTS, errors)) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_100k_grafts_leave_fds_and_memory_flat(start_broker):
    broker = start_broker('version = 1\n[tenants.t]\n[[tenants.t.connect]]\nto = ["127.0.0.1/32"]\nports = [9]\n'
                          'proto = "udp"\n', "t", "--audit-log", "off")
    pid = broker.proc.pid
    idle_fds = fds(pid)
    assert run_grafts(broker.socket_path, GRAFTS // 5) == []  # warm-up
    warm = rss_kb(pid)
    assert run_grafts(broker.socket_path, GRAFTS - GRAFTS // 5) == []
    assert eventually(lambda: fds(pid) <= idle_fds), (fds(pid), idle_fds)
    grown = rss_kb(pid) - warm
    assert grown < RSS_SLACK_KB, f"RSS grew by {grown} kB over {GRAFTS - GRAFTS // 5} grafts"
