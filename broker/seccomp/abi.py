"""Seccomp user notification, the sans-IO part: layouts, system call tables, the filter, the runtime's message.

The seccomp agent (seccomp/agent.py) and ``graft run --seccomp`` do the I/O; this
module only turns bytes into values and back, so all of it is tested
without a kernel (tests/unit/test_seccomp_abi.py):

* ``struct seccomp_notif`` / ``seccomp_notif_resp`` / ``seccomp_notif_addfd``
  (<linux/seccomp.h>) and the ioctl numbers built from their sizes;
* the system calls seccomp mode stops (seccomp_calls.NOTIFIED_SYSCALLS) by
  number, per architecture, and where each one's address is in its arguments;
* the classic-BPF filter that ``graft run --seccomp`` installs: notify on
  those calls for the native architecture, allow everything else;
* the OCI "container process state" a runtime sends with the notify fd over
  ``linux.seccomp.listenerPath`` (docs/containers.md; runc and crun
  send it as JSON in one stream message, the fd in SCM_RIGHTS, and do not
  wait for an answer), and the broker's one-line answer.
"""

from __future__ import annotations

import json
import platform
import socket
import struct
from dataclasses import dataclass

from .calls import NOTIFIED_SYSCALLS

# <linux/seccomp.h>
NOTIF = struct.Struct("=QIIiIQ6Q")  # id, pid, flags, data.{nr, arch, instruction_pointer, args[6]}
NOTIF_RESP = struct.Struct("=QqiI")  # id, val, error, flags
NOTIF_ADDFD = struct.Struct("=QIIII")  # id, flags, srcfd, newfd, newfd_flags
USER_NOTIF_FLAG_CONTINUE = 1
ADDFD_FLAG_SETFD = 1
SET_MODE_FILTER = 1
FILTER_FLAG_NEW_LISTENER = 1 << 3
RET_USER_NOTIF = 0x7FC00000
RET_ALLOW = 0x7FFF0000


