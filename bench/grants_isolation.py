"""One tenant's flood of destinations against another tenant's fast path.

    python bench/grants_isolation.py [--flood N] [--quiet K]

The connect fast path needs a grant in the kernel per (tenant, destination).
Two tenants share one broker: "quiet" has K destinations granted; "busy"
then gets FLOOD destinations granted (default 100,000, six times what the
one LRU all tenants shared before held). The hit rate of a tenant is the
share of its granted destinations that a pre-issued socket can still reach
without the broker (a connect the kernel lets through: a grant hit; EPERM:
a miss, the shim would ask the broker). It is measured for quiet before
and after the flood, in the same run, and for busy's own first K
destinations, to show the flood really overflowed a map. Destinations are
distinct loopback addresses with a closed port: a hit is a connection
reset, a miss EPERM. Confinement is required (the fast path needs it).
"""

from __future__ import annotations

import argparse
import errno
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from graft.broker.shim import wire  # noqa: E402
from support.harness import BrokerProcess, WireClient, grant_many, loopback_destination  # noqa: E402

PORT = 9
QUIET_NET, BUSY_NET = 200, 1  # 127.200.x.y for quiet, 127.1.x.y onwards for busy


def policy() -> str:
    return f"""version = 1
[broker]
confinement = "required"
audit_log = "off"
[tenants.quiet]
default = "deny"
max_sockets = 4096
[[tenants.quiet.connect]]
to = ["127.{QUIET_NET}.0.0/16"]
proto = "tcp"
[tenants.busy]
default = "deny"
max_sockets = 4096
[[tenants.busy.connect]]
to = ["127.0.0.0/8"]
proto = "tcp"
"""


def hit_rate(path: Path, k: int, net: int) -> float:
    """The share of the first k destinations of 127.net/16 that pre-issued sockets reach without the broker."""
    client = WireClient(path)
    hits = 0
    try:
        done = 0
        while done < k:
            reply, socks = client.preissue()
            if reply.verdict != wire.V_GRAFT:
                raise SystemExit(f"pre-issue refused: {reply}")
            for sock in socks:
                if done < k:
                    sock.setblocking(True)
                    err = sock.connect_ex((loopback_destination(done, net), PORT))
                    hits += err != errno.EPERM
                    done += 1
                sock.close()
    finally:
        client.close()
    return hits / k


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flood", type=int, default=100_000)
    ap.add_argument("--quiet", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="graft-bench-", dir="/tmp") as tmp:
        broker = BrokerProcess(Path(tmp), policy(), tenant="quiet").start()
        try:
            quiet, busy = broker.socket_path, broker.socket_dir / "busy.sock"
            grant_many(quiet, args.quiet, QUIET_NET, PORT)
            before = hit_rate(quiet, args.quiet, QUIET_NET)
            t0 = time.monotonic()
            grant_many(busy, args.flood, BUSY_NET, PORT)
            flood_s = time.monotonic() - t0
            after = hit_rate(quiet, args.quiet, QUIET_NET)
            busy_own = hit_rate(busy, args.quiet, BUSY_NET)
        finally:
            rc = broker.stop()
        if rc != 0:
            raise SystemExit(f"broker exited {rc}:\n{broker.stderr()}")
    print(f"busy tenant: {args.flood:,} destinations granted in {flood_s:.1f} s")
    print()
    print("| tenant | destinations measured | hit rate before the flood | after | after / before |")
    print("|---|---:|---:|---:|---:|")
    print(f"| quiet | {args.quiet} | {before:.3f} | {after:.3f} | {after / before:.2f} |")
    print(f"| busy (its first {args.quiet}) | {args.quiet} | - | {busy_own:.3f} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
