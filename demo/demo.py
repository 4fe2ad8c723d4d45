"""make demo: graft end to end on one machine, with no container engine.

A network namespace with only `lo` stands in for a container: nothing in it
can reach the host's 127.0.0.1. graft-broker runs with
policy/examples/demo.toml, and unmodified programs run in the namespace
under `graft run`. The demo shows, each with its audit line:

  (a) curl in the namespace fetches a page from a server that listens only
      on the host's 127.0.0.1:8000;
  (b) `python3 -m http.server 80` in the namespace is published on the
      host's 127.0.0.1:8080, and curl on the host fetches from it;
  (c) a connection the policy denies fails with EPERM.

It exits 0 only if all three behave so, and removes everything it made.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness import (  # noqa: E402  (the demo reuses the test harness)
    BrokerProcess,
    graft_cmd,
    http_server,
    network_namespace,
    run_grafted,
    run_in_netns,
)

HOST_PORT, PUBLISHED_PORT, DENIED_PORT = 8000, 8080, 8001
PAGE = "Hello from the host's 127.0.0.1 - served through graft.\n"
DENIED_CLIENT = (
    "import socket\n"
    "try:\n"
    f"    socket.create_connection(('127.0.0.1', {DENIED_PORT}))\n"
    "except OSError as e:\n"
    "    print(f'connect failed: errno {e.errno} ({e.strerror})'); raise SystemExit(e.errno)\n"
    "print('connect succeeded'); raise SystemExit(0)\n"
)


def step(title: str) -> None:
    print(f"\n=== {title}")


def audit_line(broker: BrokerProcess, **match) -> dict:
    for rec in reversed(broker.audit()):
        if all(rec.get(k) == v for k, v in match.items()):
            print(f"    audit: {json.dumps(rec)}")
            return rec
    raise SystemExit(f"demo failed: no audit record matching {match}")


def check(ok: bool, what: str) -> None:
    print(f"    {'ok' if ok else 'FAILED'}: {what}")
    if not ok:
        raise SystemExit(f"demo failed: {what}")


def main() -> int:
    policy = (REPO / "policy" / "examples" / "demo.toml").read_text()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graft-demo-", dir="/tmp")))
        (tmp / "www").mkdir()
        (tmp / "www" / "index.html").write_text(PAGE)
        (tmp / "app").mkdir()
        (tmp / "app" / "index.html").write_text("Hello from inside the namespace, published by graft.\n")

        step("set-up: a namespace with only lo, a host-only HTTP server, graft-broker")
        ns = stack.enter_context(network_namespace("graft-demo"))
        print(f"    namespace {ns}")
        stack.enter_context(http_server(tmp / "www", port=HOST_PORT))
        print(f"    host HTTP server on 127.0.0.1:{HOST_PORT}")
        broker = BrokerProcess(tmp, policy, tenant="demo")
        stack.callback(broker.stop)
        broker.start()
        print(f"    graft-broker ready, tenant socket {broker.socket_path}")

        step(f"(a) curl in the namespace -> host 127.0.0.1:{HOST_PORT}")
        url = f"http://127.0.0.1:{HOST_PORT}/"
        plain = run_in_netns(ns, "curl", "-sS", "--max-time", "5", url)
        check(plain.returncode != 0, f"without graft, curl cannot reach it ({plain.stderr.strip()})")
        grafted = run_grafted(broker, ns, "curl", "-sS", "--max-time", "10", url)
        print(f"    curl says: {grafted.stdout.strip()!r}")
        check(grafted.returncode == 0 and grafted.stdout == PAGE, "under graft, curl fetches the host's page")
        audit_line(broker, op="connect", port=HOST_PORT, action="graft")

        step(f"(b) python3 -m http.server 80 in the namespace, published on host 127.0.0.1:{PUBLISHED_PORT}")
        server = subprocess.Popen(
            graft_cmd(broker, ns, sys.executable, "-u", "-m", "http.server", "80", "--bind", "0.0.0.0",
                      "--directory", str(tmp / "app")),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        stack.callback(lambda: (server.terminate(), server.wait()))
        ready = server.stdout.readline()  # http.server prints this once it listens
        check("Serving HTTP" in ready, f"the server is listening ({ready.strip()})")
        host = subprocess.run(["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{PUBLISHED_PORT}/"],
                              capture_output=True, text=True)
        print(f"    host curl says: {host.stdout.strip()!r}")
        check(host.returncode == 0 and "inside the namespace" in host.stdout,
              "curl on the host fetches from the namespace's server")
        audit_line(broker, op="bind", port=80, action="graft", host_addr=f"127.0.0.1:{PUBLISHED_PORT}")

        step(f"(c) a connection the policy denies: namespace -> host 127.0.0.1:{DENIED_PORT}")
        denied = run_grafted(broker, ns, sys.executable, "-c", DENIED_CLIENT, env=None)
        print(f"    client says: {denied.stdout.strip()}")
        check(denied.returncode == 1 and "errno 1 " in denied.stdout, "the connect fails with EPERM")
        audit_line(broker, op="connect", port=DENIED_PORT, action="deny", errno=1)

        step("clean-up")
    print("    namespace, servers and broker removed")
    print("\nDemo passed: (a), (b) and (c) behaved as described.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
