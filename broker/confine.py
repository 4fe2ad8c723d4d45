"""Confinement: the kernel refuses to re-point a socket the broker handed out.

A socket handed to an untrusted program can be re-pointed with raw system
calls that the shim never sees: ``connect(AF_UNSPEC)`` dissolves a connected
TCP socket or a listener, then a second ``connect`` goes anywhere; a UDP
``sendto`` names its destination on every call. Confinement closes that in
the kernel, with no module:

* Six cgroup ``sock_addr`` programs (connect4/6, sendmsg4/6, bind4/6) are
  attached to the broker's cgroup. They run for sockets *created* by a
  process of that cgroup, whoever calls connect() later: the grafted sockets.
* A ``BPF_MAP_TYPE_SK_STORAGE`` map (``BPF_F_CLONE``: accepted sockets inherit
  their listener's entry) holds a mark for each grafted socket, set by the
  broker after its own bind/connect and before the fd leaves it.
* Unmarked sockets are let through at once (one storage lookup). On a marked
  socket: bind is refused; connect is refused unless it names the address the
  broker connected it to; sendmsg with an address likewise, or to anyone if
  the mark says "any peer" (a grafted UDP server replying to its clients).
  Refused means the system call fails with EPERM.
* The connect fast path: the broker may hand a shim unconnected TCP
  sockets ahead of time, marked "pre-issued" with the tenant's id. Their
  first connect is judged in the kernel against ``grants``, a hash of the
  (tenant, destination) pairs the broker has answered "graft" for; a
  granted connect locks the mark to that destination, as if the broker had
  connected it, and leaves an audit record in the ``events`` ring buffer.
  Anything else is refused (EPERM) and the shim asks the broker.
* ``owned`` maps the cookie of every socket the broker handed out to its
  tenant, and a ``sock_release`` program counts each one's close into
  ``released``: ``max_sockets`` is counted exactly, pre-issued sockets
  (which no socket dump sees) included.
* ``listen()`` has no sock_addr hook, and on a socket with no port it binds
  a fresh ephemeral port on the host's wildcard address: a pre-issued
  socket, or (before kernel 6.18, which refuses it) a connected one
  dissolved by ``connect(AF_UNSPEC)``. Each TCP socket the broker connects
  or pre-issues therefore gets a locked socket filter
  (``SO_ATTACH_BPF`` + ``SO_LOCK_FILTER``, which the app cannot undo)
  that drops segments with SYN set and ACK clear: a connected socket never
  needs one, and a listener gets nothing else, so the escaped listen
  succeeds but no connection ever reaches it. Grafted listeners and the
  sockets they accept carry no filter and pay nothing.

Where things live, for a broker whose cgroup is ``C`` (from /proc/self/cgroup):

* cgroup ``C/graft-broker`` (or ``C`` itself if it already has that name): the
  broker moves itself in at start, and the programs are attached there with
  ``BPF_F_ALLOW_MULTI``, so no other process's sockets ever run them;
* ``<bpffs>/graft/<that cgroup's path>/{marks,grants,...,connect4,...}``: the
  maps and the programs, pinned. A restarted broker finds them and reuses
  them (and finds them already attached), so nothing stacks, and sockets
  handed out before the restart keep their marks and stay confined. It
  empties ``grants`` (its policy may differ) and gives its tenants ids of a
  new epoch, so no pre-issued socket of the old broker finds a grant.

``remove()`` undoes it all (``graft confinement remove``; docs/security.md).
Instruction encodings follow <linux/bpf.h>; the programs are assembled here
because there is no compiler at run time.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import socket
import struct
from dataclasses import dataclass, field

from . import bpf

log = logging.getLogger("graft.broker")

CGROUP_NAME = "graft-broker"
PIN_ROOT_NAME = "graft"
DEFAULT_BPFFS = "/sys/fs/bpf"
MAP_PIN = "marks"
MAP_NAME = "graft_marks"
LICENSE = "Dual MIT/GPL"

# The mark, one per grafted socket (struct graft_mark in the map's BTF):
#   u32 flags; u32 port; u32 ip4; u32 ip6[4]; u32 tenant
# port/ip4/ip6 hold the destination the broker connected the socket to, in
# the same representation as bpf_sock_addr's user_port/user_ip4/user_ip6;
# tenant is the tenant id of a pre-issued socket (0 otherwise).
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

# grants: (tenant, family, user_port, address as in the hook: ip4 then zeros,
# or ip6) -> (rule id, unused). LRU: a full map forgets old grants, and a
# forgotten grant only sends a connect back to the broker.
GRANT_KEY = struct.Struct("=III16s")
GRANT_VALUE = struct.Struct("=II")
GRANTS_MAX = 16384
# owned: socket cookie -> tenant id; released: tenant id -> closes counted.
OWNED_MAX = 1 << 20
RELEASED_MAX = 65536
# events: one record per connect judged in the kernel (the fast path's audit).
EVENT = struct.Struct("=IIIII2s2x16s")  # tenant, rule, pid, uid, family, user_port (be16 in a u32), address
EVENTS_SIZE = 1 << 20
# state: a tiny array. [0] the epoch of the last broker, [1] audit records lost.
STATE_EPOCH, STATE_EVENTS_LOST = 0, 1
SO_COOKIE = getattr(socket, "SO_COOKIE", 57)

# ---- the programs ---------------------------------------------------------------

# bpf_sock_addr offsets (checked against the header in tests/test_confinement.py)
CTX_USER_IP4 = 4
CTX_USER_IP6 = 8
CTX_USER_PORT = 24
CTX_SK = 64
# mark offsets
M_FLAGS, M_PORT, M_IP4, M_IP6, M_TENANT = 0, 4, 8, 12, 28
# v4-mapped prefix word 2 (bytes 00 00 ff ff) as a little-endian s32 immediate
_MAPPED_WORD = -0x10000


class Asm:
    """A few eBPF instructions, with labels for forward jumps."""

    def __init__(self):
        self.insns: list[list] = []  # [code, dst, src, off, imm, label-or-None]
        self.labels: dict[str, int] = {}

    def _emit(self, code, dst=0, src=0, off=0, imm=0, target=None):
        self.insns.append([code, dst, src, off, imm, target])

    def label(self, name):
        self.labels[name] = len(self.insns)

    def mov_reg(self, dst, src):
        self._emit(0xBF, dst, src)  # BPF_ALU64 | BPF_MOV | BPF_X

    def mov_imm(self, dst, imm):
        self._emit(0xB7, dst, 0, 0, imm)  # BPF_ALU64 | BPF_MOV | BPF_K

    def and_imm(self, dst, imm):
        self._emit(0x57, dst, 0, 0, imm)  # BPF_ALU64 | BPF_AND | BPF_K

    def ldx_w(self, dst, src, off):
        self._emit(0x61, dst, src, off)  # BPF_LDX | BPF_MEM | BPF_W

    def ldx_dw(self, dst, src, off):
        self._emit(0x79, dst, src, off)  # BPF_LDX | BPF_MEM | BPF_DW

    def add_imm(self, dst, imm):
        self._emit(0x07, dst, 0, 0, imm)  # BPF_ALU64 | BPF_ADD | BPF_K

    def rsh_imm(self, dst, imm):
        self._emit(0x77, dst, 0, 0, imm)  # BPF_ALU64 | BPF_RSH | BPF_K

    def stx_w(self, dst, off, src):
        self._emit(0x63, dst, src, off)  # BPF_STX | BPF_MEM | BPF_W

    def stx_dw(self, dst, off, src):
        self._emit(0x7B, dst, src, off)  # BPF_STX | BPF_MEM | BPF_DW

    def st_w(self, dst, off, imm):
        self._emit(0x62, dst, 0, off, imm)  # BPF_ST | BPF_MEM | BPF_W

    def atomic_add_dw(self, dst, off, src):
        self._emit(0xDB, dst, src, off, 0)  # BPF_STX | BPF_ATOMIC | BPF_DW, imm BPF_ADD

    def stack_ptr(self, dst, off):
        self.mov_reg(dst, 10)
        self.add_imm(dst, off)

    def ja(self, target):
        self._emit(0x05, 0, 0, 0, 0, target)

    def ld_abs_b(self, off):
        self._emit(0x30, 0, 0, 0, off)  # BPF_LD | BPF_ABS | BPF_B: r0 = packet byte (skb in r6)

    def ld_map_fd(self, dst, fd):
        self._emit(0x18, dst, 1, 0, fd)  # BPF_LD | BPF_IMM | BPF_DW, src = BPF_PSEUDO_MAP_FD
        self._emit(0x00)

    def call(self, helper):
        self._emit(0x85, 0, 0, 0, helper)

    def jeq_imm(self, dst, imm, target):
        self._emit(0x15, dst, 0, 0, imm, target)

    def jne_imm(self, dst, imm, target):
        self._emit(0x55, dst, 0, 0, imm, target)

    def jne_reg(self, dst, src, target):
        self._emit(0x5D, dst, src, 0, 0, target)

    def exit(self):
        self._emit(0x95)

    def assemble(self) -> bytes:
        out = b""
        for i, (code, dst, src, off, imm, target) in enumerate(self.insns):
            if target is not None:
                off = self.labels[target] - (i + 1)
            out += struct.pack("<BBhi", code, (src << 4) | dst, off, imm)
        return out


def program(kind: str, v6: bool, maps: dict[str, int]) -> bytes:
    """The program for kind "connect" | "sendmsg" | "bind" (IPv4 or IPv6) | "release"."""
    if kind == "release":
        return release_program(maps)
    a = Asm()
    a.mov_reg(6, 1)  # r6 = ctx
    a.ldx_dw(2, 1, CTX_SK)  # r2 = ctx->sk
    a.ld_map_fd(1, maps["marks"])
    a.mov_imm(3, 0)  # no value to create
    a.mov_imm(4, 0)  # flags 0: look up only
    a.call(bpf.FUNC_SK_STORAGE_GET)
    a.jeq_imm(0, 0, "allow")  # not a grafted socket: none of our business
    if kind == "bind":
        a.mov_imm(0, 0)  # a grafted socket never binds again
        a.exit()
        a.label("allow")
        a.mov_imm(0, 1)
        a.exit()
        return a.assemble()
    a.mov_reg(7, 0)  # r7 = the mark
    a.ldx_w(1, 7, M_FLAGS)
    if kind == "sendmsg":
        a.mov_reg(2, 1)
        a.and_imm(2, F_ANY_PEER)
        a.jne_imm(2, 0, "allow")
    else:
        a.mov_reg(2, 1)
        a.and_imm(2, F_PREISSUED | F_HAS_DEST)
        a.jeq_imm(2, F_PREISSUED, "first_connect")
    need = F_HAS_DEST if v6 else F_HAS_DEST | F_DEST_V4  # a destination, in this hook's family
    a.and_imm(1, need)
    a.jne_imm(1, need, "deny")
    # only the destination the broker connected it to
    a.ldx_w(2, 6, CTX_USER_PORT)
    a.ldx_w(3, 7, M_PORT)
    a.jne_reg(2, 3, "deny")
    if v6:
        for i in range(4):
            a.ldx_w(2, 6, CTX_USER_IP6 + 4 * i)
            a.ldx_w(3, 7, M_IP6 + 4 * i)
            a.jne_reg(2, 3, "deny")
    else:
        a.ldx_w(2, 6, CTX_USER_IP4)
        a.ldx_w(3, 7, M_IP4)
        a.jne_reg(2, 3, "deny")
    a.label("allow")
    a.mov_imm(0, 1)
    a.exit()
    a.label("deny")
    a.mov_imm(0, 0)
    a.exit()
    if kind == "connect":
        _first_connect(a, v6, maps)
    return a.assemble()


# Stack of the connect programs: the grant key, the audit record, a state key.
_KEY_AT, _EVENT_AT, _STATE_KEY_AT = -32, -80, -84


def _first_connect(a: Asm, v6: bool, maps: dict[str, int]) -> None:
    """A pre-issued socket's first connect: allowed if granted, and then locked to it.

    Entered with r6 = ctx, r7 = the mark; ends at the "allow"/"deny" labels.
    """
    family = socket.AF_INET6 if v6 else socket.AF_INET
    a.label("first_connect")
    # the grant key, as confine.grant_key() builds it
    a.ldx_w(1, 7, M_TENANT)
    a.stx_w(10, _KEY_AT, 1)
    a.st_w(10, _KEY_AT + 4, family)
    a.ldx_w(1, 6, CTX_USER_PORT)
    a.stx_w(10, _KEY_AT + 8, 1)
    for i in range(4):
        if v6 or i == 0:
            a.ldx_w(1, 6, (CTX_USER_IP6 + 4 * i) if v6 else CTX_USER_IP4)
            a.stx_w(10, _KEY_AT + 12 + 4 * i, 1)
        else:
            a.st_w(10, _KEY_AT + 12 + 4 * i, 0)
    a.ld_map_fd(1, maps["grants"])
    a.stack_ptr(2, _KEY_AT)
    a.call(bpf.FUNC_MAP_LOOKUP_ELEM)
    a.jeq_imm(0, 0, "deny")
    a.ldx_w(8, 0, 0)  # r8 = the rule id
    # From now on this socket is what the broker would have connected.
    a.ldx_w(1, 6, CTX_USER_PORT)
    a.stx_w(7, M_PORT, 1)
    if v6:
        for i in range(4):
            a.ldx_w(1, 6, CTX_USER_IP6 + 4 * i)
            a.stx_w(7, M_IP6 + 4 * i, 1)
        a.st_w(7, M_FLAGS, F_PREISSUED | F_HAS_DEST)
    else:
        a.ldx_w(1, 6, CTX_USER_IP4)
        a.stx_w(7, M_IP4, 1)
        a.st_w(7, M_IP6, 0)
        a.st_w(7, M_IP6 + 4, 0)
        a.st_w(7, M_IP6 + 8, _MAPPED_WORD)
        a.stx_w(7, M_IP6 + 12, 1)
        a.st_w(7, M_FLAGS, F_PREISSUED | F_HAS_DEST | F_DEST_V4)
    # The audit record (EVENT). No wakeup: the broker drains the ring on a timer.
    a.ldx_w(1, 7, M_TENANT)
    a.stx_w(10, _EVENT_AT, 1)
    a.stx_w(10, _EVENT_AT + 4, 8)
    a.call(bpf.FUNC_GET_CURRENT_PID_TGID)
    a.rsh_imm(0, 32)  # the tgid: the process id
    a.stx_w(10, _EVENT_AT + 8, 0)
    a.call(bpf.FUNC_GET_CURRENT_UID_GID)
    a.stx_w(10, _EVENT_AT + 12, 0)  # the low half: the uid
    a.st_w(10, _EVENT_AT + 16, family)
    for i in range(5):  # user_port and the address, from the key
        a.ldx_w(1, 10, _KEY_AT + 8 + 4 * i)
        a.stx_w(10, _EVENT_AT + 20 + 4 * i, 1)
    a.ld_map_fd(1, maps["events"])
    a.stack_ptr(2, _EVENT_AT)
    a.mov_imm(3, EVENT.size)
    a.mov_imm(4, bpf.RB_NO_WAKEUP)
    a.call(bpf.FUNC_RINGBUF_OUTPUT)
    a.jeq_imm(0, 0, "allow")
    # The ring is full: the connect goes ahead, and the loss is counted.
    a.st_w(10, _STATE_KEY_AT, STATE_EVENTS_LOST)
    a.ld_map_fd(1, maps["state"])
    a.stack_ptr(2, _STATE_KEY_AT)
    a.call(bpf.FUNC_MAP_LOOKUP_ELEM)
    a.jeq_imm(0, 0, "allow")
    a.mov_imm(1, 1)
    a.atomic_add_dw(0, 0, 1)
    a.ja("allow")


def release_program(maps: dict[str, int]) -> bytes:
    """cgroup sock_release: a socket the broker handed out is closed; count it for its tenant."""
    a = Asm()
    a.call(bpf.FUNC_GET_SOCKET_COOKIE)  # r1 = ctx already
    a.stx_dw(10, -8, 0)
    a.ld_map_fd(1, maps["owned"])
    a.stack_ptr(2, -8)
    a.call(bpf.FUNC_MAP_LOOKUP_ELEM)
    a.jeq_imm(0, 0, "out")  # not handed out by the broker (an accepted socket, its own)
    a.ldx_w(1, 0, 0)
    a.stx_w(10, -16, 1)  # the tenant id
    a.ld_map_fd(1, maps["owned"])
    a.stack_ptr(2, -8)
    a.call(bpf.FUNC_MAP_DELETE_ELEM)
    a.ld_map_fd(1, maps["released"])
    a.stack_ptr(2, -16)
    a.call(bpf.FUNC_MAP_LOOKUP_ELEM)
    a.jeq_imm(0, 0, "out")  # a tenant of an earlier broker or epoch: nobody counts it
    a.mov_imm(1, 1)
    a.atomic_add_dw(0, 0, 1)
    a.label("out")
    a.mov_imm(0, 1)
    a.exit()
    return a.assemble()


# name in bpffs -> (kind, v6, attach type); bpf program names are "graft_" + name
PROGRAMS = {
    "connect4": ("connect", False, bpf.CGROUP_INET4_CONNECT),
    "connect6": ("connect", True, bpf.CGROUP_INET6_CONNECT),
    "sendmsg4": ("sendmsg", False, bpf.CGROUP_UDP4_SENDMSG),
    "sendmsg6": ("sendmsg", True, bpf.CGROUP_UDP6_SENDMSG),
    "bind4": ("bind", False, bpf.CGROUP_INET4_BIND),
    "bind6": ("bind", True, bpf.CGROUP_INET6_BIND),
    "release": ("release", False, bpf.CGROUP_INET_SOCK_RELEASE),
}


def prog_type(kind: str) -> int:
    return bpf.PROG_TYPE_CGROUP_SOCK if kind == "release" else bpf.PROG_TYPE_CGROUP_SOCK_ADDR


# The listen guard, a socket filter: for TCP the kernel runs it with the
# packet starting at the TCP header (v4 and v6 alike), so byte 13 holds the
# flags. A SYN without ACK is dropped, anything else kept whole. Loaded once
# per broker; attaching it to a socket is a reference, not a copy.
_TCP_FLAGS, _SYN, _ACK = 13, 0x02, 0x10
SO_ATTACH_BPF = getattr(socket, "SO_ATTACH_BPF", 50)
SO_LOCK_FILTER = getattr(socket, "SO_LOCK_FILTER", 44)


def listen_guard_program() -> bytes:
    a = Asm()
    a.mov_reg(6, 1)  # the packet loads below take the skb in r6
    a.ld_abs_b(_TCP_FLAGS)  # r0 = flags
    a.and_imm(0, _SYN | _ACK)
    a.jeq_imm(0, _SYN, "drop")
    a.mov_imm(0, -1)  # keep the whole packet
    a.exit()
    a.label("drop")
    a.mov_imm(0, 0)
    a.exit()
    return a.assemble()


def guard_against_listening(sock: socket.socket, guard_fd: int) -> None:
    """Attach the listen guard to a connected TCP socket and lock it (the app cannot remove it)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, guard_fd)
    sock.setsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER, 1)


