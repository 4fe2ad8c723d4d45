"""``graft run --seccomp``: graft one command in seccomp mode, with no container engine.

What a runtime does with ``linux.seccomp.listenerPath``, for one process:

    parent (graft run)                          child
    ──────────────────                          ─────
    fork ─────────────────────────────────────▶ [--netns: setns]
                                                no_new_privs; seccomp filter with a listener
                                                (seccomp_calls.NOTIFIED_SYSCALLS)
          ◀──────────── listener fd number ──── (pipe); waits
    pidfd_getfd the listener
    seccomp.sock: process state + fd (SCM_RIGHTS), as runc sends them
    the broker's answer (one JSON line)
          ───────────── go ───────────────────▶ exec CMD
    wait; exit with CMD's status

The child cannot pass the listener itself: its own sendmsg would stop in
the filter with nobody serving it yet. Until the broker has answered, the
child makes no socket call. If the broker refuses (no such tenant, not in
seccomp mode, no confinement) CMD never runs and graft run exits 1 with
the broker's reason.

Signals: SIGTERM, SIGHUP, SIGUSR1, SIGUSR2 and SIGWINCH sent to graft run
are passed on to CMD. SIGINT and SIGQUIT are ignored here: from a terminal
they reach CMD directly (same process group), and passing them on would
deliver them twice. The exit status is CMD's, or 128 + the signal that
killed it.
"""

from __future__ import annotations

import array
import errno
import os
import signal
import socket
import struct
import sys

from graft.broker.seccomp import abi, syscalls

ANSWER_TIMEOUT = 10.0
# The child's report on the pipe: (step, listener fd number) once done, else (failed step, errno).
_REPORT = struct.Struct("=ii")
_STEP_DONE, _STEP_NETNS, _STEP_FILTER = 0, 1, 2
_FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)


def _say(msg: str) -> None:
    print(f"graft run: {msg}", file=sys.stderr, flush=True)


def run_seccomp(
    cmd: list[str], seccomp_socket: str, tenant: str, netns: str | None, resolver_socket: str | None = None
) -> int:
    try:
        program = abi.notify_filter(abi.native_arch())
    except ValueError as e:
        _say(str(e))
        return 1
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child execs or exits
        os.close(ready_r)
        os.close(go_w)
        _child(cmd, program, netns, ready_w, go_r, resolver_socket)
    os.close(ready_w)
    os.close(go_r)
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    for sig in _FORWARDED:
        signal.signal(sig, lambda signum, _frame: _forward(pid, signum))
    try:
        error = _hand_over(pid, ready_r, seccomp_socket, tenant, netns)
        if error is None:
            os.write(go_w, b"g")
    finally:
        os.close(ready_r)
        os.close(go_w)  # without "g" first, the child exits 1 and CMD never runs
    _, status = os.waitpid(pid, 0)
    if error is not None:
        _say(error)
        return 1
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _forward(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _child(  # pragma: no cover
    cmd: list[str], program: bytes, netns: str | None, ready_w: int, go_r: int, resolver_socket: str | None
) -> None:
    """Install the filter, report its listener, wait for the go, exec. Never returns."""
    step = _STEP_NETNS
    try:
        if netns:
            from pyroute2 import netns as pyroute2_netns

            pyroute2_netns.setns(netns, flags=0)  # flags=0: never create one
        if resolver_socket is not None:  # before the filter: this request is the broker's, not judged
            from graft.names import use_broker_resolver

            use_broker_resolver(resolver_socket)
        step = _STEP_FILTER
        listener = syscalls.install_notify_filter(program)
    except OSError as e:
        os.write(ready_w, _REPORT.pack(step, e.errno or errno.EIO))
        os._exit(1)
    os.write(ready_w, _REPORT.pack(_STEP_DONE, listener))
    os.close(ready_w)
    go = os.read(go_r, 1)
    os.close(listener)  # the broker holds it now; CMD must not
    if go != b"g":
        os._exit(1)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        _say(f"{cmd[0]}: {e.strerror}")
    os._exit(127)


def _hand_over(pid: int, ready_r: int, seccomp_socket: str, tenant: str, netns: str | None) -> str | None:
    """Pass the child's listener to the broker; None once the broker serves it, else why not."""
    raw = os.read(ready_r, _REPORT.size)
    if len(raw) != _REPORT.size:
        return "the child exited before installing its seccomp filter"
    step, number = _REPORT.unpack(raw)
    if step == _STEP_NETNS:
        return f"cannot enter network namespace {netns}: {os.strerror(number)}"
    if step == _STEP_FILTER:
        return f"cannot install the seccomp filter: {os.strerror(number)}"
    try:
        pidfd = syscalls.pidfd_open(pid)
        try:
            listener = syscalls.pidfd_getfd(pidfd, number)
        finally:
            os.close(pidfd)
    except OSError as e:
        return f"cannot take the seccomp listener from the child: {e.strerror}"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as conn:
            conn.settimeout(ANSWER_TIMEOUT)
            conn.connect(seccomp_socket)
            state = abi.encode_process_state(tenant, pid, f"graft-run-{pid}")
            conn.sendmsg([state], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [listener]))])
            answer = b""
            while not answer.endswith(b"\n") and len(answer) < 4096:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                answer += chunk
    except OSError as e:
        return f"no broker's seccomp agent answers at {seccomp_socket}: {e.strerror or e}"
    finally:
        os.close(listener)
    error = abi.decode_answer(answer) if answer else "the broker closed the connection without an answer"
    return None if error is None else f"the broker refused the seccomp listener: {error}"
