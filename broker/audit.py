"""The audit log: one JSON object per line, for every request the broker judges.

Fields are fixed by the design (ts, tenant, pid, uid, op, proto, family, addr,
port, host_addr, action, rule, errno); ``reason`` is added when a request was
refused as malformed or failed on the host, so an operator sees why.
"""
from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import TextIO


class AuditLog:
    """Writes audit records to stderr, a file (appended), or nowhere."""

    def __init__(self, target: str):
        self.target = target
        self._stream: TextIO | None
        self._owned = False
        if target == "off":
            self._stream = None
        elif target == "stderr":
            self._stream = sys.stderr
        else:
            self._stream = open(target, "a", buffering=1, encoding="utf-8")
            self._owned = True

    def write(self, **record) -> None:
        if self._stream is None:
            return
        record = {"ts": datetime.now(timezone.utc).isoformat(timespec="microseconds"), **record}
        self._stream.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._owned and self._stream is not None:
            self._stream.close()
        self._stream = None
