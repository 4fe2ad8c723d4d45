"""make demo: graft end to end on one machine, with no container engine.

A network namespace with only `lo` stands in for a container: nothing in it
can reach the host's 127.0.0.1. graft-broker runs with
policy/examples/demo.toml, and unmodified programs run in the namespace
under `graft run`. The demo shows, each with its audit line:

  (a) curl in the namespace fetches a page by name from a server that
      listens only on the host's 127.0.0.1:8000: the name is resolved by the
      broker's resolver in the namespace (127.0.0.11), which asks the
      tenant's upstream, a dnsmasq on the host's 127.53.0.1;
  (b) `python3 -m http.server 80` in the namespace is published on the
      host's 127.0.0.1:8080, and curl on the host fetches from it;
  (c) a connection the policy denies fails with EPERM;
  (d) a real container, started by runc through graft-runtime from a bundle
      whose only mention of graft is the annotation io.graft.tenant=demo,
      runs curl and fetches the same host-only page; and one annotated
      io.graft.tenant=static (a tenant in seccomp mode) runs the static
      busybox wget, which no LD_PRELOAD could graft, and fetches it too;
      then Debian's dockerd (a private one, on a private containerd, both
      started and stopped here) runs `docker run --runtime graft-demo`: the
      runtime packaging/docker/daemon.json registers for tenant demo, since
      dockerd 20.10 passes no annotations. Its curl fetches the page too.

It exits 0 only if all of them behave so, and removes everything it made.
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

from support.dnsmasq import dnsmasq  # noqa: E402
from support.docker import graft_runtime, host_volumes, private_dockerd  # noqa: E402
from support.harness import (  # noqa: E402  (the demo reuses the test harness)
    BrokerProcess,
    graft_cmd,
    http_server,
    network_namespace,
    run_grafted,
    run_in_netns,
)
from support.rootfs import Runtime, build_rootfs, default_config, real_runtime, write_bundle  # noqa: E402

HOST_PORT, PUBLISHED_PORT, DENIED_PORT = 8000, 8080, 8001
UPSTREAM, HOST_NAME = "127.53.0.1", "web.graft-demo.test"  # as policy/examples/demo.toml names them
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


def audit_line(broker: BrokerProcess, since: int = 0, **match) -> dict:
    """The last audit record matching match, among those after the first `since`."""
    for rec in reversed(broker.audit()[since:]):
        if all(rec.get(k) == v for k, v in match.items()):
            print(f"    audit: {json.dumps(rec)}")
            return rec
    raise SystemExit(f"demo failed: no audit record matching {match}")


def check(ok: bool, what: str) -> None:
    print(f"    {'ok' if ok else 'FAILED'}: {what}")
    if not ok:
        raise SystemExit(f"demo failed: {what}")


class Containers:
    """Step (d): containers from bundles that name their tenant and nothing else of graft."""

    def __init__(self, tmp: Path, broker: BrokerProcess):
        self.tmp, self.broker = tmp, broker
        self.rootfs = build_rootfs(tmp / "rootfs")
        self.runtime = Runtime(real_runtime("runc", tmp), tmp / "oci-state")

    def run(self, name: str, args: list[str], tenant: str | None = None) -> subprocess.CompletedProcess:
        """Run args in a new container `name` of tenant (default: the broker's); deleted afterwards."""
        annotations = {
            "io.graft.tenant": tenant or self.broker.tenant,
            "io.graft.socket-dir": str(self.broker.socket_dir),
        }
        bundle = write_bundle(self.tmp / f"bundle-{name}", default_config(self.rootfs, args, annotations))
        print(f"    bundle {bundle}: annotations {json.dumps(annotations)}")
        print(f"    $ graft-runtime run --bundle {bundle} {name}    (real runtime: {self.runtime.real})")
        with self.runtime.container_id(f"graft-demo-{name}") as cid:
            done = self.runtime.run("run", "--bundle", str(bundle), cid)
        added = json.loads((bundle / "config.json").read_text())
        mounts = [f"{m['source']} -> {m['destination']}" for m in added["mounts"][-2:]]
        print(
            f"    graft-runtime added: {'; '.join(mounts)}"
            + "".join(f"; {e}" for e in added["process"]["env"] if e.startswith("LD_PRELOAD="))
            + ("; a seccomp notify rule" if "seccomp" in added.get("linux", {}) else "")
        )
        if done.stderr.strip():
            print(f"    stderr: {done.stderr.strip()}")
        return done


def docker_run(stack: ExitStack, tmp: Path, broker: BrokerProcess, rootfs: Path, url: str) -> None:
    """Step (d) with Docker: a private containerd and dockerd whose runtime graft-demo is tenant demo's."""
    runtime = graft_runtime("demo", broker.socket_dir)
    dk = stack.enter_context(private_dockerd(tmp, {"graft-demo": runtime}))  # stopped before the broker is
    print(f"    private dockerd (pid {dk.pid}) on {dk.host}, on its own containerd (pid {dk.containerd.pid})")
    print(f'    daemon.json: "graft-demo": {json.dumps(runtime)}')
    image = dk.import_rootfs(rootfs, "graft-demo:rootfs")
    print(f"    $ tar -C {rootfs} -c . | docker import - {image}")
    args = ["run", "--rm", "--network", "none", *host_volumes(), "--runtime", "graft-demo", image]
    args += ["curl", "-sS", "--max-time", "10", url]
    print(f"    $ docker {' '.join(args)}")
    seen = len(broker.audit())
    run = dk.docker(*args)
    if run.stderr.strip():
        print(f"    stderr: {run.stderr.strip()}")
    print(f"    curl in the Docker container says: {run.stdout.strip()!r}")
    check(run.returncode == 0 and run.stdout == PAGE, "a docker run --runtime graft-demo container fetches it too")
    audit_line(broker, since=seen, tenant="demo", op="connect", port=HOST_PORT, action="graft", via="shim")


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
        stack.enter_context(dnsmasq(UPSTREAM, {HOST_NAME: "127.0.0.1"}))
        print(f"    dnsmasq on {UPSTREAM}:53 (the demo tenant's upstream): {HOST_NAME} -> 127.0.0.1")
        broker = BrokerProcess(tmp, policy, tenant="demo")
        stack.callback(broker.stop)
        broker.start()
        print(f"    graft-broker ready, tenant socket {broker.socket_path}")

        step(f"(a) curl in the namespace -> http://{HOST_NAME}:{HOST_PORT}/ (host 127.0.0.1:{HOST_PORT})")
        url = f"http://127.0.0.1:{HOST_PORT}/"
        plain = run_in_netns(ns, "curl", "-sS", "--max-time", "5", url)
        check(plain.returncode != 0, f"without graft, curl cannot reach it even by address ({plain.stderr.strip()})")
        by_name = f"http://{HOST_NAME}:{HOST_PORT}/"
        grafted = run_grafted(broker, ns, "curl", "-sS", "--max-time", "10", by_name, dns=True)
        print(f"    curl says: {grafted.stdout.strip()!r}")
        check(grafted.returncode == 0 and grafted.stdout == PAGE, "under graft, curl fetches the host's page by name")
        audit_line(broker, op="dns", name=HOST_NAME, qtype="A", action="graft", via="resolver")
        audit_line(broker, op="connect", port=HOST_PORT, action="graft")

        step(f"(b) python3 -m http.server 80 in the namespace, published on host 127.0.0.1:{PUBLISHED_PORT}")
        server = subprocess.Popen(
            graft_cmd(
                broker,
                ns,
                sys.executable,
                "-u",
                "-m",
                "http.server",
                "80",
                "--bind",
                "0.0.0.0",
                "--directory",
                str(tmp / "app"),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        stack.callback(lambda: (server.terminate(), server.wait()))
        ready = server.stdout.readline()  # http.server prints this once it listens
        check("Serving HTTP" in ready, f"the server is listening ({ready.strip()})")
        host = subprocess.run(
            ["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{PUBLISHED_PORT}/"], capture_output=True, text=True
        )
        print(f"    host curl says: {host.stdout.strip()!r}")
        check(
            host.returncode == 0 and "inside the namespace" in host.stdout,
            "curl on the host fetches from the namespace's server",
        )
        audit_line(broker, op="bind", port=80, action="graft", host_addr=f"127.0.0.1:{PUBLISHED_PORT}")

        step(f"(c) a connection the policy denies: namespace -> host 127.0.0.1:{DENIED_PORT}")
        denied = run_grafted(broker, ns, sys.executable, "-c", DENIED_CLIENT, env=None)
        print(f"    client says: {denied.stdout.strip()}")
        check(denied.returncode == 1 and "errno 1 " in denied.stdout, "the connect fails with EPERM")
        audit_line(broker, op="connect", port=DENIED_PORT, action="deny", errno=1)

        step(f"(d) containers started by runc, then by dockerd, through graft-runtime -> host 127.0.0.1:{HOST_PORT}")
        containers = Containers(tmp, broker)
        seen = len(broker.audit())
        print(f"    root filesystem {containers.rootfs} (the host's /usr, read-only), network: only lo")
        run = containers.run("curl", ["curl", "-sS", "--max-time", "10", url])
        print(f"    curl in the container says: {run.stdout.strip()!r}")
        check(run.returncode == 0 and run.stdout == PAGE, "the container fetches the host's page through graft")
        audit_line(broker, since=seen, op="connect", port=HOST_PORT, action="graft", via="shim")
        seen = len(broker.audit())
        run = containers.run("wget", ["busybox", "wget", "-q", "-O", "-", url], tenant="static")
        print(f"    static busybox wget in the container says: {run.stdout.strip()!r}")
        check(
            run.returncode == 0 and run.stdout == PAGE,
            "a static binary in a seccomp-mode container fetches the host's page through graft"
            + ("" if run.returncode == 0 else f" (exit status {run.returncode})"),
        )
        audit_line(broker, since=seen, tenant="static", op="connect", port=HOST_PORT, action="graft", via="seccomp")
        docker_run(stack, tmp, broker, containers.rootfs, url)

        step("clean-up")
    print("    containers, Docker's daemons and their state, namespace, servers and broker removed")
    print("\nDemo passed: (a), (b), (c) and (d) behaved as described.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
