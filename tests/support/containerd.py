"""A private containerd for the engine tests, started as an operator would, and every trace of it removed.

The engine tests (docs/containers.md, DESIGN.md "Testing") run Debian's own
/usr/bin/containerd (1.6) with a config file of the test's: its own root,
state, gRPC and ttrpc sockets, the `opt` plugin's directory, all under one
short temporary directory, and no CRI plugin unless asked for. Docker's tests
point dockerd's ``--containerd`` at ``.address``; the containerd tests drive it
with ``ctr`` (``.ctr(...)``).

Usage::

    with private_containerd(short_tmp) as cd:          # short: the socket path must fit 107 bytes
        cd.ctr("-n", "t", "image", "import", "img.tar")  # raises CalledProcessError, with stderr
        print(cd.pid, cd.socket, cd.log_path.read_text())

``private_containerd(tmp, *, cri=False, extra_config="", imports=(), env=None)``:

- ``cri``: load the CRI plugin (off by default: it would also try to start
  pods' networking). Its stream server listens on 127.0.0.1 only.
- ``extra_config``: TOML appended to the generated config (version 2); it may
  add tables (``[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.x]``)
  but not repeat the ones written here (root, state, grpc, ttrpc, debug,
  ``[plugins."io.containerd.internal.v1.opt"]``).
- ``imports``: config files merged by containerd's own ``imports`` (how an
  operator adds a drop-in such as packaging/containerd/config.toml).
- ``env``: containerd's environment (default: this process's). The runc shim
  inherits it, and the runtime the shim runs inherits the shim's
  (``GRAFT_RUNTIME`` reaches graft-runtime this way).

It is ready when ``ctr version`` gets the server's answer (polled up to
``STARTUP_TIMEOUT``). On exit, pass or fail, it

1. kills and deletes every task and removes every container, image and
   namespace through containerd itself, so the shims exit as in normal use;
2. stops containerd by pid (SIGTERM, a bounded wait, then SIGKILL);
3. kills any shim still serving this daemon (``containerd-shim-runc-v2 ...
   -address <our socket>``) and the container processes it left
   (``init.pid`` in the task's state directory), and force-deletes their
   runc state;
4. unmounts what is mounted under the temporary directory (overlay
   snapshots, a container's rootfs, shm), deepest first;
5. removes what containerd 1.6 writes outside its roots, which is only what
   did not exist before it started: ``/run/containerd/s/`` (the shims'
   sockets, a path 1.6 hard-codes), ``/run/containerd/runc/<ns>`` (runc's
   state, unless ``--runc-root`` is given), ``/run/containerd`` itself, and
   the per-namespace cgroups (``/sys/fs/cgroup/*/<ns>``) that ``ctr run``
   puts containers under. (Measured here: with the opt plugin's path moved
   under the root, nothing else is written outside the temporary directory.)

Then it asserts that no shim of it is left, and removes its directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
SHIM_NAMES = ("containerd-shim", "containerd-shim-runc-v1", "containerd-shim-runc-v2")
# containerd 1.6 puts these here whatever its config says: the shims' sockets
# (/run/containerd/s/<hash>) and the runc shim's default runc root (/run/containerd/runc).
FIXED_STATE = Path("/run/containerd")


def cgroup_roots() -> list[Path]:
    """Every mounted cgroup hierarchy (v1 controllers and cgroup2), from /proc/self/mounts."""
    roots = []
    with open("/proc/self/mounts") as f:
        for line in f:
            _src, target, fstype, *_ = line.split()
            if fstype in ("cgroup", "cgroup2"):
                roots.append(Path(target))
    return roots


def _cgroup_dirs() -> set[Path]:
    """The top two levels of every cgroup hierarchy: where ``ctr run`` makes /<ns>/<id>."""
    found = set()
    for root in cgroup_roots():
        with contextlib.suppress(OSError):
            for d in root.iterdir():
                if d.is_dir():
                    found.add(d)
    return found


def _fixed_paths() -> set[Path]:
    """What exists now under the fixed state directory (two levels: s/, runc/<ns>)."""
    if not FIXED_STATE.exists():
        return set()
    found = {FIXED_STATE}
    for d in FIXED_STATE.iterdir():
        found.add(d)
        if d.is_dir():
            found.update(d.iterdir())
    return found


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mounts") as f:
        targets = [line.split()[1].encode().decode("unicode_escape") for line in f]
    return [t for t in targets if t.startswith(prefix)]


def _umount_detach(target: str) -> None:
    """umount2(MNT_DETACH) directly: umount(8) would create /run/mount for its utab."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(target), 2) != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        raise OSError(ctypes.get_errno(), f"umount {target}: {os.strerror(ctypes.get_errno())}")


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and _state(pid) != "Z":
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


