"""graft-runtime end to end: runc, crun and podman running real containers through it.

Each container has a network namespace of its own with nothing but `lo`
(the runtime makes it, as engines do for --network none), a root filesystem
built from this host's files (tests/support/rootfs.py), and unmodified Debian
programs. Nothing in it can reach the host's 127.0.0.1 except through graft.
Every container is deleted, and checked gone, when its test ends.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from graft.cgroups import crun_refuses_host
from support.dns_server import dns_server
from support.harness import free_port, need_program, need_root_and_netns
from support.rootfs import GRAFT_RUNTIME, Runtime, default_config, host_dirs, real_runtime, write_bundle
from support.runtime_env import PAGE, annotations, policy

pytestmark = pytest.mark.netns


def curl(port: int, path: str = "/") -> list[str]:
    return ["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}{path}"]


def test_preload_curl_reaches_the_host_only_through_graft(rt, start_broker, short_tmp, rootfs, site):
    broker = start_broker(policy(site), "web")
    bundle = write_bundle(short_tmp / "bundle", default_config(rootfs, curl(site), annotations(broker)))
    os.chown(bundle / "config.json", 65534, 65534)  # as a rootless engine's file would be
    os.chmod(bundle / "config.json", 0o640)
    with rt.container_id() as cid:
        out = rt.run("run", "--bundle", str(bundle), cid)
    assert (out.returncode, out.stdout) == (0, PAGE), out.stderr
    st = (bundle / "config.json").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (65534, 65534, 0o640), "the config changed hands"
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "graft-resolv.conf"], "a temporary file was left"
    (rec,) = [r for r in broker.audit() if r["op"] == "connect"]
    assert (rec["port"], rec["action"], rec["via"]) == (site, "graft", "shim")
    config = json.loads((bundle / "config.json").read_text())
    assert "LD_PRELOAD=/run/graft/libgraft.so" in config["process"]["env"]


ENGINE_RESOLV_CONF = "nameserver 192.0.2.53\nsearch corp.example\noptions ndots:1 timeout:1\n"  # as an engine's


@pytest.mark.parametrize("mode", ["preload", "seccomp"])
def test_a_container_resolves_a_name_through_the_brokers_resolver(rt, start_broker, short_tmp, rootfs, site, mode):
    """The engine's resolv.conf gives way to one naming the tenant's resolver, served in the container's network."""
    text = policy(site, mode=mode).replace("[tenants.web]\n", "[tenants.web]\n")
    with dns_server("127.0.0.1", {"myhost.graft.test": "127.0.0.1"}, port=0, ttl=300) as (dns_port, asked):
        broker = start_broker(text + f'[tenants.web.dns]\nupstream = ["127.0.0.1:{dns_port}"]\n', "web")
        engine = short_tmp / "engine-resolv.conf"
        engine.write_text(ENGINE_RESOLV_CONF)
        script = f"cat /etc/resolv.conf && getent hosts myhost.graft.test && curl -sS http://myhost.graft.test:{site}/"
        config = default_config(rootfs, ["sh", "-c", script], annotations(broker))
        config["mounts"].append(
            {"destination": "/etc/resolv.conf", "type": "bind", "source": str(engine), "options": ["rbind", "ro"]}
        )
        bundle = write_bundle(short_tmp / "bundle", config)
        with rt.container_id() as cid:
            out = rt.run("run", "--bundle", str(bundle), cid)
        assert out.returncode == 0, (out.stdout, out.stderr)
    resolv_conf, hosts, page = out.stdout.split("\n", 3)[:3], out.stdout.splitlines()[3], out.stdout.split("\n", 4)[4]
    assert resolv_conf == ["nameserver 127.0.0.11", "search corp.example", "options ndots:1 timeout:1"]
    assert hosts.split() == ["127.0.0.1", "myhost.graft.test"] and page == PAGE
    # the engine's search line is kept: glibc may try the name under it too (for its AAAA query)
    assert "myhost.graft.test" in {q.name for q, _ in asked} <= {"myhost.graft.test", "myhost.graft.test.corp.example"}
    lookups = [r for r in broker.audit() if r["op"] == "dns" and r["qtype"] == "A"]
    assert lookups and {(r["name"], tuple(r["answers"]), r["via"]) for r in lookups} == {
        ("myhost.graft.test", ("127.0.0.1",), "resolver")
    }
    assert [(r["port"], r["action"]) for r in broker.audit() if r["op"] == "connect" and r["proto"] == "tcp"] == [
        (site, "graft")
    ]
    assert engine.read_text() == ENGINE_RESOLV_CONF  # the engine's file is never written to


