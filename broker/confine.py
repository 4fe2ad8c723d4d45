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
* ``listen()`` has no sock_addr hook, and a connected TCP socket dissolved by
  ``connect(AF_UNSPEC)`` loses its kernel-chosen port, so ``listen()`` would
  bind a fresh ephemeral port on the host's wildcard address. Each TCP
  socket the broker *connects* therefore gets a locked socket filter
  (``SO_ATTACH_BPF`` + ``SO_LOCK_FILTER``, which the app cannot undo)
  that drops segments with SYN set and ACK clear: a connected socket never
  needs one, and a listener gets nothing else, so the escaped listen
  succeeds but no connection ever reaches it. Grafted listeners and the
  sockets they accept carry no filter and pay nothing.

Where things live, for a broker whose cgroup is ``C`` (from /proc/self/cgroup):

* cgroup ``C/graft-broker`` (or ``C`` itself if it already has that name): the
  broker moves itself in at start, and the programs are attached there with
  ``BPF_F_ALLOW_MULTI``, so no other process's sockets ever run them;
* ``<bpffs>/graft/<that cgroup's path>/{marks,connect4,...}``: the map and the
  programs, pinned. A restarted broker finds them and reuses them (and finds
  them already attached), so nothing stacks, and sockets handed out before the
  restart keep their marks and stay confined.

``remove()`` undoes it all (``graft confinement remove``; docs/security.md).
Instruction encodings follow <linux/bpf.h>; the programs are assembled here
because there is no compiler at run time.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
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
#   u32 flags; u32 port; u32 ip4; u32 ip6[4]; u32 reserved
# port/ip4/ip6 hold the destination the broker connected the socket to, in
# the same representation as bpf_sock_addr's user_port/user_ip4/user_ip6.
MARK = struct.Struct("=II4s16sI")
MARK_SIZE = MARK.size  # 32
F_HAS_DEST = 1
F_ANY_PEER = 2
# The destination has an IPv4 form (IPv4, or v4-mapped IPv6). Without it
# the IPv4 programs match no destination: a dual-stack IPv6 UDP socket runs
# them for an AF_INET address, and an ip4 of 0.0.0.0 would otherwise admit
# 0.0.0.0, which the kernel delivers to 127.0.0.1.
F_DEST_V4 = 4

# ---- the programs ---------------------------------------------------------------

# bpf_sock_addr offsets (checked against the header in tests/test_confinement.py)
CTX_USER_IP4 = 4
CTX_USER_IP6 = 8
CTX_USER_PORT = 24
CTX_SK = 64
# mark offsets
M_FLAGS, M_PORT, M_IP4, M_IP6 = 0, 4, 8, 12


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


def program(kind: str, v6: bool, map_fd: int) -> bytes:
    """The program for kind "connect" | "sendmsg" | "bind", IPv4 or IPv6."""
    a = Asm()
    a.mov_reg(6, 1)  # r6 = ctx
    a.ldx_dw(2, 1, CTX_SK)  # r2 = ctx->sk
    a.ld_map_fd(1, map_fd)
    a.mov_imm(3, 0)  # no value to create
    a.mov_imm(4, 0)  # flags 0: look up only
    a.call(bpf.FUNC_SK_STORAGE_GET)
    a.jeq_imm(0, 0, "allow")  # not a grafted socket: none of our business
    if kind != "bind":
        a.ldx_w(1, 0, M_FLAGS)
        if kind == "sendmsg":
            a.mov_reg(2, 1)
            a.and_imm(2, F_ANY_PEER)
            a.jne_imm(2, 0, "allow")
        need = F_HAS_DEST if v6 else F_HAS_DEST | F_DEST_V4  # a destination, in this hook's family
        a.and_imm(1, need)
        a.jne_imm(1, need, "deny")
        # only the destination the broker connected it to
        a.ldx_w(2, 6, CTX_USER_PORT)
        a.ldx_w(3, 0, M_PORT)
        a.jne_reg(2, 3, "deny")
        if v6:
            for i in range(4):
                a.ldx_w(2, 6, CTX_USER_IP6 + 4 * i)
                a.ldx_w(3, 0, M_IP6 + 4 * i)
                a.jne_reg(2, 3, "deny")
        else:
            a.ldx_w(2, 6, CTX_USER_IP4)
            a.ldx_w(3, 0, M_IP4)
            a.jne_reg(2, 3, "deny")
        a.label("allow")
        a.mov_imm(0, 1)
        a.exit()
        a.label("deny")
        a.mov_imm(0, 0)
        a.exit()
    else:
        a.mov_imm(0, 0)  # a grafted socket never binds again
        a.exit()
        a.label("allow")
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
}


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
    members = [("flags", u32, 0), ("port", u32, 32), ("ip4", u32, 64), ("ip6", 3, 96), ("reserved", u32, 224)]
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