@dataclass
class Containerd:
    """A running private containerd: its sockets, its pid, and ``ctr`` against it."""

    dir: Path
    proc: subprocess.Popen
    config_path: Path
    log_path: Path
    namespaces: set[str] = field(default_factory=set)  # the namespaces ctr() was given
    seen: set[tuple[str, str]] = field(default_factory=set)  # (namespace, container id), from collect_ids()

    @property
    def seen_namespaces(self) -> set[str]:
        return self.namespaces | {ns for ns, _ in self.seen}

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def socket(self) -> Path:
        return self.dir / "c.sock"

    @property
    def address(self) -> str:
        """The gRPC address, as dockerd's ``--containerd`` and ``ctr --address`` take it."""
        return str(self.socket)

    @property
    def ttrpc_socket(self) -> Path:
        return self.dir / "c.sock.ttrpc"

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    def ctr(
        self, *args: str, namespace: str | None = None, check: bool = True, timeout: float = 120, **kw
    ) -> subprocess.CompletedProcess:
        """``ctr --address SOCK [-n NS] ARGS``; text output; raises with ctr's stderr when check fails."""
        cmd = [CTR, "--address", self.address]
        if namespace is not None:
            self.namespaces.add(namespace)
            cmd += ["--namespace", namespace]
        kw.setdefault("stdin", subprocess.DEVNULL)
        out = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise subprocess.CalledProcessError(out.returncode, out.args, out.stdout, out.stderr)
        return out

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def shims(self) -> list[int]:
        """Pids of the shims serving this containerd (their ``-address`` is our socket)."""
        found = []
        for pid in _pids():
            args = _cmdline(pid)
            if args and os.path.basename(args[0]) in SHIM_NAMES and self._is_ours(args):
                found.append(pid)
        return found

    def _is_ours(self, args: list[str]) -> bool:
        return any(a == "-address" and i + 1 < len(args) and args[i + 1] == self.address for i, a in enumerate(args))

    # ---- clean-up -----------------------------------------------------------------------

    def collect_ids(self) -> None:
        """Record every (namespace, container) it has: their traces outside its directory are named after them."""
        for task_dir in self.state.glob("io.containerd.runtime.v2.task/*/*"):
            self.seen.add((task_dir.parent.name, task_dir.name))
        if self.proc.poll() is not None:
            return
        listed = self.ctr("namespaces", "ls", "-q", check=False, timeout=30)
        for ns in set(listed.stdout.split()) | self.namespaces if listed.returncode == 0 else ():
            self.seen.update((ns, cid) for cid in self._column(ns, "containers", "ls", "-q"))
            self.seen.add((ns, ""))  # the namespace itself, even with no container

    def remove_everything(self) -> None:
        """Through containerd: every task killed and deleted, every container, image, namespace removed."""
        for ns in sorted(self.seen_namespaces):
            for task in self._column(ns, "tasks", "ls"):
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=ns, check=False, timeout=30)
                self.ctr("tasks", "delete", "--force", task, namespace=ns, check=False, timeout=30)
            for cid in self._column(ns, "containers", "ls", "-q"):
                self.ctr("containers", "rm", cid, namespace=ns, check=False, timeout=30)
            images = self._column(ns, "images", "ls", "-q")
            if images:
                self.ctr("images", "rm", "--sync", *images, namespace=ns, check=False, timeout=60)
            self.ctr("namespaces", "rm", ns, check=False, timeout=30)

    def _column(self, ns: str, *args: str) -> list[str]:
        out = self.ctr(*args, namespace=ns, check=False, timeout=30)
        if out.returncode != 0:
            return []
        lines = out.stdout.splitlines()
        if args[-1] != "-q":  # `tasks ls` has a header and no -q
            lines = [line.split()[0] for line in lines[1:] if line.split()]
        return [line.strip() for line in lines if line.strip()]

    def stop(self) -> int:
        """SIGTERM, wait (bounded), else SIGKILL; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
        return self.proc.returncode

    def kill_leftovers(self) -> list[int]:
        """Kill shims still serving this daemon and the container inits they leave; their pids."""
        killed = []
        for pid_file in self.state.glob("io.containerd.runtime.v2.task/*/*/init.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        for pid in self.shims():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        for pid in killed:
            _wait_gone(pid, STOP_TIMEOUT)
        # runc's state of a container whose shim was killed (the default root is the fixed one)
        for task_dir in self.state.glob("io.containerd.runtime.v2.task/*/*"):
            ns, cid = task_dir.parent.name, task_dir.name
            for root in (FIXED_STATE / "runc" / ns, self.state / "runc" / ns):
                if (root / cid).exists():
                    subprocess.run(["runc", "--root", str(root), "delete", "--force", cid], capture_output=True)
        return killed

    def unmount_all(self) -> None:
        for target in sorted(_mounts_under(self.dir), key=len, reverse=True):
            _umount_detach(target)
        left = _mounts_under(self.dir)
        assert not left, f"still mounted under {self.dir}: {left}"


def _config_text(d: Path, cri: bool, extra_config: str, imports: Iterable[Path]) -> str:
    sock = d / "c.sock"
    disabled = "[]" if cri else f'["{CRI_PLUGIN}"]'
    text = f"""\
