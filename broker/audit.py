"""The audit log: one JSON object per line, for every request the broker judges.

Fields are fixed by the design (ts, tenant, pid, uid, op, proto, family, addr,
port, host_addr, action, rule, errno); ``confinement`` says whether the
socket was locked by the kernel, and ``reason`` is added when a request was
refused as malformed or failed on the host, so an operator sees why.

Each record is one write(2) of a whole line, unbuffered, so `tail -f` and
log shippers see each decision at once and lines never interleave.

A record that cannot be written (disk full, a closed stderr) is dropped and
counted, with an error logged at most once a minute: an unwritable audit log
must not stop container networking, and the operator hears about it.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime, timezone

log = logging.getLogger("graft.broker")
DROP_REPORT_INTERVAL = 60.0


class AuditLog:
    """Writes audit records to stderr, a file (appended), or nowhere."""

    def __init__(self, target: str):
        self.target = target
        self._fd: int | None = None
        self._owned = False
        self.dropped = 0
        self._reported_at = float("-inf")
        if target == "stderr":
            self._fd = sys.stderr.fileno()
        elif target != "off":
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._owned = True

    def write(self, **record) -> None:
        if self._fd is None:
            return
        ts = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        line = (json.dumps({"ts": ts, **record}, separators=(",", ":")) + "\n").encode()
        try:
            while line:  # a pipe may take less than a whole line (beyond PIPE_BUF)
                line = line[os.write(self._fd, line):]
        except OSError as e:
            self.dropped += 1
            now = time.monotonic()
            if now - self._reported_at >= DROP_REPORT_INTERVAL:
                self._reported_at = now
                log.error("audit log %s: cannot write (%s); %d record(s) dropped so far", self.target, e,
                          self.dropped)

    def close(self) -> None:
        if self._owned and self._fd is not None:
            os.close(self._fd)
        self._fd = None
