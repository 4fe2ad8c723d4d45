"""Confinement's BPF programs, assembled from eBPF instructions (confine/asm.py).

* connect4/6, sendmsg4/6, bind4/6: cgroup ``sock_addr`` programs, attached to
  the broker's cgroup, so they run for the sockets the broker creates. A
  socket without a mark (maps.py) is let through at once; on a marked one,
  bind is refused, and connect/sendmsg only reach the destination in the
  mark (or anyone, for a grafted UDP server). A UDP socket may also reach
  what its tenant's UDP ``grants`` hold, by a datagram or by a connect (which
  only names where later sends go). A pre-issued socket's first connect is
  judged by the tenant's ``grants``, locks the mark to that destination and
  writes an audit record to the ``events`` ring.
* release: cgroup ``sock_release``, counts closes of handed-out sockets (by
  the count id the ``counts`` socket storage holds).
* create: cgroup ``sock_create``, marks and counts each socket of a batch of
  pre-issued ones as the kernel creates it, from the ``stamps`` entry of the
  broker thread making the batch (confine/issue.c); other sockets the
  broker creates find no entry and are left alone.
* the listen guard: a socket filter that drops SYNs without ACK, attached
  and locked on connected and pre-issued TCP sockets (docs/security.md,
  "The listen hole").

Refused means the system call fails with EPERM.
"""

from __future__ import annotations

import socket

from . import bpf
from .asm import Asm
from .maps import (
    EVENT_SIZE,
    F_ANY_PEER,
    F_DEST_V4,
    F_HAS_DEST,
    F_PREISSUED,
    GRANT_KEY_SIZE,
    STATE_EVENTS_LOST,
    grant_kind,
    offset_of,
)

LICENSE = "Dual MIT/GPL"

# bpf_sock_addr offsets (checked against the header in tests/e2e/test_confinement.py)
CTX_USER_IP4 = 4
CTX_USER_IP6 = 8
CTX_USER_PORT = 24
CTX_TYPE = 32
CTX_SK = 64
# offsets in the maps' layouts (graft_maps.h)
M_FLAGS, M_PORT, M_IP4, M_IP6, M_TENANT = (
    offset_of("struct graft_mark", f) for f in ("flags", "port", "ip4", "ip6", "tenant")
)
K_TENANT, K_KIND, K_PORT, K_ADDR = (offset_of("struct graft_grant_key", f) for f in ("tenant", "kind", "port", "addr"))
V_EXPIRES = offset_of("struct graft_grant_value", "expires")
S_MARK, S_COUNT_ID, S_MADE = (offset_of("struct graft_stamp", f) for f in ("mark", "count_id", "made"))
E_TENANT, E_RULE, E_PID, E_UID, E_FAMILY, E_PORT, E_ADDR = (
    offset_of("struct graft_event", f) for f in ("tenant", "rule", "pid", "uid", "family", "port", "addr")
)
# The audit record takes the key's port and address as they are, word by word.
if (K_ADDR - K_PORT, E_ADDR - E_PORT) != (4, 4):  # checked at import, also under python -O
    raise RuntimeError("graft_maps.h: the programs copy a key's port and address to an event word by word")
# v4-mapped prefix word 2 (bytes 00 00 ff ff) as a little-endian s32 immediate
_MAPPED_WORD = -0x10000


