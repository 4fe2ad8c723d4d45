"""graft-runtime under containerd: `ctr run` grafting real containers, and the CRI handlers loading.

The test starts Debian's containerd itself (tests/support/containerd.py: its
own config, root, state and sockets, removed with every trace pass or fail)
and imports an image built with no registry and no engine: an OCI archive of
a root filesystem from this host's files (tests/support/rootfs.py), whose
empty /usr gets the host's /usr read-only at `ctr run --mount`. `ctr run`
without --net-host gives each container a fresh network namespace with only
`lo`, so nothing in it reaches the host's 127.0.0.1 except through graft.

containerd's runc shim runs the "runc binary" with runc's arguments only, and
passes on containerd's environment: graft-runtime is that binary either
directly (`--runc-binary`, the tenant from the annotation `ctr run
--annotation` sets) or through a per-tenant wrapper (packaging/containerd/
graft-runtime-web: no annotation, the tenant is the handler's). The CRI
handlers of packaging/containerd/config.toml are loaded by a containerd with
its CRI plugin on; no kubelet runs here, so no pod is started through them.
"""

from __future__ import annotations

import os
import subprocess
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from support.containerd import CRI_PLUGIN, Containerd, oci_archive, private_containerd
from support.harness import REPO, need_program, need_root_and_netns
from support.rootfs import GRAFT_RUNTIME, host_dirs
from support.runtime_env import PAGE, policy

pytestmark = pytest.mark.netns

IMAGE = "graft.test/host-rootfs:1"
PACKAGING = REPO / "packaging" / "containerd"
WRAPPER = PACKAGING / "graft-runtime-web"
PACKAGED_RUNTIME = "/opt/graft/venv/bin/graft-runtime"  # where the packaging expects graft
PACKAGED_SOCKET_DIR = "/run/graft"
RUN_TIMEOUT = 120


def curl(port: int) -> list[str]:
    return ["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/"]


@pytest.fixture
def containerd(short_tmp) -> Iterator[Containerd]:
    """A private containerd whose shims run graft-runtime, which picks its real runtime itself.

    No GRAFT_RUNTIME in containerd's environment: called by containerd's
    runc shim, graft-runtime takes runc (graft/runtime.py), never crun,
    which refuses this host's hybrid cgroups (docs/containers.md, "The real
    runtime"). Every container of these tests starts only if that holds.
    """
    need_root_and_netns()
    need_program("containerd")
    need_program("runc")
    env = {k: v for k, v in os.environ.items() if k != "GRAFT_RUNTIME"}
    with private_containerd(short_tmp, env=env) as cd:
        yield cd


@pytest.fixture
def namespace(containerd, short_tmp, rootfs) -> Iterator[str]:
    """A containerd namespace of this test holding IMAGE; afterwards nothing of it is left in containerd."""
    ns = f"graft-{uuid.uuid4().hex[:8]}"
    archive = oci_archive(rootfs, short_tmp / "image.tar", IMAGE)
    containerd.ctr("image", "import", str(archive), namespace=ns)
    try:
        yield ns
    finally:
        left = containerd.ctr("containers", "ls", "-q", namespace=ns).stdout.split()
        containerd.ctr("images", "rm", "--sync", IMAGE, namespace=ns, check=False)
        snapshots = containerd.ctr("snapshots", "ls", namespace=ns).stdout.splitlines()[1:]
        containerd.ctr("namespaces", "rm", ns)  # refuses a namespace that still holds anything
    assert not left, f"ctr run --rm left containers: {left}"
    assert not snapshots, f"snapshots left after the image was removed: {snapshots}"


def ctr_run(
    cd: Containerd, ns: str, cmd: list[str], *, runc_binary: str = GRAFT_RUNTIME, annotations: dict | None = None
) -> subprocess.CompletedProcess:
    """`ctr run --rm` of cmd in IMAGE through runc_binary, with the host's program directories read-only."""
    flags = [f"--annotation={k}={v}" for k, v in (annotations or {}).items()]
    flags += [f"--mount=type=bind,src=/{d},dst=/{d},options=rbind:ro" for d in host_dirs()]
    cid = f"c-{uuid.uuid4().hex[:8]}"
    return cd.ctr(
        "run", "--rm", "--runc-binary", runc_binary, *flags, IMAGE, cid, *cmd,
        namespace=ns, check=False, timeout=RUN_TIMEOUT,
    )  # fmt: skip


def tenant_annotations(broker) -> dict[str, str]:
    return {"io.graft.tenant": broker.tenant, "io.graft.socket-dir": str(broker.socket_dir)}


@contextmanager
def tenant_wrapper(short_tmp: Path, broker) -> Iterator[str]:
    """The shipped per-tenant wrapper, installed as an operator would, with this test's paths in it."""
    text = WRAPPER.read_text()
    assert text.count(PACKAGED_RUNTIME) == 1 and text.count(f"--graft-socket-dir {PACKAGED_SOCKET_DIR} ") == 1
    path = short_tmp / "graft-runtime-web"
    path.write_text(
        text.replace(PACKAGED_RUNTIME, GRAFT_RUNTIME).replace(
            f"--graft-socket-dir {PACKAGED_SOCKET_DIR} ", f"--graft-socket-dir {broker.socket_dir} "
        )
    )
    path.chmod(0o755)
    yield str(path)


