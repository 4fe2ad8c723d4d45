"""seccomp_abi: the sans-IO half of seccomp mode, without a kernel.

Layouts against <linux/seccomp.h> as a C compiler sees them, the system
call tables against the running machine's numbers, the filter program by
running it, and the process state codec against what runc sends. One test
asks the running kernel about the ioctl newer than the C headers here (a
filter needs no root with no_new_privs).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import struct
import subprocess

import pytest

from graft.broker.seccomp import abi
from graft.broker.seccomp.calls import NOTIFIED_SYSCALLS


def notif(call: str, *args: int, arch: int | None = None, nid: int = 7, pid: int = 1234) -> abi.Notification:
    arch = abi.native_arch() if arch is None else arch
    raw = abi.NOTIF.pack(nid, pid, 0, abi.SYSCALLS[arch][call], arch, 0, *(list(args) + [0] * (6 - len(args))))
    return abi.decode_notification(raw)


def test_notification_decodes_every_field():
    n = notif("sendto", 5, 0x1000, 10, 0, 0x2000, 16, nid=99, pid=4321)
    assert (n.id, n.pid, n.call, n.fd) == (99, 4321, "sendto", 5)
    assert n.args == (5, 0x1000, 10, 0, 0x2000, 16)


def test_fd_argument_is_the_low_32_bits_signed():
    assert notif("connect", 0xFFFFFFFF00000003).fd == 3
    assert notif("connect", 0xFFFFFFFF).fd == -1


def test_unknown_architecture_or_number_is_no_call():
    assert notif("connect", arch=abi.AUDIT_ARCH_X86_64).call == "connect"
    raw = abi.NOTIF.pack(1, 1, 0, 42, 0x40000003, 0, 0, 0, 0, 0, 0, 0)  # i386: 42 is not connect there
    assert abi.decode_notification(raw).call is None


@pytest.mark.parametrize(
    "call, args, want",
    [
        ("connect", (3, 0x10, 16), abi.AddressAt(0x10, 16)),
        ("bind", (3, 0x10, 28), abi.AddressAt(0x10, 28)),
        ("sendto", (3, 0x99, 5, 0, 0x20, 16), abi.AddressAt(0x20, 16)),
        ("sendto", (3, 0x99, 5, 0, 0, 0), None),  # send() on a connected socket
        ("connect", (3, 0x10, 100000), abi.AddressAt(0x10, abi.SOCKADDR_MAX)),  # never read more than the kernel does
        ("connect", (3, 0, 16), None),
        ("sendmsg", (3, 0x30, 0), None),  # in the msghdr
    ],
)
def test_address_argument(call, args, want):
    assert abi.address_at(notif(call, *args)) == want


def test_sendmsg_address_is_in_its_msghdr():
    n = notif("sendmsg", 3, 0x5000, 0)
    assert abi.msghdr_at(n) == abi.AddressAt(0x5000, abi.MSGHDR.size)
    raw = abi.MSGHDR.pack(0x6000, 28, 0x7000, 1, 0, 0, 0)
    assert abi.address_in_msghdr(raw) == abi.AddressAt(0x6000, 28)
    assert abi.address_in_msghdr(abi.MSGHDR.pack(0, 0, 0x7000, 1, 0, 0, 0)) is None
    assert abi.send_flags(n) == 0 and abi.send_flags(notif("sendto", 3, 0, 0, 0x40)) == 0x40


def test_responses_and_addfd_layout():
    assert abi.encode_response(5, continue_=True) == struct.pack("=QqiI", 5, 0, 0, 1)
    assert abi.encode_response(5, error=13) == struct.pack("=QqiI", 5, 0, -13, 0)
    assert abi.encode_response(5, val=0) == struct.pack("=QqiI", 5, 0, 0, 0)
    assert abi.encode_addfd(5, 9, 3, True) == struct.pack("=QIIII", 5, 1, 9, 3, os.O_CLOEXEC)


def test_sockaddr_family():
    assert abi.sockaddr_family(struct.pack("=H", socket.AF_INET6) + bytes(26)) == socket.AF_INET6
    assert abi.sockaddr_family(b"\x01") is None


C_LAYOUT = r"""
#include <linux/seccomp.h>
#include <linux/audit.h>
#include <stdio.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <sys/ioctl.h>
int main(void) {
    printf("%zu %zu %zu %zu\n", sizeof(struct seccomp_notif), sizeof(struct seccomp_notif_resp),
           sizeof(struct seccomp_notif_addfd), sizeof(struct msghdr));
    printf("%lu %lu %lu %lu\n", (unsigned long)SECCOMP_IOCTL_NOTIF_RECV, (unsigned long)SECCOMP_IOCTL_NOTIF_SEND,
           (unsigned long)SECCOMP_IOCTL_NOTIF_ID_VALID, (unsigned long)SECCOMP_IOCTL_NOTIF_ADDFD);
    printf("%d %d %d %d %u\n", SYS_connect, SYS_bind, SYS_sendto, SYS_sendmsg, AUDIT_ARCH_X86_64);
    printf("%zu %zu\n", offsetof(struct msghdr, msg_namelen), offsetof(struct msghdr, msg_flags));
    printf("%d %d %u %u\n", SECCOMP_USER_NOTIF_FLAG_CONTINUE, SECCOMP_ADDFD_FLAG_SETFD,
           SECCOMP_RET_USER_NOTIF, SECCOMP_FILTER_FLAG_NEW_LISTENER);
    return 0;
}
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the numbers checked are x86_64's")
def test_layouts_and_numbers_match_the_kernel_headers(tmp_path):
    cc = shutil.which("cc")
    assert cc is not None, "cc is needed (build-essential)"
    (tmp_path / "layout.c").write_text(C_LAYOUT)
    subprocess.run([cc, "-o", tmp_path / "layout", tmp_path / "layout.c"], check=True)
    lines = subprocess.run([tmp_path / "layout"], capture_output=True, text=True, check=True).stdout.split("\n")
    assert [int(x) for x in lines[0].split()] == [
        abi.NOTIF.size,
        abi.NOTIF_RESP.size,
        abi.NOTIF_ADDFD.size,
        abi.MSGHDR.size,
    ]
    assert [int(x) for x in lines[1].split()] == [
        abi.IOCTL_NOTIF_RECV,
        abi.IOCTL_NOTIF_SEND,
        abi.IOCTL_NOTIF_ID_VALID,
        abi.IOCTL_NOTIF_ADDFD,
    ]
    x86 = abi.SYSCALLS[abi.AUDIT_ARCH_X86_64]
    assert [int(x) for x in lines[2].split()] == [
        x86["connect"],
        x86["bind"],
        x86["sendto"],
        x86["sendmsg"],
        abi.AUDIT_ARCH_X86_64,
    ]
    assert [int(x) for x in lines[3].split()] == [8, 48]
    assert [int(x) for x in lines[4].split()] == [
        abi.USER_NOTIF_FLAG_CONTINUE,
        abi.ADDFD_FLAG_SETFD,
        abi.RET_USER_NOTIF,
        abi.FILTER_FLAG_NEW_LISTENER,
    ]