def _iowr(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | ord("!") << 8 | nr  # SECCOMP_IOC_MAGIC '!'


_W, _R = 1, 2
IOCTL_NOTIF_RECV = _iowr(_W | _R, 0, NOTIF.size)
IOCTL_NOTIF_SEND = _iowr(_W | _R, 1, NOTIF_RESP.size)
IOCTL_NOTIF_ID_VALID = _iowr(_W, 2, 8)
IOCTL_NOTIF_ADDFD = _iowr(_W, 3, NOTIF_ADDFD.size)
IOCTL_NOTIF_SET_FLAGS = _iowr(_W, 4, 8)  # Linux 6.6
USER_NOTIF_FD_SYNC_WAKE_UP = 1  # wake the stopped thread on the agent's CPU, as the agent then waits

# AUDIT_ARCH_* (<linux/audit.h>) and the numbers of the notified calls there.
# Only 64-bit ABIs: pointers in the arguments are 8 bytes, as msghdr's are.
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
SYSCALLS: dict[int, dict[str, int]] = {
    AUDIT_ARCH_X86_64: {"connect": 42, "sendto": 44, "sendmsg": 46, "bind": 49},
    AUDIT_ARCH_AARCH64: {"bind": 200, "connect": 203, "sendto": 206, "sendmsg": 211},
}
_NAMES = {arch: {nr: name for name, nr in calls.items()} for arch, calls in SYSCALLS.items()}
_MACHINES = {"x86_64": AUDIT_ARCH_X86_64, "aarch64": AUDIT_ARCH_AARCH64}

MSGHDR = struct.Struct("=QI4xQQQQi4x")  # msg_name, msg_namelen, msg_iov, msg_iovlen, msg_control, ..., msg_flags
SOCKADDR_MAX = 128  # sizeof(struct sockaddr_storage): the kernel reads no more
MSG_FASTOPEN = 0x20000000


def native_arch() -> int:
    """The AUDIT_ARCH of this machine's 64-bit ABI; ValueError where seccomp mode has no table."""
    arch = _MACHINES.get(platform.machine())
    if arch is None:
        raise ValueError(f"seccomp mode does not know the system call numbers of {platform.machine()}")
    return arch


@dataclass(frozen=True, slots=True)
class Notification:
    id: int
    pid: int  # the calling thread, in the agent's pid namespace
    nr: int
    arch: int
    args: tuple[int, ...]

    @property
    def call(self) -> str | None:
        """ "connect" | "bind" | "sendto" | "sendmsg", or None for a call this agent does not know."""
        return _NAMES.get(self.arch, {}).get(self.nr)

    @property
    def fd(self) -> int:
        """The socket the call is on: the first argument, an int (upper bits are garbage to the kernel)."""
        return struct.unpack("=i", struct.pack("=I", self.args[0] & 0xFFFFFFFF))[0]


def decode_notification(raw: bytes) -> Notification:
    nid, pid, _flags, nr, arch, _ip, *args = NOTIF.unpack(raw)
    return Notification(nid, pid, nr, arch, tuple(args))


def encode_response(nid: int, *, error: int = 0, val: int = 0, continue_: bool = False) -> bytes:
    """A reply: the call returns val, fails with error (a positive errno), or runs as it was (continue_)."""
    if continue_:
        return NOTIF_RESP.pack(nid, 0, 0, USER_NOTIF_FLAG_CONTINUE)
    return NOTIF_RESP.pack(nid, val, -error if error else 0, 0)


def encode_addfd(nid: int, srcfd: int, newfd: int, cloexec: bool) -> bytes:
    """Put srcfd on the target's fd number newfd (replacing what is there), as dup3 would."""
    return NOTIF_ADDFD.pack(nid, ADDFD_FLAG_SETFD, srcfd, newfd, 0o2000000 if cloexec else 0)  # O_CLOEXEC


@dataclass(frozen=True, slots=True)
class AddressAt:
    """Where a call's socket address is in the target's memory."""

    ptr: int
    length: int


def address_at(n: Notification) -> AddressAt | None:
    """For connect, bind and sendto: the address argument (None: the call names no address).

    sendmsg's address is in its msghdr: see msghdr_at and address_in_msghdr.
    """
    call = n.call
    if call in ("connect", "bind"):
        ptr, length = n.args[1], n.args[2] & 0xFFFFFFFF
    elif call == "sendto":
        ptr, length = n.args[4], n.args[5] & 0xFFFFFFFF
    else:
        return None
    if ptr == 0 or length == 0:
        return None
    return AddressAt(ptr, min(length, SOCKADDR_MAX))


def msghdr_at(n: Notification) -> AddressAt | None:
    """For sendmsg: where its struct msghdr is."""
    if n.call != "sendmsg" or n.args[1] == 0:
        return None
    return AddressAt(n.args[1], MSGHDR.size)


def address_in_msghdr(raw: bytes) -> AddressAt | None:
    """The msg_name of a struct msghdr (None: no destination named)."""
    name, namelen = MSGHDR.unpack(raw)[:2]
    if name == 0 or namelen == 0:
        return None
    return AddressAt(name, min(namelen, SOCKADDR_MAX))


def send_flags(n: Notification) -> int:
    """The flags argument of sendto/sendmsg (MSG_FASTOPEN makes a TCP sendto a connect)."""
    return n.args[3] if n.call == "sendto" else n.args[2]


def sockaddr_family(raw: bytes) -> int | None:
    """sa_family of a sockaddr, or None if it is too short to have one."""
    return struct.unpack_from("=H", raw)[0] if len(raw) >= 2 else None


# ---- the filter graft run --seccomp installs ---------------------------------------------

_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x20, 0x15, 0x06
_DATA_NR, _DATA_ARCH = 0, 4
_SENDTO_DEST = 16 + 8 * 4  # seccomp_data.args[4], sendto's dest_addr (little-endian: low word first)
SOCK_FILTER = struct.Struct("=HBBI")
# What an OCI runtime's filter needs for the same effect (the runtime wrapper's seccomp section):
# sendto with a NULL destination (send(2) on a connected socket, the data path) is not stopped.
SENDTO_DEST_ARG = 4


def _assemble(insns: list[tuple]) -> bytes:
    """(code, k, jt, jf) with jt/jf as labels (str) or 0, plus ("label", name) entries: forward jumps only."""
    where, pc = {}, 0
    for insn in insns:
        if insn[0] == "label":
            where[insn[1]] = pc
        else:
            pc += 1
    out, pc = [], 0
    for insn in insns:
        if insn[0] == "label":
            continue
        code, k, jt, jf = insn
        offsets = [where[j] - pc - 1 if isinstance(j, str) else j for j in (jt, jf)]
        assert all(0 <= o < 256 for o in offsets), "classic BPF jumps forward, by at most 255"
        out.append(SOCK_FILTER.pack(code, offsets[0], offsets[1], k))
        pc += 1
    return b"".join(out)


def notify_filter(arch: int) -> bytes:
    """struct sock_filter[]: USER_NOTIF for the notified calls of arch, ALLOW for everything else.

    A sendto without a destination (send(2): the data path of a connected
    socket) is allowed in the kernel: there is nothing to judge, and a round
    trip to the broker per send would cost the data path its speed. sendmsg's
    destination is behind a pointer, which a filter cannot read, so every
    sendmsg is stopped. Another architecture's calls (a 32-bit syscall entry)
    are allowed: a socket call there runs in the container's own stack, like
    a "container" verdict, and never on a host socket without confinement's say.
    """
    table = SYSCALLS[arch]
    prog: list[tuple] = [
        (_BPF_LD_W_ABS, _DATA_ARCH, 0, 0),
        (_BPF_JEQ_K, arch, 0, "allow"),
        (_BPF_LD_W_ABS, _DATA_NR, 0, 0),
    ]
    for name in NOTIFIED_SYSCALLS:
        prog.append((_BPF_JEQ_K, table[name], "sendto" if name == "sendto" else "notify", 0))
    prog += [
        ("label", "allow"),
        (_BPF_RET_K, RET_ALLOW, 0, 0),
        ("label", "sendto"),
        (_BPF_LD_W_ABS, _SENDTO_DEST, 0, 0),
        (_BPF_JEQ_K, 0, 0, "notify"),
        (_BPF_LD_W_ABS, _SENDTO_DEST + 4, 0, 0),
        (_BPF_JEQ_K, 0, "allow2", "notify"),
        ("label", "allow2"),
        (_BPF_RET_K, RET_ALLOW, 0, 0),
        ("label", "notify"),
        (_BPF_RET_K, RET_USER_NOTIF, 0, 0),
    ]
    return _assemble(prog)


# ---- the runtime's message on seccomp.sock --------------------------------------------------

SECCOMP_SOCKET = "seccomp.sock"  # in the broker's socket directory (docs/containers.md)

STATE_MAX = 1 << 16  # a process state larger than this is refused (annotations included)
SECCOMP_FD_NAME = "seccompFd"  # the runtime-spec's name for the notify fd in "fds"


class StateError(ValueError):
    """A process state message the agent refuses; the text goes back to the sender."""


@dataclass(frozen=True, slots=True)
class ProcessState:
    tenant: str  # listenerMetadata
    pid: int  # the container's process, as the runtime sees it
    container: str  # state.id
    fd_index: int  # where the notify fd is in SCM_RIGHTS


def decode_process_state(raw: bytes, n_fds: int) -> ProcessState:
    """Validate a ContainerProcessState (runtime-spec) that came with n_fds fds."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise StateError(f"the process state is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise StateError("the process state is not a JSON object")
    fds = doc.get("fds")
    if not isinstance(fds, list) or not all(isinstance(f, str) for f in fds):
        raise StateError('the process state has no "fds" list of names')
    if fds.count(SECCOMP_FD_NAME) != 1:
        raise StateError(f'"fds" must name {SECCOMP_FD_NAME!r} once (got {fds!r})')
    if len(fds) != n_fds:
        raise StateError(f'"fds" names {len(fds)} fds but {n_fds} came with it')
    tenant = doc.get("metadata")
    if not isinstance(tenant, str) or not tenant:
        raise StateError('"metadata" (linux.seccomp.listenerMetadata) must name the tenant')
    state = doc.get("state")
    if not isinstance(state, dict):
        raise StateError('the process state has no "state" object')
    pid = doc.get("pid", state.get("pid", 0))
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0:
        raise StateError(f'"pid" must be a process id (got {pid!r})')
    container = state.get("id", "")
    if not isinstance(container, str):
        raise StateError('"state.id" must be a string')
    return ProcessState(tenant, pid, container, fds.index(SECCOMP_FD_NAME))


def encode_process_state(tenant: str, pid: int, container: str) -> bytes:
    """The message graft run --seccomp sends, in the runtime-spec's format as runc sends it."""
    return json.dumps(
        {
            "ociVersion": "1.0.2",
            "fds": [SECCOMP_FD_NAME],
            "pid": pid,
            "metadata": tenant,
            "state": {"ociVersion": "1.0.2", "id": container, "status": "creating", "pid": pid, "bundle": ""},
        }
    ).encode()


def encode_answer(error: str | None) -> bytes:
    """The broker's answer: one JSON line. Runtimes ignore it; graft run --seccomp waits for it."""
    return (json.dumps({"ok": True} if error is None else {"ok": False, "error": error}) + "\n").encode()


def decode_answer(raw: bytes) -> str | None:
    """None if the broker serves the listener, else why not."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return f"the broker answered something else than graft's answer: {raw[:80]!r}"
    if isinstance(doc, dict) and doc.get("ok") is True:
        return None
    return str(doc.get("error", "refused")) if isinstance(doc, dict) else "refused"


INET_FAMILIES = (socket.AF_INET, socket.AF_INET6)
