"""graft-runtime: an OCI runtime that grafts containers, then execs the real one.

    graft-runtime [--graft-runtime PATH] [--graft-tenant NAME] [--graft-socket-dir DIR]
                  [runtime global flags] COMMAND [ARGS ...]

Engines run it in place of runc or crun (docs/containers.md shows how each
is told to). Every command goes to the real runtime unchanged, by execv, so
exit codes, signals, stdio, the console socket and pid files are the real
runtime's own. Our three flags come before the command and are never passed on.

The real runtime is ``--graft-runtime PATH``, else $GRAFT_RUNTIME, taken as
named; else a default that can run containers here: runc when the parent
is containerd's runc shim (which runs us as its "runc binary"), otherwise
the first of crun, runc on PATH, passing over crun where it refuses every
container (a hybrid cgroup layout, graft/cgroups.py).

Only ``create`` and ``run`` are looked at, of a bundle to be grafted: every
bundle when the operator registered the runtime with ``--graft-tenant`` (one
runtime name per tenant), else one whose config.json carries the annotation
io.graft.tenant. The operator's flags win over the container's annotations:
an annotation naming another tenant or socket directory is refused
(oci.requested). The tenant is checked with the broker first (it must be up
and know the tenant, whose mode decides the edits), the shim build that
matches the image's C library is picked (glibc or musl, graft/imagecheck.py),
then config.json is replaced atomically by the grafted one (graft/oci.py),
and, unless the tenant's resolver is off, the container's resolv.conf naming
it is written next to it (docs/dns.md: the broker serves the resolver in the
container's namespace as its programs load the shim, or, in seccomp mode, at
their first query). Any failure is one line on stderr (and in the runtime log
engines read, if one was given) and exit 1 before the real runtime is
called, so no container starts half grafted. A bundle that is not to be
grafted is never written to.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field

PROG = "graft-runtime"
ENV_RUNTIME = "GRAFT_RUNTIME"
DEFAULT_RUNTIMES = ("crun", "runc")
GRAFTED_COMMANDS = ("create", "run")

# Global flags of runc and crun that take a value, as `--flag VALUE` or `--flag=VALUE` (names
# without dashes: urfave/cli, which runc uses, takes -flag as well as --flag). Every other
# global flag is taken for a switch; the first word that is no flag is the command.
GLOBAL_VALUE_FLAGS = frozenset({"root", "log", "log-format", "criu", "rootless", "cgroup-manager"})
# graft-runtime's own global flags (never passed on), and the Invocation field each sets.
OWN_FLAGS = {"graft-runtime": "runtime", "graft-tenant": "tenant", "graft-socket-dir": "socket_dir"}
# create/run flags that take a value. The bundle is --bundle/-b, default the working
# directory; its config is config.json in it, or crun's --config/-f (relative to the cwd).
COMMAND_VALUE_FLAGS = frozenset({"bundle", "b", "config", "f", "console-socket", "pid-file", "preserve-fds"})


class UsageError(Exception):
    pass


@dataclass
class Invocation:
    """One graft-runtime command line, split into what is ours and what the real runtime gets."""

    runtime: str | None = None  # --graft-runtime
    tenant: str | None = None  # --graft-tenant: every create/run bundle is grafted for it
    socket_dir: str | None = None  # --graft-socket-dir: the operator's broker
    args: list[str] = field(default_factory=list)  # for the real runtime, in order
    command: str | None = None
    log: str | None = None  # the real runtime's --log, where engines look for errors
    log_format: str = "text"
    bundle: str | None = None  # create/run only: --bundle, or None for the cwd
    config: str | None = None  # create/run only: crun's --config, or None


def _is_flag(word: str) -> bool:
    return word.startswith("-") and word != "--"


def _name(word: str) -> str:
    """A flag's name without dashes or value: `--root=/x` -> `root`."""
    return word.split("=", 1)[0].lstrip("-")


def _flag_value(args: list[str], i: int) -> tuple[str, int]:
    """(value, index of the next word) for the `--flag=V` or `--flag V` at i."""
    if "=" in args[i]:
        return args[i].split("=", 1)[1], i + 1
    if i + 1 >= len(args):
        raise UsageError(f"{args[i]} needs a value")
    return args[i + 1], i + 2


def parse(argv: list[str]) -> Invocation:
    inv = Invocation()
    i = 0
    while i < len(argv) and _is_flag(argv[i]):
        name = _name(argv[i])
        if name in OWN_FLAGS:
            value, i = _flag_value(argv, i)
            setattr(inv, OWN_FLAGS[name], value)
            continue
        if name in GLOBAL_VALUE_FLAGS:
            value, nxt = _flag_value(argv, i)
            if name == "log":
                inv.log = value
            elif name == "log-format":
                inv.log_format = value
            inv.args += argv[i:nxt]
            i = nxt
            continue
        inv.args.append(argv[i])
        i += 1
    inv.args += argv[i:]
    if i < len(argv) and argv[i] != "--":
        inv.command = argv[i]
    if inv.command in GRAFTED_COMMANDS:
        _command_paths(inv, argv[i + 1 :])
    return inv


