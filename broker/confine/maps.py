"""What confinement keeps in the kernel, as bytes: the maps' layouts and their codec.

Pure (no system calls): the mark a grafted socket carries in the
``marks`` SK_STORAGE map, the ``grants`` of the connect fast path, the
``events`` ring's audit records, and the shapes of the other maps
(``MAPS``). The programs (programs.py) read the same layouts; confine/lifecycle.py
creates, pins and updates the maps.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from . import bpf

# The mark, one per grafted socket (struct graft_mark in the map's BTF):
#   u32 flags; u32 port; u32 ip4; u32 ip6[4]; u32 tenant
# port/ip4/ip6 hold the destination the broker connected the socket to, in
# the same representation as bpf_sock_addr's user_port/user_ip4/user_ip6;
# tenant is the grant id of a pre-issued socket, or of a grafted UDP socket
# whose later destinations its tenant's UDP grants decide (0 otherwise).
MARK = struct.Struct("=II4s16sI")
MARK_SIZE = MARK.size  # 32
F_HAS_DEST = 1
F_ANY_PEER = 2
# The destination has an IPv4 form (IPv4, or v4-mapped IPv6). Without it
# the IPv4 programs match no destination: a dual-stack IPv6 UDP socket runs
# them for an AF_INET address, and an ip4 of 0.0.0.0 would otherwise admit
# 0.0.0.0, which the kernel delivers to 127.0.0.1.
F_DEST_V4 = 4
# Pre-issued: not connected by the broker; the first connect is judged by
# the grants of the mark's tenant, and fixes the destination.
F_PREISSUED = 8

# grants: a map of maps, grant id -> that tenant's own grants, an LRU hash
# (tenant, family, user_port, address as in the hook: ip4 then zeros, or
# ip6) -> (rule id, unused). One LRU per tenant, so that a tenant granted
# many destinations forgets only its own least recently used grants, never
# another's; a forgotten grant only sends a connect back to the broker.
GRANT_KEY = struct.Struct("=III16s")
GRANT_VALUE = struct.Struct("=II")
GRANTS_PER_TENANT = 4096  # about 0.4 MB of kernel memory per tenant on the fast path
GRANT_TENANTS_MAX = 65536
# owned: socket cookie -> tenant id; released: tenant id -> closes counted.
OWNED_MAX = 1 << 20
RELEASED_MAX = 65536
# events: one record per connect judged in the kernel (the fast path's audit).
EVENT = struct.Struct("=IIIII2s2x16s")  # tenant, rule, pid, uid, family, user_port (be16 in a u32), address
EVENTS_SIZE = 1 << 20
# state: a tiny array. [0] the epoch of the last broker, [1] audit records lost.
STATE_EPOCH, STATE_EVENTS_LOST = 0, 1


def mark_btf() -> bytes:
    """BTF for the map: key int, value struct graft_mark (SK_STORAGE requires BTF)."""
    u32 = 2
    members = [("flags", u32, 0), ("port", u32, 32), ("ip4", u32, 64), ("ip6", 3, 96), ("tenant", u32, 224)]
    return bpf.btf_blob(
        [
            ("int", "int", 4, True),
            ("int", "__u32", 4, False),
            ("array", u32, u32, 4),
            ("struct", "graft_mark", MARK_SIZE, members),
        ],
        [],
    )


BTF_KEY_ID, BTF_VALUE_ID = 1, 4


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
    return MARK.pack(flags, port, ip4, ip6, tenant_id)


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


def decode_event(raw: bytes) -> ConnectEvent:
    tenant_id, rule_id, pid, uid, family, port, addr = EVENT.unpack(raw[: EVENT.size])
    host = socket.inet_ntop(family, addr[:4] if family == socket.AF_INET else addr)
    return ConnectEvent(tenant_id, rule_id, pid, uid, family, host, struct.unpack("!H", port)[0])


def mark_flags_and_tenant(raw: bytes) -> tuple[int, int]:
    """A mark's flags (F_*) and grant id."""
    flags, _, _, _, tenant_id = MARK.unpack(raw[: MARK.size])
    return flags, tenant_id


def unconnected_preissued(raw: bytes) -> bool:
    """A pre-issued socket whose first connect has not been let through: nothing is granted it yet."""
    return mark_flags_and_tenant(raw)[0] & (F_PREISSUED | F_HAS_DEST) == F_PREISSUED


def encode_preissued_mark(tenant_id: int) -> bytes:
    return MARK.pack(F_PREISSUED, 0, bytes(4), bytes(16), tenant_id)


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
    return GRANT_KEY.pack(tenant_id, grant_kind(sock_type, family), port_u32, addr)


@dataclass(frozen=True)
class MapSpec:
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0
    inner: MapSpec | None = None  # a map of maps: the shape of the maps it holds


# A tenant's grants (the inner maps of "grants").
TENANT_GRANTS = MapSpec(bpf.MAP_TYPE_LRU_HASH, GRANT_KEY.size, GRANT_VALUE.size, GRANTS_PER_TENANT)
# The maps besides the marks (which need BTF; see _load_or_reuse), pinned by these names.
MAPS = {
    "grants": MapSpec(bpf.MAP_TYPE_HASH_OF_MAPS, 4, 4, GRANT_TENANTS_MAX, bpf.F_NO_PREALLOC, TENANT_GRANTS),
    "owned": MapSpec(bpf.MAP_TYPE_HASH, 8, 4, OWNED_MAX, bpf.F_NO_PREALLOC),
    "released": MapSpec(bpf.MAP_TYPE_HASH, 4, 8, RELEASED_MAX, bpf.F_NO_PREALLOC),
    "events": MapSpec(bpf.MAP_TYPE_RINGBUF, 0, 0, EVENTS_SIZE),
    "state": MapSpec(bpf.MAP_TYPE_ARRAY, 4, 8, 2),
}
