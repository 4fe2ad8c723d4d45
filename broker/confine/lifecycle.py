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
  first connect is judged in the kernel against the tenant's own map in
  ``grants`` (a map of maps: one LRU per tenant, so no tenant can evict
  another's), the destinations the broker has answered "graft" for; a
  granted connect locks the mark to that destination, as if the broker had
  connected it, and leaves an audit record in the ``events`` ring buffer.
  Anything else is refused (EPERM) and the shim asks the broker.
* ``counts`` (SK_STORAGE) holds, on every socket the broker handed out,
  the id its tenant is counted under, and a ``sock_release`` program counts
  each one's close into ``released``: ``max_sockets`` is counted exactly,
  pre-issued sockets (which no socket dump sees) included. Storage on the
  socket, not a hash by cookie: no cookie to read and no entry to insert
  and delete per socket, and it goes with the socket.
* ``stamps`` (a hash by pid_tgid) holds, while a broker thread makes a
  batch of pre-issued sockets (confine/issue.c), the mark and count id
  they get: a ``sock_create`` program gives them to each socket that thread
  creates, as it is created (docs/security.md, "Stamps").
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

This module is the lifecycle: cgroup, bpffs, load or reuse, attach, mark,
remove. The maps' layouts are in maps.py, the programs in programs.py, the
assembler they are written with in confine/asm.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field

from . import bpf, fastpath
from .maps import (
    GRANT_KEY_SIZE,
    GRANT_VALUE_SIZE,
    MAPS,
    MARK_SIZE,
    MARKS,
    RETIRED_MAPS,
    STATE_EPOCH,
    STATE_EVENTS_LOST,
    TENANT_GRANTS,
    MapSpec,
    encode_grant_value,
    encode_mark,
    grant_key,
    grant_lasts,
)
from .programs import LICENSE, OPTIONAL, PROGRAMS, listen_guard_program, prog_type, program

log = logging.getLogger("graft.broker")

CGROUP_NAME = "graft-broker"
PIN_ROOT_NAME = "graft"
DEFAULT_BPFFS = "/sys/fs/bpf"
MAP_PIN = "marks"
MAP_NAME = "graft_marks"

SO_ATTACH_BPF = getattr(socket, "SO_ATTACH_BPF", 50)
SO_LOCK_FILTER = getattr(socket, "SO_LOCK_FILTER", 44)


def guard_against_listening(sock: socket.socket, guard_fd: int) -> None:
    """Attach the listen guard to a connected TCP socket and lock it (the app cannot remove it)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, guard_fd)
    sock.setsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER, 1)


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


# Tenant ids: the broker's epoch in the high half, a count of its tenants in the low.
_TENANT_BITS = 16


@dataclass(frozen=True)
class _GrantMap:
    """One tenant's grants: the map (held open by the broker) and its preallocated updater."""

    fd: int
    updater: bpf.MapUpdater


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
    _grant_maps: dict[int, _GrantMap] = field(default_factory=dict, repr=False)  # grant id -> its own map
    _owner: bpf.MapUpdater | None = field(default=None, repr=False)
    _closes: bpf.MapUpdater | None = field(default=None, repr=False)
    _issuer: fastpath.Issuer | None = field(default=None, repr=False)

    @property
    def map_fd(self) -> int:
        return self.maps["marks"]

    def describe(self) -> str:
        how = "reused pinned programs" if self.reused else "loaded programs"
        return f"cgroup {self.cgroup}, pins in {self.pin_dir}, {how}"

    def mark(self, sock: socket.socket, allow_any_peer: bool, dest: tuple | None = None, grant_id: int = 0) -> None:
        """Lock sock: from now on the kernel refuses to re-point it (EPERM).

        dest: the address the broker connected it to (connect and sendmsg to
        it stay allowed; a TCP socket also gets the listen guard);
        allow_any_peer: sendmsg to any address stays allowed;
        grant_id: sendmsg to any destination of that id's UDP grants stays allowed.
        """
        self._set_mark(sock, encode_mark(dest, allow_any_peer, grant_id))
        if dest is not None and sock.type == socket.SOCK_STREAM:
            guard_against_listening(sock, self.guard_fd)

    def issuer(self) -> fastpath.Issuer:
        """What makes pre-issued sockets, locked to a tenant's grants (fastpath.py): in C, a batch at a time.

        Each gets what mark() and own() give a grafted socket: the pre-issued
        mark (it may connect only where its grant id is granted), the listen
        guard, and its entry in the count of the tenant's sockets.
        """
        if self._issuer is None:
            stamps = self.maps["stamps"] if "create" in self.prog_fds else -1  # without the program, nobody stamps
            self._issuer = fastpath.Issuer(self.map_fd, self.guard_fd, self.maps["counts"], stamps)
        return self._issuer

    def _marks(self) -> bpf.MapUpdater:
        if self._updater is None:
            self._updater = bpf.MapUpdater(self.map_fd, 4, MARK_SIZE)
        return self._updater

    def _set_mark(self, sock: socket.socket, mark: bytes) -> None:
        self._marks().update(struct.pack("=i", sock.fileno()), mark)

    def mark_of(self, sock: socket.socket) -> bytes | None:
        """sock's mark (maps.py), or None: not a socket the broker handed out."""
        return self._marks().lookup(struct.pack("=i", sock.fileno()))

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

    def new_grant_id(self) -> int:
        """A new id for a tenant's grants and pre-issued sockets, with an empty grant map of its own."""
        grant_id = self.new_id()
        self._grant_maps[grant_id] = self._new_grant_map(grant_id)
        return grant_id

    def drop_grants(self, grant_id: int) -> None:
        """The id is retired (its tenant is gone or has a new one): its grants go, and its map with them."""
        old = self._grant_maps.pop(grant_id, None)
        if old is None:
            return
        try:
            bpf.map_delete(self.maps["grants"], struct.pack("=I", grant_id))
        except bpf.BpfError as e:
            if e.errno != errno.ENOENT:
                raise
        finally:
            os.close(old.fd)

    def _new_grant_map(self, grant_id: int) -> _GrantMap:
        """An empty grant map, put in place for grant_id (replacing any there, in one step)."""
        spec = TENANT_GRANTS
        fd = bpf.map_create(
            spec.map_type, spec.key_size, spec.value_size, spec.max_entries, spec.flags, "graft_tgrants"
        )
        try:
            bpf.map_update(self.maps["grants"], struct.pack("=I", grant_id), struct.pack("=I", fd))
        except BaseException:
            os.close(fd)
            raise
        return _GrantMap(fd, bpf.MapUpdater(fd, GRANT_KEY_SIZE, GRANT_VALUE_SIZE))

    def grant(
        self,
        grant_id: int,
        family: int,
        host: str,
        port: int,
        rule_id: int,
        sock_type: int = socket.SOCK_STREAM,
        expires: int = 0,
    ) -> None:
        """From now on (until the CLOCK_MONOTONIC second expires, if not 0) the tenant's sockets may reach
        (host, port) without the broker.

        TCP: its pre-issued sockets may connect there. UDP: its grafted UDP
        sockets may send there.
        """
        self._grant_maps[grant_id].updater.update(
            grant_key(grant_id, family, host, port, sock_type), encode_grant_value(rule_id, expires)
        )

    def granted(self, grant_id: int, family: int, host: str, port: int, sock_type: int) -> bool:
        """Whether the grant id's grants let its sockets reach (host, port) (the kernel's own lookup)."""
        grants = self._grant_maps.get(grant_id)
        if grants is None:
            return False
        value = grants.updater.lookup(grant_key(grant_id, family, host, port, sock_type))
        return value is not None and grant_lasts(value, time.monotonic())

    def revoke_grants(self) -> None:
        """Forget every grant (a new policy): pre-issued sockets ask the broker again.

        Each tenant's map is swapped for an empty one, one map update each,
        however many grants it held. Fails closed: a tenant whose map cannot
        be swapped loses its map instead (no grants), and the error is raised.
        """
        for grant_id, old in list(self._grant_maps.items()):
            try:
                self._grant_maps[grant_id] = self._new_grant_map(grant_id)
            except BaseException:
                self.drop_grants(grant_id)
                raise
            os.close(old.fd)

    def own(self, sock: socket.socket, tenant_id: int) -> None:
        """Count sock for the tenant until it is closed (released() counts the close)."""
        if self._owner is None:
            self._owner = bpf.MapUpdater(self.maps["counts"], 4, 4)
        self._owner.update(struct.pack("=i", sock.fileno()), struct.pack("=I", tenant_id))

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
        for fd in [
            *self.maps.values(),
            *self.prog_fds.values(),
            self.guard_fd,
            *(g.fd for g in self._grant_maps.values()),
        ]:
            if fd >= 0:
                os.close(fd)
        self.prog_fds.clear()
        self.maps.clear()
        self._grant_maps.clear()
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
    pin_dir = None
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
    except (bpf.BpfError, OSError) as e:
        if pin_dir is not None:
            with contextlib.suppress(OSError):  # a failed first start leaves no empty directories
                _prune_empty_pin_dirs(pin_dir, target)
        raise Unavailable(f"BPF: {e}" if isinstance(e, bpf.BpfError) else f"{e}") from None
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
        if (info.type, info.value_size, info.map_flags & bpf.F_CLONE) != (
            bpf.MAP_TYPE_SK_STORAGE,
            MARK_SIZE,
            bpf.F_CLONE,
        ):
            os.close(map_fd)
            raise Unavailable(f"{map_path} is not graft's mark map (remove it: graft confinement remove)")
    else:
        map_fd = _create_map(MARKS, MAP_NAME)
    conf = Confinement(cgroup, cgroup_dir, pin_dir, {"marks": map_fd})
    try:
        all_reused = marks_reused
        for name in RETIRED_MAPS:
            _unlink(os.path.join(pin_dir, name))
        for name, spec in MAPS.items():
            conf.maps[name], reused = _load_or_reuse_map(pin_dir, name, spec)
            all_reused = all_reused and reused
            if name == "state":
                conf.fresh_state = not reused
        conf.reused = all_reused
        for name, (kind, v6, attach_type) in PROGRAMS.items():
            try:
                conf.prog_fds[name] = _load_or_reuse_program(conf, name, kind, v6, attach_type, all_reused)
            except bpf.BpfError as e:
                if name not in OPTIONAL or e.errno not in (errno.EINVAL, errno.EACCES):  # the verifier's refusals
                    raise
                log.info("confinement: this kernel refuses the %s program; the broker does its work: %s", name, e)
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
            spec.map_type,
            spec.key_size,
            spec.value_size,
            spec.max_entries,
        ) and _inner_fits(fd, spec):
            return fd, True
        os.close(fd)
        log.info("confinement: map %s changed shape since it was pinned; replacing it", name)
        _unlink(path)
    fd = _create_map(spec, f"graft_{name}")
    try:
        bpf.obj_pin(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd, False


def _create_map(spec: MapSpec, name: str) -> int:
    if spec.btf is not None:
        blob, key_id, value_id = spec.btf
        btf_fd = bpf.btf_load(blob())
        try:
            shape = (spec.map_type, spec.key_size, spec.value_size, spec.max_entries, spec.flags)
            return bpf.map_create(*shape, name, btf_fd, key_id, value_id)
        finally:
            os.close(btf_fd)
    if spec.inner is None:
        return bpf.map_create(spec.map_type, spec.key_size, spec.value_size, spec.max_entries, spec.flags, name)
    template = _create_map(spec.inner, name[:12] + "_tpl")
    try:
        return bpf.map_create(
            spec.map_type, spec.key_size, spec.value_size, spec.max_entries, spec.flags, name, inner_map_fd=template
        )
    finally:
        os.close(template)


def _inner_fits(fd: int, spec: MapSpec) -> bool:
    """Whether a pinned map of maps takes inner maps of today's shape (the kernel fixed it at creation).

    Tried under key 0, which no grant id uses (ids start at 1 in every epoch).
    """
    if spec.inner is None:
        return True
    inner = _create_map(spec.inner, "graft_probe")
    try:
        bpf.map_update(fd, struct.pack("=I", 0), struct.pack("=I", inner))
    except bpf.BpfError as e:
        if e.errno != errno.EINVAL:
            raise
        return False
    finally:
        os.close(inner)
    bpf.map_delete(fd, struct.pack("=I", 0))
    return True


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
    bpf.map_clear(conf.maps["grants"], 4)  # every earlier tenant's grant map goes
    bpf.map_clear(conf.maps["released"], 4)
    bpf.map_clear(conf.maps["stamps"], 8)  # a broker that died making a batch: no thread of ours is making it


def _load_or_reuse_program(
    conf: Confinement, name: str, kind: str, v6: bool, attach_type: int, maps_reused: bool
) -> int:
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
            attached = bpf.prog_query(fd, attach_type)
            if name not in conf.prog_fds:  # an optional one this kernel refused: no earlier broker's either
                for other in attached:
                    _detach_if_graft(fd, other, attach_type)
                continue
            prog_id = bpf.prog_info(conf.prog_fds[name]).id
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


def _prune_empty_pin_dirs(pin_dir: str, cgroup: str) -> None:
    """Remove pin_dir and its parents while they are empty, up to and including <bpffs>/graft."""
    root = pin_dir
    for _ in [c for c in cgroup.strip("/").split("/") if c]:
        root = os.path.dirname(root)
    d = pin_dir
    while os.path.isdir(d) and not os.listdir(d):
        os.rmdir(d)
        if d == root:
            break
        d = os.path.dirname(d)


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
    for map_name in [*MAPS, *RETIRED_MAPS, MAP_PIN]:  # the marks last, as they were pinned last
        map_path = os.path.join(pin_dir, map_name)
        if os.path.exists(map_path):
            os.unlink(map_path)
            done.append(f"removed {map_path}")
    _prune_empty_pin_dirs(pin_dir, cgroup)
    if rmdir_cgroup and cgroup_dir and os.path.basename(cgroup_dir) == CGROUP_NAME and os.path.isdir(cgroup_dir):
        try:
            os.rmdir(cgroup_dir)
            done.append(f"removed cgroup {cgroup}")
        except OSError as e:
            done.append(f"kept cgroup {cgroup}: {e.strerror} (a broker still runs in it?)")
    return done
