"""graft/oci.py and graft-runtime's command-line parsing, on plain data (no runtime, no broker)."""

from __future__ import annotations

import copy
import re

import pytest

from graft import oci, runtime
from graft.broker.seccomp.calls import NOTIFIED_SYSCALLS

LIB = "/opt/graft/libgraft.so"


def config(**annotations) -> dict:
    c = {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "env": ["PATH=/usr/bin:/bin", "TERM=xterm"]},
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": "network"}]},
    }
    if annotations:
        c["annotations"] = {k.replace("_", "."): v for k, v in annotations.items()}
    return c


def request(tenant="web", socket_dir="/run/graft") -> oci.Request:
    return oci.Request(tenant, socket_dir)


def env_of(c: dict, name: str) -> list[str]:
    return [e.split("=", 1)[1] for e in c["process"]["env"] if e.startswith(name + "=")]


# ---- annotations ------------------------------------------------------------------


def test_no_annotation_is_no_request():
    assert oci.requested(config()) is None
    assert oci.requested({**config(), "annotations": {"org.example": "x"}}) is None


def test_annotation_with_default_and_explicit_socket_dir():
    c = config()
    c["annotations"] = {oci.TENANT_ANNOTATION: "web"}
    assert oci.requested(c) == oci.Request("web", "/run/graft")
    c["annotations"][oci.SOCKET_DIR_ANNOTATION] = "/srv/graft/"
    r = oci.requested(c)
    assert r == oci.Request("web", "/srv/graft")
    assert r.tenant_socket == "/srv/graft/web.sock" and r.seccomp_listener == "/srv/graft/seccomp.sock"


@pytest.mark.parametrize(
    "annotations, message",
    [
        ({oci.TENANT_ANNOTATION: ""}, "is not a tenant name"),
        ({oci.TENANT_ANNOTATION: "../etc/x"}, "is not a tenant name"),
        ({oci.TENANT_ANNOTATION: ".."}, "is not a tenant name"),
        ({oci.TENANT_ANNOTATION: "web", oci.SOCKET_DIR_ANNOTATION: "run/graft"}, "is not an absolute path"),
    ],
)
def test_bad_annotations(annotations, message):
    c = config()
    c["annotations"] = annotations
    with pytest.raises(oci.BundleError, match=message):
        oci.requested(c)


# ---- the operator's flags against the container's annotations (--graft-tenant, --graft-socket-dir) ----

T, D = oci.TENANT_ANNOTATION, oci.SOCKET_DIR_ANNOTATION


@pytest.mark.parametrize(
    "annotations, tenant, socket_dir, expected",
    [
        ({}, "web", None, oci.Request("web", "/run/graft")),  # no annotation: grafted all the same
        ({}, "web", "/srv/graft/", oci.Request("web", "/srv/graft")),
        ({T: "web"}, "web", None, oci.Request("web", "/run/graft")),  # the same tenant: fine
        ({T: "web", D: "/srv/graft"}, "web", "/srv//graft", oci.Request("web", "/srv/graft")),  # the same directory
        ({D: "/run/graft/"}, "web", None, oci.Request("web", "/run/graft")),  # the flag's default, named
        ({T: "db"}, None, "/srv/graft", oci.Request("db", "/srv/graft")),  # a directory flag alone pins the broker
        ({}, None, "/srv/graft", None),  # ... and grafts nothing by itself
        ({T: "db", D: "/srv/graft"}, None, None, oci.Request("db", "/srv/graft")),  # no flags: annotations decide
    ],
)
def test_the_operators_flags_and_the_annotations(annotations, tenant, socket_dir, expected):
    assert oci.requested({**config(), "annotations": annotations}, tenant, socket_dir) == expected


@pytest.mark.parametrize(
    "annotations, tenant, socket_dir, message",
    [
        ({T: "db"}, "web", None, "io.graft.tenant='db' names another tenant than this runtime's --graft-tenant web"),
        ({T: "db"}, "web", "/srv/graft", "cannot choose its own tenant"),
        ({D: "/tmp/mine"}, "web", None, "names another broker than this runtime's socket directory /run/graft"),
        ({T: "web", D: "/tmp/mine"}, None, "/srv/graft", "than this runtime's socket directory /srv/graft"),
        ({T: "../x"}, "web", None, "is not a tenant name"),  # a bad annotation is refused as such, flag or not
        ({D: "tmp"}, "web", None, "is not an absolute path"),
    ],
)
def test_an_annotation_against_the_operators_flags_is_refused(annotations, tenant, socket_dir, message):
    with pytest.raises(oci.BundleError, match=re.escape(message)):
        oci.requested({**config(), "annotations": annotations}, tenant, socket_dir)


