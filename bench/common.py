"""Shared set-up for graft's benchmarks: the scenarios and their clean-up.

Scenarios (docs/benchmarks.md):

  host   no namespace: client and server on the host's 127.0.0.1.
  nat    a namespace behind a veth pair, Docker-bridge style: the host end
         has NAT_HOST (the "gateway", like docker0's 172.17.0.1), the
         namespace end NAT_NS; nftables masquerades the namespace's subnet
         on the way out and DNAT-publishes ports, both in a table of this
         run's own (`table ip graft_bench_<id>`). A client in the namespace
         reaches a host server at the gateway address; a server in the
         namespace is reached from the host at <gateway>:<published port>,
         DNAT in the nat OUTPUT hook (Docker's `! -d 127.0.0.0/8
         --dst-type LOCAL` rule). The namespace has no default route: its
         /30 is all it can reach.
  pasta, slirp4netns
         a namespace connected by that user-mode network program, as
         rootless podman connects a container (bench/usernet.py; only with
         environment(user_nets=True)).
  graft  a namespace with only `lo`; the program runs under libgraft.so
         (`graft run --netns`), with a graft-broker whose policy grafts the
         benchmark's ports onto the host's 127.0.0.1.

Everything made here (namespaces, the veth pair, the nft table, the
pasta and slirp4netns processes, the broker, every process) is removed
when the ExitStack unwinds, pass or fail.
Namespaces and links are made with pyroute2; nothing shells out to `ip`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.harness import BrokerProcess, create_namespace, free_port, graft_cmd  # noqa: E402

# The nat scenario's /30. It exists only on this run's veth pair: one end in
# the host, one in the run's own namespace, no route anywhere else.
NAT_NET = ipaddress.ip_network("10.199.0.0/30")
NAT_HOST = "10.199.0.1"
NAT_NS = "10.199.0.2"
TENANT = "bench"
SCENARIOS = ("host", "nat", "pasta", "slirp4netns", "graft")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- processes ---------------------------------------------------------------


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL; always reaps. Only the process we started."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()


def unwind_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C (SystemExit), so a benchmark's ExitStack cleans up on `kill` too.

    SIGKILL cannot be caught. Only in the process that calls this: pyroute2
    forks helpers and stops them with SIGTERM, and a fork that unwound would
    run this process's clean-up.
    """
    me = os.getpid()

    def on_sigterm(*_):
        if os.getpid() != me:
            os._exit(128 + signal.SIGTERM)
        sys.exit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


def start_process(
    stack: ExitStack, argv: list[str], *, log_to: Path | None = None, stdin=subprocess.DEVNULL, env=None, pass_fds=()
) -> subprocess.Popen:
    """Start a server process; stopped (and reaped) when stack unwinds.

    Its stdout and stderr go to log_to (a file, so a chatty server never
    blocks on a full pipe); wait_line() reads that file.
    """
    out = open(log_to, "wb") if log_to is not None else subprocess.DEVNULL  # noqa: SIM115  (closed below)
    try:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=out, stderr=subprocess.STDOUT, env=env, pass_fds=pass_fds)
    finally:
        if log_to is not None:
            out.close()
    proc.log_path = log_to
    stack.callback(stop_process, proc)
    return proc