def test_a_runtime_per_tenant_grafts_a_bundle_without_annotation(rt, start_broker, short_tmp, rootfs, site):
    """--graft-tenant: the operator's runtime names the tenant, for engines that pass no annotations."""
    broker = start_broker(policy(site), "web")
    web = rt.with_flags("--graft-tenant", "web", f"--graft-socket-dir={broker.socket_dir}")
    bundle = write_bundle(short_tmp / "bundle", default_config(rootfs, curl(site)))
    with web.container_id() as cid:
        out = web.run("run", "--bundle", str(bundle), cid)
    assert (out.returncode, out.stdout) == (0, PAGE), out.stderr
    (rec,) = [r for r in broker.audit() if r["op"] == "connect"]
    assert (rec["tenant"], rec["port"], rec["action"], rec["via"]) == ("web", site, "graft", "shim")


def test_unannotated_bundle_is_untouched_and_cut_off(rt, short_tmp, rootfs, site):
    """The control: the same container without the annotation cannot reach the host, and its config is not written."""
    bundle = write_bundle(short_tmp / "bundle", default_config(rootfs, curl(site)))
    before = (bundle / "config.json").read_bytes(), (bundle / "config.json").stat().st_mtime_ns
    with rt.container_id() as cid:
        out = rt.run("run", "-b", str(bundle), cid)
    assert out.returncode == 7, (out.returncode, out.stdout, out.stderr)  # curl: could not connect
    assert ((bundle / "config.json").read_bytes(), (bundle / "config.json").stat().st_mtime_ns) == before


def test_preload_http_server_is_published_on_the_host(rt, start_broker, short_tmp, rootfs, site):
    published = free_port()
    broker = start_broker(policy(site, published), "web")
    server = ["python3", "-u", "-m", "http.server", "80", "--bind", "0.0.0.0", "--directory", "/etc"]
    bundle = write_bundle(short_tmp / "bundle", default_config(rootfs, server, annotations(broker)))
    with rt.container_id() as cid, rt.serving(cid, bundle) as (proc, ready):
        # http.server prints this once it listens
        assert "Serving HTTP" in ready, (ready, proc.stderr.read() if proc.poll() is not None else "")
        got = subprocess.run(curl(published, "/hosts"), capture_output=True, text=True, timeout=30)
    assert got.returncode == 0 and got.stdout == (rootfs / "etc" / "hosts").read_text(), got.stderr
    (rec,) = [r for r in broker.audit() if r["op"] == "bind"]
    assert (rec["port"], rec["action"], rec["host_addr"]) == (80, "graft", f"127.0.0.1:{published}")


def test_seccomp_mode_extends_the_bundles_profile(rt, start_broker, short_tmp, rootfs, site):
    """A seccomp-mode tenant: curl is grafted by the broker's agent, and the bundle's own rules still hold."""
    broker = start_broker(policy(site, mode="seccomp"), "web")
    script = f"uname -s || echo uname refused; exec {' '.join(curl(site))}"
    config = default_config(rootfs, ["sh", "-c", script], annotations(broker))
    config["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["uname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
            {"names": ["connect", "getpid"], "action": "SCMP_ACT_ALLOW"},
        ],
    }
    bundle = write_bundle(short_tmp / "bundle", config)
    with rt.container_id() as cid:
        out = rt.run("run", "--bundle", str(bundle), cid)
    assert (out.returncode, out.stdout) == (0, "uname refused\n" + PAGE), (out.stderr, broker.stderr())
    (rec,) = [r for r in broker.audit() if r["op"] == "connect"]
    assert (rec["port"], rec["action"], rec["via"]) == (site, "graft", "seccomp")
    grafted = json.loads((bundle / "config.json").read_text())
    assert not [e for e in grafted["process"]["env"] if e.startswith("LD_PRELOAD=")]


