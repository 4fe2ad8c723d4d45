"""The user-mode network scenarios of bench/run.py: pasta and slirp4netns.

Rootless podman and most users without root connect a container with one of
these two programs (Debian packages `passt` and `slirp4netns`) instead of a
veth pair and NAT. Each is run here as an operator runs it, against a
namespace the benchmark made with pyroute2 (docs/benchmarks.md, "pasta and
slirp4netns"):

  pasta        `pasta --netns PATH` with explicit forwards only, so every
               path the benchmark measures is pasta's spliced loopback path
               (its fastest, and what podman uses for published ports):
               -T: a client in the namespace connects to 127.0.0.1:<port>,
               pasta splices it to the host's 127.0.0.1:<port>;
               -U: the same for UDP; -t 127.0.0.1/H:C: the host's
               127.0.0.1:H is spliced to the namespace's port C. The tap
               interface pasta adds is left unconfigured and down.
  slirp4netns  `slirp4netns --netns-type=path PATH tap0` with podman's MTU
               (65520) and seccomp filter; the tap gets 10.0.2.100/24 from
               pyroute2 and no default route. A client in the namespace
               reaches the host's 127.0.0.1 at the gateway 10.0.2.2 (podman's
               `allow_host_loopback=true`); published ports are `add_hostfwd`
               requests on its API socket, bound on the host's 127.0.0.1.

So traffic only ever crosses the host's loopback and the namespaces made
here. Every process and namespace is removed when the caller's ExitStack
unwinds, pass or fail.
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import socket
import subprocess
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from common import create_namespace, remove_namespace, start_process

# slirp4netns's default virtual network; it exists only inside its namespace.
SLIRP_NET = ipaddress.ip_network("10.0.2.0/24")
SLIRP_GUEST = "10.0.2.100"  # the namespace's address (what --configure would set)
SLIRP_GATEWAY = "10.0.2.2"  # slirp's alias for the host's 127.0.0.1
SLIRP_TAP = "tap0"
# podman's MTU for both programs (containers.conf); slirp4netns's own default is 1500.
MTU = 65520


def _wait_file(path: Path, proc, timeout: float = 15.0) -> None:
    """Wait (bounded) until proc has written a non-empty path."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    log = proc.log_path.read_text(errors="replace")[-1500:] if proc.log_path else ""
    raise RuntimeError(f"{proc.args[0]}: no {path} within {timeout}s (exit {proc.poll()}): {log}")


def pasta_argv(
    netns_path: str, pidfile: Path, logfile: Path, *, tcp_in: dict[int, int], tcp_out: list[int], udp_out: list[int]
) -> list[str]:
    """pasta's command line: explicit forwards only (its default, `auto`, would follow the namespace's binds).

    tcp_in: host port on 127.0.0.1 -> port in the namespace (podman's `-p 127.0.0.1:H:C`).
    """

    def spec(ports):
        return ",".join(str(p) for p in ports) if ports else "none"

    argv = [
        "pasta",
        "--foreground",
        "--quiet",
        "--log-file",
        str(logfile),
        "--pid",
        str(pidfile),
        # As root, pasta drops to `nobody` and then cannot join a namespace owned
        # by the initial user namespace; podman (rootful) keeps root the same way.
        "--runas",
        "0:0",
        "--netns",
        netns_path,
    ]
    for h, c in tcp_in.items():
        argv += ["-t", f"127.0.0.1/{h}:{c}"]
    if not tcp_in:
        argv += ["-t", "none"]
    return argv + ["-u", "none", "-T", spec(tcp_out), "-U", spec(udp_out)]


@contextmanager
def pasta_namespace(
    run_id: str, tmp: Path, *, tcp_in: dict[int, int], tcp_out: list[int], udp_out: list[int], nice: int = 0
):
    """A namespace connected by pasta (at niceness nice); yields {"netns", "argv", "pid"}."""
    name = f"graft-bench-pasta-{run_id}"
    with ExitStack() as stack:
        create_namespace(name)
        stack.callback(remove_namespace, name)
        pidfile, logfile = tmp / "pasta.pid", tmp / "pasta.log"
        argv = pasta_argv(f"/run/netns/{name}", pidfile, logfile, tcp_in=tcp_in, tcp_out=tcp_out, udp_out=udp_out)
        if nice:
            argv = ["nice", "-n", str(nice), *argv]
        proc = start_process(stack, argv, log_to=tmp / "pasta.stdout")
        # pasta writes its pid file once its forwarding sockets are bound.
        _wait_file(pidfile, proc)
        yield {"netns": name, "argv": argv, "pid": proc.pid}


def slirp_api(api_socket: Path, execute: str, arguments: dict, timeout: float = 5.0) -> dict:
    """One request on slirp4netns's API socket (one JSON object per connection)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(api_socket))
        s.sendall(json.dumps({"execute": execute, "arguments": arguments}).encode())
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    answer = json.loads(reply)
    if "error" in answer:
        raise RuntimeError(f"slirp4netns {execute} {arguments}: {answer['error']}")
    return answer


@contextmanager
def slirp_namespace(run_id: str, tmp: Path, *, tcp_in: dict[int, int]):
    """A namespace connected by slirp4netns; yields {"netns", "argv", "pid", "hostfwd"}."""
    from pyroute2 import NetNS

    name = f"graft-bench-slirp-{run_id}"
    api = tmp / "slirp4netns.sock"
    with ExitStack() as stack:
        create_namespace(name)
        stack.callback(remove_namespace, name)
        # podman's defaults but two: --enable-sandbox (here it left the namespace's
        # /run/netns mount missing from the host while slirp4netns ran) and
        # --disable-host-loopback (the client workloads reach the host's 127.0.0.1).
        # --disable-dns: nothing here resolves names, so nothing may leave for a resolver.
        ready_r, ready_w = os.pipe()
        argv = [
            "slirp4netns",
            "--mtu",
            str(MTU),
            "--enable-seccomp",
            "--disable-dns",
            "--api-socket",
            str(api),
            "--ready-fd",
            str(ready_w),
            "--netns-type=path",
            f"/run/netns/{name}",
            SLIRP_TAP,
        ]
        try:
            proc = start_process(stack, argv, log_to=tmp / "slirp4netns.log", pass_fds=(ready_w,))
        finally:
            os.close(ready_w)
        with open(ready_r, "rb", buffering=0) as ready:
            # "1" once the tap is set up; EOF if slirp4netns exits first
            up = select.select([ready], [], [], 15.0)[0] and ready.read(1) == b"1"
        if not up:
            raise RuntimeError(f"slirp4netns did not start: {proc.log_path.read_text(errors='replace')[-1500:]}")
        with NetNS(name) as ns:
            (idx,) = ns.link_lookup(ifname=SLIRP_TAP)
            ns.link("set", index=idx, mtu=MTU)
            ns.addr("add", index=idx, address=SLIRP_GUEST, prefixlen=SLIRP_NET.prefixlen)
            ns.link("set", index=idx, state="up")
        fwds = [
            slirp_api(
                api,
                "add_hostfwd",
                {"proto": "tcp", "host_addr": "127.0.0.1", "host_port": h, "guest_addr": SLIRP_GUEST, "guest_port": c},
            )
            for h, c in tcp_in.items()
        ]
        yield {"netns": name, "argv": argv, "pid": proc.pid, "hostfwd": fwds}


def versions() -> dict:
    """The Debian package versions of the two programs (the results record them)."""
    out = {}
    for pkg in ("passt", "slirp4netns"):
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
        out[pkg] = r.stdout.strip() if r.returncode == 0 else None
    return out