def test_annotations_of_another_type_are_none_under_a_tenant_flag():
    assert oci.requested({**config(), "annotations": ["x"]}, "web") == oci.Request("web", "/run/graft")


# ---- the broker's word on the tenant ------------------------------------------------------


def status(mode="preload", confinement="on", socket="/run/graft/web.sock", **extra) -> dict:
    tenant = {"socket": socket, "mode": mode, "netns": "host", **extra}
    if mode is None:
        del tenant["mode"]
    return {"policy": {"version": 1}, "confinement": confinement, "tenants": {"web": tenant, "db": {}}}


@pytest.mark.parametrize("mode", oci.MODES)
def test_mode_from_status(mode):
    assert oci.mode_from_status(status(mode), request()) == mode


def test_preload_needs_no_confinement():
    assert oci.mode_from_status(status("preload", confinement="off"), request()) == "preload"


@pytest.mark.parametrize(
    "st, req, message",
    [
        (
            status(),
            request("api"),
            r"tenant 'api' is not in the policy of the broker at /run/graft \(its tenants: db, ",
        ),
        (
            status(socket="/run/graft2/web.sock"),
            request(),
            "serves it at /run/graft2/web.sock, not /run/graft/web.sock",
        ),
        (status(mode=None), request(), "does not report tenant modes"),
        (status("seccomp", confinement="off"), request(), "seccomp mode, which needs kernel confinement"),
    ],
)
def test_status_that_cannot_graft(st, req, message):
    with pytest.raises(oci.BundleError, match=message):
        oci.mode_from_status(st, req)


# ---- preload mode ---------------------------------------------------------------


def test_preload_mounts_and_env():
    before = config()
    c = oci.graft_config(before, request(), "preload", LIB)
    assert before == config(), "the input is not modified"
    lib, sock = c["mounts"][-2:]
    assert lib == {
        "destination": oci.CONTAINER_LIB,
        "type": "bind",
        "source": LIB,
        "options": ["bind", "ro", "nosuid", "nodev"],
    }
    assert sock == {
        "destination": "/run/graft/graft.sock",
        "type": "bind",
        "source": "/run/graft/web.sock",
        "options": ["bind", "ro", "nosuid", "nodev", "noexec"],
    }
    assert c["mounts"][0] == before["mounts"][0]
    assert env_of(c, "LD_PRELOAD") == [oci.CONTAINER_LIB]
    assert "seccomp" not in c["linux"]


def test_preload_keeps_an_existing_ld_preload_after_the_shim():
    c = config()
    c["process"]["env"] += ["LD_PRELOAD=/usr/lib/libjemalloc.so:/usr/lib/libx.so", "LD_PRELOAD="]
    out = oci.graft_config(c, request(), "preload", LIB)
    # every entry: ld.so honours the last one, getenv() the first
    assert env_of(out, "LD_PRELOAD") == [
        f"{oci.CONTAINER_LIB} /usr/lib/libjemalloc.so:/usr/lib/libx.so",
        oci.CONTAINER_LIB,
    ]


def test_process_without_env():
    c = config()
    del c["process"]["env"]
    assert oci.graft_config(c, request(), "preload", LIB)["process"]["env"] == [f"LD_PRELOAD={oci.CONTAINER_LIB}"]


def test_a_mount_at_the_same_destination_is_replaced():
    c = config()
    c["mounts"].append({"destination": "/run/graft/graft.sock/", "type": "bind", "source": "/elsewhere.sock"})
    out = oci.graft_config(c, request(), "preload", LIB)
    assert [m["source"] for m in out["mounts"] if m["destination"].startswith("/run/graft/graft.sock")] == [
        "/run/graft/web.sock"
    ]


