#!/usr/bin/env python3
"""The floor under a grafted connect: one broker round trip, with nothing else in it.

    python bench/ipc_floor.py [--rounds 5] [--count 2000]

A grafted connect is a native connect done by another process, plus one
round trip to it over a unix socket with the socket passed back. How cheap
can that round trip be here? bench/ipc_floor.c measures it against servers
reduced to their system calls (open a socket, start the connect, send it
with SCM_RIGHTS; no policy, no audit):

  - in C, with the client on the other CPU (the usual case: the broker is a
    separate daemon), on the same CPU, and on the other CPU with the client
    spinning (non-blocking recvmsg + sched_yield) instead of sleeping;
  - in Python, as a blocking loop, and as a trio task (wait_readable, then
    recvmsg/sendmsg: the shape of graft's broker).

Each client run also times native socket()+connect() calls, interleaved with
the round trips, so every row carries its own baseline: "delta" is the round
trip's p50 minus the native connect's p50, the figure the "+40 µs" target
(docs/benchmarks.md, Targets) is about. Rounds rotate the order of the variants. Loopback only;
needs 2 CPUs for the cross-CPU rows (taskset); no root needed.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVER_CPU, OTHER_CPU = "0", "1"

# (label, server kind, client CPU, client spins)
VARIANTS = [
    ("C server, client on the other CPU", "c", OTHER_CPU, False),
    ("C server, client on the same CPU", "c", SERVER_CPU, False),
    ("C server, other CPU, client spins", "c", OTHER_CPU, True),
    ("Python blocking loop, other CPU", "py", OTHER_CPU, False),
    ("Python trio loop, other CPU", "trio", OTHER_CPU, False),
]


def _reply_with_socket(conn: socket.socket, req: bytes) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", int.from_bytes(req[:2], "big")))
    conn.sendmsg([bytes(16)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]))])
    s.close()


def serve_py(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as ls:
        ls.bind(path)
        ls.listen(8)
        print("ready", flush=True)
        conn, _ = ls.accept()
        while req := conn.recv(64):
            _reply_with_socket(conn, req)


def serve_trio(path: str) -> None:
    import trio

    async def main():
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as ls:
            ls.bind(path)
            ls.listen(8)
            print("ready", flush=True)
            conn, _ = ls.accept()
            conn.setblocking(False)
            while True:
                await trio.lowlevel.wait_readable(conn)
                req = conn.recv(64)
                if not req:
                    return
                _reply_with_socket(conn, req)

    trio.run(main)


def build(tmp: Path) -> str:
    out = tmp / "ipc_floor"
    subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-o", str(out), str(HERE / "ipc_floor.c")], check=True)
    return str(out)


def run_variant(binary: str, tmp: Path, kind: str, client_cpu: str, spin: bool, count: int) -> dict:
    path = str(tmp / f"floor-{kind}.sock")
    if os.path.exists(path):
        os.unlink(path)
    server = [binary, "server", path] if kind == "c" else [sys.executable, __file__, "--serve", kind, path]
    srv = subprocess.Popen(["taskset", "-c", SERVER_CPU, *server], stdout=subprocess.PIPE, text=True)
    try:
        if srv.stdout.readline().strip() != "ready":
            raise SystemExit(f"{kind} server did not start")
        r = subprocess.run(
            ["taskset", "-c", client_cpu, binary, "client", path, str(count), str(int(spin))],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if r.returncode != 0:
            raise SystemExit(f"client failed: {r.stderr}")
        srv.wait(timeout=30)  # the client's close ends the server
        return json.loads(r.stdout)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--count", type=int, default=2000, help="round trips per run")
    ap.add_argument("--serve", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        {"py": serve_py, "trio": serve_trio}[args.serve[0]](args.serve[1])
        return 0
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs 2 CPUs")
    results: dict[str, list[dict]] = {label: [] for label, *_ in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="graft-floor-") as d:
        tmp = Path(d)
        binary = build(tmp)
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for label, kind, cpu, spin in order:
                results[label].append(run_variant(binary, tmp, kind, cpu, spin, args.count))

    def med(label: str, key: str) -> float:
        return statistics.median(x[key] for x in results[label])

    print(
        f"broker round-trip floor: {args.rounds} rounds x {args.count} round trips, medians, "
        f"kernel {os.uname().release}"
    )
    print(f"{'variant':<40} {'native p50':>10} {'rt p50':>8} {'rt p99':>8} {'delta p50':>10}")
    for label, *_ in VARIANTS:
        n, p50, p99 = med(label, "native_p50"), med(label, "rt_p50"), med(label, "rt_p99")
        print(f"{label:<40} {n:>8.1f}µs {p50:>6.1f}µs {p99:>6.1f}µs {p50 - n:>+8.1f}µs")
    print("delta p50 = round trip p50 - native connect p50 (the connect-cost target: <= +40 µs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
