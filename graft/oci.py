"""What graft-runtime changes in an OCI bundle's config.json, as pure functions.

graft-runtime (graft/runtime.py) reads a bundle's config, asks the broker
for its status, and hands both to ``mode_from_status`` and ``graft_config``
here; this module does no I/O, so every edit is unit-tested on plain dicts
(tests/unit/test_oci_config.py). The edits, for a bundle annotated
``io.graft.tenant=<name>`` (docs/containers.md):

- read-only bind mounts of libgraft.so at /run/graft/libgraft.so and of the
  tenant's socket <socket_dir>/<name>.sock at /run/graft/graft.sock, the
  shim's default GRAFT_SOCKET;
- names (docs/dns.md), unless the tenant's resolver is "off": a read-only
  bind mount over /etc/resolv.conf of a file graft-runtime writes next to
  config.json, naming the tenant's resolver and keeping the engine's
  ``search``, ``domain`` and ``options`` lines;
- preload mode: LD_PRELOAD names the shim first, before anything the image
  already preloads;
- seccomp mode: no LD_PRELOAD (every socket call traps to the broker anyway,
  so the shim would only add a round trip), and a ``linux.seccomp`` rule that
  notifies on graft.broker.seccomp.calls.NOTIFIED_SYSCALLS, with the broker's
  seccomp agent as listener. A profile already in the bundle is kept and
  extended; see ``_notify_seccomp`` for how rules on the same system calls
  are reconciled.

Applying the edits to an already grafted config changes nothing, so a bundle
that is run again (as runc users do) does not pile up mounts; if its tenant's
mode changed in between, the other mode's edits are undone first.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass

from graft.broker.seccomp.abi import SECCOMP_SOCKET, SENDTO_DEST_ARG
from graft.broker.seccomp.calls import NOTIFIED_SYSCALLS
from graft.cli import DEFAULT_SOCKET_DIR

TENANT_ANNOTATION = "io.graft.tenant"
SOCKET_DIR_ANNOTATION = "io.graft.socket-dir"

# Inside the container. /run/graft/graft.sock is the shim's default GRAFT_SOCKET,
# so the environment needs no GRAFT_SOCKET; the library sits next to it because
# /run is a tmpfs in most engines' containers, where a mount point can always be made.
CONTAINER_SOCKET = "/run/graft/graft.sock"
CONTAINER_LIB = "/run/graft/libgraft.so"
RESOLV_CONF = "/etc/resolv.conf"
BUNDLE_RESOLV_CONF = "graft-resolv.conf"  # in the bundle: it lives and goes with the container

MODES = ("preload", "seccomp")
NOTIFY = "SCMP_ACT_NOTIFY"
# Actions that let a call through: replacing them with a notification takes
# nothing away, because the broker lets through ("container") whatever its
# policy does not graft or deny.
PERMISSIVE = ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG")

_LD_SEPARATORS = re.compile(r"[: ]+")  # ld.so splits LD_PRELOAD on colons and spaces


class BundleError(ValueError):
    """The bundle cannot be grafted as it is; the message is one line for the operator."""


@dataclass(frozen=True)
class Request:
    """What a bundle's annotations ask for."""

    tenant: str
    socket_dir: str

    @property
    def tenant_socket(self) -> str:
        return os.path.join(self.socket_dir, f"{self.tenant}.sock")

    @property
    def seccomp_listener(self) -> str:
        return os.path.join(self.socket_dir, SECCOMP_SOCKET)


def is_tenant_name(value: object) -> bool:
    """A name that can only mean <socket_dir>/<name>.sock: no path of its own, no way out of the directory."""
    return isinstance(value, str) and bool(value) and "/" not in value and value not in (".", "..")


