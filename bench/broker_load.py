"""The broker's hot path: sustained grafted connects per second, 1/8/64 clients.

    python bench/broker_load.py [--quick] [--reps N] [--profile SECONDS]

Each client is a process of connbench.c (bench/connbench.c) in a namespace
under libgraft.so, looping socket(); connect(); close() against a server on
the host's 127.0.0.1, all clients started together. Every grafted connect is
one broker round trip, so this measures the broker. A native run on the
host (no namespace, no shim) with the same client counts is the baseline,
interleaved with the grafted runs.

--profile SECONDS also samples the broker with py-spy while one client
loops grafted connects, and prints where the broker's CPU time goes
(self time by function, and time under the broker's own functions).
Results go to bench/results/<ts>-broker.json.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import log, run_client, start_process, wait_line  # noqa: E402

RESULTS = common.REPO / "bench" / "results"
LEVELS = (1, 8, 64)
MODES = ("host", "graft")


def one(env, mode: str, clients: int, count: int) -> dict:
    argv = [env.connbench, "client", "127.0.0.1", str(env.ports.conn), str(count), str(clients), "20"]
    cmd = env.client_cpu(argv) if mode == "host" else env.client_in("graft", *argv)
    r = run_client(cmd, timeout=300)
    return json.loads(r.stdout)


def profile(env, seconds: int) -> dict:
    """py-spy the broker while one grafted client loops connects."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        return {"error": "py-spy not installed (pip install -e '.[bench]')"}
    raw = env.tmp / "broker-profile.txt"
    rate = 500
    spy = subprocess.Popen(
        [
            pyspy,
            "record",
            "--pid",
            str(env.broker.proc.pid),
            "--duration",
            str(seconds),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            str(raw),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)  # py-spy attaches
        deadline = time.monotonic() + seconds
        loops = 0
        client = None
        while time.monotonic() < deadline and loops < 1000:  # bounded
            client = one(env, "graft", 1, 2000)
            loops += 1
        spy.wait(timeout=seconds + 60)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if not raw.exists():
        return {"error": f"py-spy wrote nothing: {spy.stderr.read()[-1000:]}"}
    self_t: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n

    def top(c, k=25):
        return [{"frame": f, "samples": n, "share": round(n / total, 4)} for f, n in c.most_common(k)]

    return {
        "seconds": seconds,
        "rate_hz": rate,
        "samples": total,
        "busy_share": round(total / (seconds * rate), 3),
        "self": top(self_t),
        "inclusive": top(incl, 40),
        "last_client": client,
        "raw": str(raw),
    }


def figure(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
    for mode, colour in (("host", "#4c72b0"), ("graft", "#55a868")):
        xs = [c for c in LEVELS if f"{mode}/{c}" in summary]
        axes[0].plot(xs, [summary[f"{mode}/{c}"]["rate"] for c in xs], "o-", color=colour, label=mode)
        axes[1].plot(xs, [summary[f"{mode}/{c}"]["p99_us"] for c in xs], "o-", color=colour, label=mode)
    axes[0].set_title("connect+close cycles/s (higher is better)", fontsize=9)
    axes[1].set_title("connect() p99, µs (lower is better)", fontsize=9)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(LEVELS), [str(c) for c in LEVELS])
        ax.set_xlabel("concurrent client processes")
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--profile", type=int, default=0, metavar="SECONDS", help="py-spy the broker for SECONDS")
    ap.add_argument("--log-level", default="info", help="the broker's --log-level (default info)")
    ap.add_argument("--max-sockets", type=int, help="the tenant's max_sockets (default: the policy default, 1024)")
    ap.add_argument("--docs-img", action="store_true", help="also copy the figure to docs/img/bench-broker-load.png")
    ap.add_argument("--audit", default="file", help="'file' (default: a file in the run's temp dir), 'off' or 'stderr'")
    args = ap.parse_args(argv)
    reps = args.reps or (2 if args.quick else 3)
    count = 1280 if args.quick else 6400  # divisible by every level
    common.require("cc", "nsenter")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    machine = common.machine_info()
    runs = []
    prof = None
    with common.environment(
        broker_log_level=args.log_level, with_nat=False, max_sockets=args.max_sockets, audit=args.audit
    ) as env:
        srv = start_process(
            env.stack,
            env.server_cpu([env.connbench, "server", "127.0.0.1", str(env.ports.conn)]),
            stdin=subprocess.PIPE,
            log_to=env.tmp / "connbench-server.log",
        )
        wait_line(srv, "ready")
        for rep in range(reps):
            for clients in LEVELS:
                for mode in MODES if rep % 2 == 0 else MODES[::-1]:
                    try:
                        d = one(env, mode, clients, count)
                        runs.append({"mode": mode, "clients": clients, "rep": rep, **d})
                    except Exception as e:
                        runs.append({"mode": mode, "clients": clients, "rep": rep, "error": str(e)[:1500]})
                        log(f"  {mode} x{clients} rep {rep}: FAILED {str(e)[:300]}")
        if args.profile:
            log(f"profiling the broker with py-spy for {args.profile}s")
            prof = profile(env, args.profile)
    summary = {}
    for mode in MODES:
        for clients in LEVELS:
            rs = [r for r in runs if r["mode"] == mode and r["clients"] == clients and "rate" in r]
            if rs:
                summary[f"{mode}/{clients}"] = {
                    k: statistics.median(r[k] for r in rs) for k in ("rate", "p50_us", "p99_us")
                } | {"n": len(rs)}
    print(
        f"grafted connects per second ({count} socket+connect+close cycles per run, median of {reps} runs); "
        f"host TIME-WAIT sockets at start: {machine['host_time_wait_at_start']}"
    )
    print(
        f"{'clients':>7} | {'host rate/s':>11} {'p50 µs':>8} {'p99 µs':>8} | {'graft rate/s':>12} {'p50 µs':>8} "
        f"{'p99 µs':>8} | {'graft/host rate':>15}"
    )
    print("-" * 96)
    for clients in LEVELS:
        h, g = summary.get(f"host/{clients}"), summary.get(f"graft/{clients}")
        hs = f"{h['rate']:>11,.0f} {h['p50_us']:>8.1f} {h['p99_us']:>8.1f}" if h else f"{'fail':>29}"
        gs = f"{g['rate']:>12,.0f} {g['p50_us']:>8.1f} {g['p99_us']:>8.1f}" if g else f"{'fail':>30}"
        rr = f"{g['rate'] / h['rate']:>15.3f}" if h and g else f"{'—':>15}"
        print(f"{clients:>7} | {hs} | {gs} | {rr}")
    if prof:
        print()
        if "error" in prof:
            print(f"profile: {prof['error']}")
        else:
            print(
                f"py-spy: {prof['samples']} samples in {prof['seconds']}s at {prof['rate_hz']} Hz "
                f"(broker on CPU {prof['busy_share']:.0%} of the time)"
            )
            print("self time (top 15):")
            for e in prof["self"][:15]:
                print(f"  {e['share']:6.1%}  {e['frame']}")
            print("inclusive time (top 25):")
            for e in prof["inclusive"][:25]:
                print(f"  {e['share']:6.1%}  {e['frame']}")
    out = RESULTS / f"{stamp}-broker.json"
    out.write_text(
        json.dumps(
            {
                "machine": machine,
                "count": count,
                "reps": reps,
                "runs": runs,
                "summary": summary,
                "profile": prof,
                "broker_log_level": args.log_level,
                "max_sockets": args.max_sockets,
                "audit": args.audit,
            },
            indent=2,
        )
    )
    png = out.with_suffix(".png")
    figure(
        summary, png, f"grafted connects, 1/8/64 client processes (max_sockets {args.max_sockets or 'default 1024'})"
    )
    if args.docs_img:
        (common.REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        shutil.copy(png, common.REPO / "docs" / "img" / "bench-broker-load.png")
    print(f"results: {out} and {png.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
