"""graft-broker: the command line, signals and the service lifecycle.

    graft-broker --policy FILE [--socket-dir DIR] [--audit-log PATH|stderr|off]
                 [--log-level LEVEL]

Runs in the foreground. A policy that does not validate is refused at start
(exit 2). SIGHUP reloads the policy: on any error the old one stays in force
and the errors are logged. SIGTERM and SIGINT stop the broker cleanly: the
tenant sockets are removed, unless systemd's fd store keeps them for the
next broker (fdstore.py); grafted sockets belong to the apps and live on.
READY=1 / RELOADING=1 / STOPPING=1 go to $NOTIFY_SOCKET for systemd.

Confinement (broker.confinement in the policy; docs/security.md): "auto"
locks grafted sockets with cgroup-BPF when the kernel allows it and logs
which mode is in force; "required" refuses to start (exit 2) without it;
"off" never loads it. It is put in place before anything else is served,
because it moves the broker into its own cgroup.
"""

from __future__ import annotations

import argparse
import logging
import resource
import signal
import sys
from pathlib import Path

import trio

from graft.policy import PolicyError, load_policy

from .confine import lifecycle
from .confine.lifecycle import Confinement
from .core.audit import AuditLog
from .io.fdstore import FdStore
from .io.outlet import LogHandler, Outlet
from .io.sdnotify import sd_notify
from .server import Broker

log = logging.getLogger("graft.broker")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="graft-broker", description="Serve graft tenants under a policy.")
    p.add_argument("--policy", required=True, type=Path, help="policy file (TOML, version 1)")
    p.add_argument("--socket-dir", type=Path, help="directory of the tenant sockets (overrides broker.socket_dir)")
    p.add_argument("--audit-log", help="'stderr', 'off' or a file path (overrides broker.audit_log)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="default: info")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_outlet = Outlet.inherited(2)  # a stalled stderr must not stop the broker (outlet.py)
    handler = LogHandler(log_outlet)
    handler.setFormatter(logging.Formatter("graft-broker: %(levelname)s %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # its debug output is per netlink message
    raise_fd_limit()
    fdstore = FdStore.from_environment()  # first: the passed-in fds must not leak into anything else
    try:
        policy = load_policy(args.policy, check_env=True)
    except PolicyError as e:
        log.error("refusing to start: the policy does not validate\n%s", e)
        return 2
    confinement, status = establish_confinement(policy.broker.confinement)
    if status is not None:
        log.error("%s", status)
        return 2
    socket_dir = args.socket_dir or Path(policy.broker.socket_dir)
    try:
        audit = AuditLog(args.audit_log or policy.broker.audit_log)
    except OSError as e:
        log.error("refusing to start: cannot open the audit log: %s", e)
        return 2
    try:
        trio.run(_serve, policy, socket_dir, audit, args.policy, confinement, fdstore, log_outlet)
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled below
        pass
    finally:
        audit.close()
        log_outlet.close()
        if confinement is not None:
            confinement.close()  # the pins keep programs, map and marks alive for the next broker
    return 0


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every client connection and
    every socket in flight is an fd, and the usual soft limit is 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.debug("RLIMIT_NOFILE raised from %d to %d", soft, hard)


def establish_confinement(mode: str) -> tuple[Confinement | None, str | None]:
    """Put kernel confinement in place as the policy's mode asks.

    Returns (confinement or None, None), or (None, why) when a "required"
    broker must refuse to start. Logs which mode is in force either way.
    """
    if mode == "off":
        log.info('confinement: OFF (policy: confinement = "off"); grafted sockets are not locked by the kernel')
        return None, None
    try:
        confinement = lifecycle.establish()
    except lifecycle.Unavailable as e:
        if mode == "required":
            return None, (
                'refusing to start: confinement = "required" but kernel confinement (cgroup2 + BPF) cannot be '
                f"put in place: {e}"
            )
        log.warning(
            'confinement: OFF (policy: confinement = "auto", and it is unavailable here: %s); grafted sockets '
            "can be re-pointed by raw system calls",
            e,
        )
        return None, None
    log.info("confinement: ON (policy: confinement = %r; %s)", mode, confinement.describe())
    return confinement, None


async def _serve(
    policy,
    socket_dir: Path,
    audit: AuditLog,
    policy_path: Path,
    confinement: Confinement | None = None,
    fdstore: FdStore | None = None,
    log_outlet: Outlet | None = None,
) -> None:
    # The signal receiver exists before READY=1, so an early SIGTERM is a clean stop.
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            # Writers of what waits for a slow reader of the audit log and stderr; cancelled at the stop
            # (close() then tries once more, without blocking).
            nursery.start_soon(audit.run)
            if log_outlet is not None:
                nursery.start_soon(log_outlet.run)
            broker = Broker(policy, socket_dir, audit, confinement=confinement, fdstore=fdstore)
            await nursery.start(broker.run)
            sd_notify("READY=1")
            log.info("ready: %d tenant(s), sockets in %s", len(policy.tenants), socket_dir)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    sd_notify("RELOADING=1")
                    await _reload(broker, policy_path)
                    sd_notify("READY=1")
                else:
                    log.info("stopping on %s", signal.Signals(signum).name)
                    sd_notify("STOPPING=1")
                    nursery.cancel_scope.cancel()
                    break


async def _reload(broker: Broker, policy_path: Path) -> None:
    try:
        policy = load_policy(policy_path, check_env=True)
    except PolicyError as e:
        log.error("reload refused; the old policy stays in force\n%s", e)
        return
    try:
        await broker.reload(policy)
    except (OSError, RuntimeError) as e:
        # Tenants whose listener could not start are not served; the rest
        # run the new policy. The next successful reload completes it.
        log.error("reload applied only in part: %s", e)
        return
    log.info("policy reloaded from %s", policy_path)


if __name__ == "__main__":
    sys.exit(main())
