"""The fast path's per-socket work in C (libgraft_confine.so, graft_confine.h), through cffi.

Two jobs, each many sockets or records per call into C, because Python's
cost per socket and per record was what held the fast path back
(docs/benchmarks.md):

* ``Issuer.issue``: a batch of pre-issued sockets, made, marked pre-issued,
  guarded against listen() and counted for the tenant's ``max_sockets``,
  as lifecycle.Confinement does one socket at a time for grafted sockets.
  core/grants.py issues them for both front-ends (the shim's pools and the
  seccomp loop's), which hand a batch on in one sendmsg.
* ``KernelAudit.drain``: the kernel's records of connects it judged on the
  fast path (the events ring), as audit lines, byte for byte what
  audit.Record.to_json writes; Python says what each grant id and rule id
  is called.

Nothing here decides: how many sockets, for whom, with which grant id, and
what a record names, are the callers'.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

from ..io.cheader import ffi_of, lazy_library
from . import maps

HEADER = Path(__file__).with_name("graft_confine.h")
LIBRARY = Path(__file__).with_name("libgraft_confine.so")

ffi = ffi_of(HEADER, "CONFINE")
_consts = ffi.dlopen(None)  # only for the #define constants
EMPTY, FULL, HELD = _consts.GRAFT_KAUDIT_EMPTY, _consts.GRAFT_KAUDIT_FULL, _consts.GRAFT_KAUDIT_HELD


class Unavailable(Exception):
    """The library is not there (not built) or does not load."""


library = lazy_library(ffi, LIBRARY, Unavailable)  # libgraft_confine.so, loaded once


# ---- pre-issued sockets ---------------------------------------------------------


class Batch:
    """Sockets graft_issue made: the broker's copies of their fds, until close()."""

    __slots__ = ("_fds", "n", "stamped")

    def __init__(self, fds=None, n: int = 0, stamped: bool = False):
        self._fds = fds
        self.n = n
        self.stamped = stamped  # the kernel marked and counted them as it made them (else C did)

    def __len__(self) -> int:
        return self.n

    def fds(self) -> list[int]:
        return list(self._fds[0 : self.n]) if self.n else []

    def close(self) -> None:
        """Close the broker's copies (sent or not): one call for the batch."""
        if self.n:
            library().graft_issue_close(self._fds, self.n)
            self.n = 0


NONE = Batch()  # what a refusal hands out


class IssueError(OSError):
    """None of the batch is handed out; ``counted``: how many of them the kernel counts (it counts their closes)."""

    def __init__(self, err: int, message: str, counted: int):
        super().__init__(err, message)
        self.counted = counted


class LockError(IssueError):
    """The sockets were made but could not be marked or counted (none is handed out)."""


# The initial pid namespace's inode number (the kernel's PROC_PID_INIT_INO): only there do
# getpid() and gettid() give the pid_tgid the kernel's programs see, which a stamp is keyed by.
_INIT_PID_NS = 0xEFFFFFFC


def in_initial_pid_namespace() -> bool:
    try:
        return os.stat("/proc/self/ns/pid").st_ino == _INIT_PID_NS
    except OSError:
        return False


class Issuer:
    """graft_issue for one confinement's maps and listen guard."""

    def __init__(self, marks_fd: int, guard_fd: int, counts_fd: int, stamps_fd: int = -1):
        """stamps_fd: the stamps map, through which the kernel marks and counts the sockets (-1: from C, per socket)."""
        self._lib = library()
        self._fds = (marks_fd, guard_fd, counts_fd, stamps_fd if in_initial_pid_namespace() else -1)

    def issue(self, family: int, type: int, proto: int, n: int, owner_uid: int, grant_id: int, count_id: int) -> Batch:
        """n sockets, marked pre-issued for grant_id and counted under count_id; all or none (IssueError).

        Runs in the calling thread, which must be in the tenant's network
        namespace (core/netns.py runs it there); threads may call it at once.
        """
        marks_fd, guard_fd, counts_fd, stamps_fd = self._fds
        config = ffi.new(
            "struct graft_issue_config *",
            {
                "family": family,
                "type": type,
                "protocol": proto,
                "owner_uid": owner_uid,
                "marks_fd": marks_fd,
                "guard_fd": guard_fd,
                "counts_fd": counts_fd,
                "count_id": count_id,
                "stamps_fd": stamps_fd,
            },
        )
        ffi.memmove(config.mark, maps.encode_preissued_mark(grant_id), maps.MARK_SIZE)
        fds = ffi.new("int[]", n)
        rc = self._lib.graft_issue(config, n, fds)
        if rc < 0:
            if config.failed_locking:
                raise LockError(-rc, f"cannot lock pre-issued sockets: {os.strerror(-rc)}", config.counted)
            if rc == -errno.EPERM and owner_uid:
                raise IssueError(errno.EPERM, f"cannot create sockets owned by uid {owner_uid}", config.counted)
            raise IssueError(-rc, f"cannot make sockets: {os.strerror(-rc)}", config.counted)
        return Batch(fds, n, bool(config.stamped))


