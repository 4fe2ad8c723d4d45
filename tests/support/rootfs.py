"""OCI bundles for the container tests and the demo, built from this host's own files,
and containers run from them through graft-runtime.

No image registry is reachable here, and none is needed: a root filesystem
is a directory of empty mount points, with /usr bind-mounted read-only from
the host (Debian's merged /usr holds every program and library; /bin, /lib,
/lib64 and /sbin are symlinks into it, as on the host; where they are
directories they are bind-mounted too), and a few small files of its own in
/etc. The config is the one `runc spec` writes (new pid,
network, ipc, uts and mount namespaces; no capabilities beyond the default
three), made non-interactive. Its network namespace is new and empty: the
runtime brings up `lo` and nothing else, so nothing outside is reachable
except through graft.
"""

from __future__ import annotations

import json
import os
import platform
import select
import shutil
import subprocess
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

from graft.cgroups import CRUN_UNIFIED, crun_refuses_host

GRAFT_RUNTIME = str(Path(sys.executable).parent / "graft-runtime")

# Top-level entries that hold programs and libraries: under merged /usr all but
# usr are symlinks into it, copied as symlinks; a real directory is bind-mounted.
PROGRAM_DIRS = ("usr", "bin", "lib", "lib32", "lib64", "libx32", "sbin")
MOUNT_POINTS = ("proc", "dev", "sys", "tmp", "run", "etc")
ETC_FILES = {
    "passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "group": "root:x:0:\nnogroup:x:65534:\n",
    "hosts": "127.0.0.1 localhost\n::1 localhost\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
}


def host_dirs() -> list[str]:
    """The program directories of the host that the container sees read-only (bind mounts)."""
    return [d for d in PROGRAM_DIRS if Path("/", d).is_dir() and not Path("/", d).is_symlink()]


def build_rootfs(root: Path) -> Path:
    """Make root a container root filesystem (mount points, /etc, merged-/usr symlinks); return it."""
    root.mkdir(parents=True, exist_ok=True)
    for name in (*host_dirs(), *MOUNT_POINTS):
        (root / name).mkdir(exist_ok=True)
    for name in PROGRAM_DIRS:
        if Path("/", name).is_symlink():
            (root / name).symlink_to(os.readlink(Path("/", name)))
    for name, text in ETC_FILES.items():
        (root / "etc" / name).write_text(text)
    if os.path.exists("/etc/ld.so.cache"):  # only speeds up library lookup
        shutil.copy("/etc/ld.so.cache", root / "etc" / "ld.so.cache")
    return root


def musl_loader() -> str:
    """Where musl's dynamic loader (which is musl's libc too) lives, on the host (Debian's musl) and in a musl image."""
    return f"/lib/ld-musl-{platform.machine()}.so.1"


def build_musl_rootfs(root: Path, programs: list[Path]) -> Path:
    """A musl image's root filesystem, as Alpine's is as far as the C library goes: musl's loader in /lib, no glibc.

    programs (built with musl-gcc, dynamically: LD_PRELOAD needs the loader) go to /bin;
    the config for it takes no host directories (default_config(host_programs=False)).
    """
    for name in MOUNT_POINTS:
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "lib").mkdir()
    shutil.copy(musl_loader(), root / musl_loader().lstrip("/"))  # the file, not Debian's link to it
    (root / "bin").mkdir()
    for path in programs:
        shutil.copy(path, root / "bin" / path.name)
    for name, text in ETC_FILES.items():
        (root / "etc" / name).write_text(text)
    return root


def _tmpfs(destination: str, *options: str) -> dict:
    return {"destination": destination, "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", *options]}