# A private containerd of one test (tests/support/containerd.py).
version = 2
root = "{d / "root"}"
state = "{d / "state"}"
disabled_plugins = {disabled}
imports = {json.dumps([str(p) for p in imports])}

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  level = "debug"

# The opt plugin would make /opt/containerd otherwise.
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / "root" / "opt"}"
"""
    if cri:
        text += f"""
[plugins."{CRI_PLUGIN}"]
  # Streaming (exec/attach) on loopback only; no pod networking is set up here.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."{CRI_PLUGIN}".cni]
    bin_dir = "{d / "cni" / "bin"}"
    conf_dir = "{d / "cni" / "conf"}"
  # The default handler, as `containerd config default` writes it. A config that
  # names any handler must name this one too: containerd 1.6 then takes the
  # runtimes table from the file alone, and CRI fails to load without "runc".
  [plugins."{CRI_PLUGIN}".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
"""
    return text + ("\n" + extra_config if extra_config else "")


@contextlib.contextmanager
def private_containerd(
    tmp: Path,
    *,
    cri: bool = False,
    extra_config: str = "",
    imports: Iterable[Path] = (),
    env: dict[str, str] | None = None,
) -> Iterator[Containerd]:
    """Start Debian's containerd with its own config under tmp/ctrd; yield it; remove all of it (module doc)."""
    d = tmp / "ctrd"
    d.mkdir(parents=True)
    config_path = d / "config.toml"
    config_path.write_text(_config_text(d, cri, extra_config, imports))
    log_path = d / "containerd.log"
    fixed_before, cgroups_before = _fixed_paths(), _cgroup_dirs()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [CONTAINERD, "--config", str(config_path), "--log-level", "debug"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,  # a ^C to the tests does not reach it before teardown does
        )
    cd = Containerd(d, proc, config_path, log_path)
    try:
        _wait_ready(cd)
        yield cd
    finally:
        try:
            cd.collect_ids()
            if proc.poll() is None:
                cd.remove_everything()
        finally:
            cd.stop()
            leftovers = cd.kill_leftovers()
            cd.unmount_all()
            _remove_traces(cd, fixed_before, cgroups_before)
            assert not cd.shims(), f"shims of {cd.address} survived: {cd.shims()}"
            shutil.rmtree(d, ignore_errors=True)
        assert not leftovers, f"containerd left shims or containers running, killed: {leftovers}"


def _wait_ready(cd: Containerd) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if cd.proc.poll() is not None:
            raise AssertionError(f"containerd exited {cd.proc.returncode}:\n{cd.log()[-4000:]}")
        if cd.socket.exists():
            out = cd.ctr("version", check=False, timeout=10)
            if out.returncode == 0 and "Server:" in out.stdout:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"containerd did not answer in {STARTUP_TIMEOUT} s:\n{cd.log()[-4000:]}")
        time.sleep(0.05)  # polling a socket that has no readiness signal; bounded by the deadline