@pytest.mark.parametrize("mode", oci.MODES)
def test_grafting_twice_changes_nothing(mode):
    c = config()
    c["process"]["env"].append("LD_PRELOAD=/usr/lib/libx.so")
    c["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": ["read", "connect", "bind", "sendto", "sendmsg"], "action": "SCMP_ACT_ALLOW"}],
    }
    once = oci.graft_config(c, request(), mode, LIB)
    assert oci.graft_config(once, request(), mode, LIB) == once


@pytest.mark.parametrize(
    "profile",
    [
        None,
        {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["ptrace"], "action": "SCMP_ACT_ERRNO"}]},
        {
            "defaultAction": "SCMP_ACT_ERRNO",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["read", *NOTIFIED_SYSCALLS], "action": "SCMP_ACT_ALLOW"}],
        },
    ],
)
def test_a_mode_change_undoes_the_other_modes_edits(profile):
    c = config()
    c["process"]["env"].append("LD_PRELOAD=/usr/lib/libx.so")
    if profile:
        c["linux"]["seccomp"] = copy.deepcopy(profile)
    preload = oci.graft_config(c, request(), "preload", LIB)
    seccomp = oci.graft_config(c, request(), "seccomp", LIB)
    assert oci.graft_config(preload, request(), "seccomp", LIB) == seccomp
    back = oci.graft_config(seccomp, request(), "preload", LIB)
    assert back["process"] == preload["process"]
    if profile is None or profile["defaultAction"] == "SCMP_ACT_ALLOW":
        assert back == preload
    else:  # the same filter, its allow rule split in two
        assert back["linux"]["seccomp"]["syscalls"] == [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
            {"names": list(NOTIFIED_SYSCALLS), "action": "SCMP_ACT_ALLOW"},
        ]


def test_seccomp_mode_drops_only_the_shim_from_ld_preload():
    c = config()
    c["process"]["env"] += ["LD_PRELOAD=/run/graft/libgraft.so:/usr/lib/libx.so", "LD_PRELOAD=/run/graft/libgraft.so"]
    out = oci.graft_config(c, request(), "seccomp", LIB)
    assert env_of(out, "LD_PRELOAD") == ["/usr/lib/libx.so"]


def test_unknown_mode_is_refused():
    with pytest.raises(oci.BundleError, match="mode 'ebpf'"):
        oci.graft_config(config(), request(), "ebpf", LIB)


# ---- seccomp mode ---------------------------------------------------------------------


def notify_rules(default_permissive: bool = True) -> list[dict]:
    """The socket calls notified, but a sendto with a NULL destination (send(2)) never, and allowed explicitly
    under a refusing default."""
    out = [
        {"names": [n for n in NOTIFIED_SYSCALLS if n != "sendto"], "action": "SCMP_ACT_NOTIFY"},
        {"names": ["sendto"], "action": "SCMP_ACT_NOTIFY", "args": [{"index": 4, "value": 0, "op": "SCMP_CMP_NE"}]},
    ]
    if not default_permissive:
        out.append(
            {"names": ["sendto"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 4, "value": 0, "op": "SCMP_CMP_EQ"}]}
        )
    return out


def test_seccomp_mode_without_a_profile():
    c = oci.graft_config(config(), request(), "seccomp", LIB)
    assert c["linux"]["seccomp"] == {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": notify_rules(),
        "listenerPath": "/run/graft/seccomp.sock",
        "listenerMetadata": "web",
    }
    assert env_of(c, "LD_PRELOAD") == [], "seccomp mode does not preload the shim"
    assert [m["destination"] for m in c["mounts"][-2:]] == [oci.CONTAINER_LIB, oci.CONTAINER_SOCKET]


