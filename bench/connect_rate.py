"""Short connections at 1, 8 and 64 client processes: host, preload, seccomp and pasta side by side.

    bench/connect_rate.py [--quick] [--rounds N] [--connects N] [--no-pin] [--max-sockets N] [--report JSON]

DESIGN.md ("Performance model and targets") sets the cost of a grafted
connection's set-up against a native one: in preload mode (libgraft.so,
the fast path on) connect+close cycles/s at least 0.8x host's at 1 and at
8 client processes, connect() p99 at most 2x host's, p50 within +10 µs; in
seccomp mode (the broker's seccomp agent and its C loop answer the
connect) 0.6x, 4x and +60 µs. bench/run.py's connect row has one client
process; bench/seccomp_connect.py has no rate. Here several processes
connect at once, which is where the shim's pool of pre-issued sockets runs
dry and waits for the broker's refill, and where the broker's per-socket
work is shared by every client.

Every run is bench/connbench.c's client, PROCS forked processes making
COUNT cycles between them (socket(); connect(); SO_LINGER{1,0}; close()),
against one connbench server on the host's 127.0.0.1:

  host      the client on the host
  preload   `graft run --netns NS --no-dns` in a namespace with only `lo`; the
            tenant's policy allows connect to 127.0.0.1:PORT/tcp, and the broker
            has confinement "required", so repeated connects take the fast path
  seccomp   `graft run --seccomp --netns NS --no-dns`, the same namespace and
            broker, a tenant in mode "seccomp" (bench/seccomp_connect.py's policy)
  pasta     a namespace connected by pasta (bench/usernet.py, as bench/run.py
            runs it: `-T PORT`, the spliced loopback path) in connbench's eof
            mode: pasta completes the client's handshake itself and connects
            onward afterwards, so connect() alone returns before the server is
            reached; eof times connect() until the server's close arrives
  host-eof  the host client in eof mode too: what pasta's row is compared with

Each round runs every scenario at every client count once: the client
counts in turn (reversed every other round), and at each, every scenario,
in an order rotated every round, so drift on the machine hits all alike.
A figure is the median over rounds of each run's rate, p50 and p99; the
ratios to host are formed per round and summarised by their geometric mean
with a 95% t-interval (bench/stats.py), the p50 difference by its median.
The server runs on CPU 0 (at nice -10, so that it is never what limits a
run) and every client on CPU 1 (common.py's placement); the broker and
pasta run where the scheduler puts them, as in bench/run.py, at the
server's nice: they carry the connects to it, and in production they and
the server are equals at the default nice. A broker at 0 against the
server at -10 got about a ninth of CPU 0 while both wanted it, answered
refills late, and set the preload p99 at 8 clients (docs/benchmarks.md). SYNs the host
namespace's listeners dropped are counted around every run: a dropped SYN
is retried after 1 s and turns a run's rate and p99 into noise.
Results: bench/results/<ts>-connect-rate.json and .md.

Traffic only crosses the host's loopback and the two namespaces made here.
Everything (the broker, both namespaces, pasta, the server, the temp dir)
is removed when the ExitStack unwinds, pass or fail, SIGTERM included.
Every run is bounded by its count, connbench's 100-failure stop and a
timeout. Needs root.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import run  # noqa: E402
import stats  # noqa: E402
import usernet  # noqa: E402
from common import build_connbench, create_namespace, free_port, log, remove_namespace, run_client  # noqa: E402
from seccomp_connect import policy  # noqa: E402

from support.harness import GRAFT, BrokerProcess  # noqa: E402  (common.py puts tests/ on the path)

SCENARIOS = ("host", "preload", "seccomp", "pasta", "host-eof")
# connbench's mode per scenario: "connect" times connect() alone (what the targets name), "eof" until
# the server's close arrives (the only way to see pasta reach the server; module docstring)
MODE = {"host": "connect", "preload": "connect", "seccomp": "connect", "pasta": "eof", "host-eof": "eof"}
BASE = {"preload": "host", "seccomp": "host", "pasta": "host-eof"}  # each compared with a host run in its mode
CLIENTS = (1, 8, 64)
WARMUP = 100  # untimed cycles per process: the first connect grants the destination, the shim fills its pool
# DESIGN.md's targets: (rate >= x host, at these client counts), p99 <= x host, p50 <= host + µs
TARGETS = {"preload": (0.8, (1, 8), 2.0, 10.0), "seccomp": (0.6, (1, 8), 4.0, 60.0)}
SERVER_NICE = -10  # main() says why
# what the runs depend on; a rebuild in the middle of a run (someone else's `make`) would mix two builds
BUILDS = ("shim/libgraft.so", "broker/seccomp/libgraft_seccomp.so")


@dataclass
class Config:
    rounds: int
    connects: int  # per run, shared by the processes
    max_sockets: int | None = None  # the grafted tenants' (None: the policy's default)

    @classmethod
    def make(cls, quick: bool, rounds: int | None, connects: int | None, max_sockets: int | None = None) -> Config:
        # quick: 5,000, not fewer: a host run of 2,000 lasts 60 ms, and one stalled process then sets its rate
        c = cls(3, 5000) if quick else cls(5, 20000)
        return cls(rounds or c.rounds, connects or c.connects, max_sockets)


def builds() -> dict:
    out = {}
    for rel in BUILDS:
        p = common.REPO / rel
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.exists() else None
    return out


def listen_drops() -> int:
    """The host namespace's TcpExt ListenDrops: SYNs dropped at a listener (its accept queue full).

    A dropped SYN is retried after 1 s, which shows as a p99 or a rate off by
    orders of magnitude; on this 2-core machine it happens when the server on
    CPU 0 is kept from accepting (another job on that CPU). Counted around
    each run so such a run can be told from a slow graft. Other jobs' drops
    in the host namespace count too.
    """
    lines = [ln.split() for ln in Path("/proc/net/netstat").read_text().splitlines() if ln.startswith("TcpExt:")]
    names, values = lines[0], lines[1]
    return int(values[names.index("ListenDrops")])


def audit_key(r: dict) -> str:
    return f"{r.get('op')} via {r.get('via')} {r.get('action')}"


class AuditTail:
    """The broker's audit log, read on from where the last read stopped.

    What answered the connects: "connect via kernel" is a fast-path connect
    the kernel judged; "via shim" or "via seccomp" one that went to the
    broker (the first to a destination, or one whose pool had nothing to
    give); "preissue ... deny" a refill refused (pools fill only the lower
    half of max_sockets).
    """

    # the broker drains the kernel's records every 50 ms; a run's last ones are waited for this long
    LAG = 0.15

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def read(self) -> dict:
        if not self.path.exists():
            return {}
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        whole = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next read
        self.offset += len(whole)
        return dict(Counter(audit_key(json.loads(line)) for line in whole.splitlines() if line))


def client_argv(env: dict, sc: str, procs: int, connects: int) -> list[str]:
    argv = [env["connbench"], "client", "127.0.0.1", str(env["port"]), str(connects), str(procs), str(WARMUP)]
    if MODE[sc] == "eof":
        argv.append("eof")
    if env["pin"]:
        argv = ["taskset", "-c", "1", *argv]
    if sc in ("host", "host-eof"):
        return argv
    if sc == "pasta":
        return ["nsenter", f"--net=/run/netns/{env['pasta_ns']}", "--", *argv]
    # --no-dns: nothing here resolves a name, and the runs need no resolver set up in the namespace
    tenant, extra = ("preload", []) if sc == "preload" else ("seccomp_t", ["--seccomp"])
    sock = str(env["broker"].socket_dir / f"{tenant}.sock")
    return [GRAFT, "run", *extra, "--socket", sock, "--netns", env["netns"], "--no-dns", "--", *argv]


def one_run(env: dict, cfg: Config, sc: str, procs: int) -> dict:
    # bounded: COUNT cycles, a process stops after 100 failures, and a floor of 500 cycles/s for the timeout
    timeout = 60 + (cfg.connects + WARMUP * procs) / 500
    drops = listen_drops()
    d = json.loads(run_client(client_argv(env, sc, procs, cfg.connects), timeout=timeout).stdout)
    out = {k: d[k] for k in ("rate", "p50_us", "p90_us", "p99_us", "max_us", "count", "elapsed_s")}
    out["listen_drops"] = listen_drops() - drops
    if sc in ("preload", "seccomp"):  # warm-up connects included: they are in the log too
        time.sleep(AuditTail.LAG)
        out["audit"] = env["audit"].read()
    return out


def workload(procs: int) -> str:
    """run.py's record key: each client count is a workload of its own to run.per_round_ratios."""
    return f"connect-{procs}"


