"""What the graft-runtime tests share: the page a host server serves, a policy, the annotations, fixtures.

The fixtures give a host web server (`site`), a root filesystem (`rootfs`) and
each real runtime, runc and crun (`rt`). Used by e2e/test_oci_runtime.py and
e2e/test_static_apps.py (static wget through graft-runtime).
"""

from __future__ import annotations

import pytest

from .harness import http_server, need_program, need_root_and_netns
from .rootfs import Runtime, build_rootfs, real_runtime

PAGE = "only on the host's loopback\n"
RUNTIMES = ("runc", "crun")


def policy(connect_port: int, publish_port: int | None = None, mode: str = "preload") -> str:
    text = f"""
version = 1
[broker]
confinement = "auto"
[tenants.web]
default = "deny"
mode = "{mode}"
[[tenants.web.connect]]
to = ["127.0.0.1/32"]
ports = [{connect_port}]
proto = "tcp"
"""
    if publish_port:
        text += f"""
[[tenants.web.bind]]
addr = ["0.0.0.0/32"]
ports = [80]
proto = "tcp"
host = "127.0.0.1:{publish_port}"
"""
    return text


@pytest.fixture
def site(short_tmp):
    (short_tmp / "www").mkdir()
    (short_tmp / "www" / "index.html").write_text(PAGE)
    with http_server(short_tmp / "www") as port:
        yield port


@pytest.fixture
def rootfs(short_tmp):
    return build_rootfs(short_tmp / "rootfs")


@pytest.fixture(params=RUNTIMES)
def rt(request, short_tmp) -> Runtime:
    need_root_and_netns()
    need_program(request.param)
    return Runtime(real_runtime(request.param, short_tmp), short_tmp / f"state-{request.param}")


def annotations(broker) -> dict[str, str]:
    return {"io.graft.tenant": broker.tenant, "io.graft.socket-dir": str(broker.socket_dir)}
