"""Docker end to end: Debian's dockerd 20.10 runs containers through graft-runtime, one runtime per tenant.

dockerd 20.10 passes a container no annotation (API 1.41 has none, and it
drops them from the raw API), so the tenant comes from the runtime's name:
``docker run --runtime graft-web`` runs graft-runtime with the runtimeArgs of
packaging/docker/daemon.json (``--graft-tenant web --graft-socket-dir DIR``).
One private containerd and dockerd serve the whole module
(tests/support/docker.py: ~3 s to start); each test starts its own broker and
points the runtime at its socket directory by a config reload (SIGHUP), as an
operator would. The image is a `docker import` of tests/support/rootfs.py's
root filesystem, with the host's /usr mounted read-only (``host_volumes``);
every container runs with ``--network none``, so nothing in it reaches the
host's 127.0.0.1 except through graft. Every container is removed after each
test, the daemons and all their state after the module.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from support.docker import COMPOSE, DOCKER, DOCKERD, graft_runtime, host_volumes, private_dockerd
from support.harness import eventually, free_port, need, need_program, need_root_and_netns
from support.rootfs import ETC_FILES, build_rootfs
from support.runtime_env import PAGE, policy
from support.static_binaries import interpreter

pytestmark = pytest.mark.netns

IMAGE = "graft-test:rootfs"
RUNTIME = "graft-web"
CONTAINER_LIB = "/run/graft/libgraft.so"  # where graft-runtime mounts the shim (docs/containers.md)
DENIED_CLIENT = (  # the connect's errno is the exit code, and printed
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10)\n"
    "except OSError as e:\n"
    "    print(f'errno {e.errno}'); raise SystemExit(e.errno)\n"
    "print('connected')\n"
)


def curl(port: int, path: str = "/") -> list[str]:
    return ["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}{path}"]


@pytest.fixture(scope="module")
def docker():
    """One private containerd + dockerd for the module, with the test image imported; all removed after it."""
    need_root_and_netns()
    for path in (DOCKERD, DOCKER, COMPOSE):
        need(Path(path).is_file(), f"needs {path} (make deps installs docker.io and docker-compose)")
    need_program("containerd")
    tmp = Path(tempfile.mkdtemp(prefix="graft-dk-", dir="/tmp"))  # short: the sockets live in it
    try:
        with private_dockerd(tmp) as dk:
            dk.import_rootfs(build_rootfs(tmp / "rootfs"), IMAGE)
            yield dk
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def graft_web(docker, start_broker):
    """Start the test's broker for tenant web and point the graft-web runtime at it; the dockerd, ready.

    Every container is removed at teardown, before start_broker's teardown stops the broker.
    """

    def start(policy_text: str):
        broker = start_broker(policy_text, "web")
        docker.set_runtimes({RUNTIME: graft_runtime("web", broker.socket_dir)})
        return broker

    yield start
    docker.remove_containers()


def run(docker, *args: str, runtime: str | None = RUNTIME, rm: bool = True):
    """`docker run [--rm] --network none` with the host's /usr, through runtime (None: Docker's runc).

    args: more flags, the image, its command.
    """
    flags = (["--rm"] if rm else []) + (["--runtime", runtime] if runtime else [])
    return docker.docker("run", *flags, "--network", "none", *host_volumes(), *args)


def detached(docker, *args: str) -> str:
    """A container started with `docker run -d` through the graft runtime; its id."""
    started = run(docker, "-d", *args)
    assert started.returncode == 0, started.stderr
    return started.stdout.strip()


def connects(broker) -> list[tuple]:
    return [(r["port"], r["action"], r["via"]) for r in broker.audit() if r["op"] == "connect"]


def test_preload_curl_reaches_the_host_only_through_graft(graft_web, docker, site):
    broker = graft_web(policy(site))
    out = run(docker, IMAGE, *curl(site))
    assert (out.returncode, out.stdout) == (0, PAGE), (out.stderr, docker.log())
    assert connects(broker) == [(site, "graft", "shim")]
    # The control: the same container under Docker's own runc cannot reach the host's loopback.
    plain = run(docker, IMAGE, *curl(site), runtime=None)
    assert plain.returncode == 7, (plain.returncode, plain.stdout, plain.stderr)  # curl: could not connect
    assert connects(broker) == [(site, "graft", "shim")]


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_preload_http_server_is_published_on_the_host(graft_web, docker, site):
    published = free_port()
    broker = graft_web(policy(site, published))
    cid = detached(docker, IMAGE, "python3", "-m", "http.server", "80", "--bind", "0.0.0.0", "--directory", "/etc")
    # No readiness signal crosses `docker run -d`: poll the published port, bounded.
    assert eventually(lambda: _accepts(published), timeout=30, interval=0.05), docker.docker("logs", cid).stderr
    got = subprocess.run(curl(published, "/passwd"), capture_output=True, text=True, timeout=30)  # on the host
    assert (got.returncode, got.stdout) == (0, ETC_FILES["passwd"]), got.stderr
    (rec,) = [r for r in broker.audit() if r["op"] == "bind"]
    assert (rec["port"], rec["action"], rec["host_addr"], rec["via"]) == (80, "graft", f"127.0.0.1:{published}", "shim")


def test_seccomp_mode_grafts_static_busybox_wget_and_go(graft_web, docker, site, go_fetch):
    """Programs no LD_PRELOAD reaches: grafted by the broker's seccomp agent, under Docker's default profile."""
    busybox = shutil.which("busybox")
    need(busybox is not None and interpreter(busybox) is None, "needs a static busybox (Debian busybox-static)")
    broker = graft_web(policy(site, mode="seccomp"))
    url = f"http://127.0.0.1:{site}/"
    wget = run(docker, IMAGE, "busybox", "wget", "-q", "-O", "-", url)
    assert (wget.returncode, wget.stdout) == (0, PAGE), (wget.stderr, broker.stderr())
    go = run(docker, "-v", f"{go_fetch}:/fetch:ro", IMAGE, "/fetch", url)
    assert go.returncode == 0, (go.stdout, go.stderr)
    result = json.loads(go.stdout)
    assert (result["status"], result["body"], result["remote"]) == (200, PAGE, f"127.0.0.1:{site}")
    assert connects(broker) == [(site, "graft", "seccomp")] * 2


@pytest.mark.parametrize("mode", ["preload", "seccomp"])
def test_a_denied_destination_fails_with_eperm(graft_web, docker, site, mode):
    """DESIGN: deny is EPERM for connect. The client exits with the errno, so `docker run` exits 1."""
    denied = free_port()
    broker = graft_web(policy(site, mode=mode))  # default = "deny": only site's port is granted
    out = run(docker, IMAGE, "python3", "-c", DENIED_CLIENT, str(denied))
    assert (out.returncode, out.stdout) == (1, "errno 1\n"), out.stderr
    (rec,) = [r for r in broker.audit() if r["op"] == "connect"]
    assert (rec["port"], rec["action"], rec["errno"], rec["rule"]) == (denied, "deny", 1, "tenants.web.default")
    assert rec["via"] == ("shim" if mode == "preload" else "seccomp")


def test_docker_exec_in_preload_mode_is_grafted_only_with_ld_preload(graft_web, docker, site):
    """docker exec takes its environment from Docker's container config, not config.json: no LD_PRELOAD.

    The shim and the socket are mounted, so `-e LD_PRELOAD=/run/graft/libgraft.so` grafts the
    exec'd process (docs/containers.md).
    """
    broker = graft_web(policy(site))
    cid = detached(docker, IMAGE, "sleep", "infinity")
    bare = docker.docker("exec", cid, *curl(site))
    assert bare.returncode == 7, (bare.returncode, bare.stdout, bare.stderr)
    preloaded = docker.docker("exec", "-e", f"LD_PRELOAD={CONTAINER_LIB}", cid, *curl(site))
    assert (preloaded.returncode, preloaded.stdout) == (0, PAGE), preloaded.stderr
    assert connects(broker) == [(site, "graft", "shim")]


def test_docker_exec_in_seccomp_mode_is_grafted(graft_web, docker, site):
    """runc applies the container's seccomp profile, with its listener, to an exec'd process."""
    broker = graft_web(policy(site, mode="seccomp"))
    out = docker.docker("exec", detached(docker, IMAGE, "sleep", "infinity"), *curl(site))
    assert (out.returncode, out.stdout) == (0, PAGE), (out.stderr, broker.stderr())
    assert connects(broker) == [(site, "graft", "seccomp")]


def test_docker_restart_grafts_the_container_again(graft_web, docker, site):
    """dockerd writes a new bundle on every start; graft-runtime grafts each one."""
    broker = graft_web(policy(site))
    name = "graft-restart"
    first = run(docker, "--name", name, IMAGE, *curl(site), rm=False)
    assert (first.returncode, first.stdout) == (0, PAGE), first.stderr
    restarted = docker.docker("restart", name)
    assert restarted.returncode == 0, restarted.stderr
    waited = docker.docker("wait", name)  # the restarted curl's exit code
    assert waited.stdout.strip() == "0", (waited.stdout, waited.stderr)
    logs = docker.docker("logs", name)
    assert logs.stdout == PAGE * 2, (logs.stdout, logs.stderr)
    assert connects(broker) == [(site, "graft", "shim")] * 2
    pids = {r["pid"] for r in broker.audit() if r["op"] == "connect"}
    assert len(pids) == 2, "both connects came from one process"


COMPOSE_FILE = """\
version: "2.4"
services:
  fetch:
    image: {image}
    runtime: {runtime}
    network_mode: none
    volumes: {volumes}
    command: {command}
"""


def test_docker_compose_service_with_the_graft_runtime(graft_web, docker, site, short_tmp):
    """Debian's docker-compose 1.29: `runtime:` (compose file 2.x) on a service is all it takes."""
    broker = graft_web(policy(site))
    volumes = host_volumes()[1::2]  # the values of its -v flags: compose's short syntax is the same
    project = short_tmp / "app"
    project.mkdir()
    (project / "docker-compose.yml").write_text(
        COMPOSE_FILE.format(image=IMAGE, runtime=RUNTIME, volumes=json.dumps(volumes), command=json.dumps(curl(site)))
    )
    try:
        up = docker.compose(project, "-p", "graftweb", "up", "--exit-code-from", "fetch")
        assert up.returncode == 0, (up.stdout, up.stderr)
        assert f"fetch_1  | {PAGE}" in up.stdout, up.stdout
    finally:
        down = docker.compose(project, "-p", "graftweb", "down")
    assert down.returncode == 0, down.stderr
    assert docker.containers() == []
    assert connects(broker) == [(site, "graft", "shim")]
