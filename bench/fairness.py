"""A quiet tenant's grant latency, alone and while another tenant floods the broker.

    python bench/fairness.py [--requests 1500] [--rounds 3]

The flooder is bench/load_tenants.py's tenant process: 64 connections asking
for UDP connect grafts as fast as the broker answers. The quiet tenant asks
for the same grafts one at a time on one connection, first with the broker to
itself, then during the flood, in each round; the table gives its p50 and p99
both ways and the flooded/alone ratio of the p99 (design target: 2x). The
mechanism this measures, per-tenant turns, is asserted by count in
tests/reliability/test_fairness.py; its latency on this 2-core machine, where the clients
share the cores with the broker, is this script's. Results: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import load_tenants  # noqa: E402

from graft.broker.shim import wire  # noqa: E402
from graft.brokerstatus import read_status  # noqa: E402
from support.harness import BrokerProcess, WireClient, connect_request, eventually  # noqa: E402


def grant_latencies(path: Path, port: int, n: int) -> tuple[float, float]:
    """(p50, p99) in seconds of n sequential UDP connect grafts on one connection."""
    req = connect_request(port, udp=True)
    c = WireClient(path)
    lat = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            c.send(req)
            rep, sock = c.reply()
            lat.append(time.perf_counter() - t0)
            if rep is None or rep.verdict != wire.V_GRAFT:
                raise SystemExit(f"quiet tenant: no graft ({rep})")
            sock.close()
    finally:
        c.close()
    lat.sort()
    return statistics.median(lat), lat[int(0.99 * (n - 1))]


def grafts(broker, tenant: str) -> int:
    return read_status(str(broker.socket_dir))["tenants"][tenant]["counts"]["graft"]


def one_round(broker, n: int) -> tuple[tuple, tuple]:
    quiet = broker.socket_dir / "t1.sock"
    alone = grant_latencies(quiet, load_tenants.BASE_PORT + 1, n)
    ctx = multiprocessing.get_context("fork")
    flooder = ctx.Process(
        target=load_tenants.tenant_process,
        args=("t0", str(broker.socket_dir / "t0.sock"), load_tenants.BASE_PORT, 64, time.monotonic(), 60, ctx.Queue()),
    )
    before = grafts(broker, "t0")
    flooder.start()
    try:
        if not eventually(lambda: grafts(broker, "t0") > before + 1000, timeout=20, interval=0.05):
            raise SystemExit("the flood did not start")
        flooded = grant_latencies(quiet, load_tenants.BASE_PORT + 1, n)
        if not flooder.is_alive():
            raise SystemExit("the flood ended before the measurement")
    finally:
        flooder.terminate()
        flooder.join()
    return alone, flooded


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="graft-fairness-", dir="/tmp") as tmp:
        broker = BrokerProcess(Path(tmp), load_tenants.policy(2), tenant="t0")
        try:
            broker.start("--audit-log", "off", "--log-level", "warning")
            rows = [one_round(broker, args.requests) for _ in range(args.rounds)]
        finally:
            rc = broker.stop()
    print(f"quiet tenant, {args.requests} sequential UDP connect grafts; flooder: 64 connections")
    print(f"{'round':>5} {'alone p50':>10} {'alone p99':>10} {'flooded p50':>12} {'flooded p99':>12} {'p99 ratio':>10}")
    for i, ((a50, a99), (f50, f99)) in enumerate(rows, 1):
        print(
            f"{i:>5} {a50 * 1e6:>8.0f}us {a99 * 1e6:>8.0f}us {f50 * 1e6:>10.0f}us {f99 * 1e6:>10.0f}us "
            f"{f99 / a99:>9.2f}x"
        )
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