def program(kind: str, v6: bool, maps: dict[str, int]) -> bytes:
    """The program for kind "connect" | "sendmsg" | "bind" (IPv4 or IPv6) | "release" | "create"."""
    if kind == "release":
        return release_program(maps)
    if kind == "create":
        return create_program(maps)
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
    if kind == "connect":
        # A UDP connect only names where later sends go: judged as a datagram (below).
        a.ldx_w(2, 6, CTX_TYPE)
        a.jeq_imm(2, socket.SOCK_DGRAM, "datagram")
        a.mov_reg(2, 1)
        a.and_imm(2, F_PREISSUED | F_HAS_DEST)
        a.jeq_imm(2, F_PREISSUED, "first_connect")
        _to_mark_destination(a, v6, "deny")  # a TCP socket connects only where the broker connected it
        a.label("datagram")
    # A datagram elsewhere than the mark's destination goes where the tenant's UDP
    # grants allow (the policy's verdicts, made by the broker); a UDP server's, anywhere.
    a.mov_reg(2, 1)
    a.and_imm(2, F_ANY_PEER)
    a.jne_imm(2, 0, "allow")
    _to_mark_destination(a, v6, "udp_grants")
    _exits(a, "allow", "deny")
    if kind == "connect":
        _first_connect(a, v6, maps)
    a.label("udp_grants")
    if v6 and kind == "connect":
        # A datagram to a v4-mapped address runs the IPv4 sendmsg hook, so UDP grants of such
        # destinations are keyed in IPv4 form (maps.grant_key); a UDP connect6 must look them up so.
        a.ldx_w(2, 6, CTX_USER_IP6)
        a.jne_imm(2, 0, "udp_grants_v6")
        a.ldx_w(2, 6, CTX_USER_IP6 + 4)
        a.jne_imm(2, 0, "udp_grants_v6")
        a.ldx_w(2, 6, CTX_USER_IP6 + 8)  # bytes 00 00 ff ff: 0xffff0000 as loaded
        a.mov_reg(3, 2)
        a.and_imm(3, 0xFFFF)
        a.jne_imm(3, 0, "udp_grants_v6")
        a.rsh_imm(2, 16)  # (an immediate is sign-extended: 0xffff0000 cannot be one)
        a.jne_imm(2, 0xFFFF, "udp_grants_v6")
        _grant_lookup(a, v6, socket.SOCK_DGRAM, maps, mapped=True)
        a.ja("allow")
        a.label("udp_grants_v6")
    _grant_lookup(a, v6, socket.SOCK_DGRAM, maps)
    a.ja("allow")
    return a.assemble()


def _to_mark_destination(a: Asm, v6: bool, elsewhere: str) -> None:
    """To "allow" if the call's destination is the mark's, else to elsewhere.

    Entered with r1 = the mark's flags, r6 = ctx, r7 = the mark; r1 is lost.
    """
    need = F_HAS_DEST if v6 else F_HAS_DEST | F_DEST_V4  # a destination, in this hook's family
    a.and_imm(1, need)
    a.jne_imm(1, need, elsewhere)
    # the destination the broker connected it to
    a.ldx_w(2, 6, CTX_USER_PORT)
    a.ldx_w(3, 7, M_PORT)
    a.jne_reg(2, 3, elsewhere)
    if v6:
        for i in range(4):
            a.ldx_w(2, 6, CTX_USER_IP6 + 4 * i)
            a.ldx_w(3, 7, M_IP6 + 4 * i)
            a.jne_reg(2, 3, elsewhere)
    else:
        a.ldx_w(2, 6, CTX_USER_IP4)
        a.ldx_w(3, 7, M_IP4)
        a.jne_reg(2, 3, elsewhere)
    a.ja("allow")


# Stack of the connect programs: the grant key, the audit record, a state key.
_KEY_AT, _EVENT_AT, _STATE_KEY_AT = -32, -80, -84
if GRANT_KEY_SIZE > -_KEY_AT or EVENT_SIZE > _KEY_AT - _EVENT_AT:
    raise RuntimeError("graft_maps.h: a grant key or an event outgrew its slot on the programs' stack")


