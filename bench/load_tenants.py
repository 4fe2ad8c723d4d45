"""Load and correctness: 8 tenants x 64 concurrent clients for 60 s.

    python bench/load_tenants.py [--tenants 8] [--clients 64] [--seconds 60]

Every client speaks the wire format directly (as the shim does) on its own
connection, asking for UDP connect grafts to its tenant's own destination in
a loop, and checks each answer: a GRAFT verdict with exactly one fd, and
that fd connected to the address asked for (a "wrong graft" would be a
socket for another request or another tenant). UDP keeps the host free of
TIME_WAIT sockets, so the run measures the broker, not port exhaustion.
Prints a table per tenant with grafts/s and grant latency p50/p99, and
exits 1 if any graft failed or was wrong. Results: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from graft.broker.shim import wire  # noqa: E402
from support.harness import BrokerProcess, WireClient, connect_request  # noqa: E402

BASE_PORT = 20000  # tenant i's destination is 127.0.0.1:(BASE_PORT + i); nothing needs to listen (UDP)


def policy(tenants: int) -> str:
    text = "version = 1\n"
    for i in range(tenants):
        text += (
            f'[tenants.t{i}]\nmax_sockets = 100000\n[[tenants.t{i}.connect]]\nto = ["127.0.0.1/32"]\n'
            f'ports = [{BASE_PORT + i}]\nproto = "udp"\n'
        )
    return text


def client(path: str, port: int, deadline: float, out: list) -> None:
    want = ("127.0.0.1", port)
    req = connect_request(port, want[0], udp=True)
    ok = failed = wrong = 0
    lat = []
    c = WireClient(Path(path), timeout=30)
    try:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                c.send(req)
                rep, sock = c.reply()
            except OSError:
                failed += 1
                break
            lat.append(time.perf_counter() - t0)
            if rep is None or rep.verdict != wire.V_GRAFT or sock is None:
                failed += 1
            elif sock.getpeername() != want:
                wrong += 1
            else:
                ok += 1
            if sock is not None:
                sock.close()
    finally:
        c.close()
    out.append((ok, failed, wrong, lat))


def tenant_process(name: str, path: str, port: int, clients: int, start_at: float, seconds: float, q) -> None:
    while time.monotonic() < start_at:  # start every tenant's clients together
        time.sleep(min(0.01, max(0.0, start_at - time.monotonic())))
    results: list = []
    threads = [threading.Thread(target=client, args=(path, port, start_at + seconds, results)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = sorted(x for r in results for x in r[3])
    q.put(
        {
            "tenant": name,
            "ok": sum(r[0] for r in results),
            "failed": sum(r[1] for r in results),
            "wrong": sum(r[2] for r in results),
            "p50_ms": 1000 * statistics.median(lat) if lat else None,
            "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))] if lat else None,
        }
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="graft-load-", dir="/tmp") as tmp:
        broker = BrokerProcess(Path(tmp), policy(args.tenants), tenant="t0")
        try:
            broker.start("--audit-log", "off", "--log-level", "warning")
            ctx = multiprocessing.get_context("fork")
            q = ctx.Queue()
            start_at = time.monotonic() + 1.0
            procs = [
                ctx.Process(
                    target=tenant_process,
                    args=(
                        f"t{i}",
                        str(broker.socket_dir / f"t{i}.sock"),
                        BASE_PORT + i,
                        args.clients,
                        start_at,
                        args.seconds,
                        q,
                    ),
                )
                for i in range(args.tenants)
            ]
            for p in procs:
                p.start()
            rows = [q.get(timeout=args.seconds + 120) for _ in procs]
            for p in procs:
                p.join()
            alive = broker.proc.poll() is None
        finally:
            rc = broker.stop()
    print(f"{args.tenants} tenants x {args.clients} clients x {args.seconds:.0f} s, UDP connect grafts")
    print(f"{'tenant':>6} {'grafts':>9} {'per s':>8} {'failed':>7} {'wrong':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for r in sorted(rows, key=lambda r: r["tenant"]):
        print(
            f"{r['tenant']:>6} {r['ok']:>9,} {r['ok'] / args.seconds:>8,.0f} {r['failed']:>7} {r['wrong']:>6}"
            f" {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}"
        )
    total = sum(r["ok"] for r in rows)
    bad = sum(r["failed"] + r["wrong"] for r in rows)
    print(
        f"total {total:,} grafts ({total / args.seconds:,.0f}/s), {bad} failed or wrong; broker alive: {alive}, "
        f"exit {rc}"
    )
    return 0 if bad == 0 and alive and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