def requested(config: dict, tenant: str | None = None, socket_dir: str | None = None) -> Request | None:
    """The tenant and socket directory to graft config for, or None to leave it alone.

    tenant, socket_dir: the operator's, from graft-runtime's own flags
    --graft-tenant and --graft-socket-dir (docs/containers.md, "One runtime
    per tenant"); graft-runtime has checked them. The annotations are the
    container's: whoever writes its config. So the operator's word wins:

    - with a tenant flag, every bundle is grafted for it; an annotation
      naming another tenant is refused (a container does not choose its
      tenant against the runtime it was given), the same one is fine;
    - the socket directory is the flag's, else (without a tenant flag) the
      annotation's, else /run/graft. An annotation naming another directory
      than the operator's is refused, not ignored: it would pick another
      broker, and so another policy. Without either flag the annotations
      decide, as before there were flags.
    """
    annotations = config.get("annotations")
    if not isinstance(annotations, dict):
        annotations = {}
    # The operator's directory: the flag's; a tenant flag without one means the default.
    operator_dir = socket_dir if socket_dir is not None or tenant is None else DEFAULT_SOCKET_DIR
    if TENANT_ANNOTATION in annotations:
        named = annotations[TENANT_ANNOTATION]
        if not is_tenant_name(named):
            raise BundleError(f"annotation {TENANT_ANNOTATION}={named!r} is not a tenant name")
        if tenant is not None and named != tenant:
            raise BundleError(
                f"annotation {TENANT_ANNOTATION}={named!r} names another tenant than this runtime's "
                f"--graft-tenant {tenant}; a container cannot choose its own tenant"
            )
        tenant = named
    if tenant is None:
        return None
    chosen = annotations.get(SOCKET_DIR_ANNOTATION)
    if chosen is not None:
        # Relative to what? The runtime's working directory is the engine's choice.
        if not isinstance(chosen, str) or not os.path.isabs(chosen):
            raise BundleError(f"annotation {SOCKET_DIR_ANNOTATION}={chosen!r} is not an absolute path")
        if operator_dir is not None and os.path.normpath(chosen) != os.path.normpath(operator_dir):
            raise BundleError(
                f"annotation {SOCKET_DIR_ANNOTATION}={chosen!r} names another broker than this runtime's "
                f"socket directory {operator_dir}; a container cannot choose its own broker"
            )
    return Request(tenant, os.path.normpath(operator_dir or chosen or DEFAULT_SOCKET_DIR))


def mode_from_status(status: dict, request: Request) -> str:
    """The mode of request's tenant, from its broker's status document (graft status --json).

    Refuses what would start a container that graft cannot serve: a tenant
    the broker does not know, a socket the broker does not serve at the path
    that would be mounted, and a seccomp-mode tenant of a broker without
    confinement (its agent refuses every listener then, docs/policy.md).
    """
    tenant = status["tenants"].get(request.tenant)
    if tenant is None:
        known = ", ".join(sorted(status["tenants"])) or "none"
        raise BundleError(
            f"tenant {request.tenant!r} is not in the policy of the broker at "
            f"{request.socket_dir} (its tenants: {known})"
        )
    # The mount source must be the socket the broker serves, not merely a file of
    # that name (realpath: /var/run/graft and /run/graft are one directory on Debian).
    served = str(tenant.get("socket", ""))
    if os.path.realpath(served) != os.path.realpath(request.tenant_socket):
        raise BundleError(
            f"tenant {request.tenant!r}: the broker at {request.socket_dir} serves it at "
            f"{served}, not {request.tenant_socket}"
        )
    if "mode" not in tenant:
        raise BundleError(
            f"tenant {request.tenant!r}: the broker at {request.socket_dir} does not report "
            "tenant modes; it is older than this graft-runtime"
        )
    mode = tenant["mode"]
    if mode == "seccomp" and status.get("confinement") != "on":
        raise BundleError(
            f"tenant {request.tenant!r} is in seccomp mode, which needs kernel confinement, "
            f"and the broker at {request.socket_dir} runs without it"
        )
    return mode


def resolver_from_status(status: dict, request: Request) -> str | None:
    """The address of request's tenant's resolver (docs/dns.md), None if it has none ("off", or an older broker)."""
    resolver = status["tenants"][request.tenant].get("resolver", "off")
    return None if resolver == "off" else str(resolver)


def engine_resolv_conf(config: dict, rootfs: str) -> str:
    """Where the container's resolv.conf would come from: the engine's mount over it, else the root filesystem's."""
    for mount in reversed(config.get("mounts", [])):
        if os.path.normpath(mount.get("destination", "")) == RESOLV_CONF and mount.get("type") in ("bind", None):
            return str(mount.get("source", ""))
    return os.path.join(rootfs, RESOLV_CONF.lstrip("/"))