def _grant_lookup(a: Asm, v6: bool, sock_type: int, maps: dict[str, int], mapped: bool = False) -> None:
    """Look the destination up in the grants of the mark's tenant; to "deny" if it is not there.

    Entered with r6 = ctx, r7 = the mark; the key (as maps.grant_key builds
    it) is left at _KEY_AT and r0 points at the grant's value. mapped: an
    IPv6 hook's v4-mapped destination, looked up in its IPv4 form. A grant
    whose ``expires`` second has come (a rule's `names`, its TTL run out)
    is none: the kernel's clock decides, so no sweep of the map can be late.
    Uses r9.
    """
    a.ldx_w(1, 7, M_TENANT)
    a.jeq_imm(1, 0, "deny")  # a socket of no tenant's grants (a broker without them)
    a.stx_w(10, _KEY_AT + K_TENANT, 1)
    a.st_w(10, _KEY_AT + K_KIND, grant_kind(sock_type, socket.AF_INET6 if v6 and not mapped else socket.AF_INET))
    a.ldx_w(1, 6, CTX_USER_PORT)
    a.stx_w(10, _KEY_AT + K_PORT, 1)
    if mapped:
        words = [CTX_USER_IP6 + 12]
    elif v6:
        words = [CTX_USER_IP6 + 4 * i for i in range(4)]
    else:
        words = [CTX_USER_IP4]
    for i in range(4):  # the address field of the key: the words loaded, zeros after them
        if i < len(words):
            a.ldx_w(1, 6, words[i])
            a.stx_w(10, _KEY_AT + K_ADDR + 4 * i, 1)
        else:
            a.st_w(10, _KEY_AT + K_ADDR + 4 * i, 0)
    # the tenant's own grants: the key starts with the tenant id, the outer map's key
    a.ld_map_fd(1, maps["grants"])
    a.stack_ptr(2, _KEY_AT)
    a.call(bpf.FUNC_MAP_LOOKUP_ELEM)
    a.jeq_imm(0, 0, "deny")
    a.mov_reg(1, 0)
    a.stack_ptr(2, _KEY_AT)
    a.call(bpf.FUNC_MAP_LOOKUP_ELEM)
    a.jeq_imm(0, 0, "deny")
    lasting = a.unique("grant_lasts")
    a.ldx_w(1, 0, V_EXPIRES)
    a.jeq_imm(1, 0, lasting)  # a grant that never lapses: no clock needed
    a.mov_reg(9, 0)  # the value, kept across the helper call
    a.call(bpf.FUNC_KTIME_GET_NS)
    a.div_imm(0, 1_000_000_000)
    a.ldx_w(1, 9, V_EXPIRES)
    a.jge_reg(0, 1, "deny")
    a.mov_reg(0, 9)
    a.label(lasting)


def _first_connect(a: Asm, v6: bool, maps: dict[str, int]) -> None:
    """A pre-issued socket's first connect: allowed if granted, and then locked to it.

    Entered with r6 = ctx, r7 = the mark; ends at the "allow"/"deny" labels.
    """
    family = socket.AF_INET6 if v6 else socket.AF_INET
    a.label("first_connect")
    _grant_lookup(a, v6, socket.SOCK_STREAM, maps)
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
    a.stx_w(10, _EVENT_AT + E_TENANT, 1)
    a.stx_w(10, _EVENT_AT + E_RULE, 8)
    a.call(bpf.FUNC_GET_CURRENT_PID_TGID)
    a.rsh_imm(0, 32)  # the tgid: the process id
    a.stx_w(10, _EVENT_AT + E_PID, 0)
    a.call(bpf.FUNC_GET_CURRENT_UID_GID)
    a.stx_w(10, _EVENT_AT + E_UID, 0)  # the low half: the uid
    a.st_w(10, _EVENT_AT + E_FAMILY, family)
    for i in range(5):  # user_port and the address, from the key
        a.ldx_w(1, 10, _KEY_AT + K_PORT + 4 * i)
        a.stx_w(10, _EVENT_AT + E_PORT + 4 * i, 1)
    a.ld_map_fd(1, maps["events"])
    a.stack_ptr(2, _EVENT_AT)
    a.mov_imm(3, EVENT_SIZE)
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
    a.mov_reg(2, 1)  # the socket: the ctx of a cgroup sock program
    a.ld_map_fd(1, maps["counts"])
    a.mov_imm(3, 0)  # no value to create
    a.mov_imm(4, 0)  # flags 0: look up only
    a.call(bpf.FUNC_SK_STORAGE_GET)
    a.jeq_imm(0, 0, "out")  # not handed out by the broker (an accepted socket, its own)
    a.ldx_w(1, 0, 0)
    a.stx_w(10, -16, 1)  # the count id (the storage goes with the socket)
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


