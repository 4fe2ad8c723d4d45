"""The bpf(2) system call, through cffi: just what confinement needs.

No libbpf and no compiler at run time: ``union bpf_attr`` is declared below
as the few per-command structs the broker uses, each laid out exactly as in
<linux/bpf.h> (tests/e2e/test_confinement.py compiles a C program against the
kernel header and checks every offset and constant). The kernel accepts an
attr shorter than its own union as long as it knows every byte it is given.

Functions raise ``BpfError`` (an OSError) with the errno, and for a refused
program the verifier's log.
"""

from __future__ import annotations

import os
import platform
import struct

import cffi

ffi = cffi.FFI()
ffi.cdef(
    """
    long syscall(long number, ...);

    struct graft_bpf_map_create {        /* BPF_MAP_CREATE */
        uint32_t map_type;
        uint32_t key_size;
        uint32_t value_size;
        uint32_t max_entries;
        uint32_t map_flags;
        uint32_t inner_map_fd;
        uint32_t numa_node;
        char     map_name[16];
        uint32_t map_ifindex;
        uint32_t btf_fd;
        uint32_t btf_key_type_id;
        uint32_t btf_value_type_id;
        uint32_t btf_vmlinux_value_type_id;
        uint64_t map_extra;
    };
    struct graft_bpf_map_elem {          /* BPF_MAP_*_ELEM */
        uint32_t map_fd;
        uint32_t pad0;
        uint64_t key;
        uint64_t value;
        uint64_t flags;
    };
    struct graft_bpf_prog_load {         /* BPF_PROG_LOAD */
        uint32_t prog_type;
        uint32_t insn_cnt;
        uint64_t insns;
        uint64_t license;
        uint32_t log_level;
        uint32_t log_size;
        uint64_t log_buf;
        uint32_t kern_version;
        uint32_t prog_flags;
        char     prog_name[16];
        uint32_t prog_ifindex;
        uint32_t expected_attach_type;
    };
    struct graft_bpf_obj {               /* BPF_OBJ_PIN, BPF_OBJ_GET */
        uint64_t pathname;
        uint32_t bpf_fd;
        uint32_t file_flags;
    };
    struct graft_bpf_attach {            /* BPF_PROG_ATTACH, BPF_PROG_DETACH */
        uint32_t target_fd;
        uint32_t attach_bpf_fd;
        uint32_t attach_type;
        uint32_t attach_flags;
        uint32_t replace_bpf_fd;
    };
    struct graft_bpf_query {             /* BPF_PROG_QUERY */
        uint32_t target_fd;
        uint32_t attach_type;
        uint32_t query_flags;
        uint32_t attach_flags;
        uint64_t prog_ids;
        uint32_t prog_cnt;
        uint32_t pad0;
    };
    struct graft_bpf_get_id {            /* BPF_PROG_GET_FD_BY_ID */
        uint32_t prog_id;
        uint32_t next_id;
        uint32_t open_flags;
    };
    struct graft_bpf_info {              /* BPF_OBJ_GET_INFO_BY_FD */
        uint32_t bpf_fd;
        uint32_t info_len;
        uint64_t info;
    };
    struct graft_bpf_btf_load {          /* BPF_BTF_LOAD */
        uint64_t btf;
        uint64_t btf_log_buf;
        uint32_t btf_size;
        uint32_t btf_log_size;
        uint32_t btf_log_level;
    };
    struct graft_bpf_prog_info {         /* the head of struct bpf_prog_info */
        uint32_t type;
        uint32_t id;
        uint8_t  tag[8];
        uint32_t jited_prog_len;
        uint32_t xlated_prog_len;
        uint64_t jited_prog_insns;
        uint64_t xlated_prog_insns;
        uint64_t load_time;
        uint32_t created_by_uid;
        uint32_t nr_map_ids;
        uint64_t map_ids;
        char     name[16];
    };
    struct graft_bpf_map_info {          /* the head of struct bpf_map_info */
        uint32_t type;
        uint32_t id;
        uint32_t key_size;
        uint32_t value_size;
        uint32_t max_entries;
        uint32_t map_flags;
        char     name[16];
    };
    """
)
_libc = ffi.dlopen(None)

# enum bpf_cmd
MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
PROG_LOAD = 5
OBJ_PIN = 6
OBJ_GET = 7
PROG_ATTACH = 8
PROG_DETACH = 9
PROG_GET_FD_BY_ID = 13
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16
BTF_LOAD = 18