def run_rounds(env: dict, cfg: Config, runs: list) -> None:
    failures = dict.fromkeys(((sc, n) for sc in SCENARIOS for n in CLIENTS), 0)
    for rnd in range(cfg.rounds):
        counts = CLIENTS if rnd % 2 == 0 else CLIENTS[::-1]
        k = rnd % len(SCENARIOS)
        for procs in counts:
            for sc in SCENARIOS[k:] + SCENARIOS[:k]:
                if failures[sc, procs] >= 2:  # bounded: a pair that failed twice (or timed out) is not tried again
                    continue
                rec = {"workload": workload(procs), "scenario": sc, "clients": procs, "rep": rnd, "mode": MODE[sc]}
                t0 = time.monotonic()
                try:
                    rec["metrics"] = one_run(env, cfg, sc, procs)
                    m = rec["metrics"]
                    log(
                        f"round {rnd + 1}/{cfg.rounds}, {procs:>2} clients, {sc:<8}: {m['rate']:>9,.0f}/s, "
                        f"p50 {m['p50_us']:.1f} µs, p99 {m['p99_us']:.1f} µs, {m['listen_drops']} SYN drops"
                    )
                except Exception as e:  # recorded, reported, and the run goes on
                    failures[sc, procs] += 2 if isinstance(e, subprocess.TimeoutExpired) else 1
                    rec["error"] = str(e)[:2000]
                    log(f"round {rnd + 1}/{cfg.rounds}, {procs} clients, {sc}: FAILED: {rec['error'][:300]}")
                rec["secs"] = round(time.monotonic() - t0, 2)
                runs.append(rec)