def _remove_traces(cd: Containerd, fixed_before: set[Path], cgroups_before: set[Path]) -> None:
    """Remove what this containerd made outside its directory, and nothing another daemon made meanwhile.

    Other containerds (a host's, another test's) may share /run/containerd, so a
    file there goes only if it did not exist before and is this daemon's by name:
    ``s/<sha256(address/ns/id)>`` (1.6's shim socket name), ``runc/<ns>/<id>``,
    a ``fifo/<n>/`` holding ``<id>-stdin``; directories that it made go only if
    left empty. Cgroups go if new and named after one of its namespaces.
    """
    new = _fixed_paths() - fixed_before
    ours: set[Path] = set()
    for ns, cid in cd.seen:
        if not cid:
            continue
        ours.add(FIXED_STATE / "s" / hashlib.sha256(f"{cd.address}/{ns}/{cid}".encode()).hexdigest())
        ours.add(FIXED_STATE / "runc" / ns / cid)
        ours.update(f.parent for f in (FIXED_STATE / "fifo").glob(f"*/{cid}-std*"))
    for path in sorted(new, key=lambda p: len(p.parts), reverse=True):
        if path in ours:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        elif path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):  # not empty: another daemon's
                path.rmdir()
    for cg in _cgroup_dirs() - cgroups_before:
        if cg.name in cd.seen_namespaces:
            for sub, _dirs, _files in sorted(os.walk(cg), key=lambda w: -len(w[0])):
                os.rmdir(sub)  # fails loudly if a process was left in it


# ---- images without a registry --------------------------------------------------------


def _blob(blobs: dict[str, bytes], data: bytes, media_type: str) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def oci_archive(tree: Path, out: Path, name: str, *, entrypoint: list[str] | None = None) -> Path:
    """Write out: an OCI image layout tarball of one layer, the directory tree, named name.

    What ``ctr image import`` (and ``docker load``) take, built without any
    engine: the layer is an uncompressed tar of tree (owners root, as an image's
    files are), the config names the host's architecture, and index.json carries
    the full name in ``io.containerd.image.name`` (and the tag in
    ``org.opencontainers.image.ref.name``), so the image is ``name`` after import.
    """
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as t:

        def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            return info

        for child in sorted(tree.iterdir()):
            t.add(child, arcname=child.name, filter=as_root)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    blobs: dict[str, bytes] = {}
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    if entrypoint:
        config["config"]["Entrypoint"] = entrypoint
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": _blob(blobs, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [_blob(blobs, layer_bytes, "application/vnd.oci.image.layer.v1.tar")],
    }
    desc = _blob(blobs, json.dumps(manifest).encode(), manifest["mediaType"])
    desc["platform"] = {"architecture": arch, "os": "linux"}
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    desc["annotations"] = {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [desc]}
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index).encode(),
        **{f"blobs/sha256/{d.split(':', 1)[1]}": data for d, data in blobs.items()},
    }
    with tarfile.open(out, "w") as t:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            t.addfile(info, io.BytesIO(data))
    return out
