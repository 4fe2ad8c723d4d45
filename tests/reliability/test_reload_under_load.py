"""Policy hot reload while about 1,000 grafts a second are running: the new
decisions apply at once, and no request fails because of the reload.

The load is paced to that rate; what the test asserts of it is not its rate
(a loaded machine may not reach it, and targets live in bench/) but that every
client kept being answered across every reload."""

from __future__ import annotations

import threading
import time

from graft.broker.shim import wire
from support.harness import WireClient, connect_request, eventually

RATE_PER_CLIENT = 250  # x 4 clients = 1,000 requests a second
CLIENTS = 4
RELOADS = 5

POLICY = """
version = 1
[tenants.t]
default = "deny"
[[tenants.t.connect]]
to = ["127.0.0.1/32"]
ports = [9]
proto = "udp"
action = "{action}"
"""


def request() -> bytes:
    return connect_request(9, udp=True)


def load(path, stop: threading.Event, seen: list, problems: list) -> None:
    """Paced requests on one connection; record (time sent, verdict) in seen, and anything abnormal."""
    c = WireClient(path)
    req = request()
    interval = 1.0 / RATE_PER_CLIENT
    next_at = time.monotonic()
    try:
        while not stop.is_set():
            sent_at = time.monotonic()
            try:
                c.send(req)
                rep, sock = c.reply()
            except OSError as e:
                problems.append(repr(e))
                return
            if rep is None or rep.verdict not in (wire.V_GRAFT, wire.V_DENY):
                problems.append(rep)
                return
            if sock is not None:
                sock.close()
            seen.append((sent_at, rep.verdict))
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing to the target rate, not synchronisation
    finally:
        c.close()


def test_reload_under_load(start_broker):
    broker = start_broker(POLICY.format(action="graft"), "t", "--audit-log", "off")
    stop, problems = threading.Event(), []
    seen: list[list] = [[] for _ in range(CLIENTS)]  # per client
    threads = [threading.Thread(target=load, args=(broker.socket_path, stop, mine, problems)) for mine in seen]
    for t in threads:
        t.start()
    try:
        for i in range(RELOADS):
            action = "deny" if i % 2 == 0 else "graft"
            broker.reload(POLICY.format(action=action))  # returns once READY=1 follows RELOADING=1
            switched_at, want = time.monotonic(), wire.V_DENY if action == "deny" else wire.V_GRAFT
            # Requests sent from now on reach the broker after its READY=1, so
            # they must carry the new decision; every client gets answers to some.
            after = lambda at=switched_at: [[v for ts, v in mine if ts > at] for mine in seen]  # noqa: E731
            assert eventually(lambda after=after: problems or min(map(len, after())) >= 10, timeout=10), [
                len(m) for m in seen
            ]
            assert problems == [] and all(v == want for mine in after() for v in mine), (action, problems)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert problems == []