def test_seccomp_extends_an_engine_profile():
    """The shape of podman's and Docker's default: deny by default, a long allow list, arch list, flags."""
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 38,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "flags": ["SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
        "syscalls": [
            {"names": ["accept", "bind", "connect", "read"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["sendmsg", "sendto"], "action": "SCMP_ACT_LOG"},
            {"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}]},
            {"names": ["ptrace"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
        ],
    }
    c = config()
    c["linux"]["seccomp"] = copy.deepcopy(profile)
    out = oci.graft_config(c, request(), "seccomp", LIB)["linux"]["seccomp"]
    for key in ("defaultAction", "defaultErrnoRet", "architectures", "flags"):
        assert out[key] == profile[key]
    assert out["syscalls"] == [
        {"names": ["accept", "read"], "action": "SCMP_ACT_ALLOW"},
        profile["syscalls"][2],
        profile["syscalls"][3],
        *notify_rules(default_permissive=False),
    ]
    assert (out["listenerPath"], out["listenerMetadata"]) == ("/run/graft/seccomp.sock", "web")


@pytest.mark.parametrize(
    "profile, message",
    [
        (
            {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["connect"], "action": "SCMP_ACT_ERRNO"}]},
            r"syscalls\[0\]\) sets SCMP_ACT_ERRNO for connect",
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
                    {"names": ["bind", "sendto"], "action": "SCMP_ACT_KILL"},
                ],
            },
            r"syscalls\[1\]\) sets SCMP_ACT_KILL for bind, sendto",
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {
                        "names": ["sendto"],
                        "action": "SCMP_ACT_ALLOW",
                        "args": [{"index": 3, "value": 0, "op": "SCMP_CMP_EQ"}],
                    }
                ],
            },
            "SCMP_ACT_ALLOW with argument conditions for sendto",
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [{"names": ["connect", "bind"], "action": "SCMP_ACT_ALLOW"}],
            },
            r"refuses sendmsg, sendto \(defaultAction SCMP_ACT_ERRNO\)",
        ),
        (
            {"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/bypass4netns.sock"},
            "already has a listener, /run/bypass4netns.sock",
        ),
        ({"defaultAction": "SCMP_ACT_NOTIFY", "listenerPath": "/run/graft/seccomp.sock"}, "notifies on every call"),
    ],
)
def test_seccomp_profiles_that_grafting_would_widen_are_refused(profile, message):
    c = config()
    c["linux"]["seccomp"] = profile
    with pytest.raises(oci.BundleError, match=message):
        oci.graft_config(c, request(), "seccomp", LIB)


def test_seccomp_regraft_for_another_tenant_names_it():
    once = oci.graft_config(config(), request("web"), "seccomp", LIB)
    again = oci.graft_config(once, request("db"), "seccomp", LIB)
    assert again["linux"]["seccomp"]["listenerMetadata"] == "db"
    assert again["linux"]["seccomp"]["syscalls"] == notify_rules()
    assert again["mounts"][-1]["source"] == "/run/graft/db.sock"


# ---- graft-runtime's command line ------------------------------------------------------


@pytest.mark.parametrize(
    "argv, command, bundle, real_args",
    [
        (
            [
                "--root",
                "/r",
                "--log",
                "/l.json",
                "--log-format=json",
                "--systemd-cgroup",
                "create",
                "--bundle",
                "/b",
                "--pid-file",
                "/p",
                "id1",
            ],
            "create",
            "/b",
            None,
        ),
        (["run", "-d", "--console-socket", "/c.sock", "-b=/b2", "id"], "run", "/b2", None),
        (["-root=/r", "run", "--pid-file", "--bundle", "id"], "run", None, None),  # "--bundle" is the pid file here
        (["create", "id"], "create", None, None),
        (["--graft-runtime", "/usr/bin/runc", "--debug", "state", "id"], "state", None, ["--debug", "state", "id"]),
        (
            ["--graft-runtime=/x/crun", "--cgroup-manager", "disabled", "delete", "--force", "id"],
            "delete",
            None,
            ["--cgroup-manager", "disabled", "delete", "--force", "id"],
        ),
        (["--version"], None, None, None),
    ],
)
def test_parse(argv, command, bundle, real_args):
    inv = runtime.parse(argv)
    assert (inv.command, inv.bundle) == (command, bundle)
    assert inv.args == (real_args if real_args is not None else argv)


def test_parse_finds_cruns_config_file():
    inv = runtime.parse(["run", "-f", "alt.json", "--bundle=/b", "id"])
    assert (inv.bundle, inv.config) == ("/b", "alt.json")
    assert runtime.parse(["create", "--config=/c.json", "id"]).config == "/c.json"


def test_parse_finds_the_log_engines_read():
    inv = runtime.parse(["--log", "/run/x/log.json", "--log-format", "json", "create", "id"])
    assert (inv.log, inv.log_format) == ("/run/x/log.json", "json")
    assert runtime.parse(["--graft-runtime", "/usr/bin/runc", "kill", "id"]).runtime == "/usr/bin/runc"


