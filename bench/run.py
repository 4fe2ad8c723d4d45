"""graft's benchmark suite: host, nat, pasta, slirp4netns and graft, interleaved, in rounds.

    python bench/run.py [--quick] [--rounds N] [--only W1,W2] [--docs-img]

Five scenarios (bench/common.py, bench/usernet.py): host networking, a
Docker-like veth + nftables NAT namespace, a namespace connected by pasta,
one connected by slirp4netns (rootless podman's two networks), and a
namespace under graft. For every workload each round runs every scenario
once, in an order rotated each round, so slow drift on a busy 2-core
machine hits all of them alike. Each figure is the median over rounds;
each ratio graft/X is the geometric mean of the per-round ratios, with a
95% t-interval (bench/stats.py says why).

Workloads (client/server placement, "in the container" = in the scenario):
  iperf3       TCP throughput, client in the container -> server on the host,
               both directions (-R: server sends)
  sockperf     TCP and UDP ping-pong round trip (--full-rtt), p50 and p99
  connect      connbench.c: connect() latency p50/p99 and socket+connect+close
               cycles per second, client in the container
  connect-reply  connbench.c eof: connect() until the server's close arrives,
               i.e. until the connection has reached the server (pasta's
               connect() returns before it has)
  nginx + wrk  nginx in the container (published port), wrk on the host:
               keep-alive, and one connection per request (Connection: close)
  redis        redis-server in the container, redis-benchmark on the host

Prints a table of medians, a table of ratios with their intervals, verdicts
against pasta and slirp4netns, and the rounds each row needs to resolve ±2%;
writes bench/results/<ts>.json, <ts>.md and a PNG per workload to
bench/results/ (and to docs/img/ with --docs-img).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import stats  # noqa: E402
import usernet  # noqa: E402
from common import NAT_HOST, SCENARIOS, log, run_client, start_process, wait_line, wait_reply  # noqa: E402

RESULTS = common.REPO / "bench" / "results"
DOCS_IMG = common.REPO / "docs" / "img"


@dataclass
class Config:
    reps: int
    iperf_t: int
    sockperf_t: int
    connects: int
    wrk_d: int
    wrk_c: int
    redis_n: int

    @classmethod
    def make(cls, quick: bool, reps: int | None) -> Config:
        """reps: rounds; every round runs every scenario once."""
        if quick:
            # five scenarios in under 5 minutes with broker_load.py: sockperf alone
            # costs 3.3 s a run whatever -t says (a fixed 2 s warm-up sleep)
            c = cls(reps=3, iperf_t=1, sockperf_t=1, connects=1000, wrk_d=1, wrk_c=16, redis_n=5000)
        else:
            c = cls(reps=5, iperf_t=5, sockperf_t=4, connects=10000, wrk_d=5, wrk_c=16, redis_n=50000)
        if reps:
            c.reps = reps
        return c


# A metric: key, label, unit, and whether higher is better.
@dataclass
class Metric:
    key: str
    label: str
    unit: str
    higher_better: bool


@dataclass
class Workload:
    name: str
    title: str
    metrics: list[Metric]
    servers: Callable  # (env, cfg) -> context manager
    run: Callable  # (env, cfg, scenario) -> {metric key: value}


# ---- iperf3 -------------------------------------------------------------------


@contextmanager
def iperf_servers(env, cfg):
    with ExitStack() as st:
        for addr in ("127.0.0.1", NAT_HOST):
            p = start_process(
                st,
                env.server_cpu(["iperf3", "-s", "-B", addr, "-p", str(env.ports.iperf), "--forceflush"]),
                log_to=env.tmp / f"iperf3-{addr}.log",
            )
            wait_line(p, "Server listening")
        yield


def iperf_run(reverse: bool):
    def run(env, cfg, sc):
        argv = ["iperf3", "-c", env.host_server_addr(sc), "-p", str(env.ports.iperf), "-t", str(cfg.iperf_t), "-J"]
        if reverse:
            argv.append("-R")
        r = run_client(env.client_in(sc, *argv), timeout=cfg.iperf_t + 30)
        data = json.loads(r.stdout)
        return {"gbps": data["end"]["sum_received"]["bits_per_second"] / 1e9}

    return run


# ---- sockperf --------------------------------------------------------------------


@contextmanager
def sockperf_servers(env, cfg, tcp: bool):
    with ExitStack() as st:
        for addr in ("127.0.0.1", NAT_HOST):
            argv = ["sockperf", "server", "-i", addr, "-p", str(env.ports.sockperf)] + (["--tcp"] if tcp else [])
            # same core as the client: a ping-pong is sequential, and on one core the
            # round trip is the network path's cost, not cross-core wake-ups
            p = start_process(
                st, env.client_cpu(argv), log_to=env.tmp / f"sockperf-{'tcp' if tcp else 'udp'}-{addr}.log"
            )
            wait_line(p, "to block on socket")
        yield


PCT = re.compile(r"percentile\s+(\d+\.\d+)\s*=\s*([\d.]+)")


def sockperf_run(tcp: bool):
    def run(env, cfg, sc):
        argv = [
            "sockperf",
            "ping-pong",
            "-i",
            env.host_server_addr(sc),
            "-p",
            str(env.ports.sockperf),
            "-t",
            str(cfg.sockperf_t),
            "-m",
            "64",
            "--full-rtt",
        ] + (["--tcp"] if tcp else [])
        r = run_client(env.client_in(sc, *argv), timeout=cfg.sockperf_t + 30)
        pcts = {float(a): float(b) for a, b in PCT.findall(r.stdout + r.stderr)}
        if 50.0 not in pcts or 99.0 not in pcts:
            raise RuntimeError(f"sockperf printed no percentiles: {r.stdout[-800:]}")
        return {"p50_us": pcts[50.0], "p99_us": pcts[99.0]}

    return run


# ---- connect cost -----------------------------------------------------------------------


@contextmanager
def conn_servers(env, cfg):
    with ExitStack() as st:
        for addr in ("127.0.0.1", NAT_HOST):
            p = start_process(
                st,
                env.server_cpu([env.connbench, "server", addr, str(env.ports.conn)]),
                stdin=subprocess.PIPE,
                log_to=env.tmp / f"connbench-{addr}.log",
            )
            wait_line(p, "ready")
        yield


def conn_run(env, cfg, sc, procs: int = 1, count: int | None = None):
    argv = [
        env.connbench,
        "client",
        env.host_server_addr(sc),
        str(env.ports.conn),
        str(count or cfg.connects),
        str(procs),
        "100",
    ]
    r = run_client(env.client_in(sc, *argv), timeout=120)
    d = json.loads(r.stdout)
    return {"p50_us": d["p50_us"], "p99_us": d["p99_us"], "rate": d["rate"]}


def conn_reply_run(env, cfg, sc):
    """connect() and then the server's close: the time until the connection has reached the server.

    pasta completes the client's handshake in the namespace itself and only
    then connects to the server, so its connect() alone says nothing about
    reaching the server; this row compares what every scenario needs for that.
    """
    argv = [
        env.connbench,
        "client",
        env.host_server_addr(sc),
        str(env.ports.conn),
        str(cfg.connects),
        "1",
        "100",
        "eof",
    ]
    d = json.loads(run_client(env.client_in(sc, *argv), timeout=120).stdout)
    return {"p50_us": d["p50_us"], "p99_us": d["p99_us"]}


# ---- nginx + wrk ----------------------------------------------------------------------

PAGE = (
    "<!DOCTYPE html><html><head><title>graft bench</title></head><body>" + "<p>" + "x" * 520 + "</p></body></html>\n"
)  # ~612 bytes, nginx's default page size

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {listen} backlog=4096;
        root {www};
        location / {{ }}
    }}
}}
"""


