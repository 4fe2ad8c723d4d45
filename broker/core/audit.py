"""The audit log: one JSON object per line, for every request the broker judges.

Fields are fixed by the design (ts, tenant, pid, uid, op, proto, family, addr,
port, host_addr, action, rule, errno); ``confinement`` says whether the
socket was locked by the kernel, ``via`` which front-end asked, and
``reason`` is added when a request was refused as malformed or failed on the
host, so an operator sees why.

Each record is one whole line, written at once when the reader has room,
so `tail -f` and log shippers see each decision at once and lines never
interleave. Writes never block the broker (outlet.py): a stalled reader
makes records wait in memory, in order, up to a bound.

A record that cannot be recorded (no room left, disk full, a closed stderr)
is lost and counted, with an error logged at most once a minute, and
``write()`` says so: the policy's ``[audit] on_error`` decides what that
costs. "drop" (the default): networking goes on, the operator hears about
it. "deny": the decision is refused (decisions.py, docs/policy.md).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import trio

from ..io.outlet import DEFAULT_LIMIT, Outlet

log = logging.getLogger("graft.broker")
DROP_REPORT_INTERVAL = 60.0


_OPTIONAL = frozenset(("reason", "name", "qtype", "answers", "upstream_ms"))  # not written when None
_encode = json.JSONEncoder(separators=(",", ":")).encode  # one encoder: json.dumps makes one per call


def json_string(text: str) -> str:
    """text as the records write it (for lines made elsewhere: the kernel's, confine/fastpath.py)."""
    return _encode(text)


@dataclass(frozen=True, slots=True)
class Record:
    """One audit record: the design's fixed fields, in the order they are written, then ``reason``.

    ``addr``/``port`` are the request's (None for a preissue, which names
    none, and for a request too malformed to read); ``host_addr`` the host
    address used when it differs from the request's.
    """

    tenant: str | None  # None: judged in the kernel by a grant of an earlier broker
    pid: int | None  # None: a DNS query, which names an address, not a process
    uid: int | None
    op: str | None
    proto: str | None
    family: str | None
    addr: str | None
    port: int | None
    host_addr: str | None
    action: str  # "graft" | "container" | "deny" | "error"
    rule: str | None
    errno: int
    confinement: str  # "on" | "off"
    via: str  # "shim" | "seccomp" | "kernel" | "resolver"
    reason: str | None = None  # written only when there is one (not None, not empty)
    # A DNS query's ("op": "dns"), written only for those: the name and type asked, the
    # addresses answered ([] for none or a refusal), and how long the upstream took (0: cached).
    # `name` also on a connect a rule's `names` decided: the name its destination came from.
    name: str | None = None
    qtype: str | None = None
    answers: list[str] | None = None
    upstream_ms: float | None = None

    def to_json(self, ts: str) -> bytes:
        fields = {"ts": ts}
        for name in self.__slots__:  # in order: the fixed fields, then those written only when set
            value = getattr(self, name)
            if value is not None or name not in _OPTIONAL:
                fields[name] = value
        if not self.reason:
            fields.pop("reason", None)
        return (_encode(fields) + "\n").encode()


class AuditLog:
    """Writes audit records to stderr, a file (appended), or nowhere."""

    def __init__(self, target: str, limit: int = DEFAULT_LIMIT):
        self.target = target
        self._reported_at = float("-inf")
        if target == "stderr":
            self._out: Outlet | None = Outlet.inherited(2, limit)
        elif target == "off":
            self._out = None
        else:
            self._out = Outlet.open_path(target, limit)

    @property
    def lost(self) -> int:
        """Records that could not be recorded since the start."""
        return self._out.lost if self._out is not None else 0

    @property
    def waiting(self) -> int:
        """Bytes of records waiting for a slow reader."""
        return self._out.waiting if self._out is not None else 0

    def write(self, record: Record) -> bool:
        """Record a decision: True once it is written or waits for the reader, False if it is lost."""
        if self._out is None:
            return True
        return self._offer(record.to_json(datetime.now(UTC).isoformat(timespec="microseconds")), 1)

    def write_lines(self, lines: bytes, n: int) -> bool:
        """n records already laid out as Record.to_json does (the kernel's: confine/fastpath.py), at once.

        All are written or wait for the reader (True), or all are lost and counted (False).
        """
        if self._out is None:
            return True
        return self._offer(lines, n)

    def _offer(self, line: bytes, n: int) -> bool:
        assert self._out is not None
        try:
            if self._out.offer(line, n):
                return True
            why = f"the reader is not keeping up ({self._out.waiting // 1024} KiB waiting)"
        except OSError as e:
            why = str(e)
        now = time.monotonic()
        if now - self._reported_at >= DROP_REPORT_INTERVAL:
            self._reported_at = now
            log.error("audit log %s: cannot record (%s); %d record(s) lost so far", self.target, why, self.lost)
        return False

    async def run(self) -> None:
        """Write waiting records as the reader makes room (a task of the broker's nursery)."""
        if self._out is None:
            await trio.sleep_forever()
        await self._out.run()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
        self._out = None
