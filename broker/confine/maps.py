"""What confinement keeps in the kernel, as bytes: the maps' layouts and their codec.

Pure (no system calls). The layouts are graft_maps.h's, read through
cffi, so the C loop and the broker share one definition: the mark a
grafted socket carries in the
``marks`` SK_STORAGE map, the ``grants`` of the connect fast path, the
``events`` ring's audit records, and the shapes of the other maps
(``MAPS``). The programs (programs.py) read the same layouts; confine/lifecycle.py
creates, pins and updates the maps.
"""

from __future__ import annotations

import functools
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from ..io.cheader import ffi_of
from . import bpf

HEADER = Path(__file__).with_name("graft_maps.h")
ffi = ffi_of(HEADER, "MAPS")  # the layouts, as the compiler lays them out for the C loop too
_consts = ffi.dlopen(None)  # only for the #define constants

MARK_SIZE = ffi.sizeof("struct graft_mark")  # 32
F_HAS_DEST = _consts.GRAFT_MARK_HAS_DEST
F_ANY_PEER = _consts.GRAFT_MARK_ANY_PEER
F_DEST_V4 = _consts.GRAFT_MARK_DEST_V4
F_PREISSUED = _consts.GRAFT_MARK_PREISSUED

# grants: a map of maps, grant id -> that tenant's own grants, an LRU hash
# (struct graft_grant_key -> struct graft_grant_value). One LRU per tenant,
# so that a tenant granted many destinations forgets only its own least
# recently used grants, never another's; a forgotten grant only sends a
# connect back to the broker.
GRANT_KEY_SIZE = ffi.sizeof("struct graft_grant_key")
GRANT_VALUE_SIZE = ffi.sizeof("struct graft_grant_value")
GRANTS_PER_TENANT = 4096  # about 0.4 MB of kernel memory per tenant on the fast path
GRANT_TENANTS_MAX = 65536
# counts: socket -> the count id it is counted under (SK_STORAGE: freed with the socket);
# released: count id -> closes counted.
RELEASED_MAX = 65536
# events: one struct graft_event per connect judged in the kernel (the fast path's audit).
EVENT_SIZE = ffi.sizeof("struct graft_event")
EVENTS_SIZE = 1 << 20  # the ring's
# stamps: the making thread's pid_tgid -> struct graft_stamp, while the broker makes a batch of
# pre-issued sockets: the sock_create program marks and counts each as it is created, where two
# map updates per socket from userspace took a third of the broker's time per fast-path connect.
STAMP_SIZE = ffi.sizeof("struct graft_stamp")
STAMPS_MAX = 256  # threads making batches at once (trio's worker threads, 40 by default); beyond, C marks them
# state: a tiny array. [0] the epoch of the last broker, [1] audit records lost.
STATE_EPOCH, STATE_EVENTS_LOST = 0, 1


def offset_of(ctype: str, field: str) -> int:
    """A field's offset in one of the header's structs (the BPF programs address them so)."""
    return ffi.offsetof(ctype, field)


def _bytes_of(obj) -> bytes:
    return bytes(ffi.buffer(obj))


def mark_btf() -> bytes:
    """BTF for the map: key int, value struct graft_mark (SK_STORAGE requires BTF)."""
    u32, u32_array = 2, 3  # type ids, in the order below
    fields = ffi.typeof("struct graft_mark").fields
    members = [(name, u32_array if f.type.kind == "array" else u32, 8 * f.offset) for name, f in fields]
    (ip6_words,) = {f.type.length for _, f in fields if f.type.kind == "array"}
    return bpf.btf_blob(
        [
            ("int", "int", 4, True),
            ("int", "__u32", 4, False),
            ("array", u32, u32, ip6_words),
            ("struct", "graft_mark", MARK_SIZE, members),
        ],
        [],
    )


BTF_KEY_ID, BTF_VALUE_ID = 1, 4