@contextmanager
def nginx_servers(env, cfg):
    www = env.tmp / "www"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_text(PAGE)
    with ExitStack() as st:
        for sc in SCENARIOS:
            d = env.tmp / f"nginx-{sc}"
            d.mkdir(exist_ok=True)
            listen = f"127.0.0.1:{env.ports.nginx_host}" if sc == "host" else str(common.NGINX_NS_PORT)
            (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, www=www, listen=listen))
            p = start_process(
                st,
                env.server_in(sc, "nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf")),
                log_to=d / "stdout.log",
            )
            wait_reply(*env.published(sc, "nginx"), b"GET / HTTP/1.0\r\n\r\n", b" 200 ", proc=p)
        yield


WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
WRK_ERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def wrk_run(close: bool):
    def run(env, cfg, sc):
        addr, port = env.published(sc, "nginx")
        argv = ["wrk", "-t", "1", "-c", str(cfg.wrk_c), "-d", f"{cfg.wrk_d}s", "--latency"]
        if close:
            argv += ["-H", "Connection: close"]
        r = run_client(env.client_cpu(argv + [f"http://{addr}:{port}/"]), timeout=cfg.wrk_d + 30)
        m = WRK_RPS.search(r.stdout)
        if not m:
            raise RuntimeError(f"wrk printed no Requests/sec: {r.stdout[-800:]}")
        out = {"rps": float(m.group(1))}
        e = WRK_ERR.search(r.stdout)
        out["errors"] = sum(int(x) for x in e.groups()) if e else 0
        n = WRK_NON2XX.search(r.stdout)
        if n:
            out["errors"] += int(n.group(1))
        return out

    return run


