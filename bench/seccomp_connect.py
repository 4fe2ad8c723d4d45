"""Connect cost in seccomp mode, side by side with native and preload (issue 13, item 6).

    bench/seccomp_connect.py [--quick] [--connects N] [--reps R]

Rows, each connbench.c's timed connect() to a host server on 127.0.0.1:

  native          no namespace, no graft
  preload slow    libgraft.so, a broker without confinement: every connect asks the broker
  preload fast    libgraft.so, a broker with confinement: repeated destinations take the
                  kernel's fast path
  seccomp         graft run --seccomp, same broker: every connect stops in the filter and the
                  seccomp agent answers it

The grafted rows run in a namespace with only `lo`. Rows are run in an order
rotated each repetition; the table shows the median over repetitions of
each run's p50 and p99, and p50's ratio and difference to native. Target
(issue 13): seccomp within +60 µs of native at p50. Needs root.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import uuid
from contextlib import ExitStack
from pathlib import Path

from common import build_connbench, create_namespace, free_port, log, require, run_client, start_process, wait_line

from support.harness import GRAFT, BrokerProcess  # common.py puts tests/ on the path

ROWS = ("native", "preload slow", "preload fast", "seccomp")
TARGET_US = 60.0


def policy(port: int, confinement: str, max_sockets: int | None = None) -> str:
    """Both tenants may connect to 127.0.0.1:port/tcp; max_sockets: theirs (None: the policy's default)."""
    rule = f'[[tenants.{{t}}.connect]]\nto = ["127.0.0.1/32"]\nports = [{port}]\nproto = "tcp"\n'
    limit = "" if max_sockets is None else f"max_sockets = {max_sockets}\n"
    return (
        f'version = 1\n[broker]\nconfinement = "{confinement}"\n'
        f'[tenants.preload]\ndefault = "deny"\n{limit}'
        + rule.format(t="preload")
        + f'[tenants.seccomp_t]\nmode = "seccomp"\ndefault = "deny"\n{limit}'
        + rule.format(t="seccomp_t")
    )


def argv_for(row: str, netns: str, brokers: dict, client: list[str]) -> list[str]:
    if row == "native":
        return client
    broker = brokers["off" if row == "preload slow" else "on"]
    if row == "seccomp":
        return [
            GRAFT,
            "run",
            "--seccomp",
            "--socket",
            str(broker.socket_dir / "seccomp_t.sock"),
            "--netns",
            netns,
            "--",
            *client,
        ]
    return [GRAFT, "run", "--socket", str(broker.socket_dir / "preload.sock"), "--netns", netns, "--", *client]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2,000 connects, 1 repetition")
    p.add_argument("--connects", type=int, help="timed connects per run (default 20,000; --quick 2,000)")
    p.add_argument("--reps", type=int, help="repetitions (default 3; --quick 1)")
    args = p.parse_args(argv)
    connects = args.connects or (2000 if args.quick else 20000)
    reps = args.reps or (1 if args.quick else 3)
    require("cc", "taskset")
    results: dict[str, list[dict]] = {row: [] for row in ROWS}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graft-bench-", dir="/tmp")))
        connbench = build_connbench(tmp)
        port = free_port()
        server = start_process(
            stack,
            ["taskset", "-c", "0", connbench, "server", "127.0.0.1", str(port)],
            stdin=subprocess.PIPE,
            log_to=tmp / "server.log",
        )
        wait_line(server, "ready")
        netns = f"graft-bench-sc-{uuid.uuid4().hex[:6]}"
        from pyroute2 import netns as _netns

        create_namespace(netns)
        stack.callback(_netns.remove, netns)
        brokers = {}
        for conf in ("on", "off"):
            b = BrokerProcess(
                tmp / f"broker-{conf}", policy(port, "required" if conf == "on" else "off"), tenant="preload"
            )
            stack.callback(b.stop)
            b.start("--log-level", "warning", "--audit-log", "off")
            brokers[conf] = b
        client = ["taskset", "-c", "1", connbench, "client", "127.0.0.1", str(port), str(connects), "1", "200"]
        for rep in range(reps):
            for row in ROWS[rep % len(ROWS) :] + ROWS[: rep % len(ROWS)]:
                log(f"rep {rep + 1}/{reps}: {row}")
                r = run_client(argv_for(row, netns, brokers, client), timeout=600)
                results[row].append(json.loads(r.stdout))
    print(table(results, connects, reps))
    return 0


def table(results: dict[str, list[dict]], connects: int, reps: int) -> str:
    def med(row: str, key: str) -> float:
        return statistics.median(r[key] for r in results[row])

    base = med("native", "p50_us")
    lines = [
        f"connect() latency, {connects} connects per run, median of {reps} run(s)",
        "",
        f"{'row':<14} {'p50 µs':>8} {'p99 µs':>8} {'p50/native':>11} {'p50 - native':>13} {'errors':>7}",
    ]
    for row in ROWS:
        p50 = med(row, "p50_us")
        errors = sum(r["errors"] for r in results[row])
        lines.append(
            f"{row:<14} {p50:>8.1f} {med(row, 'p99_us'):>8.1f} {p50 / base:>10.2f}x {p50 - base:>+12.1f} {errors:>7}"
        )
    delta = med("seccomp", "p50_us") - base
    lines += [
        "",
        f"target: seccomp p50 within +{TARGET_US:.0f} µs of native: "
        f"{'met' if delta <= TARGET_US else 'NOT met'} ({delta:+.1f} µs)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