def mark_btf() -> bytes:
    """BTF for the map: key int, value struct graft_mark (SK_STORAGE requires BTF)."""
    u32 = 2
    members = [("flags", u32, 0), ("port", u32, 32), ("ip4", u32, 64), ("ip6", 3, 96), ("tenant", u32, 224)]
    return bpf.btf_blob(
        [("int", "int", 4, True), ("int", "__u32", 4, False), ("array", u32, u32, 4),
         ("struct", "graft_mark", MARK_SIZE, members)],
        [],
    )


BTF_KEY_ID, BTF_VALUE_ID = 1, 4


_V4_MAPPED = bytes(10) + b"\xff\xff"


def encode_mark(dest: tuple | None, any_peer: bool) -> bytes:
    """The map value for a socket: its allowed destination (or none), and the any-peer flag."""
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
    return MARK.pack(flags, port, ip4, ip6, 0)


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
    tenant_id, rule_id, pid, uid, family, port, addr = EVENT.unpack(raw[:EVENT.size])
    host = socket.inet_ntop(family, addr[:4] if family == socket.AF_INET else addr)
    return ConnectEvent(tenant_id, rule_id, pid, uid, family, host, struct.unpack("!H", port)[0])


def encode_preissued_mark(tenant_id: int) -> bytes:
    return MARK.pack(F_PREISSUED, 0, bytes(4), bytes(16), tenant_id)


