"""packaging/kubernetes/: valid Kubernetes objects, and consistent with the containerd handlers and graft.

No cluster runs here (docs/containers.md, "Kubernetes"), so this is what is
checked on this machine: every document validates against the Kubernetes
OpenAPI schemas bundled in PyPI's kubernetes-validate (strict: an unknown or
misspelt field fails), for the oldest and the newest Kubernetes it bundles;
and the pieces fit together: a RuntimeClass names a containerd handler of
packaging/containerd/config.toml, a per-tenant handler's wrapper fixes that
tenant, the tenant is in the broker's policy, and the broker, the runtime and
the RuntimeClass agree on the socket directory and the nodes. The schemas
are read from the package's own files: a unit test opens no socket.
"""

from __future__ import annotations

import copy
import shlex
import tomllib

import kubernetes_validate
import pytest
import yaml

from graft.policy.loader import parse_policy
from support.harness import REPO

K8S = REPO / "packaging" / "kubernetes"
CONTAINERD = REPO / "packaging" / "containerd"
# The oldest and the newest schemas kubernetes-validate 1.37 bundles.
VERSIONS = ("1.25.0", "1.37.0")


def documents() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def the(kind: str) -> list[dict]:
    return [d for d in documents() if d["kind"] == kind]


def handlers() -> dict:
    config = tomllib.loads((CONTAINERD / "config.toml").read_text())
    return config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]


def broker_container() -> dict:
    (ds,) = the("DaemonSet")
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    return container


def broker_policy():
    (cm,) = the("ConfigMap")
    return parse_policy(cm["data"]["policy.toml"], "broker-daemonset.yaml")


def wrapper_args(binary: str) -> list[str]:
    """The graft-runtime command line of a per-tenant wrapper in packaging/containerd (its exec line)."""
    text = (CONTAINERD / binary.rsplit("/", 1)[1]).read_text()
    (line,) = [line for line in text.splitlines() if line.startswith("exec ")]
    args = shlex.split(line)[1:]
    assert args[0].endswith("/bin/graft-runtime") and args[-1] == "$@", args
    return args


@pytest.mark.parametrize("version", VERSIONS)
def test_every_document_validates_against_the_kubernetes_schemas(version):
    docs = documents()
    assert {d["kind"] for d in docs} == {"Namespace", "ConfigMap", "DaemonSet", "RuntimeClass"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validation_is_not_vacuous():
    """A misspelt field and a wrong type are caught, so a pass above means something."""
    (ds,) = the("DaemonSet")
    misspelt = copy.deepcopy(ds)
    misspelt["spec"]["template"]["spec"]["hostNetwrok"] = True
    wrong_type = copy.deepcopy(ds)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["readOnly"] = "yes"
    for bad in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_each_runtimeclass_names_a_packaged_containerd_handler():
    classes = the("RuntimeClass")
    assert {rc["metadata"]["name"] for rc in classes} == {"graft", "graft-web"}
    for rc in classes:
        handler = handlers()[rc["handler"]]
        assert handler["runtime_type"] == "io.containerd.runc.v2"
        # the same nodes as the broker's
        assert rc["scheduling"]["nodeSelector"] == the("DaemonSet")[0]["spec"]["template"]["spec"]["nodeSelector"]


def test_a_per_tenant_class_fixes_a_tenant_of_the_brokers_policy():
    """graft-web: handler graft-web, whose wrapper passes --graft-tenant web; no annotation is let through."""
    (rc,) = [rc for rc in the("RuntimeClass") if "graft.io/tenant" in rc["metadata"]["labels"]]
    tenant = rc["metadata"]["labels"]["graft.io/tenant"]
    assert rc["metadata"]["name"] == rc["handler"] == f"graft-{tenant}"
    handler = handlers()[rc["handler"]]
    assert "pod_annotations" not in handler and "container_annotations" not in handler
    args = wrapper_args(handler["options"]["BinaryName"])
    assert args[args.index("--graft-tenant") + 1] == tenant
    assert args[args.index("--graft-socket-dir") + 1] == str(broker_policy().broker.socket_dir)
    assert tenant in broker_policy().tenants


def test_the_shared_handler_passes_the_graft_annotations():
    assert handlers()["graft"]["pod_annotations"] == handlers()["graft"]["container_annotations"] == ["io.graft.*"]
    assert handlers()["graft"]["options"]["BinaryName"].endswith("/bin/graft-runtime")


def test_the_broker_serves_its_policy_and_shares_its_socket_directory_with_the_node():
    (ds,) = the("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    container = broker_container()
    args = container["args"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # --policy is the file of the ConfigMap, mounted where --policy looks
    policy_mount = next(m for m in mounts.values() if args[args.index("--policy") + 1].startswith(m["mountPath"] + "/"))
    (cm,) = the("ConfigMap")
    assert volumes[policy_mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    assert args[args.index("--policy") + 1] == f"{policy_mount['mountPath']}/policy.toml"
    assert "policy.toml" in cm["data"]
    assert cm["metadata"]["namespace"] == ds["metadata"]["namespace"]
    # the socket directory (tenant sockets, _admin.sock, seccomp.sock) is the node's, at the same path
    socket_dir = args[args.index("--socket-dir") + 1]
    sockets = next(m for m in mounts.values() if m["mountPath"] == socket_dir)
    assert volumes[sockets["name"]]["hostPath"]["path"] == socket_dir == str(broker_policy().broker.socket_dir)
    assert not sockets.get("readOnly", False)
    assert pod["hostNetwork"] and pod["hostPID"] and container["securityContext"]["privileged"]