def broker_share(audits: list[dict]) -> dict:
    """Of the runs' connects (warm-ups included), the share the broker answered; the refills it refused."""
    seen = Counter()
    for a in audits:
        seen.update(a)
    conn = sum(n for k, n in seen.items() if k.startswith("connect "))
    slow = sum(n for k, n in seen.items() if k.startswith("connect ") and " via kernel " not in k)
    refused = sum(n for k, n in seen.items() if k.startswith("preissue ") and k.endswith(" deny"))
    return {"via_broker": slow / conn if conn else None, "refills_refused": refused, "audit": dict(seen)}


def summarise(runs: list) -> dict:
    """{clients: {scenario: medians and counts, "vs": {scenario: ratios and differences to its base}}}.

    Runs with SYN drops (listen_drops(): a connect retried after 1 s) are left
    out: such a run measured the server kept from accepting, not the path
    under test. The medians are over the runs without drops (over all, if
    every run of that scenario at that count had some); the ratios and
    differences only over rounds in which neither run had drops (none left:
    no ratio, and the target reads "no data"). Drops come with the fastest
    runs (the host's), so leaving them out mostly makes the host faster; the
    table says how many runs had drops, the JSON which.
    """
    done = [r for r in runs if "metrics" in r]
    clean = [r for r in done if r["metrics"]["listen_drops"] == 0]
    out = {}
    for procs in CLIENTS:
        w, row = workload(procs), {}
        for sc in SCENARIOS:
            mine = [r for r in done if r["workload"] == w and r["scenario"] == sc]
            ms = [r["metrics"] for r in mine if r in clean] or [r["metrics"] for r in mine]
            row[sc] = {
                "n": len(ms),
                "runs": len(mine),
                "errors": sum(1 for r in runs if r["workload"] == w and r["scenario"] == sc) - len(mine),
                "drop_runs": sum(1 for r in mine if r["metrics"]["listen_drops"]),
                "listen_drops": sum(r["metrics"]["listen_drops"] for r in mine),
            }
            if ms:
                row[sc].update({k: statistics.median(m[k] for m in ms) for k in ("rate", "p50_us", "p99_us")})
                if "audit" in ms[0]:
                    row[sc].update(broker_share([r["metrics"]["audit"] for r in mine]))
                rates = [m["rate"] for m in ms]
                row[sc]["rate_spread"] = max(rates) / min(rates) if min(rates) else None
        row["vs"] = {}
        for sc, base in BASE.items():
            # paired by round, as the ratios: the two runs were seconds apart
            by = {(r["rep"], r["scenario"]): r["metrics"] for r in clean if r["workload"] == w}
            rounds = sorted({n for n, s in by if s == sc and (n, base) in by})
            diffs = [by[n, sc]["p50_us"] - by[n, base]["p50_us"] for n in rounds]
            vs = {"base": base}
            for key in ("rate", "p99_us"):
                ci = stats.ratio_interval(run.per_round_ratios(clean, w, key, sc, base))
                vs[key] = {"estimate": ci.estimate, "low": ci.low, "high": ci.high, "n": ci.n}
            vs["p50_diff_us"] = (
                {"median": statistics.median(diffs), "min": min(diffs), "max": max(diffs)} if diffs else None
            )
            row["vs"][sc] = vs
        out[procs] = row
    return out


