"""100,000 grafts: the broker's fd count and memory stay flat."""

from __future__ import annotations

import os
import threading

from graft.broker.shim import wire
from support.harness import WireClient, connect_request, eventually

GRAFTS = 100_000
BATCH = 10_000
CLIENTS = 4
# RSS moves by a few MiB either way as the allocator grows and trims its
# arenas, so single readings prove nothing. The test compares the lowest
# reading of the last three batches with the highest of batches 3-5: only a
# real leak lifts every late reading above every early one. A leak of 64
# bytes per graft shows as 1.9 MiB over the 30,000 grafts between them.
RSS_SLACK_KB = 1024


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def graft_udp(path, n: int, errors: list) -> None:
    """n UDP connect grafts on one connection (UDP: no TIME_WAIT to run out of ports)."""
    req = connect_request(9, udp=True)
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
    broker = start_broker(
        'version = 1\n[tenants.t]\n[[tenants.t.connect]]\nto = ["127.0.0.1/32"]\nports = [9]\nproto = "udp"\n',
        "t",
        "--audit-log",
        "off",
    )
    pid = broker.proc.pid
    idle_fds = fds(pid)
    rss = []
    for _ in range(GRAFTS // BATCH):
        assert run_grafts(broker.socket_path, BATCH) == []
        rss.append(rss_kb(pid))
    assert eventually(lambda: fds(pid) <= idle_fds), (fds(pid), idle_fds)
    growth = min(rss[-3:]) - max(rss[2:5])
    assert growth < RSS_SLACK_KB, f"RSS after each {BATCH} grafts (kB): {rss}"
