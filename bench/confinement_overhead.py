#!/usr/bin/env python3
"""What confinement costs, measured side by side in one run (loopback only, < 1 min).

    sudo .venv/bin/python bench/confinement_overhead.py [--rounds 7] [--n 3000]

1. Other processes' sockets. connect+close cycles per second of this process
   (not in the broker's cgroup), interleaved rounds, for:
     - no programs loaded at all;
     - graft's layout: the programs attached to a graft-broker cgroup below
       this process's cgroup, as graft-broker does (expected: 1.00x);
     - for comparison, the same programs attached to this process's own
       cgroup (what attaching to a shared cgroup would cost every socket in it:
       one program run and one socket-storage lookup per connect).
2. Grafted sockets, per operation, confinement on vs off:
     - the broker's extra work per grafted socket: socket+connect+mark+close
       in the confined cgroup vs socket+connect+close without programs;
     - a UDP sendto() naming the granted destination on a marked socket (the
       program runs and compares the address) vs on an unconfined socket;
       send() without an address does not run the program at all;
     - a 1-byte TCP round trip on a marked connected socket vs an unconfined
       one: the listen guard (a locked classic BPF socket filter on each TCP
       socket the broker connects) runs for every packet it receives.
       Grafted listeners and their accepted sockets carry none.
     - a connection to a grafted (marked) listener vs to an unconfined one:
       connect, accept, close both ends. The accepted socket belongs to the
       broker's cgroup, so the sock_release program (which counts closes of
       handed-out sockets for max_sockets) runs when it is closed.
Everything the bench creates (cgroups, programs, pins) is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from graft.broker.confine import (
    bpf,  # noqa: E402
    lifecycle,  # noqa: E402
    programs,  # noqa: E402
)


def move_to(cgroup_dir: str) -> None:
    with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
        f.write("0")


LINGER0 = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {1, 0}


def connect_cycles(n: int, addr, mark=None) -> float:
    """Seconds per socket+connect(+mark)+close on loopback."""
    t0 = time.perf_counter()
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)  # no TIME_WAIT build-up between rounds
        s.connect(addr)
        if mark is not None:
            mark(s)
        s.close()
    return (time.perf_counter() - t0) / n


def udp_sends(n: int, s: socket.socket, addr, with_addr: bool) -> float:
    t0 = time.perf_counter()
    if with_addr:
        for _ in range(n):
            s.sendto(b"x", addr)
    else:
        for _ in range(n):
            s.send(b"x")
    return (time.perf_counter() - t0) / n


def tcp_round_trips(n: int, a: socket.socket, b: socket.socket) -> float:
    """Seconds per 1-byte a -> b -> a round trip; a is the socket under test."""
    t0 = time.perf_counter()
    for _ in range(n):
        a.send(b"x")
        b.recv(1)
        b.send(b"x")
        a.recv(1)
    return (time.perf_counter() - t0) / n


def accept_cycles(n: int, lsn: socket.socket) -> float:
    """Seconds per connect + accept + close of both ends, to lsn (blocking)."""
    addr = lsn.getsockname()
    t0 = time.perf_counter()
    for _ in range(n):
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
        c.connect(addr)
        a, _ = lsn.accept()
        a.close()
        c.close()
    return (time.perf_counter() - t0) / n


def tcp_pair(addr, lsn: socket.socket) -> tuple[socket.socket, socket.socket]:
    a = socket.create_connection(addr)
    a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lsn.setblocking(True)
    b = lsn.accept()[0]
    lsn.setblocking(False)
    b.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def detach_all(cgroup_dir: str, conf) -> None:
    fd = os.open(cgroup_dir, os.O_RDONLY)
    try:
        for name, (_, _, t) in programs.PROGRAMS.items():
            bpf.prog_detach(fd, conf.prog_fds[name], t)
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--n", type=int, default=3000, help="operations per round")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (cgroups and BPF)", file=sys.stderr)
        return 1
    mount = lifecycle.cgroup2_mount()
    origin = lifecycle.own_cgroup()
    base = os.path.join(origin, f"graft-bench-{uuid.uuid4().hex[:8]}")
    load = base + "/load"  # where this process runs while measuring
    confined = load + "/" + lifecycle.CGROUP_NAME  # graft's layout: below, not at, the measured process
    for cg in (base, load, confined):
        os.mkdir(mount + cg)
    bpffs = lifecycle.bpffs_mount(create=True)
    pin_dir = lifecycle.pin_dir_for(bpffs, confined)
    os.makedirs(pin_dir, mode=0o700)
    conf = None
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(4096)
    lsn.setblocking(False)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    addr, uaddr = lsn.getsockname(), sink.getsockname()

    def drain():
        while True:
            try:
                lsn.accept()[0].close()
            except BlockingIOError:
                break
        while True:
            try:
                sink.recv(16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break

    try:
        move_to(mount + load)
        conf = lifecycle._load_or_reuse(confined, mount + confined, pin_dir)
        load_fd = os.open(mount + load, os.O_RDONLY)
        results: dict[str, list[float]] = {
            k: []
            for k in (
                "none",
                "graft",
                "shared",
                "c_off",
                "c_on",
                "u_off",
                "u_on",
                "u_off_noaddr",
                "u_on_noaddr",
                "mark",
                "t_off",
                "t_on",
                "a_off",
                "a_on",
            )
        }
        n = args.n
        for r in range(args.rounds):
            # -- 1. other processes' sockets, in a different order each round --------
            def none():
                results["none"].append(connect_cycles(n, addr))

            def graft():
                lifecycle._attach(conf)  # the graft layout: below this process
                results["graft"].append(connect_cycles(n, addr))
                detach_all(mount + confined, conf)

            def shared():
                for name, (_, _, t) in programs.PROGRAMS.items():
                    bpf.prog_attach(load_fd, conf.prog_fds[name], t, bpf.F_ALLOW_MULTI)
                results["shared"].append(connect_cycles(n, addr))
                detach_all(mount + load, conf)

            order = [none, graft, shared]
            for f in order[r % 3 :] + order[: r % 3]:
                f()
                drain()
            # -- 2. grafted sockets: the broker's side, UDP sends, TCP round trips --------
            lifecycle._attach(conf)
            u_plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u_plain.connect(uaddr)

            def c_off():
                results["c_off"].append(connect_cycles(n, addr))

            def c_on():
                move_to(mount + confined)
                results["c_on"].append(connect_cycles(n, addr, mark=lambda s: conf.mark(s, False, addr)))
                move_to(mount + load)

            for f in [c_off, c_on] if r % 2 else [c_on, c_off]:
                f()
                drain()
            t0 = time.perf_counter()
            for _ in range(n):
                conf.mark(u_plain, False, uaddr)
            results["mark"].append((time.perf_counter() - t0) / n)
            u_plain.close()
            u_plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # unmarked again
            u_plain.connect(uaddr)
            move_to(mount + confined)
            u_marked = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u_marked.connect(uaddr)
            conf.mark(u_marked, False, uaddr)
            move_to(mount + load)
            results["u_off"].append(udp_sends(n, u_plain, uaddr, True))
            drain()
            results["u_on"].append(udp_sends(n, u_marked, uaddr, True))
            drain()
            results["u_off_noaddr"].append(udp_sends(n, u_plain, uaddr, False))
            drain()
            results["u_on_noaddr"].append(udp_sends(n, u_marked, uaddr, False))
            drain()
            u_plain.close()
            u_marked.close()
            t_plain = tcp_pair(addr, lsn)
            move_to(mount + confined)
            t_marked = tcp_pair(addr, lsn)
            conf.mark(t_marked[0], False, addr)
            move_to(mount + load)
            for key, pair in (
                (("t_on", t_marked), ("t_off", t_plain)) if r % 2 else (("t_off", t_plain), ("t_on", t_marked))
            ):
                results[key].append(tcp_round_trips(n, *pair))
            for sock in (*t_plain, *t_marked):
                sock.close()
            l_plain = socket.create_server(("127.0.0.1", 0), backlog=128)
            move_to(mount + confined)
            l_marked = socket.create_server(("127.0.0.1", 0), backlog=128)
            conf.mark(l_marked, False)  # a bind graft: accepted sockets clone the mark
            move_to(mount + load)
            for key, lsock in (
                (("a_on", l_marked), ("a_off", l_plain)) if r % 2 else (("a_off", l_plain), ("a_on", l_marked))
            ):
                results[key].append(accept_cycles(n, lsock))
            l_plain.close()
            l_marked.close()
            detach_all(mount + confined, conf)
        os.close(load_fd)
    finally:
        move_to(mount + origin)
        lsn.close()
        sink.close()
        if conf is not None:
            conf.close()
        lifecycle.remove(confined, pin_dir, rmdir_cgroup=True)
        for cg in (confined, load, base):
            if os.path.isdir(mount + cg):
                os.rmdir(mount + cg)

    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"confinement overhead: {args.rounds} interleaved rounds x {args.n} ops, medians, kernel {os.uname().release}"
    )
    print()
    print("1. other processes' sockets: connect+close on loopback")
    print(f"   {'layout':<52} {'cycles/s':>10} {'ratio':>7}")
    for k, label in (
        ("none", "no programs"),
        ("graft", "graft: programs on <cgroup>/graft-broker (below us)"),
        ("shared", "comparison: programs on our own (shared) cgroup"),
    ):
        print(f"   {label:<52} {1 / med[k]:>10.0f} {med['none'] / med[k]:>7.3f}")
    print()
    print("2. grafted sockets, per operation")
    print(f"   {'operation':<52} {'off µs':>8} {'on µs':>8} {'delta µs':>9}")
    rows = (
        ("broker: socket+connect(+mark)+close", "c_off", "c_on"),
        ("UDP sendto(granted dest), program compares", "u_off", "u_on"),
    )
    for label, off, on in rows:
        print(f"   {label:<52} {med[off] * 1e6:>8.2f} {med[on] * 1e6:>8.2f} {(med[on] - med[off]) * 1e6:>9.2f}")
    print(f"   {'of which the mark (one bpf map update)':<52} {'':>8} {med['mark'] * 1e6:>8.2f}")
    rows = (
        ("UDP send(), no address: no program runs", "u_off_noaddr", "u_on_noaddr"),
        ("TCP 1-byte round trip (listen guard per packet)", "t_off", "t_on"),
        ("connection to a grafted listener (release program)", "a_off", "a_on"),
    )
    for label, off, on in rows:
        print(f"   {label:<52} {med[off] * 1e6:>8.2f} {med[on] * 1e6:>8.2f} {(med[on] - med[off]) * 1e6:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