# enum bpf_map_type, enum bpf_prog_type, enum bpf_attach_type
MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_LRU_HASH = 9
MAP_TYPE_HASH_OF_MAPS = 13
MAP_TYPE_SK_STORAGE = 24
MAP_TYPE_RINGBUF = 27
PROG_TYPE_SOCKET_FILTER = 1
PROG_TYPE_CGROUP_SOCK = 9
PROG_TYPE_CGROUP_SOCK_ADDR = 18
CGROUP_INET4_BIND = 8
CGROUP_INET6_BIND = 9
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CGROUP_UDP4_SENDMSG = 14
CGROUP_UDP6_SENDMSG = 15
CGROUP_INET_SOCK_CREATE = 2
CGROUP_INET_SOCK_RELEASE = 34

# flags
F_NO_PREALLOC = 1 << 0  # map_flags; required for SK_STORAGE
F_CLONE = 1 << 9  # map_flags: an accepted socket gets a copy of its listener's entry
F_ALLOW_MULTI = 1 << 1  # attach_flags: coexist with other programs on the cgroup
ANY = 0  # BPF_ANY for map updates
# enum bpf_func_id
FUNC_MAP_LOOKUP_ELEM = 1
FUNC_MAP_DELETE_ELEM = 3
FUNC_KTIME_GET_NS = 5  # CLOCK_MONOTONIC, in nanoseconds
FUNC_GET_CURRENT_PID_TGID = 14
FUNC_GET_CURRENT_UID_GID = 15
FUNC_GET_SOCKET_COOKIE = 46
FUNC_SK_STORAGE_GET = 107
FUNC_RINGBUF_OUTPUT = 130
SK_STORAGE_GET_F_CREATE = 1  # sk_storage_get flag: create the socket's entry, from the value given
RB_NO_WAKEUP = 1  # ringbuf_output flag: the consumer polls, no wakeup per record

# Little-endian machines only: Asm packs instructions little-endian.
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280, "ppc64le": 361}
LOG_SIZE = 1 << 20


class BpfError(OSError):
    """A bpf(2) call failed; ``log`` holds the verifier's log for a refused program."""

    def __init__(self, err: int, what: str, log: str = ""):
        super().__init__(err, f"{what}: {os.strerror(err)}" + (f"\n{log}" if log else ""))
        self.log = log


_nr = None


def sys_bpf_number() -> int:
    machine = platform.machine()
    try:
        return _SYS_BPF[machine]
    except KeyError:
        raise BpfError(38, f"bpf(2) number unknown for {machine}") from None  # ENOSYS


def _bpf(cmd: int, attr, what: str, log: str = "") -> int:
    global _nr
    if _nr is None:
        _nr = ffi.cast("long", sys_bpf_number())
    ret = _libc.syscall(_nr, ffi.cast("int", cmd), attr, ffi.cast("unsigned int", ffi.sizeof(attr[0])))
    if ret < 0:
        err = ffi.errno
        raise BpfError(err, what, log() if callable(log) else log)
    return int(ret)


def _addr(cdata) -> int:
    return int(ffi.cast("uintptr_t", cdata))


# ---- BTF ----------------------------------------------------------------------

_BTF_KIND_INT, _BTF_KIND_ARRAY, _BTF_KIND_STRUCT = 1, 3, 4