def _command_paths(inv: Invocation, args: list[str]) -> None:
    """inv.bundle and inv.config from create/run's own flags (args: after the command)."""
    i = 0
    while i < len(args) and _is_flag(args[i]):
        name = _name(args[i])
        if name not in COMMAND_VALUE_FLAGS:
            i += 1
            continue
        value, i = _flag_value(args, i)
        if name in ("bundle", "b"):
            inv.bundle = value
        elif name in ("config", "f"):
            inv.config = value


def called_by_containerd_shim(parent: str) -> bool:
    """Whether parent (the parent process's program name) is containerd's runc shim, which runs us as its runc.

    containerd-shim-runc-v2 (and the older containerd-shim and
    containerd-shim-runc-v1) start the "runc binary" as a child process of
    their own, with go-runc; Docker's containers run under the same shim. The
    parent's executable says so whatever the engine's paths and options
    (--root, --log and the namespace are all configurable); a wrapper script
    that execs graft-runtime keeps that parent.
    """
    return parent.startswith("containerd-shim")


def parent_program() -> str:
    """The file name of the parent process's executable (its comm, cut to 15 bytes, if that cannot be read)."""
    ppid = os.getppid()
    try:
        return os.path.basename(os.readlink(f"/proc/{ppid}/exe"))
    except OSError:
        try:
            with open(f"/proc/{ppid}/comm") as f:
                return f.read().strip()
        except OSError:
            return ""


def default_runtimes(under_containerd_shim: bool) -> tuple[str, ...]:
    """The runtimes to try when none is named: only runc for containerd's runc shim, which speaks runc's CLI."""
    return ("runc",) if under_containerd_shim else DEFAULT_RUNTIMES


def real_runtime(explicit: str | None) -> str:
    """The runtime to exec: --graft-runtime, $GRAFT_RUNTIME, else the first default that can run containers here.

    A runtime the operator names is taken as it is, crun on a hybrid host
    included: it may be a wrapper that deals with that (as the tests' is).
    The defaults pass over crun where it refuses every container
    (graft/cgroups.py), so that no container goes to a runtime that cannot run it.
    """
    from graft.cgroups import CRUN_UNIFIED, crun_refuses_host

    wanted = explicit or os.environ.get(ENV_RUNTIME)
    under_shim = False
    if wanted:
        candidates = [wanted]
    else:
        under_shim = called_by_containerd_shim(parent_program())
        candidates = list(default_runtimes(under_shim))
    passed_over = []
    for name in candidates:
        path = shutil.which(name)
        if path is None:
            continue
        path = os.path.abspath(path)
        if not wanted and name == "crun" and crun_refuses_host():
            passed_over.append(
                f"crun refuses every container on this host's hybrid cgroup layout "
                f"(a cgroup2 with controllers at {CRUN_UNIFIED})"
            )
            continue
        # graft-runtime installed as "runc", or $GRAFT_RUNTIME naming itself, would exec itself forever.
        me = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
        if os.path.realpath(path) == me:
            raise UsageError(f"the real runtime {path} is graft-runtime itself")
        return path
    if wanted:
        raise UsageError(
            f"real runtime {wanted!r} is not an executable (from "
            f"{'--graft-runtime' if explicit else '$' + ENV_RUNTIME})"
        )
    missing = [n for n in candidates if shutil.which(n) is None]
    why = [f"called by {parent_program()} as its runc binary"] if under_shim else []
    why += passed_over
    if missing:
        why.append(f"{missing[0]} is not on PATH" if len(missing) == 1 else f"none of {', '.join(missing)} is on PATH")
    raise UsageError(f"no real runtime: {', and '.join(why)}; name one with --graft-runtime PATH or ${ENV_RUNTIME}")


def operator_request(inv: Invocation) -> tuple[str | None, str | None]:
    """The checked --graft-tenant and --graft-socket-dir: (tenant or None, normalised socket directory or None)."""
    from graft.oci import is_tenant_name

    if inv.tenant is not None and not is_tenant_name(inv.tenant):
        raise UsageError(f"--graft-tenant {inv.tenant!r} is not a tenant name")
    if inv.socket_dir is None:
        return inv.tenant, None
    # Relative to what? The working directory is the engine's choice.
    if not os.path.isabs(inv.socket_dir):
        raise UsageError(f"--graft-socket-dir {inv.socket_dir!r} is not an absolute path")
    return inv.tenant, os.path.normpath(inv.socket_dir)