def run_filter(program: bytes, nr: int, arch: int, args: tuple[int, ...] = (0,) * 6) -> int:
    """A classic-BPF interpreter for the three instructions the filter uses."""
    insns = [abi.SOCK_FILTER.unpack_from(program, i) for i in range(0, len(program), abi.SOCK_FILTER.size)]
    data = struct.pack("=iIQ6Q", nr, arch, 0, *args)
    pc, acc = 0, 0
    for _ in range(len(insns)):
        code, jt, jf, k = insns[pc]
        if code == 0x20:
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code == 0x15:
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")
    raise AssertionError("the filter ran off its end")


@pytest.mark.parametrize("arch", sorted(abi.SYSCALLS))
def test_filter_notifies_exactly_the_notified_calls(arch):
    prog = abi.notify_filter(arch)
    table = abi.SYSCALLS[arch]
    dest = (3, 0x1000, 10, 0, 0x7FFF00001000, 16)  # an address argument everywhere
    for name in NOTIFIED_SYSCALLS:
        assert run_filter(prog, table[name], arch, dest) == abi.RET_USER_NOTIF, name
    notified = {table[name] for name in NOTIFIED_SYSCALLS}
    # send(2) is sendto with no destination: the data path stays in the kernel; either half set is a pointer
    assert run_filter(prog, table["sendto"], arch, (3, 0x1000, 10, 0, 0, 0)) == abi.RET_ALLOW
    assert run_filter(prog, table["sendto"], arch, (3, 0x1000, 10, 0, 1 << 32, 16)) == abi.RET_USER_NOTIF
    assert run_filter(prog, table["sendmsg"], arch, (3, 0x1000, 0, 0, 0, 0)) == abi.RET_USER_NOTIF
    for nr in range(0, 470):
        if nr not in notified:
            assert run_filter(prog, nr, arch) == abi.RET_ALLOW, nr
    other = next(a for a in (abi.AUDIT_ARCH_X86_64, abi.AUDIT_ARCH_AARCH64, 0x40000003) if a != arch)
    assert run_filter(prog, table["connect"], other) == abi.RET_ALLOW  # another ABI: allowed


