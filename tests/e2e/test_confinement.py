"""Kernel confinement: grafted sockets cannot be re-pointed, even by raw system calls.

tests/support/programs/escape.py runs under graft in a namespace with only `lo` and
re-points its grafted sockets with raw syscall()s the shim never sees, on
every kind of socket it can hold (KINDS). With confinement on, every
attempt fails with EPERM and the allowed traffic on the same sockets keeps
flowing; with it off (the control), at least one escape per kind succeeds,
so the suite cannot pass by testing nothing. Escapes with no system call to
refuse are listen()s on a socket that takes a fresh host port: there the
test connects from the host, and with confinement on the connection never
arrives. Kernels differ in which steps they allow by themselves
(kernel_facts.py): such a step is reported as "refused by the kernel"
(a warning), and never counted as a refusal by graft. Each broker runs in a
cgroup of its own test, removed with every program and pin in it at the end
(harness.BrokerProcess).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import warnings
from collections import Counter
from contextlib import contextmanager

import pytest

from graft.broker.confine import asm, bpf, lifecycle, programs
from support import kernel_facts
from support.harness import (
    GRAFT_BROKER,
    PROGRAMS,
    BrokerProcess,
    echo_server,
    free_port,
    graft_cmd,
    make_test_cgroup,
    need,
    need_confinement,
    need_root_and_netns,
    remove_test_cgroup,
)
from support.udp_env import udp_echo, udp_socket

ESCAPE = os.path.join(PROGRAMS, "escape.py")
PY = sys.executable

pytestmark = pytest.mark.netns

# The escapes, by the kind of socket they start from. An attempt absent from escape.py's
# report was not made: its kind is not held (pre-issued sockets need confinement), or
# the kernel refused a step it needs (kernel_facts.NEEDS).
KINDS = {
    "connected TCP": ["tcp_connect_forbidden"],
    "grafted listener": ["listener_connect_forbidden"],
    "accepted TCP": ["accepted_connect_forbidden"],
    "disconnected TCP": ["bind_other", "tcp_fastopen_forbidden", "listen_reached"],
    "UDP": [
        "udp_connect_forbidden",
        "udp_sendto_forbidden",
        "udp_unspec_sendto_forbidden",
        "udp_multi_sendto_forbidden",
    ],
    "dual-stack UDP": ["udp6_sendto_v4_wildcard", "udp6_connect_v4_wildcard"],
    "pre-issued TCP": ["preissued_bind", "preissued_connect_forbidden", "preissued_listen_reached"],
}
ESCAPES = [a for kind in KINDS.values() for a in kind]
# Refused how: a dropped SYN never arrives (EAGAIN from the program's accept); the rest, EPERM.
REFUSED = {a: "EAGAIN" if a.endswith("_reached") else "EPERM" for a in ESCAPES}
# The escapes that end in a connection to the forbidden TCP port.
TCP_TO_FORBIDDEN = {
    "tcp_connect_forbidden",
    "listener_connect_forbidden",
    "accepted_connect_forbidden",
    "tcp_fastopen_forbidden",
}
# Flows on the allowed path that escape.py checks (all must hold with confinement on).
FLOWS = {
    "tcp_before",
    "accepted_before",
    "udp_before",
    "udp6_before",
    "tcp_after",
    "accepted_after_listener",
    "udp_after_connect",
    "udp_after_sendto",
    "udp6_after",
    "preissued_granted",
    "udp_multi_first",
    "udp_multi_other",
}


def judged(out: dict) -> set[str]:
    """The escapes attempted that this kernel does not stop by itself: the ones confinement answers for."""
    return {a for a in ESCAPES if a in out["attempts"] and not kernel_facts.kernel_refused(a)}


def check_kernel_refusals(out: dict, confined: bool) -> None:
    """The kernel's own refusals went as probed; say which escapes the kernel stopped, not graft.

    Confined, a refused step may also meet confinement first (a connect
    program runs before the kernel's state check): EPERM.
    """
    for step, name in kernel_facts.refusals().items():
        allowed = {name, "EPERM"} if confined else {name}
        assert out["errnames"].get(step) in allowed, (step, out["errnames"])
    for escape in ESCAPES:
        why = kernel_facts.kernel_refused(escape)
        if why:
            assert escape != why.split(":")[0] or escape in out["attempts"], (escape, out)
            warnings.warn(f"escape {escape}: refused by the kernel ({why}), not by graft", stacklevel=2)


def policy(
    mode: str, tcp: int, udp: int, published: int, udp6: int = 9, udp2: int = 9, front_end: str = "preload"
) -> str:
    return f"""version = 1
[broker]
confinement = "{mode}"
[tenants.t]
mode = "{front_end}"
default = "deny"
[[tenants.t.connect]]
to = ["127.0.0.1/32"]
ports = [{tcp}, {published}]
proto = "tcp"
[[tenants.t.connect]]
to = ["127.0.0.1/32"]
ports = [{udp}, {udp2}]
proto = "udp"
[[tenants.t.connect]]
to = ["::1/128"]
ports = [{udp6}]
proto = "udp"
[[tenants.t.bind]]
addr = ["0.0.0.0/32"]
ports = [80]
host = "127.0.0.1:{published}"
proto = "tcp"
"""


def v6_and_v4_twin() -> tuple[socket.socket, socket.socket]:
    """UDP sockets on [::1]:P and 127.0.0.1:P, one port P: a grant for the first must not reach the second."""
    for _ in range(20):  # bounded: a port free in v4 and taken in v6 is rare
        twin = udp_socket("127.0.0.1")
        try:
            return udp_socket("::1", twin.getsockname()[1]), twin
        except OSError:
            twin.close()
    raise AssertionError("no UDP port free on both 127.0.0.1 and ::1")


@contextmanager
def forbidden_servers(*more_udp: socket.socket):
    """A TCP listener and a UDP socket on host-only ports the policy forbids; they count arrivals.

    Datagrams arriving at more_udp (owned by the caller) count too.
    """
    t = socket.socket()
    t.bind(("127.0.0.1", 0))
    t.listen(64)
    t.setblocking(False)
    u = udp_socket("127.0.0.1")
    for s in (u, *more_udp):
        s.setblocking(False)

    def arrivals() -> tuple[int, int]:
        conns = dgrams = 0
        while True:
            try:
                c, _ = t.accept()
            except BlockingIOError:
                break
            c.close()
            conns += 1
        for s in (u, *more_udp):
            while True:
                try:
                    s.recv(2048)
                except BlockingIOError:
                    break
                dgrams += 1
        return conns, dgrams

    try:
        yield t.getsockname()[1], u.getsockname()[1], arrivals
    finally:
        t.close()
        u.close()


@contextmanager
def escape_setup(tmp, mode: str, cgroup: str | None = None, front_end: str = "preload"):
    v6, twin = v6_and_v4_twin()
    with (
        v6,
        twin,
        echo_server() as tcp,
        udp_echo(prefix=b"") as (udp, _),
        udp_echo(sock=v6, prefix=b"") as (udp6, _),
        udp_echo(prefix=b"") as (udp2, _),
        forbidden_servers(twin) as (bad_tcp, bad_udp, arrivals),
    ):
        published = free_port()
        broker = BrokerProcess(tmp, policy(mode, tcp, udp, published, udp6, udp2, front_end), cgroup=cgroup)
        try:
            yield broker, [str(p) for p in (tcp, udp, published, bad_tcp, bad_udp, udp6, udp2)], arrivals
        finally:
            rc = broker.stop()
            assert rc == 0, broker.stderr()


def host_connects(port: int) -> bool:
    """Whether a connection from the host to 127.0.0.1:port completes.

    A confined listener drops the SYN, so "no" shows only as a timeout: one
    second, before the first retransmission; an open one on loopback answers
    in microseconds.
    """
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        return True
    except OSError:
        return False


def run_escape(broker, netns, args, between=None, seccomp: bool = False) -> dict:
    """Run escape.py and answer its prompts; with between, pass --wait and call it once grafted.

    seccomp: grafted by the broker's seccomp agent (graft run --seccomp) instead of the shim; the
    program's raw system calls then stop at the agent too, and the kernel answers them after it.
    """
    cmd = graft_cmd(broker, netns, PY, ESCAPE, *args, *(["--wait"] if between else []))
    if seccomp:
        cmd.insert(2, "--seccomp")
    # the tenant socket, which escape.py speaks to itself (graft run sets it only for the shim)
    env = dict(os.environ, GRAFT_SOCKET=str(broker.socket_path))
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    watchdog = threading.Timer(60, proc.kill)  # a hung program fails the test instead of hanging it
    watchdog.start()
    out = None
    try:
        for line in proc.stdout:
            if line.strip() == "ready":
                between()
                proc.stdin.write("go\n")
            elif line.startswith("listening "):
                host_connects(int(line.split()[2]))
                proc.stdin.write("tried\n")
            elif line.startswith("{"):
                out = json.loads(line)
            proc.stdin.flush()
        err = proc.stderr.read()
        proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and out is not None, f"escape.py failed:\n{err}\nbroker:\n{broker.stderr()}"
    return out


def open_kinds() -> set[str]:
    """The kinds of socket with at least one escape this kernel leaves open (pre-issued ones need confinement)."""
    kinds = {kind for kind, escapes in KINDS.items() if any(not kernel_facts.kernel_refused(a) for a in escapes)}
    for kind in KINDS.keys() - kinds:
        warnings.warn(f"{kind} sockets: every escape is refused by the kernel itself", stacklevel=2)
    return kinds


def assert_all_refused(out: dict) -> None:
    """Confinement on: every escape the kernel lets through is refused, on every kind of socket."""
    check_kernel_refusals(out, confined=True)
    escapes = judged(out)
    assert {a: out["errnames"][a] for a in escapes} == {a: REFUSED[a] for a in escapes}, out
    # every open kind was tried, pre-issued sockets included (the broker issues them with confinement on)
    assert {kind for kind, e in KINDS.items() if escapes & set(e)} == open_kinds(), out


def test_every_escape_is_refused_with_confinement_on(netns, short_tmp):
    need_confinement()
    with escape_setup(short_tmp / "b", "required") as (broker, args, arrivals):
        broker.start()
        out = run_escape(broker, netns, args)
        assert arrivals() == (0, 0), "something reached the forbidden ports"
        audit = broker.stop_and_audit()  # with the kernel's record of the pre-issued socket's connect
        stderr = broker.stderr()
    assert_all_refused(out)
    assert out["flows"] == {f: True for f in FLOWS}, f"allowed traffic stopped: {out['flows']}"
    assert "confinement: ON" in stderr
    # the program's 9 grafted sockets (through the broker, or the shim's fast path), the
    # pre-issued socket's granted connect, recorded by the kernel, and the second UDP destination
    grafts = [a for a in audit if a["action"] == "graft"]
    assert len(grafts) == 11 and {a["confinement"] for a in audit} == {"on"}, audit
    assert any(a["via"] == "kernel" for a in grafts), grafts
    assert out["grant_udp2"] == 0 and [a["op"] for a in grafts].count("grant") == 1, grafts


def test_every_escape_is_refused_in_seccomp_mode(netns, short_tmp):
    """The same program, grafted by the seccomp agent: its raw system calls stop at the agent, which
    lets calls on host sockets go on, and the kernel refuses every re-point. Nothing escapes."""
    need_confinement()
    with escape_setup(short_tmp / "b", "required", front_end="seccomp") as (broker, args, arrivals):
        broker.start()
        out = run_escape(broker, netns, args, seccomp=True)
        assert arrivals() == (0, 0), "something reached the forbidden ports"
        audit = broker.stop_and_audit()  # with the kernel's records of the agent's fast-path connects
    assert_all_refused(out)
    assert out["flows"] == {f: True for f in FLOWS}, f"allowed traffic stopped: {out['flows']}"
    # the program's 9 sockets grafted by the agent: its bind, and 8 connects, by the broker or (a
    # destination granted already) by the agent's C loop with a pre-issued socket, which the kernel
    # records; what escape.py asked on the tenant socket itself (its pre-issued socket's connect, the
    # second UDP destination)
    grafts = Counter((a["via"], a["op"]) for a in audit if a["action"] == "graft")
    assert grafts[("seccomp", "bind")] == 1 and grafts[("shim", "grant")] == 1, grafts
    assert grafts[("seccomp", "connect")] + grafts[("kernel", "connect")] == 8 + 1, grafts
    assert sum(grafts.values()) == 11, grafts


def test_every_escape_succeeds_with_confinement_off(netns, short_tmp):
    """The control: the same program escapes when the kernel does not hold it."""
    need_root_and_netns()
    with escape_setup(short_tmp / "b", "off") as (broker, args, arrivals):
        broker.start()
        out = run_escape(broker, netns, args)
        conns, dgrams = arrivals()
        stderr = broker.stderr()
        audit = broker.audit()
    check_kernel_refusals(out, confined=False)
    escapes = judged(out)
    # every escape the kernel lets through succeeds: a real escape on every open kind of socket held
    assert {a: out["errnames"][a] for a in escapes} == {a: "OK" for a in escapes}, out
    held = open_kinds() - {"pre-issued TCP"}
    assert {kind for kind, e in KINDS.items() if escapes & set(e)} == held and held, out
    # no pre-issued sockets without confinement: nothing would hold them to the policy
    assert out["preissue_refused"] == errno.EOPNOTSUPP, out
    # each TCP escape to the forbidden port arrived there; UDP: sendto (x2 datagrams), and IPv6's to 0.0.0.0
    assert conns == len(escapes & TCP_TO_FORBIDDEN) >= 1 and dgrams >= 3, (conns, dgrams, out)
    assert "confinement: OFF" in stderr
    assert {a["confinement"] for a in audit} == {"off"}


def test_restart_keeps_earlier_sockets_confined_and_does_not_stack(netns, short_tmp):
    """Sockets grafted before a restart stay locked, even when the broker's cgroup is recreated."""
    need_confinement()
    cgroup = make_test_cgroup()
    assert cgroup is not None
    try:
        with escape_setup(short_tmp / "b1", "required", cgroup) as (broker, args, arrivals):
            broker.start()

            def restart():
                assert broker.stop() == 0, broker.stderr()
                # As systemd does on a restart: the old (now empty) broker cgroup goes, a new one comes.
                os.rmdir(lifecycle.cgroup2_mount() + cgroup + "/" + lifecycle.CGROUP_NAME)
                broker.start()
                assert "reused pinned programs" in broker.stderr()

            out = run_escape(broker, netns, args, between=restart)
            assert arrivals() == (0, 0)
            # a third start in the same cgroup finds everything attached: one program per hook
            assert broker.stop() == 0
            broker.start()
            cg_fd = os.open(lifecycle.cgroup2_mount() + cgroup + "/" + lifecycle.CGROUP_NAME, os.O_RDONLY)
            try:
                counts = {n: len(bpf.prog_query(cg_fd, t)) for n, (_, _, t) in programs.PROGRAMS.items()}
            finally:
                os.close(cg_fd)
        assert_all_refused(out)
        # Sockets the earlier broker pre-issued find no grant of the new one: they connect nowhere.
        assert out["flows"] == {f: f != "preissued_granted" for f in FLOWS}, out["flows"]
        # one program per hook, never stacked (an optional one is absent where the kernel refuses it)
        assert {n: c for n, c in counts.items() if n not in programs.OPTIONAL} == {
            n: 1 for n in programs.PROGRAMS if n not in programs.OPTIONAL
        }, counts
        assert all(counts[n] <= 1 for n in programs.OPTIONAL), counts
    finally:
        remove_test_cgroup(cgroup)
    assert not [cg for cg, _ in lifecycle.installed() if cg.startswith(cgroup)]


def test_required_without_cgroup2_fails_at_start_with_a_clear_message(short_tmp):
    """In a mount namespace without cgroup2 nothing can be attached: "required" refuses to start."""
    need_confinement()
    unshare = shutil.which("unshare")
    need(unshare is not None, "needs unshare (util-linux)")
    mount = lifecycle.cgroup2_mount()
    pol = short_tmp / "p.toml"
    pol.write_text('version = 1\n[broker]\nconfinement = "required"\n[tenants.t]\n')
    cmd = [
        unshare,
        "--mount",
        "--propagation",
        "private",
        "/bin/sh",
        "-c",
        'umount -l "$0" && exec "$@"',
        mount,
        GRAFT_BROKER,
        "--policy",
        str(pol),
        "--socket-dir",
        str(short_tmp / "s"),
        "--audit-log",
        "off",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stderr
    assert 'refusing to start: confinement = "required"' in r.stderr
    assert "cgroup2 is not mounted" in r.stderr
    assert not (short_tmp / "s" / "t.sock").exists()


def test_cffi_layouts_and_constants_match_the_kernel_header(tmp_path):
    gcc = shutil.which("gcc") or shutil.which("cc")
    need(gcc is not None and os.path.exists("/usr/include/linux/bpf.h"), "needs a C compiler and linux/bpf.h")
    checks = {
        "BPF_MAP_CREATE": bpf.MAP_CREATE,
        "BPF_MAP_LOOKUP_ELEM": bpf.MAP_LOOKUP_ELEM,
        "BPF_MAP_UPDATE_ELEM": bpf.MAP_UPDATE_ELEM,
        "BPF_MAP_DELETE_ELEM": bpf.MAP_DELETE_ELEM,
        "BPF_PROG_LOAD": bpf.PROG_LOAD,
        "BPF_OBJ_PIN": bpf.OBJ_PIN,
        "BPF_OBJ_GET": bpf.OBJ_GET,
        "BPF_PROG_ATTACH": bpf.PROG_ATTACH,
        "BPF_PROG_DETACH": bpf.PROG_DETACH,
        "BPF_OBJ_GET_INFO_BY_FD": bpf.OBJ_GET_INFO_BY_FD,
        "BPF_PROG_QUERY": bpf.PROG_QUERY,
        "BPF_BTF_LOAD": bpf.BTF_LOAD,
        "BPF_MAP_TYPE_SK_STORAGE": bpf.MAP_TYPE_SK_STORAGE,
        "BPF_PROG_TYPE_CGROUP_SOCK_ADDR": bpf.PROG_TYPE_CGROUP_SOCK_ADDR,
        "BPF_CGROUP_INET4_BIND": bpf.CGROUP_INET4_BIND,
        "BPF_CGROUP_INET6_BIND": bpf.CGROUP_INET6_BIND,
        "BPF_CGROUP_INET4_CONNECT": bpf.CGROUP_INET4_CONNECT,
        "BPF_CGROUP_INET6_CONNECT": bpf.CGROUP_INET6_CONNECT,
        "BPF_CGROUP_UDP4_SENDMSG": bpf.CGROUP_UDP4_SENDMSG,
        "BPF_CGROUP_UDP6_SENDMSG": bpf.CGROUP_UDP6_SENDMSG,
        "BPF_F_NO_PREALLOC": bpf.F_NO_PREALLOC,
        "BPF_F_CLONE": bpf.F_CLONE,
        "BPF_F_ALLOW_MULTI": bpf.F_ALLOW_MULTI,
        "BPF_FUNC_sk_storage_get": bpf.FUNC_SK_STORAGE_GET,
        "SO_ATTACH_BPF": lifecycle.SO_ATTACH_BPF,
        "SO_LOCK_FILTER": lifecycle.SO_LOCK_FILTER,
        "BPF_PROG_TYPE_SOCKET_FILTER": bpf.PROG_TYPE_SOCKET_FILTER,
        "offsetof(struct bpf_sock_addr, user_ip4)": programs.CTX_USER_IP4,
        "offsetof(struct bpf_sock_addr, user_ip6)": programs.CTX_USER_IP6,
        "offsetof(struct bpf_sock_addr, user_port)": programs.CTX_USER_PORT,
        "offsetof(struct bpf_sock_addr, sk)": programs.CTX_SK,
    }
    fields = {
        "graft_bpf_map_create": ("map_type", "map_flags", "map_name", "btf_fd", "btf_value_type_id", "map_extra"),
        "graft_bpf_map_elem": ("map_fd", "key", "value", "flags"),
        "graft_bpf_prog_load": ("insns", "license", "log_buf", "prog_name", "expected_attach_type"),
        "graft_bpf_obj": ("pathname", "bpf_fd", "file_flags"),
        "graft_bpf_attach": ("target_fd", "attach_bpf_fd", "attach_type", "attach_flags", "replace_bpf_fd"),
        "graft_bpf_query": ("attach_type", "attach_flags", "prog_ids", "prog_cnt"),
        "graft_bpf_info": ("bpf_fd", "info_len", "info"),
        "graft_bpf_btf_load": ("btf", "btf_log_buf", "btf_size", "btf_log_size", "btf_log_level"),
    }
    kernel_name = {"graft_bpf_query": "query.", "graft_bpf_info": "info."}
    for struct_name, names in fields.items():
        for f in names:
            checks[f"offsetof(union bpf_attr, {kernel_name.get(struct_name, '')}{f})"] = bpf.ffi.offsetof(
                f"struct {struct_name}", f
            )
    for f in ("id", "nr_map_ids", "map_ids", "name"):
        checks[f"offsetof(struct bpf_prog_info, {f})"] = bpf.ffi.offsetof("struct graft_bpf_prog_info", f)
    for f in ("type", "id", "value_size", "map_flags", "name"):
        checks[f"offsetof(struct bpf_map_info, {f})"] = bpf.ffi.offsetof("struct graft_bpf_map_info", f)
    src = tmp_path / "c.c"
    src.write_text(
        "#include <stddef.h>\n#include <stdio.h>\n#include <sys/socket.h>\n#include <linux/bpf.h>\n"
        "int main(void){\n" + "".join(f'printf("%ld\\n", (long)({expr}));\n' for expr in checks) + "return 0;}\n"
    )
    subprocess.run([gcc, str(src), "-o", str(tmp_path / "c")], check=True)
    got = subprocess.run([str(tmp_path / "c")], capture_output=True, text=True, check=True).stdout.split()
    assert dict(zip(checks, map(int, got), strict=True)) == checks


def test_programs_are_attached_only_to_the_broker_cgroup(short_tmp):
    """Other processes' sockets never run the programs: nothing is attached above the broker."""
    need_confinement()
    with echo_server() as tcp, udp_echo() as (udp, _):
        broker = BrokerProcess(short_tmp / "b", policy("required", tcp, udp, free_port()))
        try:
            broker.start()
            pid = broker.proc.pid
            assert lifecycle.own_cgroup(pid) == broker.cgroup + "/" + lifecycle.CGROUP_NAME
            mount = lifecycle.cgroup2_mount()
            for cg in (broker.cgroup, lifecycle.own_cgroup()):
                fd = os.open(mount + cg, os.O_RDONLY)
                try:
                    assert all(bpf.prog_query(fd, t) == [] for _, _, t in programs.PROGRAMS.values()), cg
                finally:
                    os.close(fd)
            s = socket.create_connection(("127.0.0.1", tcp), timeout=5)  # this process: untouched
            s.close()
        finally:
            assert broker.stop() == 0, broker.stderr()


def allow_all_program() -> bytes:
    a = asm.Asm()
    a.mov_imm(0, 1)
    a.exit()
    return a.assemble()


def test_an_upgrade_replaces_changed_programs_and_detaches_stray_ones(short_tmp):
    """Pinned programs are reused only if the kernel's tag says they are this broker's programs."""
    need_confinement()
    cgroup = make_test_cgroup()
    assert cgroup is not None
    stray = None
    try:
        broker = BrokerProcess(short_tmp / "b", policy("required", 9, 9, free_port()), cgroup=cgroup)
        broker.start()
        assert broker.stop() == 0
        target = cgroup + "/" + lifecycle.CGROUP_NAME
        cg_fd = os.open(lifecycle.cgroup2_mount() + target, os.O_RDONLY)
        pin_dir = lifecycle.pin_dir_for(lifecycle.bpffs_mount(create=False), target)

        def pinned_ids() -> dict[str, int]:
            ids = {}
            for n in programs.PROGRAMS:
                fd = bpf.obj_get(os.path.join(pin_dir, n))
                ids[n] = bpf.prog_info(fd).id
                os.close(fd)
            return ids

        try:
            before = pinned_ids()
            # What an older broker would have left: a different connect4, pinned and attached...
            current = bpf.obj_get(os.path.join(pin_dir, "connect4"))
            old = bpf.prog_load(
                bpf.PROG_TYPE_CGROUP_SOCK_ADDR,
                allow_all_program(),
                programs.LICENSE,
                "graft_connect4",
                bpf.CGROUP_INET4_CONNECT,
            )
            bpf.prog_attach(cg_fd, old, bpf.CGROUP_INET4_CONNECT)
            bpf.prog_detach(cg_fd, current, bpf.CGROUP_INET4_CONNECT)
            os.unlink(os.path.join(pin_dir, "connect4"))
            bpf.obj_pin(old, os.path.join(pin_dir, "connect4"))
            old_id = bpf.prog_info(old).id
            for fd in (current, old):
                os.close(fd)
            # ...and a graft program attached but pinned nowhere (a broker died between the steps).
            stray = bpf.prog_load(
                bpf.PROG_TYPE_CGROUP_SOCK_ADDR,
                allow_all_program(),
                programs.LICENSE,
                "graft_bind4",
                bpf.CGROUP_INET4_BIND,
            )
            bpf.prog_attach(cg_fd, stray, bpf.CGROUP_INET4_BIND)
            stray_id = bpf.prog_info(stray).id

            broker.start()
            assert "connect4 changed since it was pinned; replacing it" in broker.stderr()
            attached = {n: bpf.prog_query(cg_fd, t) for n, (_, _, t) in programs.PROGRAMS.items()}
            pinned = pinned_ids()
        finally:
            os.close(cg_fd)
            assert broker.stop() == 0
        assert attached == {n: [pinned[n]] for n in programs.PROGRAMS}, (attached, pinned)
        assert old_id not in attached["connect4"] and stray_id not in attached["bind4"]
        # the unchanged programs were reused, not loaded again
        assert {n: i for n, i in pinned.items() if n != "connect4"} == {
            n: i for n, i in before.items() if n != "connect4"
        }
    finally:
        if stray is not None:
            os.close(stray)
        remove_test_cgroup(cgroup)


def test_an_upgrade_unpins_the_retired_owned_map_and_remove_takes_one_left_behind(short_tmp):
    """Closes were counted through a hash by socket cookie ("owned"); the counts socket storage replaced it."""
    need_confinement()
    cgroup = make_test_cgroup()
    assert cgroup is not None
    target = cgroup + "/" + lifecycle.CGROUP_NAME
    pin_dir = lifecycle.pin_dir_for(lifecycle.bpffs_mount(create=False), target)
    owned = os.path.join(pin_dir, "owned")

    def pin_an_old_owned_map() -> None:  # as a broker before the counts map left it
        fd = bpf.map_create(bpf.MAP_TYPE_HASH, 8, 4, 1 << 20, bpf.F_NO_PREALLOC, "graft_owned")
        try:
            bpf.obj_pin(fd, owned)
        finally:
            os.close(fd)

    try:
        broker = BrokerProcess(short_tmp / "b", policy("required", 9, 9, free_port()), cgroup=cgroup)
        broker.start()
        assert broker.stop() == 0
        pin_an_old_owned_map()
        broker.start()
        try:
            assert not os.path.exists(owned)
            fd = bpf.obj_get(os.path.join(pin_dir, "counts"))
            info = bpf.map_info(fd)
            os.close(fd)
            assert (info.type, info.key_size, info.value_size) == (bpf.MAP_TYPE_SK_STORAGE, 4, 4)
        finally:
            assert broker.stop() == 0
        pin_an_old_owned_map()
        done = lifecycle.remove(target, pin_dir)
        assert f"removed {owned}" in done and not os.path.exists(pin_dir), done
    finally:
        if os.path.isdir(pin_dir):  # a failure above left pins: nothing of this test stays
            lifecycle.remove(target, pin_dir)
        remove_test_cgroup(cgroup)