# ---- redis ------------------------------------------------------------------------

REDIS_TESTS = ("set", "get", "incr", "lpush")


@contextmanager
def redis_servers(env, cfg):
    with ExitStack() as st:
        for sc in SCENARIOS:
            if sc == "host":
                bind, port = "127.0.0.1", env.ports.redis_host
            else:
                bind, port = "0.0.0.0", common.REDIS_NS_PORT
            d = env.tmp / f"redis-{sc}"
            d.mkdir(exist_ok=True)
            p = start_process(
                st,
                env.server_in(
                    sc,
                    "redis-server",
                    "--bind",
                    bind,
                    "--port",
                    str(port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "no",
                    "--daemonize",
                    "no",
                    "--dir",
                    str(d),
                    "--logfile",
                    str(d / "redis.log"),
                ),
                log_to=d / "stdout.log",
            )
            wait_reply(*env.published(sc, "redis"), b"PING\r\n", b"+PONG", proc=p)
        yield


def redis_run(env, cfg, sc):
    addr, port = env.published(sc, "redis")
    # bounded at 2,000 requests/s per test and 20 s to spare: slirp4netns's forwarder
    # (listen backlog 1) can leave some of the 50 connections hanging
    r = run_client(
        env.client_cpu(
            [
                "redis-benchmark",
                "-h",
                addr,
                "-p",
                str(port),
                "-q",
                "-n",
                str(cfg.redis_n),
                "-c",
                "50",
                "-t",
                ",".join(REDIS_TESTS),
                "--csv",
            ]
        ),
        timeout=20 + cfg.redis_n * len(REDIS_TESTS) / 2000,
    )
    out = {}
    for line in r.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if len(cells) >= 2 and cells[0].lower().split()[0] in REDIS_TESTS:
            out[cells[0].lower().split()[0] + "_rps"] = float(cells[1])
    if len(out) != len(REDIS_TESTS):
        raise RuntimeError(f"redis-benchmark output not understood: {r.stdout[-800:]}")
    return out


# ---- the workloads ---------------------------------------------------------------------

WORKLOADS = [
    Workload(
        "iperf3",
        "iperf3 TCP throughput, client in the container -> server on the host",
        [Metric("gbps", "throughput", "Gbit/s", True)],
        iperf_servers,
        iperf_run(False),
    ),
    Workload(
        "iperf3-R",
        "iperf3 -R TCP throughput, server on the host -> client in the container",
        [Metric("gbps", "throughput", "Gbit/s", True)],
        iperf_servers,
        iperf_run(True),
    ),
    Workload(
        "sockperf-tcp",
        "sockperf TCP ping-pong round trip, 64 B",
        [Metric("p50_us", "p50 RTT", "µs", False), Metric("p99_us", "p99 RTT", "µs", False)],
        lambda env, cfg: sockperf_servers(env, cfg, True),
        sockperf_run(True),
    ),
    Workload(
        "sockperf-udp",
        "sockperf UDP ping-pong round trip, 64 B (unconnected sendto)",
        [Metric("p50_us", "p50 RTT", "µs", False), Metric("p99_us", "p99 RTT", "µs", False)],
        lambda env, cfg: sockperf_servers(env, cfg, False),
        sockperf_run(False),
    ),
    Workload(
        "connect",
        "TCP connect() latency and socket+connect+close cycles/s (connbench.c)",
        [
            Metric("p50_us", "connect p50", "µs", False),
            Metric("p99_us", "connect p99", "µs", False),
            Metric("rate", "cycles/s", "1/s", True),
        ],
        conn_servers,
        conn_run,
    ),
    Workload(
        "connect-reply",
        "TCP connect() until the server's close arrives: the connection reached the server",
        [Metric("p50_us", "p50 to server", "µs", False), Metric("p99_us", "p99 to server", "µs", False)],
        conn_servers,
        conn_reply_run,
    ),
    Workload(
        "nginx-keepalive",
        "nginx in the container, wrk on the host, keep-alive",
        [Metric("rps", "requests/s", "1/s", True)],
        nginx_servers,
        wrk_run(False),
    ),
    Workload(
        "nginx-close",
        "nginx in the container, wrk on the host, Connection: close",
        [Metric("rps", "requests/s", "1/s", True)],
        nginx_servers,
        wrk_run(True),
    ),
    Workload(
        "redis",
        "redis-server in the container, redis-benchmark on the host (-c 50)",
        [Metric(f"{t}_rps", t.upper(), "1/s", True) for t in REDIS_TESTS],
        redis_servers,
        redis_run,
    ),
]


# ---- running, summarising -----------------------------------------------------------


def run_workload(env, cfg, w: Workload, runs: list) -> None:
    failures = {sc: 0 for sc in SCENARIOS}
    t0 = time.monotonic()
    with w.servers(env, cfg):
        for rep in range(cfg.reps):
            k = rep % len(SCENARIOS)
            order = SCENARIOS[k:] + SCENARIOS[:k]
            for sc in order:
                if failures[sc] >= 2:  # bounded: a scenario that fails twice (or times out once) is not tried again
                    continue
                rec = {"workload": w.name, "scenario": sc, "rep": rep}
                t1 = time.monotonic()
                try:
                    rec["metrics"] = w.run(env, cfg, sc)
                except Exception as e:  # recorded, reported, and the run goes on
                    failures[sc] += 2 if isinstance(e, subprocess.TimeoutExpired) else 1
                    rec["error"] = str(e)[:2000]
                    log(f"  {w.name}/{sc} rep {rep}: FAILED: {rec['error'][:300]}")
                rec["secs"] = round(time.monotonic() - t1, 2)
                runs.append(rec)
    log(f"  {w.name}: {time.monotonic() - t0:.1f}s")


# graft is compared with each of these; per-round ratios graft/X, each pair measured in the same round.
BASELINES = ("host", "nat", "pasta", "slirp4netns")
RESOLVE = 0.02  # the difference a row should be able to resolve: rounds needed for a ±2% interval


def per_round_ratios(runs: list, workload: str, key: str, num: str, den: str) -> list[float]:
    """num/den for every round in which both scenarios produced the metric."""
    by = {}
    for r in runs:
        if r["workload"] == workload and "metrics" in r and r["scenario"] in (num, den):
            by[(r["rep"], r["scenario"])] = r["metrics"][key]
    return [
        by[(rep, num)] / by[(rep, den)]
        for rep in sorted({rep for rep, _ in by})
        if (rep, num) in by and (rep, den) in by and by[(rep, den)]
    ]


def summarise(runs: list) -> dict:
    """{workload: {metric: {scenario: {median, min, max, n, values}, "vs": {baseline: ratio stats}}}}."""
    out: dict = {}
    for w in WORKLOADS:
        out[w.name] = {}
        for m in w.metrics:
            row = {}
            for sc in SCENARIOS:
                vals = [
                    r["metrics"][m.key]
                    for r in runs
                    if r["workload"] == w.name and r["scenario"] == sc and "metrics" in r
                ]
                errs = [r["error"] for r in runs if r["workload"] == w.name and r["scenario"] == sc and "error" in r]
                row[sc] = (
                    {
                        "median": statistics.median(vals),
                        "min": min(vals),
                        "max": max(vals),
                        "n": len(vals),
                        "values": vals,
                    }
                    if vals
                    else {"median": None, "n": 0}
                )
                if errs:
                    row[sc]["errors"] = errs
            row["vs"] = {}
            for b in BASELINES:
                ratios = per_round_ratios(runs, w.name, m.key, "graft", b)
                ci = stats.ratio_interval(ratios)
                row["vs"][b] = {
                    "ratios": ratios,
                    "estimate": ci.estimate,
                    "low": ci.low,
                    "high": ci.high,
                    "verdict": ci.verdict(m.higher_better),
                    "rounds_needed": stats.rounds_needed(ratios, RESOLVE),
                }
            hv = row["host"]
            row["host_spread"] = hv["max"] / hv["min"] if hv.get("n") and hv["min"] else None
            out[w.name][m.key] = row
    return out


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(v, unit="") -> str:
    if v is None:
        return "—"
    if unit == "Gbit/s":
        return f"{v:.2f}"
    if unit == "µs":
        return f"{v:.1f}"
    return f"{v:,.0f}"


def fmt_ratio(vs: dict | None, interval: bool = True) -> str:
    """'0.986 [0.962–1.010]': the estimate and its 95% interval."""
    if not vs or vs.get("estimate") is None:
        return "—"
    if not interval or vs.get("low") is None:
        return f"{vs['estimate']:.3f}"
    return f"{vs['estimate']:.3f} [{vs['low']:.3f}–{vs['high']:.3f}]"


def targets(summary: dict) -> list[dict]:
    """The design's targets (docs/benchmarks.md), each with the measured ratio and met / not met.

    Also graft's connect against pasta's and slirp4netns's.
    """
    s = summary
    med = lambda w, m, sc: s.get(w, {}).get(m, {}).get(sc, {}).get("median")  # noqa: E731
    vs = lambda w, m: s.get(w, {}).get(m, {}).get("vs", {}).get("host", {}).get("estimate")  # noqa: E731
    out = []

    def add(name, value, limit, ok_if, detail):
        met = None if value is None else (value >= limit if ok_if == ">=" else value <= limit)
        out.append({"target": name, "measured": value, "limit": f"{ok_if} {limit}", "met": met, "detail": detail})

    for w in ("iperf3", "iperf3-R"):
        add(f"{w}: graft throughput ≥ 0.98× host", vs(w, "gbps"), 0.98, ">=", "graft/host, per-round geometric mean")
    for w in ("sockperf-tcp", "sockperf-udp"):
        add(f"{w}: graft p50 ≤ 1.03× host", vs(w, "p50_us"), 1.03, "<=", "graft/host, per-round geometric mean")
    g = med("connect", "p50_us", "graft")
    for b, label in (("host", "native p50 + 40 µs (host)"), ("nat", "native p50 + 40 µs (nat)")):
        x = med("connect", "p50_us", b)
        add(
            f"connect: graft p50 ≤ {label}",
            None if g is None or x is None else g - x,
            40.0,
            "<=",
            f"µs above {b}'s connect p50",
        )
    for w in ("connect", "connect-reply"):
        g = med(w, "p50_us", "graft")
        for b in ("pasta", "slirp4netns"):
            x = med(w, "p50_us", b)
            add(
                f"{w}: graft p50 below {b}'s",
                None if g is None or x is None else g - x,
                0.0,
                "<=",
                f"µs above {b}'s p50 (issue 15's goal)",
            )
    for w in ("nginx-keepalive", "nginx-close"):
        add(f"{w}: graft ≥ 0.97× host", vs(w, "rps"), 0.97, ">=", "graft/host, per-round geometric mean")
    for t in REDIS_TESTS:
        add(
            f"redis {t.upper()}: graft ≥ 0.97× host",
            vs("redis", f"{t}_rps"),
            0.97,
            ">=",
            "graft/host, per-round geometric mean",
        )
    return out


def rows(summary: dict):
    """(workload, metric, summary row) in table order; rows of other scenario sets (old results) are tolerated."""
    for w in WORKLOADS:
        for m in w.metrics:
            if m.key in summary.get(w.name, {}):
                yield w, m, summary[w.name][m.key]


def medians_cells(m: Metric, row: dict) -> list[str]:
    return [
        fmt(row.get(sc, {}).get("median"), m.unit) if row.get(sc, {}).get("median") is not None else "fail"
        for sc in SCENARIOS
    ]


def rounds_needed(vs: dict) -> tuple[str, str]:
    """The rounds a ±2% interval needs against the host and against pasta ("—" when unknown)."""
    return tuple(str(vs.get(b, {}).get("rounds_needed") or "—") for b in ("host", "pasta"))


def table(summary: dict, reps: int) -> str:
    """Two text tables: medians per scenario, then graft's ratios with 95% intervals and verdicts."""
    names = {"slirp4netns": "slirp"}
    lines = [
        f"medians over {reps} interleaved rounds",
        "",
        f"{'workload':<16} {'metric':<12} {'unit':<7} "
        + " ".join(f"{sc:>11}" for sc in SCENARIOS)
        + f" {'host max/min':>12}",
        "-" * 112,
    ]
    for w, m, row in rows(summary):
        spread = f"{row['host_spread']:.2f}" if row.get("host_spread") else "—"
        lines.append(
            f"{w.name:<16} {m.label:<12} {m.unit:<7} "
            + " ".join(f"{c:>11}" for c in medians_cells(m, row))
            + f" {spread:>12}"
        )
    lines += [
        "",
        "graft/X: geometric mean of per-round ratios [95% t-interval]; "
        "ahead/behind only when the whole interval is on one side of 1; "
        f"n±{RESOLVE:.0%}: rounds for a ±{RESOLVE:.0%} interval at this spread",
        "",
        f"{'workload':<16} {'metric':<12} "
        + " ".join(f"{'graft/' + names.get(b, b):>21}" for b in BASELINES)
        + f" {'vs pasta':>12} {'vs slirp':>12} {'n±2% host':>9} {'n±2% pasta':>10}",
        "-" * 170,
    ]
    for w, m, row in rows(summary):
        vs = row.get("vs", {})
        host_n, pasta_n = rounds_needed(vs)
        lines.append(
            f"{w.name:<16} {m.label:<12} "
            + " ".join(f"{fmt_ratio(vs.get(b)):>21}" for b in BASELINES)
            + f" {vs.get('pasta', {}).get('verdict', '—'):>12} {vs.get('slirp4netns', {}).get('verdict', '—'):>12}"
            + f" {host_n:>9} {pasta_n:>10}"
        )
    return "\n".join(lines)


def targets_table(tg: list[dict]) -> str:
    lines = [f"{'target':<52} {'measured':>9} {'limit':>8}  result", "-" * 82]
    for t in tg:
        v = t["measured"]
        res = "no data" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"{t['target']:<52} {(f'{v:.3f}' if v is not None else '—'):>9} {t['limit']:>8}  {res}")
    return "\n".join(lines)


