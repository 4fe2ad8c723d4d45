"""DNS lookup latency through the broker's resolver, against the same upstream asked directly.

    bench/dns_lookup.py [--quick] [--rounds N] [--queries N] [--no-pin]

A `graft run --netns` program resolves names through its tenant's resolver,
which the broker serves on 127.0.0.11:53 inside the program's own network
namespace; it judges each query by the tenant's `dns.names`, answers from
the tenant's cache while the TTL lasts, or forwards to the tenant's
upstream from the host side, and audits every query (docs/dns.md). This
measures what that costs a lookup, with one C client (bench/dnsbench.c:
connect() once, then send() and recv() per query, clock_gettime around
each) on both sides:

  direct  on the host, asking the upstream itself: a dnsmasq on UPSTREAM:53
          (tests/support/dnsmasq.py) that answers every name under bench.test
  graft   in a fresh namespace with only `lo`, under `graft run --netns`,
          asking 127.0.0.11:53: the broker's resolver, whose upstream is that
          same dnsmasq

and two rows:

  cached    the same name every query, after an untimed warm-up: the broker
            answers from its cache (dnsmasq from its configuration)
  uncached  a name of its own for every query (TAG-<i>.bench.test, never asked
            before in this broker's life): the broker forwards every one

Each round runs every (row, side) once, the rows' and the sides' order
alternated every round, so drift on the machine hits both sides alike. The
table shows, per row and side, the median over rounds of each run's p50
and p99; the p50 difference (graft − direct) and ratio are formed per
round and summarised by their median and by the geometric mean with a 95%
t-interval (bench/stats.py). Target (the issue): cached graft p50 within
+50 µs of direct. The broker's audit log is read at the end to check that
cached queries were answered from the cache and uncached ones forwarded.

dnsmasq and the broker run on CPU 0 and the client on CPU 1 (common.py's
placement), so both sides pay the same cross-CPU wake-ups; --no-pin leaves
placement to the scheduler. Traffic stays on the host's loopback and in
the namespace made here; the host's configured DNS servers are never asked
(the tenant's upstream is the dnsmasq above, which forwards nothing).
Everything (the broker, the namespace, dnsmasq, the temp dir) is removed
when the ExitStack unwinds, pass or fail, SIGTERM included. Needs root.
Results go to bench/results/<ts>-dns.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import sys
import tempfile
import uuid
from contextlib import ExitStack
from pathlib import Path

import common
import stats
from common import create_namespace, log, remove_namespace, require, run_client

from support.dnsmasq import dnsmasq, dnsmasq_binary  # common.py puts tests/ on the path
from support.harness import BrokerProcess, graft_cmd

RESULTS = common.REPO / "bench" / "results"
TENANT = "bench"
# Not the demo's 127.53.0.1 (policy/examples/demo.toml), so `make demo` can run beside this.
UPSTREAM = "127.53.1.1"
RESOLVER = "127.0.0.11"  # the tenant's default resolver address
DOMAIN = "bench.test"
CACHED_NAME = f"cached.{DOMAIN}"
TTL = 300  # longer than a run: a cached answer never expires mid-run
ROWS = ("cached", "uncached")
SIDES = ("direct", "graft")
TARGET_US = 50.0  # cached: graft p50 <= direct p50 + this
SERVER_CPUS, CLIENT_CPU = {0}, "1"


def policy() -> str:
    # names: judged on every query, as an operator's policy would have it
    return f"""\
version = 1

[tenants.{TENANT}]
default = "deny"

[tenants.{TENANT}.dns]
upstream = ["{UPSTREAM}:53"]
names = ["*.{DOMAIN}"]
"""


def pin_all_threads(pid: int, cpus: set[int]) -> None:
    """Pin every thread pid has now; threads it starts later inherit the affinity of the one starting them."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a worker thread that just ended
            pass