def grant_key(tenant_id: int, family: int, host: str, port: int) -> bytes:
    """The grants key the connect programs build for this destination (see _first_connect)."""
    if family == socket.AF_INET:
        addr = socket.inet_pton(socket.AF_INET, host) + bytes(12)
    else:
        addr = socket.inet_pton(socket.AF_INET6, host.split("%")[0])
    return GRANT_KEY.pack(tenant_id, family, struct.unpack("=H", struct.pack("!H", port))[0], addr)


# ---- where things are -----------------------------------------------------------


class Unavailable(Exception):
    """Confinement cannot be put in place here; the message says why."""


def _unescape(field_: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as \ooo
    return field_.encode().decode("unicode_escape") if "\\" in field_ else field_


def mounts_of(fstype: str, mounts: str = "/proc/self/mounts") -> list[str]:
    out = []
    with open(mounts) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == fstype:
                out.append(_unescape(parts[1]))
    return out


def cgroup2_mount() -> str:
    found = mounts_of("cgroup2")
    if not found:
        raise Unavailable("cgroup2 is not mounted (no cgroup2 entry in /proc/self/mounts)")
    return found[0]


def own_cgroup(pid: int | str = "self") -> str:
    """This process's cgroup2 path (the "0::" line of /proc/<pid>/cgroup)."""
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].rstrip("\n")
    raise Unavailable("this process is in no cgroup2 hierarchy (no 0:: line in /proc/self/cgroup)")