def wait_line(proc: subprocess.Popen, needle: str, timeout: float = 15.0) -> None:
    """Wait (bounded) until proc's output file contains needle."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = proc.log_path.read_text(errors="replace")
        if needle in text:
            return
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    raise RuntimeError(f"{proc.args[0]}: no {needle!r} within {timeout}s (exit {proc.poll()}): {text[-2000:]}")


def wait_reply(
    addr: str, port: int, request: bytes, expect: bytes, timeout: float = 15.0, proc: subprocess.Popen | None = None
) -> None:
    """Wait (bounded) until a request to addr:port from the host gets a reply containing expect.

    An accepted connection is not enough: pasta and slirp4netns accept on the
    host side before anything listens in the namespace, and then close.
    """
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited {proc.returncode} before serving {addr}:{port}")
        try:
            with socket.create_connection((addr, port), timeout=1.0) as s:
                s.sendall(request)
                reply = s.recv(4096)
            if expect in reply:
                return
            last = repr(reply[:200])
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    raise RuntimeError(f"no {expect!r} from {addr}:{port} after {timeout}s (last: {last})")


def run_client(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()[-1500:]} {r.stdout.strip()[-500:]}"
        )
    return r


# ---- namespaces -------------------------------------------------------------------


def remove_namespace(name: str) -> None:
    """Remove /run/netns/NAME if it is still there (an ExitStack callback)."""
    from pyroute2 import netns

    if os.path.exists(f"/run/netns/{name}"):
        netns.remove(name)


# ---- the nat namespace -----------------------------------------------------------


def _check_subnet_free() -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for a in ipr.get_addr(family=socket.AF_INET):
            addr = ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
            if addr.network.overlaps(NAT_NET):
                raise RuntimeError(f"{NAT_NET} is already in use on this host ({addr}); not touching it")


def nft_ruleset(table: str, veth_host: str, published: dict[int, int]) -> str:
    """Docker-bridge-like NAT for NAT_NET, in a table of its own.

    published: host port -> port in the namespace (like `docker run -p H:C`).
    """
    out = "\n".join(
        f"        ip daddr != 127.0.0.0/8 fib daddr type local tcp dport {h} dnat to {NAT_NS}:{c}"
        for h, c in published.items()
    )
    return f"""\
table ip {table} {{
    # Docker's DOCKER chain for a published port, as reached from the host
    # itself: a local, non-loopback destination address (`! -d 127.0.0.0/8
    # -m addrtype --dst-type LOCAL`). Its PREROUTING twin, for traffic from
    # other machines, is left out on purpose: nothing outside this machine
    # may reach the benchmark.
    chain output {{
        type nat hook output priority -100; policy accept;
{out}
    }}
    # MASQUERADE for the namespace's subnet leaving by another interface
    # (the namespace has no default route, so here it never fires).
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {NAT_NET} oifname != "{veth_host}" masquerade
    }}
}}
"""


@contextmanager
def nat_namespace(published: dict[int, int], run_id: str):
    """A namespace behind a veth pair with Docker-like nft NAT; yields the namespace name."""
    from pyroute2 import IPRoute, NetNS

    _check_subnet_free()
    name = f"graft-bench-nat-{run_id}"
    veth_host, veth_ns = f"gbh-{run_id}", f"gbn-{run_id}"
    table = f"graft_bench_{run_id}"
    with ExitStack() as stack:
        create_namespace(name)
        stack.callback(remove_namespace, name)
        with IPRoute() as ipr:
            ipr.link("add", ifname=veth_host, kind="veth", peer={"ifname": veth_ns, "net_ns_fd": name})

            def _del_link():
                with IPRoute() as i2:
                    idx = i2.link_lookup(ifname=veth_host)
                    if idx:
                        i2.link("del", index=idx[0])

            stack.callback(_del_link)
            (hidx,) = ipr.link_lookup(ifname=veth_host)
            ipr.addr("add", index=hidx, address=NAT_HOST, prefixlen=NAT_NET.prefixlen)
            ipr.link("set", index=hidx, state="up")
        with NetNS(name) as ns:
            (nidx,) = ns.link_lookup(ifname=veth_ns)
            ns.addr("add", index=nidx, address=NAT_NS, prefixlen=NAT_NET.prefixlen)
            ns.link("set", index=nidx, state="up")
        rules = nft_ruleset(table, veth_host, published)
        with tempfile.NamedTemporaryFile("w", suffix=".nft", prefix="graft-bench-") as f:
            f.write(rules)
            f.flush()
            subprocess.run(["nft", "-f", f.name], check=True, capture_output=True, text=True)
        stack.callback(lambda: subprocess.run(["nft", "delete", "table", "ip", table], capture_output=True))
        yield {"netns": name, "veth_host": veth_host, "veth_ns": veth_ns, "nft_table": table, "ruleset": rules}


# ---- the whole environment -------------------------------------------------------------


@dataclass
class Ports:
    """Every port the benchmarks use, fixed up front so the policy can name them."""

    iperf: int = 0
    sockperf: int = 0
    conn: int = 0
    # servers in the "container": (host-visible port per scenario)
    nginx_host: int = 0
    nginx_nat: int = 0
    nginx_pasta: int = 0
    nginx_slirp4netns: int = 0
    nginx_graft: int = 0
    redis_host: int = 0
    redis_nat: int = 0
    redis_pasta: int = 0
    redis_slirp4netns: int = 0
    redis_graft: int = 0

    @classmethod
    def pick(cls) -> Ports:
        seen: set[int] = set()
        vals = {}
        for f in cls.__dataclass_fields__:
            p = free_port()
            for _ in range(50):  # bounded: distinct ports
                if p not in seen:
                    break
                p = free_port()
            seen.add(p)
            vals[f] = p
        return cls(**vals)


NGINX_NS_PORT, REDIS_NS_PORT = 80, 6379


def policy_text(ports: Ports, max_sockets: int | None = None) -> str:
    client_ports = [ports.iperf, ports.sockperf, ports.conn]
    limit = f"max_sockets = {max_sockets}\n" if max_sockets else ""
    return f"""\
