"""Policy hot reload while about 1,000 grafts a second are running: the new
decisions apply at once, and no request fails because of the reload."""
from __future__ import annotations

import threading
import time

from graft.broker import wire
from harness import WireClient, connect_request, eventually

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
    """Paced requests on one connection; record (time sent, verdict) and anything abnormal."""
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
    stop, seen, problems = threading.Event(), [], []
    threads = [threading.Thread(target=load, args=(broker.socket_path, stop, seen, problems))
               for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    switches = []
    try:
        for i in range(RELOADS):
            action = "deny" if i % 2 == 0 else "graft"
            broker.reload(POLICY.format(action=action))  # returns once READY=1 follows RELOADING=1
            switches.append((time.monotonic(), wire.V_DENY if action == "deny" else wire.V_GRAFT))
            # Requests sent from now on reach the broker after its READY=1, so
            # they must carry the new decision.
            mark = len(seen)
            assert eventually(lambda: len(seen) >= mark + 50)  # answers to 50 requests after the switch
            after = [v for ts, v in seen[mark:] if ts > switches[-1][0]]
            assert after and all(v == switches[-1][1] for v in after), (action, after[:10])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert problems == []
    duration = seen[-1][0] - seen[0][0]
    assert len(seen) / duration > 0.8 * RATE_PER_CLIENT * CLIENTS, f"{len(seen) / duration:.0f} requests/s"