def bpffs_mount(create: bool) -> str:
    """A bpffs mount: an existing one (/sys/fs/bpf first), or one mounted there now."""
    found = mounts_of("bpf")
    if found:
        return DEFAULT_BPFFS if DEFAULT_BPFFS in found else found[0]
    if not create:
        raise Unavailable("bpffs is not mounted")
    libc = ctypes.CDLL(None, use_errno=True)
    os.makedirs(DEFAULT_BPFFS, exist_ok=True)
    if libc.mount(b"bpf", DEFAULT_BPFFS.encode(), b"bpf", 0, b"mode=0700") != 0:
        e = ctypes.get_errno()
        raise Unavailable(f"bpffs is not mounted and mounting it at {DEFAULT_BPFFS} failed: {os.strerror(e)}")
    log.info("mounted bpffs at %s", DEFAULT_BPFFS)
    return DEFAULT_BPFFS


def pin_dir_for(bpffs: str, cgroup: str) -> str:
    return os.path.join(bpffs, PIN_ROOT_NAME, cgroup.strip("/"))


# ---- the confinement in force -----------------------------------------------------


@dataclass(frozen=True)
class MapSpec:
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0


# The maps besides the marks (which need BTF; see _load_or_reuse), pinned by these names.
MAPS = {
    "grants": MapSpec(bpf.MAP_TYPE_LRU_HASH, GRANT_KEY.size, GRANT_VALUE.size, GRANTS_MAX),
    "owned": MapSpec(bpf.MAP_TYPE_HASH, 8, 4, OWNED_MAX, bpf.F_NO_PREALLOC),
    "released": MapSpec(bpf.MAP_TYPE_HASH, 4, 8, RELEASED_MAX, bpf.F_NO_PREALLOC),
    "events": MapSpec(bpf.MAP_TYPE_RINGBUF, 0, 0, EVENTS_SIZE),
    "state": MapSpec(bpf.MAP_TYPE_ARRAY, 4, 8, 2),
}
# Tenant ids: the broker's epoch in the high half, a count of its tenants in the low.
_TENANT_BITS = 16


