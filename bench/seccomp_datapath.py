"""Seccomp mode's data path against the host's, side by side in one run.

    python bench/seccomp_datapath.py [--rounds N] [--seconds S]

Once a socket is grafted in seccomp mode it is a host socket on the app's
fd; read/write/send/recv without an address are not stopped by the filter,
so the data path should cost what the host's does. A datagram sent with an
address (sendto/sendmsg on an unconnected UDP socket) is stopped every time:
the filter cannot read the address, so the agent must see each one.

Workloads, each run as a client on the host (host) and as the same client in
a namespace with only `lo` under `graft run --seccomp` (seccomp), against the
same server on the host's 127.0.0.1, in alternating order, N rounds:

  iperf3        TCP throughput, client -> server (Gbit/s)
  sockperf-tcp  TCP ping-pong, 64 B, p50 round trip (µs)
  sockperf-udp  UDP ping-pong, 64 B, p50 round trip (µs): unconnected sendto

The table shows the median over rounds of each, and seccomp / host.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from common import require, run_client, start_process, wait_line

from support.harness import GRAFT, BrokerProcess, free_port, network_namespace  # common.py puts tests/ on the path

PCT50 = re.compile(r"percentile\s+50\.000\s*=\s*([\d.]+)")


def policy(ports: list[int]) -> str:
    return f"""version = 1
[broker]
confinement = "required"
audit_log = "off"
[tenants.t]
mode = "seccomp"
default = "deny"
[[tenants.t.connect]]
to = ["127.0.0.1/32"]
ports = {ports}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3)
    args = ap.parse_args()
    require("iperf3", "sockperf")
    iperf_port, tcp_port, udp_port = free_port(), free_port(), free_port()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graft-bench-", dir="/tmp")))
        servers = {  # on the host; each ready once it prints its own readiness line
            "iperf3": (["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port), "--forceflush"], "listening"),
            "sockperf-tcp": (
                ["sockperf", "server", "-i", "127.0.0.1", "-p", str(tcp_port), "--tcp"],
                "to block on socket",
            ),
            "sockperf-udp": (["sockperf", "server", "-i", "127.0.0.1", "-p", str(udp_port)], "to block on socket"),
        }
        for name, (argv, ready) in servers.items():
            wait_line(start_process(stack, argv, log_to=tmp / f"{name}.log"), ready)
        ns = stack.enter_context(network_namespace("graft-bench"))
        broker = BrokerProcess(tmp, policy([iperf_port, tcp_port, udp_port]))
        stack.callback(broker.stop)
        broker.start()
        seccomp = [GRAFT, "run", "--seccomp", "--socket", str(broker.socket_path), "--netns", ns, "--"]
        t = str(args.seconds)
        workloads = {
            "iperf3 Gbit/s": (
                ["iperf3", "-c", "127.0.0.1", "-p", str(iperf_port), "-t", t, "-J"],
                lambda out: json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9,
            ),
            "sockperf-tcp p50 µs": (
                [
                    "sockperf",
                    "ping-pong",
                    "-i",
                    "127.0.0.1",
                    "-p",
                    str(tcp_port),
                    "--tcp",
                    "-t",
                    t,
                    "-m",
                    "64",
                    "--full-rtt",
                ],
                lambda out: float(PCT50.search(out).group(1)),
            ),
            "sockperf-udp p50 µs": (
                ["sockperf", "ping-pong", "-i", "127.0.0.1", "-p", str(udp_port), "-t", t, "-m", "64", "--full-rtt"],
                lambda out: float(PCT50.search(out).group(1)),
            ),
        }
        results = {name: {"host": [], "seccomp": []} for name in workloads}
        for r in range(args.rounds):
            order = ("host", "seccomp") if r % 2 == 0 else ("seccomp", "host")
            for name, (argv, parse) in workloads.items():
                for scenario in order:
                    cmd = argv if scenario == "host" else seccomp + argv
                    results[name][scenario].append(parse(run_client(cmd, args.seconds + 60).stdout))
    print(f"{args.rounds} rounds of {args.seconds} s, medians; host client vs graft run --seccomp in a namespace\n")
    print("| workload | host | seccomp | seccomp / host |")
    print("|---|---:|---:|---:|")
    for name, by in results.items():
        host, sec = statistics.median(by["host"]), statistics.median(by["seccomp"])
        print(f"| {name} | {host:.2f} | {sec:.2f} | {sec / host:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