# ---- the kernel's audit records ---------------------------------------------------


class KernelAudit:
    """The consumer of the events ring (BPF_MAP_TYPE_RINGBUF), writing audit lines in C (kaudit.c).

    The ring's layout is the kernel's; kaudit.c describes it.
    """

    BUFFER = 1 << 16  # bytes of lines per drain call: ~270 records, a fraction of a millisecond

    def __init__(self, consumer, producer, size: int, closing=()):
        """consumer: the ring's first page (writable); producer: its second page, then the data area twice.

        Buffers, so that tests can lay out a ring of their own; ``mapped`` maps the kernel's.
        closing: what close() closes after it lets go of the buffers.
        """
        self._lib = library()
        page = mmap.PAGESIZE
        self._closing = list(closing)
        self._views = [ffi.from_buffer("uint64_t[]", consumer), ffi.from_buffer("uint8_t[]", producer)]
        cons, prod = self._views
        self._k = ffi.new("struct graft_kaudit *")
        self._k.consumer = cons
        self._k.producer = ffi.cast("uint64_t *", prod)
        self._k.data = prod + page
        self._k.mask = size - 1
        self._keep: list = []  # what the C struct points to (set_names)
        self._out = ffi.new("char[]", self.BUFFER)
        self._lines = ffi.new("uint32_t *")
        self._stop = ffi.new("int *")
        self._held = ffi.new("char[]", maps.EVENT_SIZE)
        self.set_names([], [], "off")

    def set_names(self, tenants: list[tuple[int, bool, str]], rules: list[str], confinement: str) -> None:
        """What records are written with: (grant id, left to Python, tenant name as JSON); rules as JSON.

        Counts of records written so far (``take_written``) are dropped: take them first.
        """
        tenants = sorted(tenants)
        names = [ffi.new("char[]", name.encode()) for _, _, name in tenants]
        table = ffi.new(
            "struct graft_kaudit_tenant[]",
            [{"gid": gid, "to_python": int(py), "name": nm} for (gid, py, _), nm in zip(tenants, names, strict=True)],
        )
        rule_strings = [ffi.new("char[]", r.encode()) for r in rules]
        rule_table = ffi.new("char *[]", rule_strings)
        conf = ffi.new("char[]", confinement.encode())
        self._keep = [names, rule_strings, rule_table, conf]
        self._tenants = table
        self._k.tenants, self._k.n_tenants = table, len(tenants)
        self._k.rules, self._k.n_rules = rule_table, len(rules)
        self._k.confinement = conf

    def take_written(self) -> dict[int, int]:
        """Records written per grant id since the last call."""
        out = {}
        for i in range(self._k.n_tenants):
            t = self._tenants[i]
            if t.written:
                out[t.gid] = t.written
                t.written = 0
        return out

    def drain(self):
        """Yield (lines as bytes, how many, or None) and (None, 0, raw event) for each record Python must write.

        In the ring's order; what is yielded is consumed.
        """
        while True:
            used = self._lib.graft_kaudit_drain(self._k, self._out, self.BUFFER, self._lines, self._stop, self._held)
            if used:
                yield bytes(ffi.buffer(self._out, used)), self._lines[0], None
            if self._stop[0] == HELD:
                yield None, 0, bytes(ffi.buffer(self._held, maps.EVENT_SIZE))
            elif self._stop[0] == EMPTY:
                return
            elif not used:  # FULL with nothing written: a line longer than the buffer, which none is
                raise RuntimeError("an audit line longer than the drain's buffer")

    @classmethod
    def mapped(cls, map_fd: int, size: int) -> KernelAudit:
        """The reader of the kernel's ring map_fd (BPF_MAP_TYPE_RINGBUF of size bytes, a power of two)."""
        page = mmap.PAGESIZE
        consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            producer = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            consumer.close()
            raise
        return cls(consumer, producer, size, closing=(consumer, producer))

    def close(self) -> None:
        for view in self._views:
            ffi.release(view)
        self._views = []
        for m in self._closing:
            m.close()