def graft_config(config: dict, request: Request, mode: str, lib_path: str, resolv_conf: str | None = None) -> dict:
    """A copy of config, grafted for request's tenant in mode, with the shim at lib_path on the host.

    resolv_conf: a file on the host naming the tenant's resolver, mounted
    over the container's /etc/resolv.conf (None: the engine's stays).
    """
    if mode not in MODES:
        raise BundleError(f"tenant {request.tenant!r} has mode {mode!r}, which this graft-runtime does not know")
    out = copy.deepcopy(config)
    _bind_read_only(out, lib_path, CONTAINER_LIB, noexec=False)  # it is mapped executable
    _bind_read_only(out, request.tenant_socket, CONTAINER_SOCKET, noexec=True)
    if resolv_conf is not None:
        _bind_read_only(out, resolv_conf, RESOLV_CONF, noexec=True)
    else:  # the tenant's resolver is off now: a mount of graft's own file from an earlier graft goes
        out["mounts"] = [m for m in out.get("mounts", []) if not _graft_resolv_conf(m)]
    env = out.setdefault("process", {}).setdefault("env", [])
    linux = out.setdefault("linux", {})
    if mode == "preload":
        _preload(env)
        # A bundle grafted before in seccomp mode (its tenant's mode changed since): the
        # broker takes no listener of a preload tenant, so a rule left here would fail every call.
        _drop_notify(linux, request.seccomp_listener)
    else:
        _unpreload(env)
        linux["seccomp"] = _notify_seccomp(linux.get("seccomp"), request.seccomp_listener, request.tenant)
    if not linux:
        del out["linux"]
    return out


def _graft_resolv_conf(mount: dict) -> bool:
    return os.path.normpath(mount.get("destination", "")) == RESOLV_CONF and (
        os.path.basename(str(mount.get("source", ""))) == BUNDLE_RESOLV_CONF
    )


def _bind_read_only(config: dict, source: str, destination: str, noexec: bool) -> None:
    """Mount source at destination, last (over anything above it), replacing a mount already there."""
    mounts = [m for m in config.get("mounts", []) if os.path.normpath(m.get("destination", "")) != destination]
    options = ["bind", "ro", "nosuid", "nodev"] + (["noexec"] if noexec else [])
    mounts.append({"destination": destination, "type": "bind", "source": source, "options": options})
    config["mounts"] = mounts


def _preload(env: list[str]) -> None:
    """Put the shim first in every LD_PRELOAD of env (ld.so honours the last), or add one."""
    found = False
    for i, entry in enumerate(env):
        if not entry.startswith("LD_PRELOAD="):
            continue
        found = True
        value = entry[len("LD_PRELOAD=") :]
        if CONTAINER_LIB not in _LD_SEPARATORS.split(value):
            env[i] = f"LD_PRELOAD={CONTAINER_LIB} {value}".rstrip()
    if not found:
        env.append(f"LD_PRELOAD={CONTAINER_LIB}")


def _unpreload(env: list[str]) -> None:
    """Take the shim out of every LD_PRELOAD of env (dropping one left empty)."""
    for i, entry in reversed(list(enumerate(env))):
        if not entry.startswith("LD_PRELOAD="):
            continue
        items = _LD_SEPARATORS.split(entry[len("LD_PRELOAD=") :])
        if CONTAINER_LIB not in items:
            continue
        rest = " ".join(item for item in items if item and item != CONTAINER_LIB)
        if rest:
            env[i] = f"LD_PRELOAD={rest}"
        else:
            del env[i]


def notify_rules(default_permissive: bool) -> list[dict]:
    """graft's rules: notify the broker of the socket calls, but not of a sendto with no destination.

    A send(2) is a sendto with a NULL address: the data path of every
    connected socket. The filter can test that argument (it cannot look
    behind a pointer, so sendmsg is always notified), and a send then costs
    no round trip to the broker. Under a default that refuses, such a
    sendto is allowed explicitly (_notify_seccomp has checked the profile
    allowed sendto).
    """
    destination = {"index": SENDTO_DEST_ARG, "value": 0}
    rules = [
        {"names": [n for n in NOTIFIED_SYSCALLS if n != "sendto"], "action": NOTIFY},
        {"names": ["sendto"], "action": NOTIFY, "args": [{**destination, "op": "SCMP_CMP_NE"}]},
    ]
    if not default_permissive:
        rules.append({"names": ["sendto"], "action": "SCMP_ACT_ALLOW", "args": [{**destination, "op": "SCMP_CMP_EQ"}]})
    return rules