# ---- ctr run --runc-binary graft-runtime, the tenant from the annotation ---------------------


@pytest.mark.parametrize("mode", ["preload", "seccomp"])
def test_ctr_run_reaches_a_host_only_server_through_graft(containerd, namespace, start_broker, site, mode):
    """curl in ctr's bare network namespace fetches the host's loopback page, grafted and audited.

    In seccomp mode the container also gets containerd's default seccomp
    profile (`ctr run --seccomp`), which graft-runtime extends.
    """
    broker = start_broker(policy(site, mode=mode), "web")
    cmd = curl(site)
    if mode == "seccomp":
        cmd = ["sh", "-c", f"grep -E '^Seccomp:' /proc/self/status; exec {' '.join(cmd)}"]
    out = ctr_run(containerd, namespace, cmd, annotations=tenant_annotations(broker))
    expected = ("Seccomp:\t2\n" if mode == "seccomp" else "") + PAGE  # 2: a filter is on
    assert (out.returncode, out.stdout) == (0, expected), (out.stderr, broker.stderr()[-2000:])
    (rec,) = [r for r in broker.audit() if r["op"] == "connect"]
    assert (rec["port"], rec["action"], rec["tenant"]) == (site, "graft", "web")
    assert rec["via"] == ("seccomp" if mode == "seccomp" else "shim")


def test_ctr_run_without_the_annotation_cannot_reach_the_host(containerd, namespace, site):
    """The control: the same container, not annotated, has only its own `lo`: curl cannot connect."""
    out = ctr_run(containerd, namespace, ["sh", "-c", f"cat /sys/class/net/*/ifindex | wc -l; {' '.join(curl(site))}"])
    assert out.stdout == "1\n", out  # one interface: lo
    assert out.returncode == 7, (out.returncode, out.stderr)  # curl: could not connect


# ---- a handler per tenant: graft-runtime-web, no annotation --------------------------------


def test_per_tenant_wrapper_grafts_without_an_annotation(containerd, namespace, start_broker, short_tmp, site):
    broker = start_broker(policy(site), "web")
    with tenant_wrapper(short_tmp, broker) as wrapper:
        out = ctr_run(containerd, namespace, curl(site), runc_binary=wrapper)
    assert (out.returncode, out.stdout) == (0, PAGE), (out.stderr, broker.stderr()[-2000:])
    (rec,) = [r for r in broker.audit() if r["op"] == "connect"]
    assert (rec["tenant"], rec["port"], rec["action"], rec["via"]) == ("web", site, "graft", "shim")


def test_per_tenant_wrapper_refuses_an_annotation_naming_another_tenant(
    containerd, namespace, start_broker, short_tmp, site
):
    """A container must not choose its tenant against the handler: create fails, with graft-runtime's line."""
    broker = start_broker(policy(site), "web")
    with tenant_wrapper(short_tmp, broker) as wrapper:
        out = ctr_run(containerd, namespace, curl(site), runc_binary=wrapper, annotations={"io.graft.tenant": "db"})
    assert out.returncode != 0 and out.stdout == "", out
    # containerd's shim reports the runtime's last error from its --log: graft-runtime's one line
    assert "graft-runtime: " in out.stderr and "'db'" in out.stderr, out.stderr
    assert not [r for r in broker.audit() if r["op"] == "connect"]


# ---- the CRI handlers of packaging/containerd/config.toml ------------------------------------


def packaged_handlers() -> dict:
    config = tomllib.loads((PACKAGING / "config.toml").read_text())
    assert config["version"] == 2
    return config["plugins"][CRI_PLUGIN]["containerd"]["runtimes"]


def test_cri_plugin_loads_the_packaged_handlers(short_tmp):
    """A containerd with CRI on and the snippet merged into its config starts, CRI ok, graft handlers in it.

    The snippet's tables are merged into the main config, as the snippet says:
    containerd 1.6 merges imported files by whole plugin sections, so an
    import would replace the node's CRI settings.
    """
    need_root_and_netns()
    need_program("containerd")
    snippet = (PACKAGING / "config.toml").read_text()
    tables = snippet.replace("\nversion = 2\n", "\n", 1)  # the main config has its own version line
    assert "version =" not in tables
    with private_containerd(short_tmp, cri=True, extra_config=tables) as cd:
        plugins = cd.ctr("plugins", "ls", "id==cri").stdout.splitlines()
        assert len(plugins) == 2 and plugins[1].split()[-1] == "ok", (plugins, cd.log()[-3000:])
        dump = subprocess.run(
            ["containerd", "--config", str(cd.config_path), "config", "dump"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    loaded = tomllib.loads(dump.stdout)["plugins"][CRI_PLUGIN]["containerd"]["runtimes"]
    for name, handler in packaged_handlers().items():
        got = loaded[name]
        assert got["runtime_type"] == handler["runtime_type"] == "io.containerd.runc.v2"
        assert got["options"]["BinaryName"] == handler["options"]["BinaryName"]
        assert got["pod_annotations"] == handler.get("pod_annotations", [])
        assert got["container_annotations"] == handler.get("container_annotations", [])
    assert loaded["graft"]["pod_annotations"] == ["io.graft.*"]
    assert loaded["graft-web"]["options"]["BinaryName"].endswith("/graft-runtime-web")
    assert "runc" in loaded  # the node's own handler is still there