def targets(summary: dict) -> list[dict]:
    """Each of DESIGN.md's connect targets at each client count it names, with the measured value."""
    out = []
    for sc, (rate_min, rate_at, p99_max, p50_plus) in TARGETS.items():
        for procs in CLIENTS:
            vs = summary[procs]["vs"][sc]
            p50 = vs["p50_diff_us"]["median"] if vs["p50_diff_us"] else None
            checks = [
                ("p99", "p99 / host", vs["p99_us"]["estimate"], "<=", p99_max),
                ("p50", "p50 − host µs", p50, "<=", p50_plus),
            ]
            if procs in rate_at:  # DESIGN.md names 1 and 8; 64 is reported, not judged
                checks.insert(0, ("rate", "cycles/s / host", vs["rate"]["estimate"], ">=", rate_min))
            for key, what, v, op, limit in checks:
                met = None if v is None else (v >= limit if op == ">=" else v <= limit)
                out.append(
                    {
                        "scenario": sc,
                        "clients": procs,
                        "key": key,
                        "what": what,
                        "measured": v,
                        "limit": f"{op} {limit:g}",
                        "met": met,
                    }
                )
    return out


def verdict(t: dict) -> str:
    return "no data" if t["met"] is None else ("met" if t["met"] else "NOT met")


def held(tg: list[dict], sc: str, procs: int) -> str:
    """The per-count table's last cell: 'rate no, p99 no, p50 yes'."""
    return ", ".join(
        f"{t['key']} {'?' if t['met'] is None else ('yes' if t['met'] else 'no')}"
        for t in tg
        if t["scenario"] == sc and t["clients"] == procs
    )


def fmt_diff(d: dict | None) -> str:
    return "—" if not d else f"{d['median']:+.1f} ({d['min']:+.1f}..{d['max']:+.1f})"


def cells(summary: dict, tg: list[dict], procs: int, sc: str) -> list[str]:
    """scenario, mode, cycles/s, p50, p99; against its base: rate ratio, p99 ratio, p50 difference; targets held."""
    s, vs = summary[procs][sc], summary[procs]["vs"].get(sc)
    if not s["n"]:
        return [sc, MODE[sc], "fail", "fail", "fail", "", "", "", "", "", ""]
    out = [sc, MODE[sc], run.fmt(s["rate"], "1/s"), run.fmt(s["p50_us"], "µs"), run.fmt(s["p99_us"], "µs")]
    out.append(f"{s['drop_runs']}/{s['runs']}")
    out.append("" if s.get("via_broker") is None else f"{s['via_broker']:.1%}")
    if vs is None:
        return [*out, "", "", "", ""]
    ratios = [run.fmt_ratio(vs["rate"]), run.fmt_ratio(vs["p99_us"]), fmt_diff(vs["p50_diff_us"])]
    return [*out, *ratios, held(tg, sc, procs)]