def create_program(maps: dict[str, int]) -> bytes:
    """cgroup sock_create: a socket a thread making a batch of pre-issued ones creates gets their mark and count.

    Fails closed: storage the kernel cannot give makes socket() fail
    (EPERM), so no socket of a batch leaves unmarked; `made` tells the
    broker each one was stamped (issue.c checks it against the batch).
    """
    a = Asm()
    a.mov_reg(6, 1)  # the socket: the ctx of a cgroup sock program
    a.call(bpf.FUNC_GET_CURRENT_PID_TGID)
    a.stx_dw(10, -8, 0)
    a.ld_map_fd(1, maps["stamps"])
    a.stack_ptr(2, -8)
    a.call(bpf.FUNC_MAP_LOOKUP_ELEM)
    a.jeq_imm(0, 0, "allow")  # this thread makes no batch: not ours to mark
    a.mov_reg(7, 0)  # r7 = the stamp
    for name, at in (("marks", S_MARK), ("counts", S_COUNT_ID)):
        a.ld_map_fd(1, maps[name])
        a.mov_reg(2, 6)
        a.mov_reg(3, 7)
        a.add_imm(3, at)  # the storage's first value: the stamp's
        a.mov_imm(4, bpf.SK_STORAGE_GET_F_CREATE)
        a.call(bpf.FUNC_SK_STORAGE_GET)
        a.jeq_imm(0, 0, "refuse")
    a.mov_imm(1, 1)
    a.atomic_add_dw(7, S_MADE, 1)
    _exits(a, "allow", "refuse")
    return a.assemble()


def _exits(a: Asm, allow: str, refuse: str) -> None:
    """The two ends a cgroup program's paths jump to: 1 lets the call through, 0 refuses it (EPERM)."""
    a.label(allow)
    a.mov_imm(0, 1)
    a.exit()
    a.label(refuse)
    a.mov_imm(0, 0)
    a.exit()


# name in bpffs -> (kind, v6, attach type); bpf program names are "graft_" + name
PROGRAMS = {
    "connect4": ("connect", False, bpf.CGROUP_INET4_CONNECT),
    "connect6": ("connect", True, bpf.CGROUP_INET6_CONNECT),
    "sendmsg4": ("sendmsg", False, bpf.CGROUP_UDP4_SENDMSG),
    "sendmsg6": ("sendmsg", True, bpf.CGROUP_UDP6_SENDMSG),
    "bind4": ("bind", False, bpf.CGROUP_INET4_BIND),
    "bind6": ("bind", True, bpf.CGROUP_INET6_BIND),
    "release": ("release", False, bpf.CGROUP_INET_SOCK_RELEASE),
    "create": ("create", False, bpf.CGROUP_INET_SOCK_CREATE),
}
# Confinement holds without these: a kernel that refuses one (bpf_get_current_pid_tgid came to
# cgroup sock programs later than to sock_addr ones) leaves its work to the broker (issue.c).
OPTIONAL = frozenset({"create"})


def prog_type(kind: str) -> int:
    return bpf.PROG_TYPE_CGROUP_SOCK if kind in ("release", "create") else bpf.PROG_TYPE_CGROUP_SOCK_ADDR


# The listen guard, a socket filter: for TCP the kernel runs it with the
# packet starting at the TCP header (v4 and v6 alike), so byte 13 holds the
# flags. A SYN without ACK is dropped, anything else kept whole. Loaded once
# per broker; attaching it to a socket is a reference, not a copy.
_TCP_FLAGS, _SYN, _ACK = 13, 0x02, 0x10


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