def count_btf() -> bytes:
    """BTF for the counts map: key int, value __u32 (a count id)."""
    return bpf.btf_blob([("int", "int", 4, True), ("int", "__u32", 4, False)], [])


COUNT_BTF_VALUE_ID = 2


_V4_MAPPED = bytes(10) + b"\xff\xff"


def encode_mark(dest: tuple | None, any_peer: bool, tenant_id: int = 0) -> bytes:
    """The map value for a socket: its allowed destination (or none), the any-peer flag, and
    the grant id whose UDP grants it may also send to (0: none)."""
    flags = F_ANY_PEER if any_peer else 0
    port, ip4, ip6 = 0, bytes(4), bytes(16)
    if dest is not None:
        flags |= F_HAS_DEST
        # user_port is the be16 port as a u32 number: the same bytes on either endianness
        port = struct.unpack("=H", struct.pack("!H", dest[1]))[0]
        host = dest[0].split("%")[0]
        if ":" in host:
            ip6 = socket.inet_pton(socket.AF_INET6, host)
            if ip6[:12] == _V4_MAPPED:  # a v6 socket sending to a mapped address runs the v4 hook
                ip4 = ip6[12:]
                flags |= F_DEST_V4
        else:
            ip4 = socket.inet_pton(socket.AF_INET, host)
            ip6 = _V4_MAPPED + ip4
            flags |= F_DEST_V4
    return _mark(flags, port, ip4, ip6, tenant_id)


def _mark(flags: int, port: int, ip4: bytes, ip6: bytes, tenant_id: int) -> bytes:
    m = ffi.new("struct graft_mark *")
    m.flags, m.port, m.tenant = flags, port, tenant_id
    ffi.memmove(ffi.addressof(m[0], "ip4"), ip4, 4)
    ffi.memmove(m.ip6, ip6, 16)
    return _bytes_of(m)


@dataclass(frozen=True, slots=True)
class ConnectEvent:
    """A connect the kernel judged by a grant (the fast path's audit record)."""

    tenant_id: int
    rule_id: int
    pid: int
    uid: int
    family: int
    addr: str
    port: int


def _view(ctype: str, size: int, raw: bytes):
    """raw read as one of the header's structs; ValueError if it is shorter (cffi would read past it)."""
    if len(raw) < size:
        raise ValueError(f"{ctype} needs {size} bytes, got {len(raw)}")
    return ffi.from_buffer(f"{ctype} *", raw[:size])


def decode_event(raw: bytes) -> ConnectEvent:
    ev = _view("struct graft_event", EVENT_SIZE, raw)
    addr = bytes(ev.addr)
    host = socket.inet_ntop(ev.family, addr[:4] if ev.family == socket.AF_INET else addr)
    return ConnectEvent(ev.tenant, ev.rule, ev.pid, ev.uid, ev.family, host, int.from_bytes(bytes(ev.port), "big"))


def mark_flags_and_tenant(raw: bytes) -> tuple[int, int]:
    """A mark's flags (F_*) and grant id."""
    m = _view("struct graft_mark", MARK_SIZE, raw)
    return m.flags, m.tenant


def unconnected_preissued(raw: bytes) -> bool:
    """A pre-issued socket whose first connect has not been let through: nothing is granted it yet."""
    return mark_flags_and_tenant(raw)[0] & (F_PREISSUED | F_HAS_DEST) == F_PREISSUED


@functools.lru_cache(maxsize=256)
def encode_preissued_mark(tenant_id: int) -> bytes:
    """The mark of a pre-issued socket of grant id tenant_id: one per grant id, made once (every refill asks)."""
    return _mark(F_PREISSUED, 0, bytes(4), bytes(16), tenant_id)


def grant_kind(sock_type: int, family: int) -> int:
    """The key's second word: TCP and UDP grants of one destination are apart."""
    return sock_type << 16 | family