HEAD = [
    "scenario",
    "mode",
    "cycles/s",
    "p50 µs",
    "p99 µs",
    "runs with SYN drops",
    "via broker",
    "rate / base [95%]",
    "p99 / base [95%]",
    "p50 − base µs (min..max)",
    "targets held",
]
WIDTH = (8, 7, 8, 8, 8, 19, 10, 22, 24, 27, 24)


def clients(procs: int) -> str:
    return f"{procs} client process{'es' if procs > 1 else ''}"


def table(summary: dict, tg: list[dict], cfg: Config) -> str:
    lines = [
        f"connect+close cycles, {cfg.connects:,} a run shared by its client processes, medians over "
        f"{cfg.rounds} interleaved rounds; base: host for preload and seccomp, host-eof for pasta;",
        "runs with SYN drops (a connect retried after 1 s) left out of the medians and ratios (summarise() says why)",
    ]
    if cfg.max_sockets is not None:
        lines.append(f"the grafted tenants' max_sockets: {cfg.max_sockets:,} (not the policy's default)")
    for procs in CLIENTS:
        lines += ["", clients(procs), " ".join(f"{h:>{w}}" for h, w in zip(HEAD, WIDTH, strict=True))]
        for sc in SCENARIOS:
            lines.append(" ".join(f"{c:>{w}}" for c, w in zip(cells(summary, tg, procs, sc), WIDTH, strict=True)))
    lines += ["", f"{'target (DESIGN.md)':<40} {'measured':>9} {'limit':>8}  result", "-" * 70]
    for t in tg:
        v = "—" if t["measured"] is None else f"{t['measured']:.2f}"
        who = f"{t['scenario']}, {clients(t['clients'])}:"
        lines.append(f"{who:<30}{t['what']:<16} {v:>9} {t['limit']:>8}  {verdict(t)}")
    return "\n".join(lines)