@pytest.mark.parametrize(
    "case",
    [
        "unknown tenant",
        "no broker",
        "no socket dir",
        "seccomp without confinement",
        "malformed config",
        "old glibc image",
        "another tenant than the runtime's",
        "another broker than the runtime's",
    ],
)
def test_bad_annotation_fails_create_with_one_line(case, start_broker, short_tmp, rootfs):
    need_root_and_netns()
    rt = Runtime(real_runtime("runc", short_tmp), short_tmp / "state")
    ann = {"io.graft.tenant": "web", "io.graft.socket-dir": str(short_tmp / "nowhere")}
    expect = "no broker answers at"
    if case in ("another tenant than the runtime's", "another broker than the runtime's"):
        # A broker that serves both tenants: only the operator's flag stands between them.
        broker = start_broker(policy(free_port()) + "[tenants.db]\n", "web")
        rt = rt.with_flags("--graft-tenant", "web", "--graft-socket-dir", str(broker.socket_dir))
        if case == "another tenant than the runtime's":
            ann = {"io.graft.tenant": "db"}
            expect = "annotation io.graft.tenant='db' names another tenant than this runtime's --graft-tenant web"
        else:
            ann = annotations(broker) | {"io.graft.socket-dir": str(short_tmp)}
            expect = f"names another broker than this runtime's socket directory {broker.socket_dir}"
    elif case == "unknown tenant":
        broker = start_broker(policy(free_port()), "web")
        ann = {**annotations(broker), "io.graft.tenant": "db"}
        expect = "tenant 'db' is not in the policy of the broker"
    elif case == "seccomp without confinement":
        text = policy(free_port(), mode="seccomp").replace('confinement = "auto"', 'confinement = "off"')
        ann = annotations(start_broker(text, "web"))
        expect = "tenant 'web' is in seccomp mode, which needs kernel confinement"
    elif case == "malformed config":
        ann = annotations(start_broker(policy(free_port()), "web"))
        expect = "has an unexpected shape: AttributeError"
    elif case == "old glibc image":
        # Neither build loads there: the glibc one needs a newer glibc, and the programs are glibc's, not musl's.
        # (A musl image goes to the musl build: tests/e2e/test_musl_preload.py.)
        ann = annotations(start_broker(policy(free_port()), "web"))
        libc = rootfs / "usr" / "lib" / "x86_64-linux-gnu" / "libc.so.6"  # in the image; the host's /usr goes over it
        libc.parent.mkdir(parents=True)
        libc.write_bytes(b"\x00GNU C Library (GNU libc) stable release version 2.17\x00")
        expect = "tenant 'web' is in preload mode, but the image's glibc is 2.17 (/lib/x86_64-linux-gnu/libc.so.6)"
    elif case == "no broker":
        (short_tmp / "nowhere").mkdir()
    config = default_config(rootfs, ["true"], ann)
    if case == "malformed config":
        config["process"]["env"] = "PATH=/usr/bin"  # a string where the OCI spec has a list
    bundle = write_bundle(short_tmp / "bundle", config)
    before = (bundle / "config.json").read_bytes()
    with rt.container_id() as cid:
        out = rt.run("create", "--bundle", str(bundle), cid)
        assert rt.containers() == [], "the real runtime was called"
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"graft-runtime: bundle {bundle}: ") and expect in lines[0], lines
    assert (bundle / "config.json").read_bytes() == before


@pytest.mark.parametrize("args", [["--version"], ["--root", "{tmp}/state", "state", "nosuch"]])
def test_commands_pass_through_with_their_output_and_exit_code(args, short_tmp):
    runc = need_program("runc")
    args = [a.format(tmp=short_tmp) for a in args]
    real = subprocess.run([runc, *args], capture_output=True, text=True)
    ours = subprocess.run([GRAFT_RUNTIME, "--graft-runtime", runc, *args], capture_output=True, text=True)
    assert (ours.returncode, ours.stdout) == (real.returncode, real.stdout)
    assert ours.stderr.split("msg=")[1:] == real.stderr.split("msg=")[1:]  # the same error, timestamps apart


