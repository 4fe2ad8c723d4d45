"""What the tests of real programs share: one-tenant policies, and a program run with readiness on its output.

Used by e2e/test_real_apps.py (dynamically linked programs, through the shim) and
e2e/test_static_apps.py (static programs, in seccomp mode).
"""

from __future__ import annotations

import json
import queue
import re
import shlex
import signal
import subprocess
import threading
import time
from contextlib import contextmanager

READY_TIMEOUT = 20.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def rules(*, connect: list[dict] = (), bind: list[dict] = (), default: str = "deny") -> str:
    """A one-tenant policy ("t"); each rule is a dict of TOML keys."""

    def value(v):
        return json.dumps(v)  # a JSON string/int/list of them is valid TOML

    text = f'version = 1\n[tenants.t]\ndefault = "{default}"\n'
    for kind, items in (("connect", connect), ("bind", bind)):
        for rule in items:
            text += f"[[tenants.t.{kind}]]\n" + "".join(f"{k} = {value(v)}\n" for k, v in rule.items())
    return text


def loopback_connect(port: int, proto: str = "tcp", action: str = "graft") -> dict:
    return {"to": ["127.0.0.1/32", "::1/128"], "ports": [port], "proto": proto, "action": action}


def publish(port: int, host: str, addr: str = "0.0.0.0/32", proto: str = "tcp", action: str = "graft") -> dict:
    rule = {"addr": [addr], "ports": [port], "proto": proto, "action": action}
    if host:
        rule["host"] = host
    return rule


class Running:
    """A program started with its stdout+stderr on a pipe that a thread drains line by line.

    `expect(regex)` waits for a matching line with a deadline, and fails at once
    if the program exits first: a readiness wait guarded by liveness, with no sleep.
    """

    def __init__(self, cmd: list[str], env: dict | None = None, stdin: bool = False):
        self.cmd = cmd
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        for raw in self.proc.stdout:
            line = ANSI.sub("", raw.decode(errors="replace"))
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)  # EOF: the program closed its output (exited)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return "".join(self.lines)

    def expect(self, pattern: str, timeout: float = READY_TIMEOUT) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no /{pattern}/ within {timeout} s:\n{self.output()}") from None
            if line is None:
                self._queue.put(None)
                raise AssertionError(
                    f"{shlex.join(self.cmd)}\nended (exit {self.proc.poll()}) before printing "
                    f"/{pattern}/:\n{self.output()}"
                )
            if m := regex.search(line):
                return m

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdin:
            self.proc.stdin.close()
        self._reader.join(timeout=10)
        return self.proc.returncode


@contextmanager
def running(cmd: list[str], env: dict | None = None, stdin: bool = False):
    r = Running(cmd, env=env, stdin=stdin)
    try:
        yield r
    finally:
        r.stop()