@dataclass
class Confinement:
    cgroup: str  # cgroup2 path, e.g. /system.slice/graft-broker.service/graft-broker
    cgroup_dir: str  # its directory under the cgroup2 mount
    pin_dir: str
    maps: dict[str, int]  # name -> fd: "marks" and MAPS
    prog_fds: dict[str, int] = field(default_factory=dict)
    reused: bool = False
    guard_fd: int = -1  # the listen guard (a socket filter), loaded by each broker
    epoch: int = 0  # this broker's: tenant ids of earlier brokers never match its grants
    fresh_state: bool = False  # the state map (which keeps the last epoch) was created by this broker
    _next_tenant: int = 0
    _updater: bpf.MapUpdater | None = field(default=None, repr=False)
    _granter: bpf.MapUpdater | None = field(default=None, repr=False)
    _owner: bpf.MapUpdater | None = field(default=None, repr=False)
    _closes: bpf.MapUpdater | None = field(default=None, repr=False)

    @property
    def map_fd(self) -> int:
        return self.maps["marks"]

    def describe(self) -> str:
        how = "reused pinned programs" if self.reused else "loaded programs"
        return f"cgroup {self.cgroup}, pins in {self.pin_dir}, {how}"

    def mark(self, sock: socket.socket, allow_any_peer: bool, dest: tuple | None = None) -> None:
        """Lock sock: from now on the kernel refuses to re-point it (EPERM).

        dest: the address the broker connected it to (connect and sendmsg to
        it stay allowed; a TCP socket also gets the listen guard);
        allow_any_peer: sendmsg to any address stays allowed.
        """
        self._set_mark(sock, encode_mark(dest, allow_any_peer))
        if dest is not None and sock.type == socket.SOCK_STREAM:
            guard_against_listening(sock, self.guard_fd)

    def mark_preissued(self, sock: socket.socket, tenant_id: int) -> None:
        """Lock an unconnected TCP socket to the tenant's grants: it may connect to those only."""
        self._set_mark(sock, encode_preissued_mark(tenant_id))
        guard_against_listening(sock, self.guard_fd)

    def _set_mark(self, sock: socket.socket, mark: bytes) -> None:
        if self._updater is None:
            self._updater = bpf.MapUpdater(self.map_fd, 4, MARK_SIZE)
        self._updater.update(struct.pack("=i", sock.fileno()), mark)

    # ---- the fast path's grants and the tenants' socket counts ----

    def new_id(self) -> int:
        """An id no earlier broker and no other use in this one has: for a tenant's count or its grants.

        Raises Unavailable once this broker has used them all up (65,535).
        """
        if self._next_tenant + 1 >= 1 << _TENANT_BITS:
            raise Unavailable("this broker has used up its tenant ids (65,535); restart it for more")
        self._next_tenant += 1
        return self.epoch << _TENANT_BITS | self._next_tenant

    def new_tenant_id(self) -> int:
        """A new id whose close count starts at 0 (see own() and released())."""
        tenant_id = self.new_id()
        bpf.map_update(self.maps["released"], struct.pack("=I", tenant_id), bytes(8))
        return tenant_id

    def forget_tenant(self, tenant_id: int) -> None:
        try:
            bpf.map_delete(self.maps["released"], struct.pack("=I", tenant_id))
        except bpf.BpfError as e:
            if e.errno != errno.ENOENT:
                raise

    def grant(self, tenant_id: int, family: int, host: str, port: int, rule_id: int) -> None:
        """Let the tenant's pre-issued sockets connect to (host, port) from now on."""
        if self._granter is None:
            self._granter = bpf.MapUpdater(self.maps["grants"], GRANT_KEY.size, GRANT_VALUE.size)
        self._granter.update(grant_key(tenant_id, family, host, port), GRANT_VALUE.pack(rule_id, 0))

    def revoke_grants(self) -> int:
        """Forget every grant (a new policy): pre-issued sockets ask the broker again."""
        return bpf.map_clear(self.maps["grants"], GRANT_KEY.size)

    def own(self, sock: socket.socket, tenant_id: int) -> None:
        """Count sock for the tenant until it is closed (released() counts the close)."""
        if self._owner is None:
            self._owner = bpf.MapUpdater(self.maps["owned"], 8, 4)
        self._owner.update(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), struct.pack("=I", tenant_id))

    def released(self, tenant_id: int) -> int:
        """How many sockets owned by the tenant have been closed."""
        if self._closes is None:
            self._closes = bpf.MapUpdater(self.maps["released"], 4, 8)
        raw = self._closes.lookup(struct.pack("=I", tenant_id))
        return struct.unpack("=Q", raw)[0] if raw is not None else 0

    def events_lost(self) -> int:
        return self.state(STATE_EVENTS_LOST)

    def state(self, index: int) -> int:
        """One u64 of the state map (STATE_*)."""
        raw = bpf.map_lookup(self.maps["state"], struct.pack("=I", index), 8)
        return struct.unpack("=Q", raw)[0] if raw is not None else 0

    def close(self) -> None:
        for fd in [*self.maps.values(), *self.prog_fds.values(), self.guard_fd]:
            if fd >= 0:
                os.close(fd)
        self.prog_fds.clear()
        self.maps.clear()
        self.guard_fd = -1