@pytest.mark.parametrize(
    "argv",
    [
        ["--graft-tenant", "web", "--graft-socket-dir", "/srv/graft", "--root", "/r", "create", "id"],
        ["--graft-tenant=web", "--root=/r", "--graft-socket-dir=/srv/graft", "create", "id"],
    ],
)
def test_parse_takes_the_tenant_flags_out(argv):
    inv = runtime.parse(argv)
    assert (inv.tenant, inv.socket_dir, inv.command) == ("web", "/srv/graft", "create")
    assert [a for a in inv.args if "graft" in a] == [], "the real runtime would refuse graft's own flags"


def test_graft_flags_after_the_command_are_the_commands():
    """Only the global flags, before the command, are ours: what follows it is the real runtime's."""
    inv = runtime.parse(["create", "--graft-tenant", "web", "id"])
    assert inv.tenant is None and inv.args == ["create", "--graft-tenant", "web", "id"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--graft-tenant", "../web"], "--graft-tenant '../web' is not a tenant name"),
        (["--graft-tenant="], "--graft-tenant '' is not a tenant name"),
        (["--graft-socket-dir", "run/graft"], "--graft-socket-dir 'run/graft' is not an absolute path"),
    ],
)
def test_bad_tenant_flags(flags, message):
    with pytest.raises(runtime.UsageError, match=re.escape(message)):
        runtime.operator_request(runtime.parse([*flags, "create", "id"]))


def test_operator_request_normalises_the_directory():
    inv = runtime.parse(["--graft-tenant", "web", "--graft-socket-dir", "/srv//graft/", "run", "id"])
    assert runtime.operator_request(inv) == ("web", "/srv/graft")
    assert runtime.operator_request(runtime.parse(["run", "id"])) == (None, None)


@pytest.mark.parametrize(
    "argv", [["--root"], ["create", "--bundle"], ["--graft-runtime"], ["--graft-tenant"], ["--graft-socket-dir"]]
)
def test_parse_missing_values(argv):
    with pytest.raises(runtime.UsageError, match="needs a value"):
        runtime.parse(argv)


# ---- names (docs/dns.md) ------------------------------------------------------------


def status_with(resolver: str | None) -> dict:
    tenant = {"socket": "/run/graft/web.sock", "mode": "preload"}
    if resolver is not None:
        tenant["resolver"] = resolver
    return {"tenants": {"web": tenant}}


def test_the_resolver_comes_from_the_brokers_status():
    assert oci.resolver_from_status(status_with("127.0.0.11"), request()) == "127.0.0.11"
    assert oci.resolver_from_status(status_with("off"), request()) is None
    assert oci.resolver_from_status(status_with(None), request()) is None  # a broker older than names


def test_the_engines_resolv_conf_is_its_mount_over_the_file_else_the_images():
    c = config()
    assert oci.engine_resolv_conf(c, "/b/rootfs") == "/b/rootfs/etc/resolv.conf"
    c["mounts"].append({"destination": "/etc/resolv.conf", "type": "bind", "source": "/var/lib/e/resolv.conf"})
    assert oci.engine_resolv_conf(c, "/b/rootfs") == "/var/lib/e/resolv.conf"


def test_the_resolv_conf_mount_replaces_the_engines_and_goes_when_the_resolver_is_off():
    c = config(io_graft_tenant="web")
    c["mounts"].append({"destination": "/etc/resolv.conf", "type": "bind", "source": "/var/lib/e/resolv.conf"})
    ours = "/b/" + oci.BUNDLE_RESOLV_CONF
    grafted = oci.graft_config(c, request(), "preload", LIB, ours)
    at = [m for m in grafted["mounts"] if m["destination"] == "/etc/resolv.conf"]
    assert at == [{"destination": "/etc/resolv.conf", "type": "bind", "source": ours, "options": at[0]["options"]}]
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(at[0]["options"])
    assert oci.graft_config(grafted, request(), "preload", LIB, ours) == grafted  # run again: nothing piles up
    off = oci.graft_config(grafted, request(), "preload", LIB, None)
    assert not [m for m in off["mounts"] if m["destination"] == "/etc/resolv.conf"]
    untouched = oci.graft_config(c, request(), "preload", LIB, None)  # the engine's own mount stays
    assert [m["source"] for m in untouched["mounts"] if m["destination"] == "/etc/resolv.conf"] == [
        "/var/lib/e/resolv.conf"
    ]
