"""confine/issue.c's two ways to mark and count pre-issued sockets, side by side; prints one JSON object.

Run as root with the test's cgroup directory as argv[1]: the program moves
itself there and puts confinement in place as a broker does (in
<it>/graft-broker), then issues a batch through the kernel's stamps (the
sock_create program marks and counts each socket as it is made) and one
marked and counted from C (no stamps map), and reports, for each, what every
socket carries: its mark, its count id, its locked listen guard, and the
closes the kernel counted once the broker's copies are closed. Also: a
socket the same thread makes after a batch carries nothing, no stamp is
left behind, threads issuing at once for different tenants get each their
own ids, and a batch cut short by the fd limit reports exactly the
sockets the kernel counts. It leaves its confinement in place; the caller
removes the cgroup (and with it the pins).

With "refused" as argv[2], the kernel is made to refuse the sock_create
program (a program no verifier accepts stands in for it): confinement
still comes up, without the program attached, and conf.issuer() marks and
counts from C.
"""

import json
import os
import resource
import socket
import struct
import sys
import threading

from graft.broker.confine import asm, bpf, fastpath, lifecycle, maps, programs

N = 8
SO_LOCK_FILTER = lifecycle.SO_LOCK_FILTER
REFUSED = sys.argv[2:] == ["refused"]


def unverifiable(_maps) -> bytes:
    a = asm.Asm()
    a.exit()  # r0 never set: every verifier refuses it
    return a.assemble()


if REFUSED:
    programs.create_program = unverifiable
with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as f:
    f.write("0")
conf = lifecycle.establish()


def count_id(sock: socket.socket) -> int | None:
    raw = bpf.map_lookup(conf.maps["counts"], struct.pack("=i", sock.fileno()), 4)
    return None if raw is None else struct.unpack("=I", raw)[0]


def carried(sock: socket.socket) -> dict:
    # bpf.map_lookup, not conf.mark_of: that one's buffers are shared, and threads below read at once
    mark = bpf.map_lookup(conf.map_fd, struct.pack("=i", sock.fileno()), maps.MARK_SIZE)
    return {
        "mark": None if mark is None else list(maps.mark_flags_and_tenant(mark)),
        "count": count_id(sock),
        "locked": sock.getsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER),
    }


def batch(issuer: fastpath.Issuer) -> dict:
    gid, kid = conf.new_grant_id(), conf.new_tenant_id()
    got = issuer.issue(socket.AF_INET, socket.SOCK_STREAM, 0, N, 0, gid, kid)
    socks = [socket.socket(fileno=fd) for fd in got.fds()]
    out = {"gid": gid, "kid": kid, "stamped": got.stamped, "sockets": [carried(s) for s in socks]}
    for s in socks:
        s.detach()  # the batch's copies are closed below, as the broker closes them
    with socket.socket() as plain:
        out["plain"] = carried(plain)
    out["stamps_left"] = len(bpf.map_keys(conf.maps["stamps"], 8))
    got.close()
    out["released"] = conf.released(kid)
    return out


def cut_short(issuer: fastpath.Issuer) -> dict:
    """A batch of N asked for with room for 3 more fds: socket() fails at the fourth."""
    kid = conf.new_tenant_id()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.open("/", os.O_RDONLY)  # the lowest free fd: every fd from it up is free
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe + 3, hard))
    try:
        issuer.issue(socket.AF_INET, socket.SOCK_STREAM, 0, N, 0, conf.new_grant_id(), kid)
        return {"error": None}
    except fastpath.IssueError as e:
        return {"error": e.errno, "counted": e.counted, "released": conf.released(kid)}
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def concurrent(issuer: fastpath.Issuer, threads: int = 4, batches: int = 20) -> dict:
    """Threads issuing at once, each for ids of its own: a socket carrying another thread's ids is a stamp crossed."""
    ids = [(conf.new_grant_id(), conf.new_tenant_id()) for _ in range(threads)]
    crossed, stamped = [], []

    def work(gid: int, kid: int) -> None:
        for _ in range(batches):
            got = issuer.issue(socket.AF_INET, socket.SOCK_STREAM, 0, 16, 0, gid, kid)
            for fd in got.fds():
                s = socket.socket(fileno=fd)
                seen = carried(s)
                s.detach()
                if seen["mark"] != [maps.F_PREISSUED, gid] or seen["count"] != kid:
                    crossed.append(seen)
            stamped.append(got.stamped)
            got.close()

    workers = [threading.Thread(target=work, args=pair) for pair in ids]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {
        "batches": len(stamped),
        "stamped": sum(stamped),
        "crossed": crossed[:3],
        "released": [conf.released(kid) for _, kid in ids],
    }


if REFUSED:
    cg_fd = os.open(conf.cgroup_dir, os.O_RDONLY)
    attached = bpf.prog_query(cg_fd, bpf.CGROUP_INET_SOCK_CREATE)
    os.close(cg_fd)
    issuer = conf.issuer()
    print(json.dumps({"loaded": "create" in conf.prog_fds, "attached": len(attached), "issued": batch(issuer)}))
    conf.close()
    sys.exit(0)
kernel = fastpath.Issuer(conf.map_fd, conf.guard_fd, conf.maps["counts"], conf.maps["stamps"])
from_c = fastpath.Issuer(conf.map_fd, conf.guard_fd, conf.maps["counts"])

report = {
    "preissued_flag": maps.F_PREISSUED,
    "kernel": batch(kernel),
    "from_c": batch(from_c),
    "concurrent": concurrent(kernel),
    "kernel_cut_short": cut_short(kernel),
    "from_c_cut_short": cut_short(from_c),
}
conf.close()
print(json.dumps(report))