def establish(move_self: bool = True) -> Confinement:
    """Put confinement in place for sockets this process creates from now on.

    Moves the process into its confinement cgroup (see the module doc),
    loads or reuses the pinned map and programs, and attaches them there if
    they are not attached yet. Raises Unavailable with the reason.
    """
    mount = cgroup2_mount()
    current = own_cgroup()
    target = current if os.path.basename(current) == CGROUP_NAME else os.path.join(current, CGROUP_NAME)
    cgroup_dir = os.path.normpath(mount + "/" + target)
    if not os.path.isdir(os.path.dirname(cgroup_dir)):
        raise Unavailable(f"this process's cgroup {current} is not under the cgroup2 mount {mount}")
    try:
        os.makedirs(cgroup_dir, exist_ok=True)
        if move_self and target != current:
            with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
                f.write("0")
    except OSError as e:
        raise Unavailable(f"cannot enter cgroup {target}: {e.strerror}") from None
    try:
        bpffs = bpffs_mount(create=True)
        pin_dir = pin_dir_for(bpffs, target)
        os.makedirs(pin_dir, mode=0o700, exist_ok=True)
        conf = _load_or_reuse(target, cgroup_dir, pin_dir)
        try:
            _start_epoch(conf)
        except BaseException:
            conf.close()
            raise
    except bpf.BpfError as e:
        raise Unavailable(f"BPF: {e}") from None
    except OSError as e:
        raise Unavailable(f"{e}") from None
    try:
        _attach(conf)
    except bpf.BpfError as e:
        conf.close()
        raise Unavailable(f"cannot attach to cgroup {target}: {e}") from None
    return conf