@dataclass
class Confinement:
    cgroup: str  # cgroup2 path, e.g. /system.slice/graft-broker.service/graft-broker
    cgroup_dir: str  # its directory under the cgroup2 mount
    pin_dir: str
    map_fd: int
    prog_fds: dict[str, int] = field(default_factory=dict)
    reused: bool = False
    guard_fd: int = -1  # the listen guard (a socket filter), loaded by each broker
    _updater: bpf.MapUpdater | None = field(default=None, repr=False)

    def describe(self) -> str:
        how = "reused pinned programs" if self.reused else "loaded programs"
        return f"cgroup {self.cgroup}, pins in {self.pin_dir}, {how}"

    def mark(self, sock: socket.socket, allow_any_peer: bool, dest: tuple | None = None) -> None:
        """Lock sock: from now on the kernel refuses to re-point it (EPERM).

        dest: the address the broker connected it to (connect and sendmsg to
        it stay allowed; a TCP socket also gets the listen guard);
        allow_any_peer: sendmsg to any address stays allowed.
        """
        if self._updater is None:
            self._updater = bpf.MapUpdater(self.map_fd, 4, MARK_SIZE)
        self._updater.update(struct.pack("=i", sock.fileno()), encode_mark(dest, allow_any_peer))
        if dest is not None and sock.type == socket.SOCK_STREAM:
            guard_against_listening(sock, self.guard_fd)

    def close(self) -> None:
        for fd in [self.map_fd, *self.prog_fds.values(), self.guard_fd]:
            if fd >= 0:
                os.close(fd)
        self.prog_fds.clear()
        self.map_fd = self.guard_fd = -1


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
    reused = os.path.exists(map_path)
    if reused:
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
    conf = Confinement(cgroup, cgroup_dir, pin_dir, map_fd, reused=reused)
    try:
        for name, (kind, v6, attach_type) in PROGRAMS.items():
            conf.prog_fds[name] = _load_or_reuse_program(conf, name, kind, v6, attach_type, reused)
        conf.guard_fd = bpf.prog_load(bpf.PROG_TYPE_SOCKET_FILTER, listen_guard_program(), LICENSE, "graft_lguard")
        if not reused:
            bpf.obj_pin(map_fd, map_path)  # last: a map pin means the set is complete
    except BaseException:
        conf.close()
        raise
    return conf


def _load_or_reuse_program(conf: Confinement, name: str, kind: str, v6: bool, attach_type: int,
                           map_reused: bool) -> int:
    """The pinned program if it is the one this broker would load, else the fresh one, pinned.

    Programs are always assembled and loaded (cheap), and the kernel's tags
    compared: a broker upgraded to changed programs replaces the pinned
    ones (the old are detached by _attach). Programs pinned next to another
    map would not see our marks: without a reused map, nothing is reused.
    """
    path = os.path.join(conf.pin_dir, name)
    fresh = bpf.prog_load(bpf.PROG_TYPE_CGROUP_SOCK_ADDR, program(kind, v6, conf.map_fd), LICENSE, f"graft_{name}",
                          attach_type)
    try:
        if map_reused and os.path.exists(path):
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
    map_path = os.path.join(pin_dir, MAP_PIN)
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