def markdown(summary: dict, tg: list[dict]) -> str:
    """The same tables, as Markdown for docs/benchmarks.md."""
    out = [
        "| workload | metric | " + " | ".join(SCENARIOS) + " | host max/min |",
        "|---|---|" + "--:|" * len(SCENARIOS) + "--:|",
    ]
    for w, m, row in rows(summary):
        out.append(
            f"| {w.name} | {m.label} ({m.unit}) | "
            + " | ".join(medians_cells(m, row))
            + (f" | {row['host_spread']:.2f} |" if row.get("host_spread") else " | — |")
        )
    out += [
        "",
        "| workload | metric | "
        + " | ".join(f"graft/{b}" for b in BASELINES)
        + " | vs pasta | vs slirp4netns | rounds for ±2% (host / pasta) |",
        "|---|---|" + "--:|" * len(BASELINES) + "---|---|--:|",
    ]
    for w, m, row in rows(summary):
        vs = row.get("vs", {})
        host_n, pasta_n = rounds_needed(vs)
        out.append(
            f"| {w.name} | {m.label} | "
            + " | ".join(fmt_ratio(vs.get(b)) for b in BASELINES)
            + f" | {vs.get('pasta', {}).get('verdict', '—')} | {vs.get('slirp4netns', {}).get('verdict', '—')}"
            + f" | {host_n} / {pasta_n} |"
        )
    out += ["", "| target | measured | limit | result |", "|---|--:|--:|---|"]
    for t in tg:
        v = t["measured"]
        res = "no data" if t["met"] is None else ("**met**" if t["met"] else "**not met**")
        out.append(f"| {t['target']} | {f'{v:.3f}' if v is not None else '—'} | {t['limit']} | {res} |")
    return "\n".join(out)


