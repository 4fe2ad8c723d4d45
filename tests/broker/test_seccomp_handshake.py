"""The seccomp agent in an in-process broker without confinement (no root needed).

Such a broker must refuse every notify fd, with a reason the runtime and
graft run can show, and keep serving its tenants.
"""

from __future__ import annotations

import array
import json
import os
import socket

import trio

from graft.broker.core.audit import AuditLog
from graft.broker.seccomp import abi
from graft.broker.server import Broker
from graft.policy import parse_policy

POLICY = 'version = 1\n[tenants.t]\nmode = "seccomp"\n'


async def test_without_confinement_no_seccomp_listener_is_accepted(nursery, short_tmp):
    broker = Broker(parse_policy(POLICY), short_tmp / "sock", AuditLog("off"))
    await nursery.start(broker.run)
    path = short_tmp / "sock" / abi.SECCOMP_SOCKET
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    r, w = os.pipe()
    passed = f"pipe:[{os.fstat(r).st_ino}]"
    try:
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with s:
            await s.connect(str(path))
            await s.sendmsg(
                [abi.encode_process_state("t", os.getpid(), "c")],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))],
            )
            answer = json.loads(await s.recv(4096))
    finally:
        os.close(r)
        os.close(w)
    assert answer["ok"] is False and "needs kernel confinement" in answer["error"]
    assert broker.tenants["t"].seccomp_listeners == 0
    # The broker closes its copy of the passed fd (on a worker thread, after answering).
    for _ in range(500):
        if passed not in open_links():
            break
        await trio.sleep(0.01)
    assert passed not in open_links()


def open_links() -> set[str]:
    links = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own fd, closed by now
            pass
    return links
