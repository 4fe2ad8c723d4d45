"""packaging/: the engine snippets parse, and name what graft installs; the DaemonSet's policy validates.

They are written from the engines' documentation (docs/containers.md); this
keeps them from drifting from graft itself: the console script, the
annotation names, a policy the broker accepts.
"""

from __future__ import annotations

import json
import textwrap
import tomllib

from graft import oci
from graft.policy.loader import parse_policy
from support.harness import REPO

PKG = REPO / "packaging"


def test_docker_daemon_json_has_one_runtime_per_tenant():
    """Each graft-NAME runtime names tenant NAME (dockerd 20.10 passes no annotations), with no spaces anywhere."""
    runtimes = json.loads((PKG / "docker" / "daemon.json").read_text())["runtimes"]
    assert runtimes and all(name.startswith("graft-") for name in runtimes)
    for name, runtime in runtimes.items():
        args = runtime["runtimeArgs"]
        assert runtime["path"].endswith("/bin/graft-runtime")
        assert args[args.index("--graft-tenant") + 1] == name.removeprefix("graft-")
        assert args[args.index("--graft-socket-dir") + 1] == "/run/graft"
        # dockerd 20.10 passes runtimeArgs through a shell script unquoted (docs/containers.md)
        assert not [a for a in (runtime["path"], *args) if any(c.isspace() for c in a)]


def test_podman_containers_conf():
    conf = tomllib.loads((PKG / "podman" / "containers.conf").read_text())
    assert all(p.endswith("/graft-runtime") for p in conf["engine"]["runtimes"]["graft"])


def test_containerd_handler_passes_the_annotations():
    handler = tomllib.loads((PKG / "containerd" / "config.toml").read_text())
    graft = handler["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["graft"]
    assert graft["options"]["BinaryName"].endswith("/bin/graft-runtime")
    assert graft["pod_annotations"] == graft["container_annotations"] == ["io.graft.*"]
    assert oci.TENANT_ANNOTATION.startswith("io.graft.") and oci.SOCKET_DIR_ANNOTATION.startswith("io.graft.")


def test_runtimeclass_names_the_handler():
    text = (PKG / "kubernetes" / "runtimeclass.yaml").read_text()
    assert "\nkind: RuntimeClass\n" in text and "\nhandler: graft\n" in text


def test_daemonset_policy_validates():
    text = (PKG / "kubernetes" / "broker-daemonset.yaml").read_text()
    block = text.split("  policy.toml: |\n", 1)[1].split("\n---\n", 1)[0]
    policy = parse_policy(textwrap.dedent(block), "broker-daemonset.yaml")
    assert str(policy.broker.socket_dir) == "/run/graft"
    assert '--socket-dir", "/run/graft"' in text and "path: /run/graft," in text