def grant_key(tenant_id: int, family: int, host: str, port: int, sock_type: int = socket.SOCK_STREAM) -> bytes:
    """The grants key the programs build for this destination (programs._grant_lookup).

    A TCP connect runs the hook of the socket's family, with the address as
    the app wrote it. A datagram to an IPv4 or v4-mapped address runs the
    IPv4 sendmsg hook whatever the socket's family, so a UDP grant of such a
    destination is keyed by its IPv4 form.
    """
    if family == socket.AF_INET:
        addr = socket.inet_pton(socket.AF_INET, host) + bytes(12)
    else:
        addr = socket.inet_pton(socket.AF_INET6, host.split("%")[0])
        if sock_type == socket.SOCK_DGRAM and addr[:12] == _V4_MAPPED:
            family, addr = socket.AF_INET, addr[12:] + bytes(12)
    port_u32 = struct.unpack("=H", struct.pack("!H", port))[0]  # user_port: be16 in a u32
    k = ffi.new("struct graft_grant_key *")
    k.tenant, k.kind, k.port = tenant_id, grant_kind(sock_type, family), port_u32
    ffi.memmove(k.addr, addr, 16)
    return _bytes_of(k)


def encode_grant_value(rule_id: int, expires: int = 0) -> bytes:
    """A grant's value: the rule that made it, the CLOCK_MONOTONIC second it lapses at (0: never)."""
    v = ffi.new("struct graft_grant_value *")
    v.rule = rule_id
    v.expires = expires
    return _bytes_of(v)


def grant_lasts(value: bytes, now: float) -> bool:
    """Whether a grant's value still holds at now (time.monotonic), as the kernel's programs judge it."""
    expires = _view("struct graft_grant_value", GRANT_VALUE_SIZE, value).expires
    return expires == 0 or int(now) < expires


@dataclass(frozen=True)
class MapSpec:
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0
    inner: MapSpec | None = None  # a map of maps: the shape of the maps it holds
    btf: tuple | None = None  # (blob function, key type id, value type id): SK_STORAGE needs BTF


# A tenant's grants (the inner maps of "grants").
TENANT_GRANTS = MapSpec(bpf.MAP_TYPE_LRU_HASH, GRANT_KEY_SIZE, GRANT_VALUE_SIZE, GRANTS_PER_TENANT)
# The marks (cloned to accepted sockets: see lifecycle.py), pinned last as the sentinel of a complete set.
MARKS = MapSpec(
    bpf.MAP_TYPE_SK_STORAGE, 4, MARK_SIZE, 0, bpf.F_NO_PREALLOC | bpf.F_CLONE, btf=(mark_btf, BTF_KEY_ID, BTF_VALUE_ID)
)
# The maps besides the marks, pinned by these names.
MAPS = {
    "grants": MapSpec(bpf.MAP_TYPE_HASH_OF_MAPS, 4, 4, GRANT_TENANTS_MAX, bpf.F_NO_PREALLOC, TENANT_GRANTS),
    # Not cloned to accepted sockets: a grafted listener's connections are the app's own, uncounted.
    "counts": MapSpec(
        bpf.MAP_TYPE_SK_STORAGE, 4, 4, 0, bpf.F_NO_PREALLOC, btf=(count_btf, BTF_KEY_ID, COUNT_BTF_VALUE_ID)
    ),
    "released": MapSpec(bpf.MAP_TYPE_HASH, 4, 8, RELEASED_MAX, bpf.F_NO_PREALLOC),
    "events": MapSpec(bpf.MAP_TYPE_RINGBUF, 0, 0, EVENTS_SIZE),
    "state": MapSpec(bpf.MAP_TYPE_ARRAY, 4, 8, 2),
    "stamps": MapSpec(bpf.MAP_TYPE_HASH, 8, STAMP_SIZE, STAMPS_MAX),  # preallocated: no allocation per batch
}
# Pinned by an earlier broker and no longer used: unpinned at start and by remove().
# owned: socket cookie -> count id, a hash the release program looked up and deleted from at every
# close, and the broker filled with an SO_COOKIE and an update per socket; the counts map replaced it.
RETIRED_MAPS = ("owned",)
