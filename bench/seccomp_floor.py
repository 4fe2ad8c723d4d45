#!/usr/bin/env python3
"""The floor under a seccomp-mode connect: one user-notification round trip, with nothing else in it.

    python bench/seccomp_floor.py [--rounds 3] [--count 20000]

In seccomp mode every connect() of the container stops in the filter until
the broker's C loop answers it. How much of the connect's cost is that
hand-off itself? bench/seccomp_floor.c times a stopped getppid() answered
by an agent that only receives and lets it go on (the loop's poll, RECV
and SEND CONTINUE), next to getpid()s the filter lets through, for the
agent's placements that matter on a 2-CPU machine:

  - the agent wherever the scheduler puts it, with synchronous wake-ups
    (SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, which the broker asks for): each
    side wakes the other on its own CPU, so they take turns on one;
  - the same without synchronous wake-ups;
  - the agent pinned to the other CPU than the app (as when the broker's
    CPU is not the app's): every hand-off is a cross-CPU wake-up, both ways.

The app is pinned to CPU 1 (where bench/connect_rate.py puts its clients).
Rounds rotate the order of the variants; the table shows each one's median
over rounds. No root needed (the app sets no_new_privs); 2 CPUs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

APP_CPU = 1
# (label, agent CPU (-1: unpinned), synchronous wake-ups)
VARIANTS = [
    ("agent unpinned, sync wake-ups (the broker's)", -1, 1),
    ("agent unpinned, no sync wake-ups", -1, 0),
    ("agent on the other CPU, sync wake-ups", 0, 1),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--count", type=int, default=20000, help="stopped calls per run")
    args = p.parse_args(argv)
    if shutil.which("cc") is None:
        raise SystemExit("missing programs: cc (make bench installs it)")
    results: dict[str, list[dict]] = {label: [] for label, _, _ in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="graft-bench-") as tmp:
        binary = common.build_c("seccomp_floor", Path(tmp))
        for r in range(args.rounds):
            for label, agent_cpu, sync in VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]:
                argv_ = [binary, str(args.count), str(agent_cpu), str(APP_CPU), str(sync)]
                done = subprocess.run(argv_, capture_output=True, text=True, timeout=300, check=True)
                results[label].append(json.loads(done.stdout))
    print(f"seccomp user-notification round trip, {args.count:,} stopped calls a run, median of {args.rounds} rounds")
    print()
    print(f"{'variant':<46} {'p50 µs':>8} {'p99 µs':>8} {'p50 − plain µs':>15}")
    for label, _, _ in VARIANTS:
        runs = results[label]
        p50 = statistics.median(x["stopped_p50_us"] for x in runs)
        p99 = statistics.median(x["stopped_p99_us"] for x in runs)
        plain = statistics.median(x["plain_p50_us"] for x in runs)
        print(f"{label:<46} {p50:>8.1f} {p99:>8.1f} {p50 - plain:>15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