def figures(summary: dict, stamp: str, docs_img: bool) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"host": "#4c72b0", "nat": "#dd8452", "pasta": "#8172b3", "slirp4netns": "#937860", "graft": "#55a868"}
    made = []
    for w in WORKLOADS:
        if w.name not in summary:
            continue
        ms = w.metrics
        fig, axes = plt.subplots(1, len(ms), figsize=(4.4 * len(ms) + 1.0, 3.6), squeeze=False)
        for ax, m in zip(axes[0], ms, strict=True):
            row = summary[w.name][m.key]
            xs = [sc for sc in SCENARIOS if sc in row]
            meds, lo, hi = [], [], []
            for sc in xs:
                r = row[sc]
                if r["median"] is None:
                    meds.append(0), lo.append(0), hi.append(0)
                else:
                    meds.append(r["median"]), lo.append(r["median"] - r["min"]), hi.append(r["max"] - r["median"])
            ax.bar(xs, meds, yerr=[lo, hi], capsize=4, color=[colours[x] for x in xs])
            for i, sc in enumerate(xs):
                if row[sc]["median"] is None:
                    ax.text(i, 0, "n/a", ha="center", va="bottom")
            ax.set_title(f"{m.label} ({'higher' if m.higher_better else 'lower'} is better)", fontsize=9)
            ax.set_ylabel(m.unit)
            ax.tick_params(axis="x", labelsize=8)
        fig.suptitle(w.title, fontsize=9)
        fig.text(0.99, 0.01, "bars: median; whiskers: min-max over rounds", ha="right", fontsize=7, color="grey")
        fig.tight_layout(rect=(0, 0.03, 1, 0.95))
        path = RESULTS / f"{stamp}-{w.name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(str(path))
        if docs_img:
            DOCS_IMG.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, DOCS_IMG / f"bench-{w.name}.png")
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs, 3 rounds")
    ap.add_argument(
        "--rounds",
        "--reps",
        dest="reps",
        type=int,
        metavar="N",
        help="rounds, each running every scenario once (default 3 quick, 5 full); "
        "more rounds narrow the intervals (docs/benchmarks.md says how many each row needs)",
    )
    ap.add_argument("--only", help="comma-separated workloads: " + ",".join(w.name for w in WORKLOADS))
    ap.add_argument("--docs-img", action="store_true", help="also copy the figures to docs/img/bench-<workload>.png")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--no-pin", action="store_true", help="do not pin servers to CPU 0 and clients to CPU 1")
    ap.add_argument("--report", metavar="JSON", help="only print the tables (text and Markdown) of a results file")
    args = ap.parse_args(argv)
    if args.report:
        d = json.loads(Path(args.report).read_text())
        print(table(d["summary"], d["config"]["reps"]))
        print()
        print(targets_table(d["targets"]))
        print()
        print(markdown(d["summary"], d["targets"]))
        return 0
    cfg = Config.make(args.quick, args.reps)
    chosen = WORKLOADS
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {w.name for w in WORKLOADS}
        if unknown:
            ap.error(f"unknown workloads: {', '.join(sorted(unknown))}")
        chosen = [w for w in WORKLOADS if w.name in names]
    if cfg.reps < 1:
        ap.error("--rounds must be at least 1")
    common.require(
        "iperf3",
        "sockperf",
        "nginx",
        "wrk",
        "redis-server",
        "redis-benchmark",
        "nft",
        "nsenter",
        "cc",
        "pasta",
        "slirp4netns",
    )

    # the namespaces, nft table and pasta and slirp4netns processes go on `kill` too
    common.unwind_on_sigterm()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    started = time.monotonic()
    runs: list = []
    info = {
        "machine": common.machine_info(),
        "config": cfg.__dict__,
        "quick": args.quick,
        "started_utc": stamp,
        "scenarios": list(SCENARIOS),
        "usernet_versions": usernet.versions(),
    }
    log(
        f"graft bench: {'quick' if args.quick else 'full'}, {cfg.reps} rounds, "
        f"{len(chosen)} workloads; machine {info['machine']}"
    )
    with common.environment(pin=not args.no_pin, user_nets=True) as env:
        info["env"] = {
            "nat": {k: v for k, v in env.nat.items()},
            "graft_netns": env.graft_ns,
            "usernet": env.usernet,
            "ports": env.ports.__dict__,
            "policy": common.policy_text(env.ports),
            **env.notes,
        }
        for w in chosen:
            log(f"- {w.name}")
            run_workload(env, cfg, w, runs)
    summary = {k: v for k, v in summarise(runs).items() if k in {w.name for w in chosen}}
    tg = targets(summary)
    info.update({"elapsed_s": round(time.monotonic() - started, 1), "runs": runs, "summary": summary, "targets": tg})
    if not args.no_figures:
        info["figures"] = figures(summary, stamp, args.docs_img)
    out = RESULTS / f"{stamp}.json"
    out.write_text(json.dumps(info, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown(summary, tg) + "\n")
    print(table(summary, cfg.reps))
    print()
    print(targets_table(tg))
    print()
    print(
        f"machine: {info['machine']['nproc']} cores, {info['machine']['cpu']}, kernel {info['machine']['kernel']}, "
        f"load at start {info['machine']['loadavg_at_start']}"
    )
    print(f"results: {out}  ({info['elapsed_s']}s)")
    failed = [r for r in runs if "error" in r]
    if failed:
        print(f"{len(failed)} run(s) failed; their errors are in the JSON")
    return 0


if __name__ == "__main__":
    sys.exit(main())