def _load_or_reuse(cgroup: str, cgroup_dir: str, pin_dir: str) -> Confinement:
    map_path = os.path.join(pin_dir, MAP_PIN)
    marks_reused = os.path.exists(map_path)
    if marks_reused:
        map_fd = bpf.obj_get(map_path)
        try:
            info = bpf.map_info(map_fd)
        except BaseException:
            os.close(map_fd)
            raise
        if (info.type, info.value_size, info.map_flags & bpf.F_CLONE) != (bpf.MAP_TYPE_SK_STORAGE, MARK_SIZE,
                                                                         bpf.F_CLONE):
            os.close(map_fd)
            raise Unavailable(f"{map_path} is not graft's mark map (remove it: graft confinement remove)")
    else:
        btf_fd = bpf.btf_load(mark_btf())
        try:
            map_fd = bpf.map_create(bpf.MAP_TYPE_SK_STORAGE, 4, MARK_SIZE, 0, bpf.F_NO_PREALLOC | bpf.F_CLONE,
                                    MAP_NAME, btf_fd, BTF_KEY_ID, BTF_VALUE_ID)
        finally:
            os.close(btf_fd)
    conf = Confinement(cgroup, cgroup_dir, pin_dir, {"marks": map_fd})
    try:
        all_reused = marks_reused
        for name, spec in MAPS.items():
            conf.maps[name], reused = _load_or_reuse_map(pin_dir, name, spec)
            all_reused = all_reused and reused
            if name == "state":
                conf.fresh_state = not reused
        conf.reused = all_reused
        for name, (kind, v6, attach_type) in PROGRAMS.items():
            conf.prog_fds[name] = _load_or_reuse_program(conf, name, kind, v6, attach_type, all_reused)
        conf.guard_fd = bpf.prog_load(bpf.PROG_TYPE_SOCKET_FILTER, listen_guard_program(), LICENSE, "graft_lguard")
        if not marks_reused:
            bpf.obj_pin(map_fd, map_path)  # last: a map pin means the set is complete
    except BaseException:
        conf.close()
        raise
    return conf