RUNC_STATE = {  # as runc 1.1 marshals specs.ContainerProcessState
    "ociVersion": "1.0.2-dev",
    "fds": ["seccompFd"],
    "pid": 4422,
    "metadata": "web",
    "state": {
        "ociVersion": "1.0.2-dev",
        "id": "c1",
        "status": "creating",
        "pid": 4422,
        "bundle": "/b",
        "annotations": {"io.graft.tenant": "web"},
    },
}


def test_process_state_as_runc_sends_it():
    st = abi.decode_process_state(json.dumps(RUNC_STATE).encode(), 1)
    assert (st.tenant, st.pid, st.container, st.fd_index) == ("web", 4422, "c1", 0)


def test_process_state_round_trips_what_graft_run_sends():
    st = abi.decode_process_state(abi.encode_process_state("t", 99, "graft-run-99"), 1)
    assert (st.tenant, st.pid, st.container, st.fd_index) == ("t", 99, "graft-run-99", 0)


@pytest.mark.parametrize(
    "doc, n_fds, words",
    [
        (b"\xff\xfe", 1, "not JSON"),
        (b"[1]", 1, "not a JSON object"),
        ({**RUNC_STATE, "fds": "seccompFd"}, 1, '"fds"'),
        ({**RUNC_STATE, "fds": ["other"]}, 1, "seccompFd"),
        ({**RUNC_STATE, "fds": ["seccompFd", "seccompFd"]}, 2, "seccompFd"),
        (RUNC_STATE, 0, "0 came with it"),
        (RUNC_STATE, 2, "2 came with it"),
        ({**RUNC_STATE, "metadata": ""}, 1, "metadata"),
        ({k: v for k, v in RUNC_STATE.items() if k != "metadata"}, 1, "metadata"),
        ({**RUNC_STATE, "state": []}, 1, '"state"'),
        ({**RUNC_STATE, "pid": "1"}, 1, '"pid"'),
        ({**RUNC_STATE, "pid": True}, 1, '"pid"'),
    ],
)
def test_bad_process_states_are_refused_with_a_reason(doc, n_fds, words):
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    with pytest.raises(abi.StateError) as e:
        abi.decode_process_state(raw, n_fds)
    assert words in str(e.value)


def test_answers():
    assert abi.decode_answer(abi.encode_answer(None)) is None
    assert abi.decode_answer(abi.encode_answer("no tenant 'x'")) == "no tenant 'x'"
    assert "something else" in abi.decode_answer(b"HTTP/1.0 200 OK")
