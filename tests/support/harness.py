"""Test harness: namespaces, a broker process, host-side servers, and runs.

Everything here is created by a test and removed when it ends, pass or
fail. Readiness is always a signal (sd_notify READY=1 from the broker, a
socket that is already listening), never a sleep.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parent
REPO = SUPPORT.parent.parent
PROGRAMS = SUPPORT / "programs"  # the Python programs tests run under graft
C_SOURCES = SUPPORT / "c"  # the C programs tests compile
BIN = Path(sys.executable).parent
GRAFT = str(BIN / "graft")
GRAFT_BROKER = str(BIN / "graft-broker")
IN_CI = os.environ.get("CI", "").lower() == "true"
STARTUP_TIMEOUT = 20.0


def need(condition: bool, why: str) -> None:
    """Skip when a test cannot run here, but fail under CI=true."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{why} (CI=true: this must not be skipped)")
    pytest.skip(why)


def need_root_and_netns() -> None:
    need(os.geteuid() == 0, "needs root for network namespaces")


def need_confinement() -> None:
    """Root, and cgroup2 for the broker's BPF confinement."""
    from graft.broker.confine import lifecycle

    need_root_and_netns()
    try:
        lifecycle.cgroup2_mount()
        ok = True
    except lifecycle.Unavailable:
        ok = False
    need(ok, "needs cgroup2 for confinement")


def need_program(name: str) -> str:
    path = shutil.which(name)
    need(path is not None, f"needs {name} (make deps installs it)")
    return path


# ---- network namespaces ----------------------------------------------------


@contextmanager
def network_namespace(prefix: str = "graft-t"):
    """A fresh network namespace with only `lo`, up; removed on exit."""
    from pyroute2 import netns

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    create_namespace(name)
    try:
        yield name
    finally:
        if os.path.exists(f"/run/netns/{name}"):  # a test may have removed it itself
            netns.remove(name)


def create_namespace(name: str) -> None:
    """Create /run/netns/NAME with its `lo` up."""
    from pyroute2 import NetNS, netns

    netns.create(name)
    try:
        with NetNS(name) as ns:
            (lo,) = ns.link_lookup(ifname="lo")
            ns.link("set", index=lo, state="up")
    except BaseException:
        netns.remove(name)
        raise


# ---- the broker --------------------------------------------------------------


# ---- cgroups for brokers ---------------------------------------------------------


def cgroup2_dir(cgroup: str) -> str | None:
    """The directory of a cgroup2 path, or None without cgroup2."""
    from graft.broker.confine import lifecycle

    try:
        return os.path.normpath(lifecycle.cgroup2_mount() + "/" + cgroup)
    except lifecycle.Unavailable:
        return None


def make_test_cgroup() -> str | None:
    """A fresh cgroup under this process's own, for one test's brokers; None without cgroup2.

    A broker with confinement moves itself into <it>/graft-broker and attaches
    its programs there, so each test's confinement is its own and removable.
    """
    from graft.broker.confine import lifecycle

    try:
        path = os.path.join(lifecycle.own_cgroup(), f"graft-test-{uuid.uuid4().hex[:8]}")
    except (lifecycle.Unavailable, OSError):
        return None
    d = cgroup2_dir(path)
    if d is None:
        return None
    try:
        os.mkdir(d)
    except OSError:
        return None
    return path


def remove_test_cgroup(cgroup: str) -> None:
    """Detach and unpin every confinement under cgroup, then remove the cgroups (processes gone)."""
    from graft.broker.confine import lifecycle

    for cg, pin_dir in lifecycle.installed():
        if cg == cgroup or cg.startswith(cgroup.rstrip("/") + "/"):
            lifecycle.remove(cg, pin_dir)
    d = cgroup2_dir(cgroup)
    if d is None or not os.path.isdir(d):
        return
    for sub, _dirs, _files in sorted(os.walk(d), key=lambda w: -len(w[0])):
        os.rmdir(sub)  # bottom-up; fails loudly if a process was left behind