def _load_or_reuse_map(pin_dir: str, name: str, spec: MapSpec) -> tuple[int, bool]:
    """The pinned map if it has the shape this broker needs, else a new one, pinned. (fd, reused)."""
    path = os.path.join(pin_dir, name)
    if os.path.exists(path):
        fd = bpf.obj_get(path)
        try:
            info = bpf.map_info(fd)
        except BaseException:
            os.close(fd)
            raise
        if (info.type, info.key_size, info.value_size, info.max_entries) == (
                spec.map_type, spec.key_size, spec.value_size, spec.max_entries):
            return fd, True
        os.close(fd)
        log.info("confinement: map %s changed shape since it was pinned; replacing it", name)
        _unlink(path)
    fd = bpf.map_create(spec.map_type, spec.key_size, spec.value_size, spec.max_entries, spec.flags,
                        f"graft_{name}")
    try:
        bpf.obj_pin(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd, False


def _start_epoch(conf: Confinement) -> None:
    """This broker's epoch: one more than the last broker's. Grants and counts start empty.

    Sockets an earlier broker pre-issued carry its tenant ids: with its
    grants gone and no new grant ever made for those ids, they can connect
    nowhere (the shim then asks this broker).
    """
    if conf.fresh_state:
        # The last epoch is lost (a first start, or the pin was removed): sockets
        # pre-issued before may still be around, under ids we cannot know.
        last = secrets.randbelow(1 << (32 - _TENANT_BITS))
    else:
        last = conf.state(STATE_EPOCH)
    conf.epoch = (last + 1) % (1 << (32 - _TENANT_BITS)) or 1
    bpf.map_update(conf.maps["state"], struct.pack("=I", STATE_EPOCH), struct.pack("=Q", conf.epoch))
    conf.revoke_grants()
    bpf.map_clear(conf.maps["released"], 4)


def _load_or_reuse_program(conf: Confinement, name: str, kind: str, v6: bool, attach_type: int,
                           maps_reused: bool) -> int:
    """The pinned program if it is the one this broker would load, else the fresh one, pinned.

    Programs are always assembled and loaded (cheap), and the kernel's tags
    compared: a broker upgraded to changed programs replaces the pinned
    ones (the old are detached by _attach). Programs pinned next to other
    maps would not see ours: unless every map was reused, nothing is.
    """
    path = os.path.join(conf.pin_dir, name)
    fresh = bpf.prog_load(prog_type(kind), program(kind, v6, conf.maps), LICENSE, f"graft_{name}", attach_type)
    try:
        if maps_reused and os.path.exists(path):
            pinned = bpf.obj_get(path)
            if bpf.prog_tag(pinned) == bpf.prog_tag(fresh):
                os.close(fresh)
                return pinned
            os.close(pinned)
            log.info("confinement: %s changed since it was pinned; replacing it", name)
        conf.reused = False
        _unlink(path)
        bpf.obj_pin(fresh, path)
    except BaseException:
        os.close(fresh)
        raise
    return fresh


def _attach(conf: Confinement) -> None:
    """Attach our programs where they are not yet, and detach any other graft program there.

    Others are programs of an earlier broker: replaced by an upgrade, or
    left attached but unpinned by one that died between the two steps.
    Only programs named graft_* are touched; the cgroup is graft's own.
    """
    fd = os.open(conf.cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name, (_, _, attach_type) in PROGRAMS.items():
            prog_id = bpf.prog_info(conf.prog_fds[name]).id
            attached = bpf.prog_query(fd, attach_type)
            if prog_id not in attached:
                bpf.prog_attach(fd, conf.prog_fds[name], attach_type, bpf.F_ALLOW_MULTI)
            for other in attached:
                if other != prog_id:
                    _detach_if_graft(fd, other, attach_type)
    finally:
        os.close(fd)


def _detach_if_graft(cgroup_fd: int, prog_id: int, attach_type: int) -> None:
    try:
        prog_fd = bpf.prog_get_fd_by_id(prog_id)
    except bpf.BpfError as e:
        if e.errno == errno.ENOENT:  # gone meanwhile
            return
        raise
    try:
        name = bpf.prog_name(prog_fd)
        if name.startswith("graft_"):
            bpf.prog_detach(cgroup_fd, prog_fd, attach_type)
            log.info("confinement: detached an earlier %s (id %d)", name, prog_id)
    finally:
        os.close(prog_fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---- removal ------------------------------------------------------------------------


def installed(bpffs: str | None = None) -> list[tuple[str, str]]:
    """Every (cgroup path, pin dir) with graft's pins under <bpffs>/graft."""
    try:
        bpffs = bpffs or bpffs_mount(create=False)
    except Unavailable:
        return []
    root = os.path.join(bpffs, PIN_ROOT_NAME)
    out = []
    for dirpath, _dirs, files in os.walk(root):
        if MAP_PIN in files or any(name in files for name in PROGRAMS):
            out.append(("/" + os.path.relpath(dirpath, root).strip("."), dirpath))
    return sorted(out)


def remove(cgroup: str, pin_dir: str, rmdir_cgroup: bool = True) -> list[str]:
    """Detach graft's programs from cgroup, unpin everything, remove the cgroup if empty.

    Sockets already handed out are no longer confined once their programs
    are detached. Returns what was done, one line each.
    """
    done: list[str] = []
    try:
        cgroup_dir = os.path.normpath(cgroup2_mount() + "/" + cgroup)
        cg_fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (Unavailable, OSError):
        cgroup_dir, cg_fd = None, None
    try:
        for name, (_, _, attach_type) in PROGRAMS.items():
            path = os.path.join(pin_dir, name)
            if not os.path.exists(path):
                continue
            if cg_fd is not None:
                fd = bpf.obj_get(path)
                try:
                    bpf.prog_detach(cg_fd, fd, attach_type)
                    done.append(f"detached {name} from {cgroup}")
                except bpf.BpfError as e:
                    if e.errno != errno.ENOENT:
                        raise
                finally:
                    os.close(fd)
            os.unlink(path)
            done.append(f"removed {path}")
    finally:
        if cg_fd is not None:
            os.close(cg_fd)
    for map_name in [*MAPS, MAP_PIN]:  # the marks last, as they were pinned last
        map_path = os.path.join(pin_dir, map_name)
        if os.path.exists(map_path):
            os.unlink(map_path)
            done.append(f"removed {map_path}")
    # empty pin directories, up to and including <bpffs>/graft
    root = pin_dir
    for _ in [c for c in cgroup.strip("/").split("/") if c]:
        root = os.path.dirname(root)
    d = pin_dir
    while os.path.isdir(d) and not os.listdir(d):
        os.rmdir(d)
        if d == root:
            break
        d = os.path.dirname(d)
    if rmdir_cgroup and cgroup_dir and os.path.basename(cgroup_dir) == CGROUP_NAME and os.path.isdir(cgroup_dir):
        try:
            os.rmdir(cgroup_dir)
            done.append(f"removed cgroup {cgroup}")
        except OSError as e:
            done.append(f"kept cgroup {cgroup}: {e.strerror} (a broker still runs in it?)")
    return done
