"""The ``graft`` command: run a program under the shim, and policy tools.

graft run [--seccomp] (--tenant NAME [--socket-dir DIR] | --socket PATH) [--netns NAME|PATH [--no-dns]] -- CMD ...
graft policy check FILE
graft policy schema
graft shim-path [--musl]
graft confinement status|remove
graft status [--socket-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from graft.shim import LIB_PATH

DEFAULT_SOCKET_DIR = "/run/graft"


def _cmd_run(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("graft run: no command given (graft run ... -- CMD ...)", file=sys.stderr)
        return 2
    if args.seccomp:
        return _run_seccomp(args, cmd)
    if not LIB_PATH.exists():
        print(f"graft run: {LIB_PATH} is missing; build the shim first (make build)", file=sys.stderr)
        return 1
    sock = args.socket or os.path.join(args.socket_dir, f"{args.tenant}.sock")
    env = dict(os.environ)
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{LIB_PATH} {preload}".strip()
    env["GRAFT_SOCKET"] = os.path.abspath(sock)
    if args.netns:
        from pyroute2 import netns  # imported here: only this path needs it

        try:
            # flags=0: never create a namespace that is not there.
            netns.setns(args.netns, flags=0)
        except OSError as e:
            print(f"graft run: cannot enter network namespace {args.netns}: {e.strerror or e}", file=sys.stderr)
            return 1
        if args.no_dns:
            env["GRAFT_DNS"] = "off"  # nor does the shim ask for one as it loads
        else:
            from graft.names import use_broker_resolver

            use_broker_resolver(env["GRAFT_SOCKET"], env)  # names, docs/dns.md
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        print(f"graft run: {cmd[0]}: {e.strerror}", file=sys.stderr)
        return 127


def _run_seccomp(args: argparse.Namespace, cmd: list[str]) -> int:
    """No shim: the broker's seccomp agent, next to the tenant socket, answers CMD's socket calls."""
    from graft.broker.seccomp.abi import SECCOMP_SOCKET
    from graft.seccomp_run import run_seccomp

    if args.socket:
        socket_dir, name = os.path.split(os.path.abspath(args.socket))
        if not name.endswith(".sock") or name == SECCOMP_SOCKET:
            print(
                f"graft run: --socket {args.socket} is not a tenant socket <socket_dir>/<tenant>.sock", file=sys.stderr
            )
            return 2
        tenant = name[: -len(".sock")]
    else:
        socket_dir, tenant = args.socket_dir, args.tenant
    # names (docs/dns.md): the program's resolver is asked for from its own namespace, by the
    # process that becomes it, on the tenant's socket.
    resolver_socket = None if args.no_dns or not args.netns else os.path.join(socket_dir, f"{tenant}.sock")
    return run_seccomp(cmd, os.path.join(socket_dir, SECCOMP_SOCKET), tenant, args.netns, resolver_socket)


def _cmd_shim_path(args: argparse.Namespace) -> int:
    """The glibc build's path (the fixed interface), or with --musl the musl build's, for musl images."""
    from graft.shim import MUSL_LIB_PATH

    path = MUSL_LIB_PATH if args.musl else LIB_PATH
    if not path.exists():
        how = "make build, with musl-gcc from musl-tools" if args.musl else "make build"
        print(f"graft shim-path: {path} is missing; build the shim first ({how})", file=sys.stderr)
        return 1
    print(path)
    return 0


def _cmd_policy_check(args: argparse.Namespace) -> int:
    from graft.policy import PolicyError, check_environment, load_policy, summarize

    try:
        policy = load_policy(args.file)
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 1
    print(summarize(policy, str(args.file)))
    # The file may be checked on another machine than the one it is for, so
    # what this machine lacks is a warning here; graft-broker refuses it.
    for issue in check_environment(policy):
        print(f"warning: {issue.loc}: {issue.msg} (on this machine; graft-broker would refuse it)", file=sys.stderr)
    return 0


def _cmd_policy_schema(args: argparse.Namespace) -> int:
    from graft.policy import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _cmd_confinement(args: argparse.Namespace) -> int:
    """List, or detach and unpin, the confinement programs that graft-broker left in bpffs."""
    from graft.broker.confine import lifecycle

    found = lifecycle.installed()
    if not found:
        print("no graft confinement is installed (nothing under <bpffs>/graft)")
        return 0
    for cgroup, pin_dir in found:
        if args.confinement_command == "status":
            print(f"cgroup {cgroup}: pins in {pin_dir}")
            continue
        try:
            for line in lifecycle.remove(cgroup, pin_dir):
                print(line)
        except OSError as e:
            print(f"graft confinement remove: {pin_dir}: {e}", file=sys.stderr)
            return 1
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    """Ask a running broker over its root-only admin socket."""
    from graft.brokerstatus import BrokerUnreachable, read_status

    try:
        status = read_status(args.socket_dir)
    except BrokerUnreachable as e:
        print(f"graft status: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    pol = status["policy"]
    print(
        f"policy version {pol['version']}, generation {pol['generation']} (loaded {pol['loaded_at']})"
        f"  confinement {status['confinement']}"
    )
    audit = status["audit"]
    print(
        f"audit on_error {audit['on_error']}: {audit['lost']} record(s) lost, {audit['refused']} decision(s)"
        f" refused for want of a record, {audit['waiting_bytes']} byte(s) waiting for the reader"
    )
    print(
        f"{'tenant':<20} {'mode':<8} {'live':>6} {'max':>6} {'graft':>8} {'container':>9} {'deny':>7}"
        f" {'error':>6} {'preissued':>9} {'seccomp':>7}  netns"
    )
    for name, t in status["tenants"].items():
        live = f"{t['live_sockets']}{'' if t['live_exact'] else '?'}"
        c = t["counts"]
        print(
            f"{name:<20} {t.get('mode', 'preload'):<8} {live:>6} {t['max_sockets']:>6} {c['graft']:>8}"
            f" {c['container']:>9} {c['deny']:>7} {c['error']:>6} {t.get('preissued', 0):>9}"
            f" {t.get('seccomp_listeners', 0):>7}  {t['netns']}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graft", description="Graft container sockets onto the host network stack.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a command grafted: with the shim preloaded, or in seccomp mode")
    who = run.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", help="tenant name: the socket is SOCKET_DIR/NAME.sock")
    who.add_argument("--socket", help="path of the tenant socket")
    run.add_argument("--socket-dir", default=DEFAULT_SOCKET_DIR, help=f"default: {DEFAULT_SOCKET_DIR}")
    run.add_argument("--netns", help="run the command in this network namespace (name in /run/netns or path)")
    run.add_argument(
        "--no-dns",
        action="store_true",
        help="with --netns: leave the program's resolv.conf alone instead of pointing it at the tenant's resolver",
    )
    run.add_argument(
        "--seccomp",
        action="store_true",
        help="graft with a seccomp filter served by the broker instead of the shim (static programs "
        'too; the tenant must be in mode "seccomp")',
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    run.set_defaults(func=_cmd_run)

    shim = sub.add_parser("shim-path", help="print the path of libgraft.so")
    shim.add_argument("--musl", action="store_true", help="the build for musl images (Alpine), libgraft-musl.so")
    shim.set_defaults(func=_cmd_shim_path)

    pol = sub.add_parser("policy", help="policy file tools").add_subparsers(dest="policy_command", required=True)
    check = pol.add_parser("check", help="validate a policy file and summarise it")
    check.add_argument("file", type=Path)
    check.set_defaults(func=_cmd_policy_check)
    schema = pol.add_parser("schema", help="print the policy's JSON Schema")
    schema.set_defaults(func=_cmd_policy_schema)

    status = sub.add_parser("status", help="a running broker's tenants, live sockets and counters")
    status.add_argument("--socket-dir", default=DEFAULT_SOCKET_DIR, help=f"default: {DEFAULT_SOCKET_DIR}")
    status.add_argument("--json", action="store_true", help="the same, as JSON")
    status.set_defaults(func=_cmd_status)

    conf = sub.add_parser("confinement", help="graft-broker's kernel confinement (BPF) on this host")
    conf_sub = conf.add_subparsers(dest="confinement_command", required=True)
    conf_sub.add_parser("status", help="list installed confinement: cgroups and bpffs pins").set_defaults(
        func=_cmd_confinement
    )
    conf_sub.add_parser(
        "remove", help="detach the programs, unpin them and the map, remove the broker cgroups (stop the broker first)"
    ).set_defaults(func=_cmd_confinement)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "socket_dir", None) != DEFAULT_SOCKET_DIR and getattr(args, "socket", None):
        print("graft run: --socket-dir goes with --tenant, not --socket", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
