"""Fairness: a tenant flooding the broker from 64 connections barely moves
another tenant's turn.

The broker gives each tenant one turn at a time (tenant.TURNS_PER_TENANT),
so a quiet tenant's request waits behind about one of the flooder's, not
behind all of the flooder's ready connections. The test counts that in the
broker's own order of service, its audit log: how many of the flooder's
requests the broker served between two consecutive requests of the quiet
tenant, which asks again as soon as it has its answer. A count, not a
latency: CPU contention from elsewhere slows both tenants alike and leaves
it alone, where it made a latency bound flaky on this 2-core machine. What
the flood costs the quiet tenant in microseconds is a benchmark's
(bench/load_tenants.py, docs/reliability.md).
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from pathlib import Path

from graft.broker.shim import wire
from graft.brokerstatus import read_status
from support.harness import REPO, WireClient, connect_request, eventually

sys.path.insert(0, str(REPO / "bench"))
import load_tenants  # noqa: E402  (the flooding clients)

# Flooder requests served between two of the quiet tenant's, at the 90th
# percentile. With turns it is 2 here (the one in progress, and one while the
# quiet client turns its answer round), with a CPU hog running too; without
# turns (TURNS_PER_TENANT = 1000) it was 74-83, the median 64: every ready
# connection of the flooder's.
BOUND = 8
REQUESTS = 1500


def quiet_requests(path: Path, port: int, n: int = REQUESTS) -> None:
    """n sequential UDP connect grafts on one connection, each sent as soon as the last is answered."""
    req = connect_request(port, udp=True)
    c = WireClient(path)
    try:
        for _ in range(n):
            c.send(req)
            rep, sock = c.reply()
            assert rep.verdict == wire.V_GRAFT
            sock.close()
    finally:
        c.close()


def grafts(broker, tenant: str) -> int:
    return read_status(str(broker.socket_dir))["tenants"][tenant]["counts"]["graft"]


def served_between(audit: list[dict], quiet: str, other: str) -> list[int]:
    """For each of quiet's records after its first: how many of other's came since quiet's last."""
    gaps, since, seen_quiet = [], 0, False
    for r in audit:
        if r["tenant"] == quiet:
            if seen_quiet:
                gaps.append(since)
            seen_quiet, since = True, 0
        elif r["tenant"] == other:
            since += 1
    return gaps


def test_a_flooding_tenant_does_not_starve_another(start_broker):
    broker = start_broker(load_tenants.policy(2), "t0", "--log-level", "warning")
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    flooder = ctx.Process(
        target=load_tenants.tenant_process,
        args=("t0", str(broker.socket_dir / "t0.sock"), load_tenants.BASE_PORT, 64, time.monotonic(), 30, q),
    )
    flooder.start()
    try:
        # The flood is on once the broker has served the flooder 1,000 times.
        assert eventually(lambda: grafts(broker, "t0") > 1000, timeout=20, interval=0.05)
        quiet_requests(broker.socket_dir / "t1.sock", load_tenants.BASE_PORT + 1)
        assert flooder.is_alive()  # still flooding when the quiet tenant was done
    finally:
        flooder.terminate()
        flooder.join()
    gaps = sorted(served_between(broker.stop_and_audit(), "t1", "t0"))
    assert len(gaps) == REQUESTS - 1, len(gaps)
    # the flood went on between the quiet tenant's requests, not only around them
    assert sum(gaps) >= REQUESTS, sum(gaps)
    p90 = gaps[int(0.9 * (len(gaps) - 1))]
    assert p90 <= BOUND, (
        f"flooder requests served between two of the quiet tenant's: p50 {gaps[len(gaps) // 2]}, "
        f"p90 {p90}, max {gaps[-1]}"
    )