def percentile(sorted_samples: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    return sorted_samples[max(0, math.ceil(p / 100 * len(sorted_samples)) - 1)]


def client_argv(client: str, row: str, side: str, rnd: int, args) -> list[str]:
    addr, port = (UPSTREAM, "53") if side == "direct" else (RESOLVER, "53")
    name = CACHED_NAME if row == "cached" else DOMAIN
    argv = [client, addr, port, name, str(args.queries), str(args.warmup), str(args.timeout_ms)]
    if row == "uncached":
        # r<round><d|g>: no name is asked twice in this broker's life, so its cache misses every time
        argv.append(f"r{rnd}{side[0]}")
    return argv


def one_run(env: dict, row: str, side: str, rnd: int, args) -> dict:
    argv = client_argv(env["client"], row, side, rnd, args)
    if side == "graft":
        argv = graft_cmd(env["broker"], env["netns"], *argv, dns=True)  # dns: the resolver, resolv.conf
    if not args.no_pin:
        argv = ["taskset", "-c", CLIENT_CPU, *argv]
    # bounded: every query has its deadline, and the client stops after MAX_LOST (20) lost ones
    timeout = 60 + (args.queries + args.warmup) * 0.01 + 20 * args.timeout_ms / 1000
    out = json.loads(run_client(argv, timeout=timeout).stdout)
    samples = sorted(out.pop("samples_us"))
    if not samples:
        raise RuntimeError(f"{row}/{side}: no query answered ({out}); is the resolver there?")
    return {
        "row": row,
        "side": side,
        "round": rnd,
        **out,
        "p50_us": percentile(samples, 50),
        "p90_us": percentile(samples, 90),
        "p99_us": percentile(samples, 99),
        "max_us": samples[-1],
        "mean_us": statistics.fmean(samples),
    }


def check_audit(broker: BrokerProcess) -> dict:
    """What the broker's audit log says it did: cached queries from the cache, uncached ones forwarded."""
    keys = ("cached_from_cache", "cached_forwarded", "uncached_from_cache", "uncached_forwarded", "not_answered")
    out = dict.fromkeys(keys, 0)
    for r in broker.audit():
        if r.get("op") != "dns":
            continue
        if r.get("action") != "graft":
            out["not_answered"] += 1
            continue
        row = "cached" if r.get("name") == CACHED_NAME else "uncached"
        out[f"{row}_{'from_cache' if r.get('upstream_ms') == 0 else 'forwarded'}"] += 1
    return out


def summarise(runs: list[dict]) -> dict:
    summary = {}
    for row in ROWS:
        s = {}
        for side in SIDES:
            rs = [r for r in runs if r["row"] == row and r["side"] == side]
            s[side] = {
                "p50_us": statistics.median(r["p50_us"] for r in rs),
                "p99_us": statistics.median(r["p99_us"] for r in rs),
                "lost": sum(r["lost"] for r in rs),
                "bad": sum(r["bad"] for r in rs),
                "answered": sum(r["answered"] for r in rs),
                "runs": len(rs),
            }
        by_round = {(r["round"], r["side"]): r for r in runs if r["row"] == row}
        rounds = sorted({rnd for rnd, _ in by_round})
        # paired by round: the two sides ran seconds apart, in the same machine state
        deltas = [by_round[n, "graft"]["p50_us"] - by_round[n, "direct"]["p50_us"] for n in rounds]
        ratios = [by_round[n, "graft"]["p50_us"] / by_round[n, "direct"]["p50_us"] for n in rounds]
        ri = stats.ratio_interval(ratios)
        s["delta_p50_us"] = statistics.median(deltas)
        s["delta_p50_range"] = [min(deltas), max(deltas)]
        s["ratio_p50"] = {"estimate": ri.estimate, "low": ri.low, "high": ri.high, "n": ri.n}
        s["delta_p99_us"] = statistics.median(
            by_round[n, "graft"]["p99_us"] - by_round[n, "direct"]["p99_us"] for n in rounds
        )
        summary[row] = s
    summary["target_met"] = summary["cached"]["delta_p50_us"] <= TARGET_US
    return summary


def table(summary: dict, args, audit: dict | None) -> str:
    place = "not pinned" if args.no_pin else "dnsmasq and broker on CPU 0, client on CPU 1"
    lines = [
        f"DNS lookup latency (UDP, A), {args.rounds} round(s) x {args.queries} queries per run "
        f"({args.warmup} warm-up), medians over rounds; {place}",
        "",
        f"{'row':<9} {'direct p50':>10} {'p99':>8} {'graft p50':>10} {'p99':>8} {'Δp50 µs':>9} "
        f"{'Δp50 min..max':>17} {'graft/direct p50 [95%]':>24} {'lost d/g':>9} {'bad d/g':>8}",
    ]
    for row in ROWS:
        s = summary[row]
        d, g, r = s["direct"], s["graft"], s["ratio_p50"]
        ci = f"[{r['low']:.2f}-{r['high']:.2f}]" if r["low"] is not None else "[n/a]"
        lo, hi = s["delta_p50_range"]
        spread, ratio = f"{lo:+.1f}..{hi:+.1f}", f"{r['estimate']:.2f}x {ci}"
        lost, bad = f"{d['lost']}/{g['lost']}", f"{d['bad']}/{g['bad']}"
        lines.append(
            f"{row:<9} {d['p50_us']:>10.1f} {d['p99_us']:>8.1f} {g['p50_us']:>10.1f} {g['p99_us']:>8.1f} "
            f"{s['delta_p50_us']:>+9.1f} {spread:>17} {ratio:>24} {lost:>9} {bad:>8}"
        )
    delta = summary["cached"]["delta_p50_us"]
    lines += [
        "",
        "(µs; Δ = graft − direct, per round, then the median; the ratio is the geometric mean of the rounds')",
        f"target: cached graft p50 within +{TARGET_US:.0f} µs of direct: "
        f"{'met' if summary['target_met'] else 'NOT met'} ({delta:+.1f} µs)",
    ]
    if audit is not None:
        lines.append(
            f"broker's audit: cached name {audit['cached_from_cache']} from the cache, "
            f"{audit['cached_forwarded']} forwarded (warm-ups); other names {audit['uncached_forwarded']} forwarded, "
            f"{audit['uncached_from_cache']} from the cache; {audit['not_answered']} not answered"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rounds x 1,000 queries")
    p.add_argument("--rounds", type=int, help="rounds (default 9; --quick 3)")
    p.add_argument("--queries", type=int, help="timed queries per run (default 10,000; --quick 1,000)")
    p.add_argument("--warmup", type=int, default=200, help="untimed queries first, per run (default 200)")
    p.add_argument("--timeout-ms", type=int, default=1000, help="per query; then it counts as lost (default 1000)")
    p.add_argument("--no-pin", action="store_true", help="do not pin dnsmasq and the broker to CPU 0, clients to 1")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 9)
    args.queries = args.queries or (1000 if args.quick else 10000)
    if args.rounds < 1 or args.queries < 1 or args.warmup < 0 or args.timeout_ms < 1:
        p.error("--rounds and --queries at least 1, --warmup at least 0, --timeout-ms at least 1")
    if (os.cpu_count() or 1) < 2:
        args.no_pin = True
    require("cc", "taskset")
    if dnsmasq_binary() is None:
        raise SystemExit("missing dnsmasq (make deps installs dnsmasq-base)")

    common.unwind_on_sigterm()  # the broker, dnsmasq and the namespace go on `kill` too

    machine = common.machine_info()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    runs: list[dict] = []
    audit = None
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graft-bench-", dir="/tmp")))
        client = common.build_c("dnsbench", tmp)
        cpus = None if args.no_pin else SERVER_CPUS
        stack.enter_context(
            dnsmasq(UPSTREAM, {CACHED_NAME: "127.0.0.1"}, ttl=TTL, wildcards={DOMAIN: "127.0.0.1"}, cpus=cpus)
        )
        netns = f"graft-bench-dns-{uuid.uuid4().hex[:6]}"
        create_namespace(netns)  # only `lo`, up
        stack.callback(remove_namespace, netns)
        broker = BrokerProcess(tmp / "broker", policy(), tenant=TENANT)
        stack.callback(broker.stop)
        broker.start("--log-level", "info")  # the audit log: a file in tmp, as bench/run.py's broker
        if cpus is not None:
            pin_all_threads(broker.proc.pid, cpus)
        env = {"client": client, "broker": broker, "netns": netns}
        for rnd in range(args.rounds):
            # sides swap every round (neither is always first), rows every other: all four orders
            rows = ROWS if (rnd // 2) % 2 == 0 else ROWS[::-1]
            sides = SIDES if rnd % 2 == 0 else SIDES[::-1]
            for row in rows:
                for side in sides:
                    log(f"round {rnd + 1}/{args.rounds}: {row} {side}")
                    r = one_run(env, row, side, rnd, args)
                    log(f"  p50 {r['p50_us']:.1f} µs, p99 {r['p99_us']:.1f} µs, lost {r['lost']}, bad {r['bad']}")
                    runs.append(r)
        audit = check_audit(broker)
    summary = summarise(runs)
    print(table(summary, args, audit))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{stamp}-dns.json"
    out.write_text(
        json.dumps(
            {
                "machine": machine,
                "args": vars(args),
                "policy": policy(),
                "upstream": f"{UPSTREAM}:53",
                "runs": runs,
                "summary": summary,
                "audit": audit,
            },
            indent=2,
        )
    )
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