def default_config(
    rootfs: Path,
    args: list[str],
    annotations: dict[str, str] | None = None,
    env: list[str] | None = None,
    host_programs: bool = True,
) -> dict:
    """The config `runc spec` writes, without a terminal, running args in rootfs (shared, read-only).

    host_programs: mount the host's program directories (host_dirs) read-only, as build_rootfs's
    root filesystems need; an image with programs of its own (build_musl_rootfs) goes without.
    """
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    config = {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", *(env or [])],
            "cwd": "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": "graft-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            _tmpfs("/tmp", "mode=1777"),
            _tmpfs("/run", "mode=755"),
            *(
                {"destination": f"/{d}", "type": "bind", "source": f"/{d}", "options": ["rbind", "ro"]}
                for d in (host_dirs() if host_programs else ())
            ),
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": [
                "/proc/acpi",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/sys/firmware",
                "/proc/scsi",
            ],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }
    if annotations:
        config["annotations"] = dict(annotations)
    return config


def write_bundle(bundle: Path, config: dict) -> Path:
    """bundle/config.json holding config; returns bundle."""
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return bundle


# ---- running containers ----------------------------------------------------------------


def real_runtime(name: str, tmp: Path) -> str:
    """The path graft-runtime should exec for runc or crun here (crun behind a shim on hybrid hosts).

    crun refuses a hybrid host (graft/cgroups.py, which graft-runtime asks too). There it
    runs in a mount namespace of its own where crun's unified hierarchy is unmounted, so
    it sees (and uses) the v1 controllers, as runc does; every command of one container
    must go through the same wrapper.
    """
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (make deps installs it)")
    if name != "crun" or not crun_refuses_host():
        return path
    wrapper = tmp / "crun-v1"
    wrapper.write_text(
        "#!/bin/sh\n"
        "# crun with the cgroup v1 controllers only: see tests/support/rootfs.py\n"
        f'exec unshare --mount --propagation private /bin/sh -c \'umount {CRUN_UNIFIED} && exec "$0" "$@"\' '
        f'{path} "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper)


class Runtime:
    """graft-runtime driving one real runtime, with its container state in a directory of the test."""

    def __init__(self, real: str, state_dir: Path, graft_flags: tuple[str, ...] = ()):
        self.real = real
        self.state_dir = state_dir
        self.graft_flags = graft_flags  # graft-runtime's own, e.g. --graft-tenant NAME: an operator's runtime

    def with_flags(self, *graft_flags: str) -> Runtime:
        """The same runtime and state, registered with more of graft-runtime's flags."""
        return Runtime(self.real, self.state_dir, (*self.graft_flags, *graft_flags))

    def cmd(self, *args: str) -> list[str]:
        return [GRAFT_RUNTIME, *self.graft_flags, "--graft-runtime", self.real, "--root", str(self.state_dir), *args]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.cmd(*args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )

    @contextmanager
    def serving(self, cid: str, bundle: Path, timeout: float = 60):
        """``run`` of a container that serves, in the background: (the process, its first line of output).

        The first line is the server's word that it listens: a container that
        prints nothing within timeout fails the test. The container is killed
        on the way out if it still runs.
        """
        proc = subprocess.Popen(
            self.cmd("run", "--bundle", str(bundle), cid),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert select.select([proc.stdout], [], [], timeout)[0], f"the server printed nothing in {timeout:g} s"
            ready = proc.stdout.readline()
            if not ready and proc.poll() is not None:
                raise AssertionError(f"the container exited {proc.returncode}: {proc.stderr.read()}")
            yield proc, ready
        finally:
            if proc.poll() is None:
                self.run("kill", cid, "KILL")
            proc.wait(timeout=30)

    def containers(self) -> list[str]:
        """The ids of the containers in the state directory."""
        if not self.state_dir.exists():
            return []
        out = self.run("list", "-q")
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    @contextmanager
    def container_id(self, prefix: str = "graft"):
        """A fresh container id; the container is deleted (--force) on exit, and checked gone."""
        cid = f"{prefix}-{uuid.uuid4().hex[:8]}"
        try:
            yield cid
        finally:
            self.run("delete", "--force", cid)  # fails harmlessly if it never started
            assert cid not in self.containers(), f"container {cid} survived delete --force"
