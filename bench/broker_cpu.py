"""The broker's CPU time per graft: a steadier yardstick than latency here.

    python bench/broker_cpu.py [--grafts N] [--fast-grafts N]

Latency on a shared 2-core machine moves by tens of percent between runs;
the CPU time the broker process spends per request does not. One client
connection asks for N grafts of each kind (UDP connect, TCP connect to a
local listener that accepts and closes) and the broker's utime+stime from
/proc/PID/stat, before and after, gives microseconds of broker CPU per
graft. Audit log to a file, confinement as the machine allows ("auto").

A third row is the connect fast path (confinement on only): this script
plays the shim, asking for pre-issued sockets (as many as one request gets) and
connecting them itself to the granted listener; the broker's share is the
refills plus writing the kernel's audit records, per connect.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from graft.broker.shim import wire  # noqa: E402
from support.harness import BrokerProcess, WireClient, connect_request, eventually  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def run(path: Path, req: bytes, n: int) -> None:
    c = WireClient(path)
    try:
        for _ in range(n):
            c.send(req)
            rep, sock = c.reply()
            assert rep.verdict == wire.V_GRAFT, rep
            sock.close()
    finally:
        c.close()


def run_fast(path: Path, port: int, n: int) -> None:
    """n connects on pre-issued sockets, as the shim makes them (the first request grants the port)."""
    c = WireClient(path)
    try:
        c.send(connect_request(port))
        c.reply()[1].close()
        done = 0
        while done < n:
            rep, socks = c.preissue()
            assert rep.verdict == wire.V_GRAFT, rep
            for sock in socks:
                with sock:
                    sock.setblocking(True)
                    sock.connect(("127.0.0.1", port))
            done += len(socks)
    finally:
        c.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grafts", type=int, default=20000)
    # /proc's CPU times count in clock ticks (10 ms): over 20,000 fast-path connects a tick is 0.5 µs
    # of a ~5 µs result, so that row takes more connects (they are cheap) for a tenth of a µs.
    ap.add_argument("--fast-grafts", type=int, default=100000)
    args = ap.parse_args()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def accept_and_close():
        while not stop.is_set():
            try:
                listener.accept()[0].close()
            except OSError:
                return

    acceptor = threading.Thread(target=accept_and_close, daemon=True)
    acceptor.start()
    policy = 'version = 1\n[tenants.t]\nmax_sockets = 1000000\n[[tenants.t.connect]]\nto = ["127.0.0.1/32"]\n'
    kinds = {
        "udp connect": connect_request(9, udp=True),
        "tcp connect": connect_request(port),
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="graft-cpu-", dir="/tmp") as tmp:
        broker = BrokerProcess(Path(tmp), policy).start("--log-level", "warning")
        try:
            run(broker.socket_path, kinds["udp connect"], 2000)  # warm-up
            for name, req in kinds.items():
                before = cpu_seconds(broker.proc.pid)
                run(broker.socket_path, req, args.grafts)
                rows.append((name, (cpu_seconds(broker.proc.pid) - before) / args.grafts * 1e6))
            confinement = broker.audit()[-1].get("confinement")
            if confinement == "on":
                before = cpu_seconds(broker.proc.pid)
                run_fast(broker.socket_path, port, args.fast_grafts)
                # until the broker has written every kernel audit record: that work is counted too
                written = lambda: broker.audit_path.read_text().count('"via":"kernel"')  # noqa: E731
                assert eventually(lambda: written() >= args.fast_grafts, timeout=60, interval=0.2), written()
                spent = cpu_seconds(broker.proc.pid) - before
                rows.append(("tcp connect, fast path", spent / args.fast_grafts * 1e6))
        finally:
            broker.stop()
            stop.set()
            listener.close()
    print(
        f"broker CPU per graft ({args.grafts} each, {args.fast_grafts} fast-path;"
        f" audit to a file, confinement {confinement})"
    )
    for name, us in rows:
        print(f"  {name:<22} {us:7.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