version = 1

[broker]
confinement = "auto"

[tenants.{TENANT}]
netns = "host"
default = "deny"
socket_mode = "0666"
{limit}
[[tenants.{TENANT}.connect]]
to = ["127.0.0.1/32"]
ports = {json.dumps(client_ports)}
proto = "any"
action = "graft"

[[tenants.{TENANT}.bind]]
addr = ["0.0.0.0/32"]
ports = [{NGINX_NS_PORT}]
proto = "tcp"
host = "127.0.0.1:{ports.nginx_graft}"
action = "graft"

[[tenants.{TENANT}.bind]]
addr = ["0.0.0.0/32"]
ports = [{REDIS_NS_PORT}]
proto = "tcp"
host = "127.0.0.1:{ports.redis_graft}"
action = "graft"
"""


@dataclass
class Env:
    stack: ExitStack
    tmp: Path
    ports: Ports
    nat: dict
    graft_ns: str
    broker: BrokerProcess
    connbench: str
    notes: dict = field(default_factory=dict)
    pin: bool = True
    # the pasta and slirp4netns set-ups (bench/usernet.py), when made
    usernet: dict = field(default_factory=dict)
    # where a client in each scenario finds a server on the host's 127.0.0.1
    server_addrs: dict = field(default_factory=lambda: {"nat": NAT_HOST})

    # -- CPU placement: servers on CPU 0, clients and load generators on CPU 1.
    # On 2 cores, a ping-pong pair's latency is bimodal depending on whether
    # the scheduler puts both ends on one core; pinning makes runs comparable.
    def server_cpu(self, argv: list[str]) -> list[str]:
        return ["taskset", "-c", "0", *argv] if self.pin and (os.cpu_count() or 1) >= 2 else argv

    def client_cpu(self, argv: list[str]) -> list[str]:
        return ["taskset", "-c", "1", *argv] if self.pin and (os.cpu_count() or 1) >= 2 else argv

    # -- where a client in scenario S finds a server that runs on the host
    def host_server_addr(self, scenario: str) -> str:
        return self.server_addrs.get(scenario, "127.0.0.1")

    # -- the command that runs a program "in the container" of scenario S
    def in_container(self, scenario: str, *cmd: str) -> list[str]:
        if scenario == "host":
            return list(cmd)
        if scenario == "graft":
            return graft_cmd(self.broker, self.graft_ns, *cmd)
        ns = self.nat["netns"] if scenario == "nat" else self.usernet[scenario]["netns"]
        return ["nsenter", f"--net=/run/netns/{ns}", "--", *cmd]

    def client_in(self, scenario: str, *cmd: str) -> list[str]:
        return self.client_cpu(self.in_container(scenario, *cmd))

    def server_in(self, scenario: str, *cmd: str) -> list[str]:
        return self.server_cpu(self.in_container(scenario, *cmd))

    # -- where the host reaches a server that runs "in the container" of scenario S
    def published(self, scenario: str, service: str) -> tuple[str, int]:
        port = getattr(self.ports, f"{service}_{scenario}")
        return (NAT_HOST if scenario == "nat" else "127.0.0.1"), port


def build_c(name: str, tmp: Path) -> str:
    """bench/NAME.c built into tmp with the project's C flags (warnings are errors); the binary's path."""
    out = tmp / name
    cc = ["cc", "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(REPO / "bench" / f"{name}.c")]
    subprocess.run(cc, check=True)
    return str(out)


def build_connbench(tmp: Path) -> str:
    return build_c("connbench", tmp)


def require(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        raise SystemExit(f"missing programs: {' '.join(missing)} (make bench installs them)")
    if os.geteuid() != 0:
        raise SystemExit("benchmarks need root (network namespaces, nftables)")


@contextmanager
def environment(
    broker_log_level: str = "info",
    audit: str = "file",
    with_nat: bool = True,
    max_sockets: int | None = None,
    pin: bool = True,
    user_nets: bool = False,
):
    """Set up host, nat (with_nat), pasta and slirp4netns (user_nets) and graft; tear everything down on exit."""
    run_id = uuid.uuid4().hex[:6]
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graft-bench-", dir="/tmp")))
        ports = Ports.pick()
        connbench = build_connbench(tmp)
        nat = (
            stack.enter_context(nat_namespace({ports.nginx_nat: NGINX_NS_PORT, ports.redis_nat: REDIS_NS_PORT}, run_id))
            if with_nat
            else {}
        )
        usernet, server_addrs = {}, {"nat": NAT_HOST}
        if user_nets:
            import usernet as un

            usernet["pasta"] = stack.enter_context(
                un.pasta_namespace(
                    run_id,
                    tmp,
                    tcp_in={ports.nginx_pasta: NGINX_NS_PORT, ports.redis_pasta: REDIS_NS_PORT},
                    tcp_out=[ports.iperf, ports.sockperf, ports.conn],
                    udp_out=[ports.sockperf],
                )
            )
            usernet["slirp4netns"] = stack.enter_context(
                un.slirp_namespace(
                    run_id, tmp, tcp_in={ports.nginx_slirp4netns: NGINX_NS_PORT, ports.redis_slirp4netns: REDIS_NS_PORT}
                )
            )
            server_addrs["slirp4netns"] = un.SLIRP_GATEWAY
        graft_ns = f"graft-bench-g-{run_id}"
        create_namespace(graft_ns)
        stack.callback(remove_namespace, graft_ns)
        broker = BrokerProcess(tmp / "broker", policy_text(ports, max_sockets), tenant=TENANT)
        stack.callback(broker.stop)
        audit_arg = str(tmp / "broker" / "audit.jsonl") if audit == "file" else audit
        broker.start("--log-level", broker_log_level, "--audit-log", audit_arg)
        yield Env(
            stack=stack,
            tmp=tmp,
            ports=ports,
            nat=nat,
            graft_ns=graft_ns,
            broker=broker,
            connbench=connbench,
            usernet=usernet,
            server_addrs=server_addrs,
            notes={
                "broker_log_level": broker_log_level,
                "audit_log": audit,
                "max_sockets": max_sockets or "default (1024)",
                "pinned": pin,
            },
            pin=pin,
        )


def host_time_wait() -> int:
    """TIME-WAIT TCP sockets in the host namespace (they slow the broker's max_sockets prune)."""
    n = 0
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(f) as fh:
                next(fh, None)
                n += sum(1 for line in fh if line.split()[3:4] == ["06"])
        except OSError:
            pass
    return n


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    u = os.uname()
    load = os.getloadavg()

    def git(*args):
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else None

    # Not stripped: a porcelain line's status columns start with a space (" M shim/...").
    dirty = git("status", "--porcelain", "--", "shim", "broker", "policy", "graft")
    return {
        "nproc": os.cpu_count(),
        "kernel": u.release,
        "cpu": cpu,
        "machine": u.machine,
        "loadavg_at_start": [round(x, 2) for x in load],
        "host_time_wait_at_start": host_time_wait(),
        "git_commit": (git("rev-parse", "HEAD") or "").strip() or None,
        "uncommitted_changes_in": sorted({ln[3:].split("/")[0] for ln in (dirty or "").splitlines()}),
    }