def in_cgroup(cgroup_dir: str | None, cmd: list[str]) -> list[str]:
    """cmd, started inside cgroup_dir (a shell moves itself in, then execs: same pid)."""
    if cgroup_dir is None:
        return cmd
    return ["/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"', os.path.join(cgroup_dir, "cgroup.procs"), *cmd]


class BrokerProcess:
    """graft-broker as a subprocess, started and judged ready via sd_notify.

    It runs in a cgroup of its own test (``cgroup``, made here unless given:
    a restarted broker shares its predecessor's), removed with every BPF
    program and pin in it by ``stop()`` when this object made it.

    With ``fdstore=True`` this object also plays systemd's file descriptor
    store: it keeps the fds the broker pushes (FDSTORE=1 / FDNAME=), drops
    them on FDSTOREREMOVE=1, and passes them to the next start as systemd
    does (fds 3.., LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID). Like systemd it
    keeps every fd pushed under a name (but one per file) until a removal.
    ``stored`` maps names to this process's copies; ``release_store()``
    closes them.

    ``kernel_audit_interval`` replaces grants.KERNEL_AUDIT_INTERVAL in the
    broker (started through the interpreter, not its script): with a long one
    the kernel's records of fast-path connects reach the log only as the
    broker stops, which is what a test of that stop needs.

    The log lags the kernel's ring by up to that interval while the broker
    runs: a test that counts ``"via": "kernel"`` records reads them with
    ``stop_and_audit()``, or waits for its exact count with ``eventually``.

    ``nice`` starts it at that niceness (its threads inherit it): a bench
    whose other fixtures run above the default gives the broker the same.

    ``nameserver`` runs the broker in a mount namespace of its own whose
    /etc/resolv.conf names that server (graft.names mounts it, as for a
    program): the host's resolvers as the broker sees them, without touching
    the host's file.
    """

    def __init__(
        self,
        tmp: Path,
        policy_text: str,
        tenant: str = "t",
        cgroup: str | None = None,
        fdstore: bool = False,
        stderr_fd: int | None = None,
        kernel_audit_interval: float | None = None,
        nameserver: str | None = None,
        nice: int = 0,
    ):
        self.cgroup = cgroup
        self.nice = nice
        self.nameserver = nameserver
        self.kernel_audit_interval = kernel_audit_interval
        self.stderr_fd = stderr_fd  # the broker's stderr, if not the file stderr() reads
        self._owns_cgroup = cgroup is None
        self.dir = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.policy_path = tmp / "policy.toml"
        self.policy_path.write_text(policy_text)
        self.socket_dir = tmp / "sock"
        self.audit_path = tmp / "audit.jsonl"
        self.stderr_path = tmp / "broker.stderr"
        self.tenant = tenant
        self.proc: subprocess.Popen | None = None
        self._notify: socket.socket | None = None
        self.stored: dict[str, list[int]] | None = {} if fdstore else None

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / f"{self.tenant}.sock"

    def start(self, *extra: str) -> BrokerProcess:
        notify_path = self.dir / "notify.sock"
        notify_path.unlink(missing_ok=True)  # from an earlier start of this broker
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._notify.bind(str(notify_path))
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
        for var in ("FDSTORE", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(var, None)  # only this object plays the service manager
        if self.cgroup is None and self._owns_cgroup:
            self.cgroup = make_test_cgroup()
        cg_dir = cgroup2_dir(self.cgroup) if self.cgroup else None
        cmd = [
            *self._broker_cmd(),
            "--policy",
            str(self.policy_path),
            "--socket-dir",
            str(self.socket_dir),
            "--audit-log",
            str(self.audit_path),
            "--log-level",
            "debug",
            *extra,
        ]
        passed: list[int] = []
        try:
            if self.stored is not None:
                env["FDSTORE"] = "64"
                cmd, passed = self._pass_stored(cmd, env)
            with contextlib.ExitStack() as stack:  # the child has its own copy of the log's fd
                stderr = (
                    self.stderr_fd if self.stderr_fd is not None else stack.enter_context(open(self.stderr_path, "wb"))
                )
                self.proc = subprocess.Popen(
                    in_cgroup(cg_dir, cmd),
                    env=env,
                    pass_fds=passed,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
        finally:
            for fd in passed:
                os.close(fd)
        self.expect_notify("READY=1")
        return self

    def _broker_cmd(self) -> list[str]:
        prefix = []
        if self.nameserver is not None:
            prefix = [
                sys.executable,
                "-c",
                "import os, sys; from graft.names import point_resolv_conf_at; "
                "point_resolv_conf_at(sys.argv[1]); os.execv(sys.argv[2], sys.argv[2:])",
                self.nameserver,
            ]
        if self.nice:
            prefix = ["nice", "-n", str(self.nice), *prefix]
        if self.kernel_audit_interval is None:
            return [*prefix, GRAFT_BROKER]
        return [
            *prefix,
            sys.executable,
            "-c",
            "import sys; from graft.broker import main; from graft.broker.core import grants; "
            f"grants.KERNEL_AUDIT_INTERVAL = {self.kernel_audit_interval!r}; sys.exit(main.main())",
        ]

    def _pass_stored(self, cmd: list[str], env: dict) -> tuple[list[str], list[int]]:
        """cmd wrapped to receive the stored fds as systemd passes them; the fds to pass."""
        if not self.stored:
            return cmd, []
        names = [n for n, fds in self.stored.items() for _ in fds]
        # Copies far above 3.. so that moving them into place clobbers none of them.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 200) for fds in self.stored.values() for fd in fds]
        env["LISTEN_FDS"], env["LISTEN_FDNAMES"] = str(len(names)), ":".join(names)
        moves = " ".join(f"{3 + i}<&{fd} {fd}<&-" for i, fd in enumerate(high))
        # bash, not sh: dash takes only one-digit fd numbers in redirections
        return ["/bin/bash", "-c", f'exec {moves}; export LISTEN_PID=$$; exec "$@"', "bash", *cmd], high

    def _take_notify(self) -> str:
        """One notify datagram; fds in it are kept (FDSTORE=1) or closed, as a service manager would."""
        from graft.broker.io.scmrights import passed_fds

        msg, anc, _flags, _ = self._notify.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
        fds = passed_fds(anc)
        fields = dict(line.split("=", 1) for line in msg.decode().split("\n") if "=" in line)
        name = fields.get("FDNAME")
        if self.stored is not None and name and fields.get("FDSTORE") == "1":
            kept = self.stored.setdefault(name, [])
            for fd in fds:
                if os.fstat(fd).st_ino not in {os.fstat(k).st_ino for k in kept}:
                    kept.append(os.dup(fd))
        elif self.stored is not None and name and fields.get("FDSTOREREMOVE") == "1":
            for fd in self.stored.pop(name, []):
                os.close(fd)
        for fd in fds:
            os.close(fd)
        return msg.decode()

    def drain_store(self) -> dict[str, list[int]]:
        """The store once every notify message sent so far is taken (pushes and removals while running)."""
        assert self._notify is not None and self.stored is not None
        self._notify.setblocking(False)
        try:
            while True:
                self._take_notify()
        except BlockingIOError:
            return self.stored
        finally:
            self._notify.setblocking(True)

    def release_store(self) -> None:
        for fds in (self.stored or {}).values():
            for fd in fds:
                os.close(fd)
        if self.stored:
            self.stored.clear()

    def expect_notify(self, state: str, timeout: float = STARTUP_TIMEOUT) -> None:
        assert self._notify is not None and self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(f"broker did not send {state} (exit {self.proc.poll()}):\n{self.stderr()}")
            self._notify.settimeout(left)
            try:
                msg = self._take_notify()
            except TimeoutError:
                continue
            if state in msg.split("\n"):
                return

    def reload(self, policy_text: str) -> None:
        self.policy_path.write_text(policy_text)
        self.proc.send_signal(signal.SIGHUP)
        self.expect_notify("RELOADING=1")
        self.expect_notify("READY=1")

    def stop(self, keep_cgroup: bool = False) -> int:
        """SIGTERM, wait; then remove the cgroup this object made (unless keep_cgroup). The exit code."""
        try:
            if self.proc is None:
                return 0
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self._notify is not None:
                self._notify.close()
                self._notify = None
            return self.proc.returncode
        finally:
            if self._owns_cgroup and self.cgroup is not None and not keep_cgroup:
                remove_test_cgroup(self.cgroup)
                self.cgroup = None

    def restart(self) -> int:
        """Stop and start again as systemd restarts the service; returns the stop's exit code.

        The broker's cgroup stays, with the pins in bpffs, as the unit's
        does; only the graft-broker cgroup inside it is removed, as systemd
        removes and recreates the unit's cgroup.
        """
        from graft.broker.confine import lifecycle

        rc = self.stop(keep_cgroup=True)
        inner = cgroup2_dir(self.cgroup + "/" + lifecycle.CGROUP_NAME) if self.cgroup else None
        if inner is not None and os.path.isdir(inner):
            os.rmdir(inner)
        self.start()
        return rc

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stop_and_audit(self) -> list[dict]:
        """Stop the broker (it must exit 0), then its whole audit log.

        On its way out the broker writes what the kernel's ring still holds,
        so every fast-path connect made before the stop is in what this reads.
        """
        rc = self.stop()
        assert rc == 0, f"broker exited {rc}:\n{self.stderr()}"
        return self.audit()

    def audit(self) -> list[dict]:
        """The audit log so far; records of fast-path connects may lag (see the class)."""
        if not self.audit_path.exists():
            return []
        # A running broker writes many lines at once: a read may end inside one, not yet whole.
        whole = self.audit_path.read_text().rpartition("\n")[0]
        return [json.loads(line) for line in whole.splitlines() if line]


# ---- host-side servers --------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def http_server(directory: Path, host: str = "127.0.0.1", port: int = 0):
    """An HTTP server on host:port (default: ephemeral) serving directory; yields its port.

    It is listening before the port is returned, so no readiness wait.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(http.server.ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    handler = lambda *a, **kw: _QuietHandler(*a, directory=str(directory), **kw)  # noqa: E731
    with serving(Server((host, port), handler)) as port:
        yield port


@contextmanager
def serving(srv):
    """Run a socketserver (already bound and listening) in a thread; yield its port."""
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
        t.join()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for policies that name one)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---- running programs under graft ---------------------------------------------


def graft_cmd(broker: BrokerProcess, ns: str | None, *cmd: str, dns: bool = False) -> list[str]:
    """`graft run` of cmd in ns; dns: with the broker's resolver, for a test whose policy names its
    upstream (without, the resolver would forward to the host's own servers, which no test may ask)."""
    args = [GRAFT, "run", "--socket", str(broker.socket_path)]
    if ns:
        args += ["--netns", ns] + ([] if dns else ["--no-dns"])
    return [*args, "--", *cmd]


def with_resolv_conf(resolv: Path, cmd: list[str]) -> list[str]:
    """cmd in a private mount namespace, where /etc/resolv.conf is resolv; the host's is untouched."""
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        'mount --bind "$0" /etc/resolv.conf && exec "$@"',
        str(resolv),
        *cmd,
    ]


def run_grafted(
    broker: BrokerProcess,
    ns: str | None,
    *cmd: str,
    env: dict | None = None,
    timeout: float = 60,
    check: bool = False,
    dns: bool = False,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        graft_cmd(broker, ns, *cmd, dns=dns),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        stdin=subprocess.DEVNULL,
    )


def compile_c(source: str, binary: Path, *extra: str, compiler: str = "cc") -> Path:
    """Build support/c/SOURCE into binary with the project's C flags (warnings are errors); extra: more cc args.

    compiler: another C compiler driver, e.g. musl-gcc for programs of a musl image.
    """
    cc = [
        compiler,
        "-std=gnu11",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-pthread",
        "-o",
        str(binary),
        str(C_SOURCES / source),
    ]
    subprocess.run([*cc, *extra], check=True)
    return binary


def program(name: str, *args) -> list[str]:
    """The argv that runs tests/support/programs/NAME (a Python script) with args."""
    return [sys.executable, str(PROGRAMS / name), *map(str, args)]


def run_in_netns(ns: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run cmd in ns without the shim (nsenter --net, which leaves /sys alone)."""
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns}", "--", *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


@contextmanager
def echo_server(host: str = "127.0.0.1"):
    """A TCP echo server on host:ephemeral, listening before it yields its port."""
    import socketserver

    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            try:
                while data := self.request.recv(65536):
                    self.request.sendall(data)
            except OSError:  # a client that resets the connection (escape tests do) is no error
                pass

    class Server(socketserver.ThreadingTCPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        allow_reuse_address = True
        daemon_threads = True
        request_queue_size = 256

    with serving(Server((host, 0), Echo)) as port:
        yield port


# ---- speaking the wire format directly (no shim) --------------------------------

REPLY_ANC_SPACE = socket.CMSG_SPACE(4 * 4)


def reply_from_msg(data: bytes, ancdata) -> tuple:
    """(Reply, socket or None) from one received message; (None, None) at EOF."""
    from graft.broker.io.scmrights import passed_fds
    from graft.broker.shim import wire

    fds = passed_fds(ancdata)
    assert len(fds) <= 1, f"a reply carried {len(fds)} fds"
    sock = socket.socket(fileno=fds[0]) if fds else None
    if not data:
        assert sock is None
        return None, None
    return wire.decode_reply(data), sock


class WireClient:
    """A blocking connection to a tenant socket, speaking graft_wire.h like the shim."""

    def __init__(self, path: Path, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))

    def send(self, raw: bytes, fds=()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([raw], anc)

    def reply(self) -> tuple:
        from graft.broker.shim import wire

        data, anc, _, _ = self.sock.recvmsg(wire.REPLY_SIZE + 1, REPLY_ANC_SPACE)
        return reply_from_msg(data, anc)

    def preissue(self, family: int = socket.AF_INET, want: int = 0) -> tuple:
        """Ask for pre-issued TCP sockets (want: how many; 0, as many as may be issued): (Reply, [sockets])."""
        from graft.broker.core import request
        from graft.broker.io.scmrights import passed_fds
        from graft.broker.shim import wire

        flags = want << request.PREISSUE_WANT_SHIFT
        self.send(wire.encode_request(request.OP_PREISSUE, None, family=family, flags=flags))
        data, anc, _, _ = self.sock.recvmsg(wire.REPLY_SIZE + 1, socket.CMSG_SPACE(4 * request.PREISSUE_MAX))
        socks = [socket.socket(fileno=fd) for fd in passed_fds(anc)]
        return wire.decode_reply(data), socks

    def close(self) -> None:
        self.sock.close()


def eventually(condition, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll condition until it holds or timeout passes; return whether it held.

    For state another process reaches asynchronously with no signal to wait
    on (a broker closing a connection after its client hung up). The test
    asserts the result, so a condition that never holds fails.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def connect_request(port: int, host: str = "127.0.0.1", udp: bool = False) -> bytes:
    """A wire request for a connect to host:port, as the shim would send it (IPv4)."""
    import ipaddress

    from graft.broker.core import request
    from graft.broker.shim import wire

    return wire.encode_request(
        request.OP_CONNECT,
        request.SockAddr(socket.AF_INET, ipaddress.ip_address(host), port),
        type=socket.SOCK_DGRAM if udp else socket.SOCK_STREAM,
    )


def loopback_destination(i: int, net: int = 1) -> str:
    """The i-th of 16 million distinct loopback addresses in 127.net.0.0/16 onwards (none carries traffic here)."""
    return f"127.{net + i // 65025}.{i // 255 % 255}.{1 + i % 255}"


def grant_many(path: Path, n: int, net: int = 1, port: int = 9) -> None:
    """n grafted TCP connects to distinct loopback destinations on one connection: n grants in the kernel.

    The port is closed (discard), so each connect ends in a reset at once;
    the grant is made when the broker judges, whatever the connect's fate.
    """
    from graft.broker.shim import wire

    client = WireClient(path)
    try:
        for i in range(n):
            client.send(connect_request(port, host=loopback_destination(i, net)))
            reply, sock = client.reply()
            assert reply.verdict == wire.V_GRAFT, (i, reply)
            sock.close()
    finally:
        client.close()
