"""A private dockerd for the Docker tests and the demo: Debian's dockerd 20.10 on a private containerd.

DESIGN.md ("Testing") has the engine tests start the engine's daemon
themselves, with private roots and sockets, and remove all of it, pass or
fail. For Docker that is two daemons: a containerd of its own
(tests/support/containerd.py), then /usr/sbin/dockerd with ``--containerd``
pointing at it, its data root, exec root, pid file and API socket in that
containerd's directory, and no host networking of its own
(``--iptables=false --bridge=none --ip-forward=false --ip-masq=false``: the
containers run with ``--network none``, so no docker0 and no NAT rule is made).
Its config file carries the graft runtimes, built from
packaging/docker/daemon.json (``graft_runtime``), so the tests run the file
operators install. Images come from ``docker import`` of a root filesystem
(``import_rootfs``); no registry is reachable here.

Usage::

    with private_dockerd(short_tmp) as dk:
        dk.set_runtimes({"graft-web": graft_runtime("web", broker.socket_dir)})
        image = dk.import_rootfs(build_rootfs(short_tmp / "rootfs"), "graft-test:rootfs")
        dk.docker("run", "--rm", "--network", "none", *host_volumes(), "--runtime", "graft-web", image, "true")

It is ready when the API answers (``docker version``, polled up to
``STARTUP_TIMEOUT``). On exit, pass or fail, it removes every container, stops
dockerd by pid (SIGTERM, a bounded wait, SIGKILL), removes the cgroups its
containers had (one ``cgroup-parent`` of its own in every hierarchy, instead
of the shared ``docker/``) and what dockerd 20.10 writes outside its roots if
it did not exist before: ``/run/docker/plugins`` and ``/run/docker`` (measured
here, with the key file moved by ``deprecated-key-path``; without it dockerd
writes ``/etc/docker/key.json``). The containerd's own clean-up follows: it
kills any shim left, unmounts everything under its directory (dockerd's
overlay and netns mounts included, since dockerd's roots are in it) and
removes the directory.

The demo (demo/demo.py, step (d)) uses this module too, as it uses the rest
of the test harness: one way to start and stop Docker, not two.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from .containerd import Containerd, cgroup_roots, private_containerd
from .harness import REPO
from .rootfs import GRAFT_RUNTIME, host_dirs

DOCKERD = "/usr/sbin/dockerd"
# Debian's CLI by its path: an unrelated, newer docker CLI may come earlier on PATH (/usr/local/bin here).
DOCKER = "/usr/bin/docker"
COMPOSE = "/usr/bin/docker-compose"
PACKAGING = REPO / "packaging" / "docker" / "daemon.json"
TEMPLATE_RUNTIME = "graft-web"  # the entry of PACKAGING that graft_runtime adapts
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0  # dockerd waits up to its shutdown-timeout (15 s) for containers; there are none by then
# What dockerd 20.10 makes outside its roots whatever its flags say (measured here), deepest first.
FIXED_TRACES = (Path("/run/docker/plugins"), Path("/run/docker"), Path("/etc/docker/key.json"))
HOST_BRIDGES = ("docker0", "br-")  # interfaces dockerd makes for bridge networks; none may appear


def graft_runtime(tenant: str, socket_dir: str | os.PathLike, path: str = GRAFT_RUNTIME) -> dict:
    """packaging/docker/daemon.json's graft-web runtime, for tenant's broker at socket_dir and graft-runtime at path.

    Only the values of --graft-tenant and --graft-socket-dir and the program's
    path change; every other argument is the packaging file's, so the tests
    run what operators install. A file without those flags fails here.
    """
    entry = json.loads(PACKAGING.read_text())["runtimes"][TEMPLATE_RUNTIME]
    args = list(entry["runtimeArgs"])
    for flag, value in (("--graft-tenant", tenant), ("--graft-socket-dir", str(socket_dir))):
        args[args.index(flag) + 1] = value
    return {"path": str(path), "runtimeArgs": args}


def host_volumes() -> list[str]:
    """`docker run` flags that mount the host's program directories read-only, as tests/support/rootfs.py's bundles do.

    An image imported from build_rootfs has empty mount points there; the
    programs and libraries are the host's, so nothing is copied into an image.
    """
    return [arg for d in host_dirs() for arg in ("-v", f"/{d}:/{d}:ro")]


@dataclass
class Dockerd:
    """A running private dockerd: its API socket, its pid, and the docker CLI against it."""

    dir: Path
    proc: subprocess.Popen | None  # None until private_dockerd starts it
    containerd: Containerd
    cgroup_parent: str
    runtimes: dict[str, dict] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def socket(self) -> Path:
        return self.dir / "docker.sock"

    @property
    def host(self) -> str:
        """The API address, as -H and DOCKER_HOST take it."""
        return f"unix://{self.socket}"

    @property
    def config_path(self) -> Path:
        return self.dir / "daemon.json"

    @property
    def log_path(self) -> Path:
        return self.dir / "dockerd.log"

    @property
    def env(self) -> dict[str, str]:
        """The environment for docker and docker-compose: this daemon, and a CLI config of its own.

        DOCKER_CONFIG keeps the host's ~/.docker (contexts, credential helpers) out
        of the tests; compose 1.29 would run the docker CLI found on PATH for an
        interactive `run` or `exec` unless told not to.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
        env.update(DOCKER_HOST=self.host, DOCKER_CONFIG=str(self.dir / "cli"), COMPOSE_INTERACTIVE_NO_CLI="1")
        return env

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""

    def docker(self, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
        """``/usr/bin/docker -H SOCK ARGS``, text output; with check, raises with docker's stderr."""
        out = subprocess.run(
            [DOCKER, "-H", self.host, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and out.returncode != 0:
            raise subprocess.CalledProcessError(out.returncode, out.args, out.stdout, out.stderr)
        return out

    def compose(self, project_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Debian's docker-compose (1.29) on project_dir's docker-compose.yml, against this daemon (DOCKER_HOST)."""
        return subprocess.run(
            [COMPOSE, "--no-ansi", *args],
            cwd=project_dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def import_rootfs(self, root: Path, name: str) -> str:
        """`docker import` of the directory root (a tar of it on stdin) as image name; returns name."""
        tar = BytesIO()
        with tarfile.open(fileobj=tar, mode="w") as t:
            for child in sorted(root.iterdir()):
                t.add(child, arcname=child.name)
        out = subprocess.run(
            [DOCKER, "-H", self.host, "import", "-", name],
            env=self.env,
            input=tar.getvalue(),
            capture_output=True,
            timeout=120,
        )
        assert out.returncode == 0, f"docker import failed: {out.stderr.decode(errors='replace')}"
        return name

    def set_runtimes(self, runtimes: dict[str, dict]) -> None:
        """Make runtimes dockerd's runtimes, as an operator does: edit the config file, SIGHUP, no restart.

        dockerd 20.10 runs a runtime that has runtimeArgs through a script it
        writes (<data-root>/runtimes/<name>) that passes the arguments, and
        the engine's own "$@", unquoted: an argument with a space would reach
        graft-runtime as two. Such a value is refused here rather than run.
        Returns once ``docker info`` reports exactly these runtimes.
        """
        for name, entry in runtimes.items():
            spaced = [a for a in (entry["path"], *entry.get("runtimeArgs", ())) if any(c.isspace() for c in a)]
            assert not spaced, f"runtime {name}: dockerd would split {spaced} at its spaces"
        self.runtimes = dict(runtimes)
        self._write_config()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)
            self._wait(lambda: self._reported_runtimes() == self.runtimes, "the reloaded runtimes")

    def _reported_runtimes(self) -> dict:
        out = self.docker("info", "--format", "{{json .Runtimes}}", timeout=30)
        if out.returncode != 0:
            return {}
        reported = json.loads(out.stdout)
        reported.pop("runc", None)  # dockerd's own
        return {name: {k: v for k, v in r.items() if v} for name, r in reported.items()}

    def _write_config(self) -> None:
        config = {
            # dockerd 20.10 writes its identity key to /etc/docker/key.json unless told otherwise
            "deprecated-key-path": str(self.dir / "key.json"),
            # containers' cgroups under a parent of this daemon's, not the docker/ that every dockerd shares
            "cgroup-parent": self.cgroup_parent,
            "runtimes": self.runtimes,
        }
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        tmp.replace(self.config_path)  # a reload reads the whole file or the old one

    def _wait(self, condition, what: str, timeout: float = STARTUP_TIMEOUT) -> None:
        """Poll condition (an API call: dockerd has no readiness signal) until it holds, bounded."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"dockerd exited {self.proc.returncode} before {what}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not show {what} in {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def containers(self) -> list[str]:
        out = self.docker("ps", "--all", "--quiet", "--no-trunc", timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    def remove_containers(self) -> list[str]:
        """Remove every container (killed first), and check none is left; their ids."""
        ids = self.containers()
        if ids:
            self.docker("rm", "--force", "--volumes", *ids, timeout=60)
        left = self.containers()
        assert not left, f"docker rm --force left containers: {left}"
        return ids

    def stop(self) -> int:
        """SIGTERM, a bounded wait, else SIGKILL; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
        return self.proc.returncode

    def remove_cgroups(self) -> None:
        """The cgroup parent in every hierarchy, bottom-up; fails loudly if a process is still in one."""
        for root in cgroup_roots():
            top = root / self.cgroup_parent.lstrip("/")
            if top.is_dir():
                for sub, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
                    os.rmdir(sub)


def _existing(paths) -> set[Path]:
    return {p for p in paths if p.exists()}


def _bridges() -> set[str]:
    return {n for n in os.listdir("/sys/class/net") if n.startswith(HOST_BRIDGES)}


@contextlib.contextmanager
def private_dockerd(tmp: Path, runtimes: dict[str, dict] | None = None) -> Iterator[Dockerd]:
    """A private containerd, then dockerd on it, under tmp (short: socket paths hold 107 bytes); all removed on exit."""
    with private_containerd(tmp) as cd:
        # In the containerd's directory: its clean-up unmounts and removes whatever dockerd leaves there.
        d = cd.dir / "docker"
        d.mkdir()
        traces_before, bridges_before = _existing(FIXED_TRACES), _bridges()
        dk = Dockerd(d, None, cd, f"/graft-docker-{uuid.uuid4().hex[:8]}")
        dk.set_runtimes(runtimes or {})  # no daemon yet: this writes the config file only
        with open(dk.log_path, "wb") as log:
            dk.proc = subprocess.Popen(
                [
                    DOCKERD,
                    "--config-file",
                    str(dk.config_path),
                    "--containerd",
                    cd.address,
                    "--data-root",
                    str(d / "data"),
                    "--exec-root",
                    str(d / "exec"),
                    "--pidfile",
                    str(d / "dockerd.pid"),
                    "-H",
                    dk.host,
                    "--iptables=false",
                    "--bridge=none",
                    "--ip-forward=false",
                    "--ip-masq=false",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a ^C to the tests does not reach it before the clean-up does
            )
        try:
            dk._wait(lambda: dk.docker("version", timeout=10).returncode == 0, "an API answer")
            yield dk
        finally:
            try:
                if dk.proc.poll() is None:
                    dk.remove_containers()
            finally:
                rc = dk.stop()
                dk.remove_cgroups()
                for path in sorted(_existing(FIXED_TRACES) - traces_before, key=lambda p: -len(p.parts)):
                    with contextlib.suppress(OSError):  # a directory another dockerd uses now is not empty
                        path.rmdir() if path.is_dir() else path.unlink()
            new_bridges = _bridges() - bridges_before
            assert not new_bridges, f"dockerd made host interfaces despite --bridge=none: {new_bridges}"
            assert rc in (0, -signal.SIGTERM), f"dockerd exited {rc}:\n{dk.log()}"
