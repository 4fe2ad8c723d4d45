"""A musl image (as Alpine's) in preload mode: graft-runtime mounts the shim's musl build, through runc.

The image is musl's loader (which is musl's libc too) and a C program built
here with musl-gcc, dynamically linked (a static one never runs the loader,
so it never reads LD_PRELOAD). There is no glibc in it: the glibc build
could not load there (graft/imagecheck.py). The program makes plain socket
calls (tests/support/c/socket_probe.c): a TCP connect to a server only on the
host's loopback, a bind published on the host by a bind rule, a UDP sendto,
and a fork whose child connects too. Each must be grafted by the shim, as
the audit says, not merely work.
"""

from __future__ import annotations

import json
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from graft.shim import MUSL_LIB_PATH
from support.harness import compile_c, echo_server, free_port, need_program, need_root_and_netns
from support.rootfs import Runtime, build_musl_rootfs, default_config, musl_loader, real_runtime, write_bundle
from support.runtime_env import policy
from support.static_binaries import interpreter
from support.udp_env import udp_echo

pytestmark = pytest.mark.netns

TENANT = {"io.graft.tenant": "web"}


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    """socket_probe built with musl-gcc, checked to ask for musl's loader."""
    need_program("musl-gcc")
    path = compile_c("socket_probe.c", tmp_path_factory.mktemp("musl") / "socket_probe", compiler="musl-gcc")
    assert interpreter(path) == musl_loader(), f"socket_probe asks for {interpreter(path)}"
    return path


@dataclass
class MuslImage:
    broker: object
    rootfs: Path
    rt: Runtime
    bundles: Path
    tcp_port: int  # a TCP echo server on the host's 127.0.0.1
    udp_port: int  # a UDP one
    published: int  # where the bind rule publishes the container's port 80

    def bundle(self, *args: str) -> Path:
        """A bundle (a new one per call) running /bin/socket_probe ARGS in the image, for the broker's tenant."""
        ann = {**TENANT, "io.graft.socket-dir": str(self.broker.socket_dir)}
        config = default_config(self.rootfs, ["/bin/socket_probe", *args], ann, host_programs=False)
        return write_bundle(self.bundles / f"bundle-{len(list(self.bundles.iterdir()))}", config)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        with self.rt.container_id("musl") as cid:
            return self.rt.run("run", "--bundle", str(self.bundle(*args)), cid)


@pytest.fixture
def image(start_broker, short_tmp, probe):
    """A broker whose tenant may reach TCP and UDP servers on 127.0.0.1 and publish port 80, and the musl image."""
    need_root_and_netns()
    assert MUSL_LIB_PATH.is_file(), f"{MUSL_LIB_PATH} is missing: make build builds it (with musl-gcc from musl-tools)"
    with echo_server() as tcp_port, udp_echo() as (udp_port, _):
        published = free_port()
        text = policy(tcp_port, published) + (
            f'[[tenants.web.connect]]\nto = ["127.0.0.1/32"]\nports = [{udp_port}]\nproto = "udp"\n'
        )
        broker = start_broker(text, "web")
        bundles = short_tmp / "bundles"
        bundles.mkdir()
        env = MuslImage(
            broker,
            build_musl_rootfs(short_tmp / "rootfs", [probe]),
            Runtime(real_runtime("runc", short_tmp), short_tmp / "state"),
            bundles,
            tcp_port,
            udp_port,
            published,
        )
        yield env


def grafted(broker, proto: str) -> list[dict]:
    return [r for r in broker.audit() if r["op"] == "connect" and r["proto"] == proto]


def test_a_tcp_connect_is_grafted_with_the_musl_build(image):
    out = image.run("tcp", "127.0.0.1", str(image.tcp_port))
    assert (out.returncode, out.stdout, out.stderr) == (0, "tcp\n", ""), out.stderr
    (rec,) = grafted(image.broker, "tcp")
    assert (rec["port"], rec["action"], rec["via"]) == (image.tcp_port, "graft", "shim")
    config = json.loads((image.bundles / "bundle-0" / "config.json").read_text())
    (lib,) = [m for m in config["mounts"] if m["destination"] == "/run/graft/libgraft.so"]
    assert lib["source"] == str(MUSL_LIB_PATH)  # at the same path in the container: LD_PRELOAD is the usual one
    assert "LD_PRELOAD=/run/graft/libgraft.so" in config["process"]["env"]


def test_a_udp_sendto_is_grafted(image):
    out = image.run("udp", "127.0.0.1", str(image.udp_port))
    assert (out.returncode, out.stdout) == (0, "echo:udp\n"), out.stderr
    (rec,) = grafted(image.broker, "udp")
    assert (rec["port"], rec["action"], rec["via"]) == (image.udp_port, "graft", "shim")


def test_a_forked_child_is_grafted_too(image):
    """The shim's fork handlers (pthread_atfork) run under musl: the child has its own broker connection."""
    out = image.run("fork", "127.0.0.1", str(image.tcp_port))
    assert (out.returncode, out.stdout) == (0, "child\nparent\n"), out.stderr
    records = grafted(image.broker, "tcp")
    assert [(r["action"], r["via"]) for r in records] == [("graft", "shim")] * 2
    assert len({r["pid"] for r in records}) == 2, "the child's connect and the parent's come from two processes"


def test_a_bind_is_published_on_the_host(image):
    with image.rt.container_id("musl") as cid, image.rt.serving(cid, image.bundle("serve", "80")) as (proc, ready):
        # the probe prints this once it listens
        assert ready == "listening\n", (ready, proc.stderr.read() if proc.poll() is not None else "")
        with socket.create_connection(("127.0.0.1", image.published), timeout=10) as conn:
            got = conn.recv(64)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    assert got == b"served"
    (rec,) = [r for r in image.broker.audit() if r["op"] == "bind"]
    assert (rec["port"], rec["action"], rec["host_addr"]) == (80, "graft", f"127.0.0.1:{image.published}")