def test_a_refusal_is_in_the_runtime_log_engines_read(short_tmp):
    """containerd's shim reports a runtime's last error from --log (JSON with --log-format json)."""
    need_program("runc")
    log = short_tmp / "log.json"
    bundle = short_tmp / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(
        json.dumps({"annotations": {"io.graft.tenant": "web", "io.graft.socket-dir": str(short_tmp)}})
    )
    out = subprocess.run(
        [
            GRAFT_RUNTIME,
            "--graft-runtime",
            "runc",
            "--log",
            str(log),
            "--log-format",
            "json",
            "create",
            "--bundle",
            str(bundle),
            "x",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert record["level"] == "error" and record["msg"] == out.stderr.strip()


def test_graft_runtime_will_not_exec_itself():
    out = subprocess.run(
        [GRAFT_RUNTIME, "state", "x"],
        env={**os.environ, "GRAFT_RUNTIME": GRAFT_RUNTIME},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert out.stderr == f"graft-runtime: the real runtime {GRAFT_RUNTIME} is graft-runtime itself\n"


# ---- the default real runtime -------------------------------------------------------------------


def without_graft_runtime_env(path: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GRAFT_RUNTIME"}
    return env if path is None else {**env, "PATH": path}


def by_default(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    """graft-runtime ARGS with neither --graft-runtime nor $GRAFT_RUNTIME (and PATH=path, if given)."""
    return subprocess.run(
        [GRAFT_RUNTIME, *args],
        env=without_graft_runtime_env(path),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_the_default_real_runtime_runs_containers_here(short_tmp, rootfs):
    """No --graft-runtime, no $GRAFT_RUNTIME: the runtime graft-runtime picks can run this host's containers."""
    need_root_and_netns()
    need_program("runc")
    need_program("crun")
    version = by_default("--version")
    expected = "runc" if crun_refuses_host() else "crun"  # crun first, unless it refuses every container here
    assert version.returncode == 0 and version.stdout.startswith(f"{expected} version"), version.stderr
    state = short_tmp / "state"
    bundle = write_bundle(short_tmp / "bundle", default_config(rootfs, ["echo", "ran"]))
    with Runtime(need_program(expected), state).container_id() as cid:  # deleted by the same runtime
        out = by_default("--root", str(state), "run", "--bundle", str(bundle), cid)
    assert (out.returncode, out.stdout) == (0, "ran\n"), out.stderr


def as_containerd_shim(tmp: Path, path: str, *args: str) -> subprocess.CompletedProcess:
    """graft-runtime ARGS run by a parent whose executable is called containerd-shim-runc-v2, with PATH=path."""
    shim = tmp / "containerd-shim-runc-v2"
    shutil.copy("/bin/dash", shim)  # a copy, not a link: the parent's executable is what graft-runtime reads
    # "; exit" keeps the shell from exec'ing graft-runtime in its own place: the shell stays its parent.
    script = f'{shlex.join([GRAFT_RUNTIME, *args])}; exit "$?"'
    env = without_graft_runtime_env(path)
    return subprocess.run([str(shim), "-c", script], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def only_crun_on_path(short_tmp) -> str:
    directory = short_tmp / "path"
    directory.mkdir()
    (directory / "crun").symlink_to(need_program("crun"))
    return str(directory)


def test_under_containerds_shim_the_default_is_runc(short_tmp, only_crun_on_path):
    """containerd-shim-runc-v2 runs graft-runtime as its runc binary: runc, never crun, whatever the host."""
    out = as_containerd_shim(short_tmp, only_crun_on_path, "--version")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == (
        "graft-runtime: no real runtime: called by containerd-shim-runc-v2 as its runc binary, and runc is not "
        "on PATH; name one with --graft-runtime PATH or $GRAFT_RUNTIME\n"
    )
    runc = subprocess.run([need_program("runc"), "--version"], capture_output=True, text=True)
    both = short_tmp / "path"
    (both / "runc").symlink_to(need_program("runc"))
    out = as_containerd_shim(short_tmp, str(both), "--version")
    assert (out.returncode, out.stdout) == (0, runc.stdout), out.stderr


def test_crun_is_passed_over_where_it_refuses_every_container(only_crun_on_path):
    out = by_default("--version", path=only_crun_on_path)
    if not crun_refuses_host():  # a cgroup2-only or v1-only host: crun it is
        assert out.returncode == 0 and out.stdout.startswith("crun version"), out.stderr
        return
    assert out.returncode == 1 and out.stderr == (
        "graft-runtime: no real runtime: crun refuses every container on this host's hybrid cgroup layout "
        "(a cgroup2 with controllers at /sys/fs/cgroup/unified), and runc is not on PATH; "
        "name one with --graft-runtime PATH or $GRAFT_RUNTIME\n"
    )


# ---- podman ------------------------------------------------------------------------------------


class Podman:
    """podman with its storage, run state and events in the test's directory, so nothing of the host's.

    The flags are what this kind of machine needs (docs/containers.md): no systemd as
    PID 1, so cgroupfs and a file for events; no CAP_SYS_RESOURCE, so explicit ulimits
    below the hard limits instead of podman's defaults (1048576 files).

    podman runs graft-runtime through a wrapper that names the real runtime and
    its state directory: podman passes the runtime neither its environment nor,
    on the `delete` of its clean-up after --rm, its --runtime-flag (measured:
    with --runtime-flag the delete went to the default runtime, and runc's
    state of every container was left behind).
    """

    def __init__(self, tmp: Path, real: str):
        tmp.mkdir(parents=True, exist_ok=True)
        # podman's cgroups (conmon's and the containers') go under one parent of this test's own.
        self.cgroup_parent = f"/graft-test-{uuid.uuid4().hex[:8]}"
        self.runtime = Runtime(real, tmp / "oci-state")
        wrapper = tmp / "graft-runtime-runc"
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.join(self.runtime.cmd())} "$@"\n')
        wrapper.chmod(0o755)
        self.base = [
            "podman",
            "--root",
            str(tmp / "storage"),
            "--runroot",
            str(tmp / "run"),
            "--tmpdir",
            str(tmp / "tmp"),
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            "--runtime",
            str(wrapper),
        ]

    def run(self, rootfs: Path, ann: dict[str, str], *cmd: str) -> subprocess.CompletedProcess:
        args = [
            *self.base,
            "run",
            "--rm",
            "--cgroup-parent",
            self.cgroup_parent,
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ]
        for d in host_dirs():
            args += ["-v", f"/{d}:/{d}:ro"]
        for k, v in ann.items():
            args += ["--annotation", f"{k}={v}"]
        return subprocess.run(
            [*args, "--rootfs", str(rootfs), *cmd],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    def remove_all(self) -> None:
        subprocess.run([*self.base, "rm", "--all", "--force"], capture_output=True, timeout=120)
        left = subprocess.run([*self.base, "ps", "--all", "--quiet"], capture_output=True, text=True, timeout=60)
        assert left.stdout.strip() == "", f"podman containers left: {left.stdout}"
        stale = self.runtime.containers()
        for cid in stale:  # so that a failure here leaves nothing either
            self.runtime.run("delete", "--force", cid)
        assert stale == [], f"podman left the runtime's state of {stale}"
        for hierarchy in cgroup_hierarchies():
            for sub, _dirs, _files in os.walk(hierarchy + self.cgroup_parent, topdown=False):
                os.rmdir(sub)  # bottom-up; fails loudly if a process was left behind


def cgroup_hierarchies() -> list[str]:
    """Mount points of every cgroup hierarchy, v1 and v2."""
    with open("/proc/self/mounts") as f:
        return [fields[1] for fields in map(str.split, f) if fields[2] in ("cgroup", "cgroup2")]


@pytest.fixture
def podman(short_tmp):
    need_root_and_netns()
    need_program("podman")
    p = Podman(short_tmp / "podman", real_runtime("runc", short_tmp))
    yield p
    p.remove_all()


def test_podman_run_with_graft_runtime(podman, start_broker, rootfs, site):
    broker = start_broker(policy(site), "web")
    out = podman.run(rootfs, annotations(broker), *curl(site))
    assert (out.returncode, out.stdout) == (0, PAGE), out.stderr
    (rec,) = [r for r in broker.audit() if r["op"] == "connect"]
    assert (rec["port"], rec["action"]) == (site, "graft")


def test_podman_reports_a_bad_annotation(podman, start_broker, rootfs):
    broker = start_broker(policy(free_port()), "web")
    out = podman.run(rootfs, {**annotations(broker), "io.graft.tenant": "db"}, "true")
    assert out.returncode != 0
    assert "graft-runtime: bundle " in out.stderr and "tenant 'db' is not in the policy" in out.stderr, out.stderr
    assert "not found" not in out.stderr, "podman took graft-runtime's error for a missing command"