def prepare_bundle(bundle: str, path: str, tenant: str | None = None, socket_dir: str | None = None) -> None:
    """Graft the bundle's config at path in place if it names a tenant, or tenant is given; leave it alone otherwise.

    tenant, socket_dir: the operator's --graft-tenant and --graft-socket-dir (oci.requested).
    """
    from graft import imagecheck, oci
    from graft.brokerstatus import BrokerUnreachable, read_status
    from graft.shim import LIB_PATH, MUSL_LIB_PATH

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return  # the real runtime reports a missing or unreadable config in its own words
    try:
        config = json.loads(raw)
    except ValueError as e:
        if tenant is None and oci.TENANT_ANNOTATION.encode() not in raw:
            return
        raise oci.BundleError(f"{path}: not valid JSON, and it is to be grafted: {e}") from None
    if not isinstance(config, dict):
        if tenant is None:
            return  # the real runtime reports it
        raise oci.BundleError(f"{path}: not a JSON object, and it is to be grafted")
    if (request := oci.requested(config, tenant, socket_dir)) is None:
        return
    try:
        status = read_status(request.socket_dir)
    except BrokerUnreachable as e:
        raise oci.BundleError(f"tenant {request.tenant!r}: {e}") from None
    if not LIB_PATH.exists():
        raise oci.BundleError(f"{LIB_PATH} is missing; build the shim first (make build)")
    try:
        mode = oci.mode_from_status(status, request)
        rootfs = os.path.join(bundle, config["root"]["path"])
        # The build matching the image's C library; seccomp mode mounts it too (nothing preloads
        # it there), so that a container looks the same from inside in either mode.
        shim, why = imagecheck.choose(rootfs, str(LIB_PATH), str(MUSL_LIB_PATH))
        if mode == "preload" and why:
            raise oci.BundleError(f"tenant {request.tenant!r} is in preload mode, but {why}")
        resolv_conf = None
        if (resolver := oci.resolver_from_status(status, request)) is not None:
            resolv_conf = _write_resolv_conf(bundle, oci.engine_resolv_conf(config, rootfs), resolver)
        grafted = oci.graft_config(config, request, mode, shim, resolv_conf)
    except (AttributeError, TypeError, KeyError) as e:
        # A field of another type than the OCI spec's (or the broker's status) says.
        raise oci.BundleError(
            f"{path} or the broker's status has an unexpected shape: {type(e).__name__}: {e}"
        ) from None
    if grafted != config:
        _replace(path, json.dumps(grafted, indent=2).encode() + b"\n")


def _write_resolv_conf(bundle: str, engine_file: str, resolver: str) -> str:
    """The container's resolv.conf, naming the tenant's resolver, written into the bundle; its path.

    The engine's file (or the image's) gives the search, domain and options
    lines. The image's is read without following a symbolic link: it is the
    image's to point anywhere, and this runs as root on the host.
    """
    from graft.names import resolv_conf_text
    from graft.oci import BUNDLE_RESOLV_CONF

    original = ""
    try:
        fd = os.open(engine_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                original = f.read(64 * 1024).decode("utf-8", "replace")
    except OSError:
        pass  # none, or a link: the resolver alone
    path = os.path.join(os.path.abspath(bundle), BUNDLE_RESOLV_CONF)
    ours = resolv_conf_text(original, resolver).encode()
    try:
        with open(path, "rb") as f:
            if f.read() == ours:
                return path  # a bundle run again: the file a container of it may have mounted stays as it is
    except OSError:
        pass
    _replace(path, ours, mode=0o644)
    return path


def _replace(path: str, data: bytes, mode: int | None = None) -> None:
    """Write path atomically: the real runtime reads either the old file or the whole new one.

    mode: a new file's (None: path exists, and keeps its owner and mode).
    """
    directory = os.path.dirname(path) or "."
    st = os.stat(path) if mode is None else None
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.graft-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if st is not None:
                os.fchown(f.fileno(), st.st_uid, st.st_gid)  # the engine's file stays the engine's
            os.fchmod(f.fileno(), st.st_mode & 0o7777 if st is not None else mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _fail(inv: Invocation, message: str) -> int:
    """One line on stderr, and in the runtime log: containerd and podman report the last error there."""
    line = f"{PROG}: {message}"
    print(line, file=sys.stderr)
    if inv.log:
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if inv.log_format == "json":
            record = json.dumps({"level": "error", "msg": line, "time": ts})
        else:
            record = f"time={json.dumps(ts)} level=error msg={json.dumps(line)}"
        try:
            with open(inv.log, "a") as f:
                f.write(record + "\n")
        except OSError:
            pass  # stderr has it
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        inv = parse(argv)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    try:
        runtime = real_runtime(inv.runtime)
        # Checked where they are used: a bad flag must not keep `delete` from cleaning up.
        tenant, socket_dir = operator_request(inv) if inv.command in GRAFTED_COMMANDS else (None, None)
    except UsageError as e:
        return _fail(inv, str(e))
    if inv.command in GRAFTED_COMMANDS:
        from graft.oci import BundleError

        bundle = inv.bundle or os.getcwd()
        config = os.path.abspath(inv.config) if inv.config else os.path.join(bundle, "config.json")
        try:
            prepare_bundle(bundle, config, tenant, socket_dir)
        except BundleError as e:
            return _fail(inv, f"bundle {bundle}: {e}")
        except OSError as e:
            return _fail(inv, f"bundle {bundle}: cannot graft {config}: {e}")
    try:
        os.execv(runtime, [runtime, *inv.args])
    except OSError as e:
        return _fail(inv, f"cannot run {runtime}: {e.strerror}")


if __name__ == "__main__":
    sys.exit(main())