def markdown(summary: dict, tg: list[dict]) -> str:
    out = []
    for procs in CLIENTS:
        out += [f"**{clients(procs)}**", "", "| " + " | ".join(HEAD) + " |", "|---|---|" + "--:|" * 8 + "---|"]
        out += ["| " + " | ".join(cells(summary, tg, procs, sc)) + " |" for sc in SCENARIOS]
        out.append("")
    out += ["| target | clients | measured | limit | result |", "|---|--:|--:|--:|---|"]
    for t in tg:
        v = "—" if t["measured"] is None else f"{t['measured']:.2f}"
        out.append(f"| {t['scenario']}: {t['what']} | {t['clients']} | {v} | {t['limit']} | **{verdict(t)}** |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rounds x 5,000 connects per run (about a minute)")
    p.add_argument("--rounds", type=int, help="rounds, each running every scenario at every client count (default 5)")
    p.add_argument("--connects", type=int, help="timed cycles per run, shared by its processes (default 20,000)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the server to CPU 0 and the clients to CPU 1")
    p.add_argument(
        "--broker-nice",
        type=int,
        default=SERVER_NICE,
        help=f"the broker's and pasta's niceness (default {SERVER_NICE}, the server's; 0 shows what a lower one costs)",
    )
    p.add_argument(
        "--max-sockets",
        type=int,
        help="the preload and seccomp tenants' max_sockets (default: the policy's, 1024); pools share half of it",
    )
    p.add_argument("--report", metavar="JSON", help="only print the tables (text and Markdown) of a results file")
    args = p.parse_args(argv)
    if args.report:  # summarised again from the runs: the same code as a fresh run's tables
        d = json.loads(Path(args.report).read_text())
        summary = summarise(d["runs"])
        tg = targets(summary)
        print(table(summary, tg, Config(**d["config"])) + "\n\n" + markdown(summary, tg))
        return 0
    cfg = Config.make(args.quick, args.rounds, args.connects, args.max_sockets)
    if cfg.rounds < 1 or cfg.connects < max(CLIENTS):
        p.error(f"--rounds at least 1, --connects at least {max(CLIENTS)}")
    common.require("cc", "taskset", "nsenter", "pasta")
    common.unwind_on_sigterm()  # the broker, namespaces and pasta go on `kill` too

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    info = {"machine": common.machine_info(), "config": cfg.__dict__, "quick": args.quick, "started_utc": stamp}
    info["server_nice"], info["broker_nice"] = SERVER_NICE, args.broker_nice
    info["builds_at_start"] = builds()
    log(f"connect rate: {cfg.rounds} rounds x {cfg.connects} cycles; machine {info['machine']}")
    started = time.monotonic()
    runs: list = []
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    run_id = uuid.uuid4().hex[:6]
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graft-bench-", dir="/tmp")))
        port = free_port()
        server_argv = [build_connbench(tmp), "server", "127.0.0.1", str(port)]
        # nice: the server is the fixture every scenario shares, not what is measured. At normal
        # priority, with a test suite on CPU 0 too, it was kept from accepting long enough (the
        # accept queue holds 4,096, 0.12 s of host connects) for SYNs to be dropped and retried
        # after 1 s, in 4 of 5 rounds of the host's 8- and 64-client runs; at -10, seldom (and those
        # runs are left out: summarise()).
        prefix = ["nice", "-n", str(SERVER_NICE), *(["taskset", "-c", "0"] if pin else [])]
        server = common.start_process(
            stack,
            [*prefix, *server_argv],
            stdin=subprocess.PIPE,
            log_to=tmp / "server.log",
        )
        common.wait_line(server, "ready")
        netns = f"graft-bench-cr-{run_id}"
        create_namespace(netns)  # only `lo`, up
        stack.callback(remove_namespace, netns)
        pasta = stack.enter_context(
            usernet.pasta_namespace(run_id, tmp, tcp_in={}, tcp_out=[port], udp_out=[], nice=args.broker_nice)
        )
        # as bench/run.py's broker: info and an audit log file, as a broker in production runs
        text = policy(port, "required", cfg.max_sockets)
        broker = BrokerProcess(tmp / "broker", text, tenant="preload", nice=args.broker_nice)
        stack.callback(broker.stop)
        broker.start("--log-level", "info", "--audit-log", str(tmp / "broker" / "audit.jsonl"))
        env = {
            "connbench": server_argv[0],
            "port": port,
            "pin": pin,
            "netns": netns,
            "pasta_ns": pasta["netns"],
            "broker": broker,
            "audit": AuditTail(broker.audit_path),
        }
        info["env"] = {"policy": text, "pasta_argv": pasta["argv"], "netns": netns}
        info["env"].update({"pinned": pin, "server_argv": server.args})
        run_rounds(env, cfg, runs)
        broker.stop()  # on its way out it writes what the kernel's ring still holds
        info["audit"] = dict(Counter(f"{r.get('tenant')} {audit_key(r)}" for r in broker.audit()))
    info["builds_at_end"] = builds()
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    summary = summarise(runs)
    tg = targets(summary)
    info.update({"elapsed_s": round(time.monotonic() - started, 1), "runs": runs, "summary": summary, "targets": tg})
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    out = run.RESULTS / f"{stamp}-connect-rate.json"
    out.write_text(json.dumps(info, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown(summary, tg) + "\n")
    print(table(summary, tg, cfg))
    m = info["machine"]
    print(
        f"\nmachine: {m['nproc']} cores, {m['cpu']}, kernel {m['kernel']}; commit {(m['git_commit'] or '?')[:7]}, "
        f"uncommitted changes in {m['uncommitted_changes_in'] or 'nothing'}; "
        f"load {m['loadavg_at_start']} at start, {info['loadavg_at_end']} at end"
    )
    print("broker's audit log: " + "; ".join(f"{k}: {n:,}" for k, n in sorted(info["audit"].items())))
    if info["builds_at_start"] != info["builds_at_end"]:
        print(f"WARNING: a build changed during the run: {info['builds_at_start']} -> {info['builds_at_end']}")
    failed = sum(1 for r in runs if "error" in r)
    print(f"results: {out}  ({info['elapsed_s']}s; {failed} run(s) failed, their errors are in the JSON)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