def _drop_notify(linux: dict, listener: str) -> None:
    """Undo _notify_seccomp: the profile as it was, give or take rule order and a split rule."""
    profile = linux.get("seccomp")
    if not profile or profile.get("listenerPath") != listener:
        return
    permissive = profile.get("defaultAction") in PERMISSIVE
    ours = notify_rules(permissive)
    rules = [r for r in profile.get("syscalls") or [] if r not in ours]
    if not permissive:
        rules.append({"names": list(NOTIFIED_SYSCALLS), "action": "SCMP_ACT_ALLOW"})  # allowed, or refused
    rest = {k: v for k, v in profile.items() if k not in ("listenerPath", "listenerMetadata", "syscalls")}
    if rules:
        rest["syscalls"] = rules
    if rest == {"defaultAction": "SCMP_ACT_ALLOW"}:
        del linux["seccomp"]  # the allow-all profile _notify_seccomp made for a bundle without one
    else:
        linux["seccomp"] = rest


def _notify_seccomp(profile: dict | None, listener: str, tenant: str) -> dict:
    """profile (or an allow-all one) extended to notify listener on the socket calls.

    A filter has one action per system call. runc 1.1 and crun 1.8 (libseccomp
    2.5) accept two unconditional rules for one call without a word, and which
    one then applies depends on their actions and order (measured: with ERRNO
    and NOTIFY rules for connect, the first one wins). So a notified call
    leaves every other rule, and never depends on that resolution:

    - a call an unconditional ALLOW or LOG rule lets through is taken out of
      that rule (and a rule left with no name is dropped): notifying instead
      narrows nothing, since the broker lets through what its policy does not
      graft or deny;
    - a call a rule denies, kills, traps or traces, a call a rule constrains
      by its arguments, and a call the default action refuses when no rule
      allows it: grafting it would widen the profile, so the bundle is
      refused with the call and the rule named; the operator decides;
    - a profile with a listener of its own (another seccomp agent) is refused
      too: a container has one listener.

    Our own earlier NOTIFY rule is recognised by its listener and replaced,
    which keeps grafting idempotent.
    """
    if profile is None:
        # Native architecture only (the runtime's default): a call made through
        # another ABI gets the filter's bad-architecture action, never a free pass.
        profile = {"defaultAction": "SCMP_ACT_ALLOW"}
    out = dict(profile)
    other = out.get("listenerPath")
    if other not in (None, "", listener):
        raise BundleError(f"the bundle's seccomp profile already has a listener, {other}; graft needs its own")
    default = out.get("defaultAction")
    if default == NOTIFY:
        raise BundleError("the bundle's seccomp profile notifies on every call (defaultAction SCMP_ACT_NOTIFY)")
    ours = set(NOTIFIED_SYSCALLS)
    allowed: set[str] = set()
    kept = []
    earlier = notify_rules(True) + notify_rules(False)  # ours, from grafting this bundle before
    for index, rule in enumerate(out.get("syscalls") or []):
        names = rule.get("names") or []
        clash = ours.intersection(names)
        if not clash:
            kept.append(rule)
            continue
        if rule in earlier:
            allowed |= clash  # replaced below
            continue
        action = rule.get("action")
        if action not in (*PERMISSIVE, NOTIFY) or rule.get("args"):
            how = f"{action} with argument conditions" if rule.get("args") else action
            raise BundleError(
                f"the bundle's seccomp profile (syscalls[{index}]) sets {how} for "
                f"{', '.join(sorted(clash))}; graft's seccomp mode must notify on it"
            )
        allowed |= clash
        rest = [n for n in names if n not in ours]
        if rest:
            kept.append({**rule, "names": rest})
    if default not in PERMISSIVE and allowed != ours:
        refused = ", ".join(sorted(ours - allowed))
        raise BundleError(
            f"the bundle's seccomp profile refuses {refused} (defaultAction {default}); grafting would allow it"
        )
    kept += notify_rules(default in PERMISSIVE)
    out["syscalls"] = kept
    out["listenerPath"] = listener
    out["listenerMetadata"] = tenant
    return out