def btf_blob(types: list[tuple], strings: list[str]) -> bytes:
    """A minimal BTF blob. ``types`` entries: ("int", name, size, signed),
    ("array", elem_type, index_type, nelems), ("struct", name, size, [(name, type, bit_offset)])."""
    strtab = b"\0"
    offsets: dict[str, int] = {"": 0}

    def s(name: str) -> int:
        nonlocal strtab
        if name not in offsets:
            offsets[name] = len(strtab)
            strtab += name.encode() + b"\0"
        return offsets[name]

    for name in strings:
        s(name)
    body = b""
    for t in types:
        if t[0] == "int":
            _, name, size, signed = t
            body += struct.pack("=III", s(name), _BTF_KIND_INT << 24, size)
            body += struct.pack("=I", ((1 if signed else 0) << 24) | (size * 8))
        elif t[0] == "array":
            _, elem, index, n = t
            body += struct.pack("=III", 0, _BTF_KIND_ARRAY << 24, 0) + struct.pack("=III", elem, index, n)
        elif t[0] == "struct":
            _, name, size, members = t
            body += struct.pack("=III", s(name), (_BTF_KIND_STRUCT << 24) | len(members), size)
            for mname, mtype, bitoff in members:
                body += struct.pack("=III", s(mname), mtype, bitoff)
        else:  # pragma: no cover - programming error
            raise ValueError(t[0])
    hdr = struct.pack("=HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(body), len(body), len(strtab))
    return hdr + body + strtab


def btf_load(blob: bytes) -> int:
    buf = ffi.new("char[]", blob)
    log = ffi.new("char[]", 65536)
    attr = ffi.new("struct graft_bpf_btf_load *")
    attr.btf, attr.btf_size = _addr(buf), len(blob)
    attr.btf_log_buf, attr.btf_log_size, attr.btf_log_level = _addr(log), 65536, 1
    return _bpf(BTF_LOAD, attr, "BPF_BTF_LOAD", lambda: ffi.string(log).decode(errors="replace"))


# ---- maps ---------------------------------------------------------------------


def map_create(
    map_type: int,
    key_size: int,
    value_size: int,
    max_entries: int,
    flags: int,
    name: str,
    btf_fd: int = 0,
    btf_key_type_id: int = 0,
    btf_value_type_id: int = 0,
    inner_map_fd: int = 0,
) -> int:
    """A new map; for a map of maps, inner_map_fd is a map of the shape its values will have."""
    attr = ffi.new("struct graft_bpf_map_create *")
    attr.map_type, attr.key_size, attr.value_size = map_type, key_size, value_size
    attr.max_entries, attr.map_flags, attr.inner_map_fd = max_entries, flags, inner_map_fd
    attr.map_name = name.encode()[:15]
    attr.btf_fd, attr.btf_key_type_id, attr.btf_value_type_id = btf_fd, btf_key_type_id, btf_value_type_id
    return _bpf(MAP_CREATE, attr, f"BPF_MAP_CREATE {name}")


def _elem(map_fd: int, key: bytes, value_buf=None, flags: int = 0):
    k = ffi.new("char[]", key)
    attr = ffi.new("struct graft_bpf_map_elem *")
    attr.map_fd, attr.key, attr.flags = map_fd, _addr(k), flags
    if value_buf is not None:
        attr.value = _addr(value_buf)
    return attr, k


def map_update(map_fd: int, key: bytes, value: bytes, flags: int = ANY) -> None:
    v = ffi.new("char[]", value)
    attr, _k = _elem(map_fd, key, v, flags)
    _bpf(MAP_UPDATE_ELEM, attr, "BPF_MAP_UPDATE_ELEM")


class MapUpdater:
    """map_update and map_lookup on one map with buffers allocated once: the broker uses them per graft."""

    def __init__(self, map_fd: int, key_size: int, value_size: int):
        self.key = ffi.new("char[]", key_size)
        self.value = ffi.new("char[]", value_size)
        self.attr = ffi.new("struct graft_bpf_map_elem *")
        self.attr.map_fd, self.attr.key, self.attr.value = map_fd, _addr(self.key), _addr(self.value)
        self.attr.flags = ANY
        self._sizes = (key_size, value_size)

    def update(self, key: bytes, value: bytes) -> None:
        assert (len(key), len(value)) == self._sizes
        ffi.memmove(self.key, key, len(key))
        ffi.memmove(self.value, value, len(value))
        _bpf(MAP_UPDATE_ELEM, self.attr, "BPF_MAP_UPDATE_ELEM")

    def lookup(self, key: bytes) -> bytes | None:
        """The value, or None when there is no entry."""
        assert len(key) == self._sizes[0]
        ffi.memmove(self.key, key, len(key))
        try:
            _bpf(MAP_LOOKUP_ELEM, self.attr, "BPF_MAP_LOOKUP_ELEM")
        except BpfError as e:
            if e.errno == 2:  # ENOENT
                return None
            raise
        return bytes(ffi.buffer(self.value, self._sizes[1]))


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value, or None when there is no entry (ENOENT)."""
    v = ffi.new("char[]", value_size)
    attr, _k = _elem(map_fd, key, v)
    try:
        _bpf(MAP_LOOKUP_ELEM, attr, "BPF_MAP_LOOKUP_ELEM")
    except BpfError as e:
        if e.errno == 2:
            return None
        raise
    return bytes(ffi.buffer(v, value_size))


def map_delete(map_fd: int, key: bytes) -> None:
    attr, _k = _elem(map_fd, key)
    _bpf(MAP_DELETE_ELEM, attr, "BPF_MAP_DELETE_ELEM")


def map_keys(map_fd: int, key_size: int) -> list[bytes]:
    """Every key of a hash map, as it stands (entries may come and go meanwhile)."""
    keys: list[bytes] = []
    nxt = ffi.new("char[]", key_size)
    attr = ffi.new("struct graft_bpf_map_elem *")
    attr.map_fd, attr.value = map_fd, _addr(nxt)  # value: where the next key goes
    cur = None
    while True:
        attr.key = _addr(cur) if cur is not None else 0  # no key: the first one
        try:
            _bpf(MAP_GET_NEXT_KEY, attr, "BPF_MAP_GET_NEXT_KEY")
        except BpfError as e:
            if e.errno == 2:  # ENOENT: no more keys
                return keys
            raise
        keys.append(bytes(ffi.buffer(nxt, key_size)))
        cur = ffi.new("char[]", keys[-1])


def map_clear(map_fd: int, key_size: int) -> int:
    """Delete every entry of a hash map; returns how many were deleted."""
    n = 0
    for key in map_keys(map_fd, key_size):
        try:
            map_delete(map_fd, key)
            n += 1
        except BpfError as e:
            if e.errno != 2:  # gone meanwhile
                raise
    return n


# ---- programs -----------------------------------------------------------------


def prog_load(prog_type: int, insns: bytes, license: str, name: str, expected_attach_type: int = 0) -> int:
    """Load a program; a refusal raises BpfError with the verifier's log."""
    code = ffi.new("char[]", insns)
    lic = ffi.new("char[]", license.encode())
    log = ffi.new("char[]", LOG_SIZE)
    attr = ffi.new("struct graft_bpf_prog_load *")
    attr.prog_type, attr.insn_cnt, attr.insns = prog_type, len(insns) // 8, _addr(code)
    attr.license = _addr(lic)
    attr.prog_name = name.encode()[:15]
    attr.expected_attach_type = expected_attach_type

    def verifier_log() -> str:
        # Loaded again with the log on only after a refusal: a log costs time.
        attr.log_level, attr.log_size, attr.log_buf = 1, LOG_SIZE, _addr(log)
        try:
            os.close(_bpf(PROG_LOAD, attr, "log"))
        except BpfError:
            pass
        return ffi.string(log).decode(errors="replace")

    return _bpf(PROG_LOAD, attr, f"BPF_PROG_LOAD {name}", verifier_log)


def prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int = F_ALLOW_MULTI) -> None:
    attr = ffi.new("struct graft_bpf_attach *")
    attr.target_fd, attr.attach_bpf_fd, attr.attach_type, attr.attach_flags = target_fd, prog_fd, attach_type, flags
    _bpf(PROG_ATTACH, attr, "BPF_PROG_ATTACH")


def prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    attr = ffi.new("struct graft_bpf_attach *")
    attr.target_fd, attr.attach_bpf_fd, attr.attach_type = target_fd, prog_fd, attach_type
    _bpf(PROG_DETACH, attr, "BPF_PROG_DETACH")


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached directly to target_fd (a cgroup) for attach_type."""
    n = 64
    while True:
        ids = ffi.new("uint32_t[]", n)
        attr = ffi.new("struct graft_bpf_query *")
        attr.target_fd, attr.attach_type, attr.prog_ids, attr.prog_cnt = target_fd, attach_type, _addr(ids), n
        try:
            _bpf(PROG_QUERY, attr, "BPF_PROG_QUERY")
        except BpfError as e:
            if e.errno == 28 and n < 65536:  # ENOSPC: more than n attached
                n *= 4
                continue
            raise
        return [ids[i] for i in range(attr.prog_cnt)]


def prog_get_fd_by_id(prog_id: int) -> int:
    """An fd for the loaded program with this id (ENOENT once it is gone)."""
    attr = ffi.new("struct graft_bpf_get_id *")
    attr.prog_id = prog_id
    return _bpf(PROG_GET_FD_BY_ID, attr, "BPF_PROG_GET_FD_BY_ID")


def prog_name(prog_fd: int) -> str:
    return ffi.string(prog_info(prog_fd).name).decode(errors="replace")


def prog_tag(prog_fd: int) -> bytes:
    """The kernel's hash of the program's instructions (map references left out)."""
    return bytes(prog_info(prog_fd).tag)


def _obj_info(fd: int, info_type: str):
    """BPF_OBJ_GET_INFO_BY_FD into a new struct of info_type."""
    info = ffi.new(info_type)
    attr = ffi.new("struct graft_bpf_info *")
    attr.bpf_fd, attr.info_len, attr.info = fd, ffi.sizeof(info[0]), _addr(info)
    _bpf(OBJ_GET_INFO_BY_FD, attr, "BPF_OBJ_GET_INFO_BY_FD")
    return info


def prog_info(prog_fd: int):
    return _obj_info(prog_fd, "struct graft_bpf_prog_info *")


def map_info(map_fd: int):
    return _obj_info(map_fd, "struct graft_bpf_map_info *")


# ---- bpffs --------------------------------------------------------------------


def obj_pin(fd: int, path: str) -> None:
    p = ffi.new("char[]", os.fsencode(path))
    attr = ffi.new("struct graft_bpf_obj *")
    attr.pathname, attr.bpf_fd = _addr(p), fd
    _bpf(OBJ_PIN, attr, f"BPF_OBJ_PIN {path}")


def obj_get(path: str) -> int:
    p = ffi.new("char[]", os.fsencode(path))
    attr = ffi.new("struct graft_bpf_obj *")
    attr.pathname = _addr(p)
    return _bpf(OBJ_GET, attr, f"BPF_OBJ_GET {path}")
