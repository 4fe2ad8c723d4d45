"""A scripted broker for the shim's side of GRAFT_OP_GRANT (tests/e2e/test_udp_multi_peer.py).

argv: SOCKET_PATH ANSWER NFT_TABLE
Serves its clients one connection, and one request, at a time. A CONNECT
(the app's first sendto) is grafted as the real broker grafts it: a UDP
socket of this process's network namespace, unconnected, bound to the
wildcard address. A GRANT is answered by ANSWER:
  graft       lift the refusal (delete the nftables table NFT_TABLE), then GRAFT without an fd
  graft-kept  GRAFT without an fd, the refusal left in place
  graft-fd    GRAFT with an fd attached (a memfd named "graft-attached"): an invalid reply
  deny        DENY with EACCES
  old         ERROR with EOPNOTSUPP, as a broker that predates GRANT answers it
  gone        exit at once, without a reply: the broker is unreachable from then on
and the script exits once it has answered its first GRANT. Prints "ready"
once listening, then one JSON line for each request it received.
"""

import array
import errno
import json
import os
import socket
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
from graft.broker.core import request  # noqa: E402
from graft.broker.shim import wire  # noqa: E402

path, answer, nft_table = sys.argv[1], sys.argv[2], sys.argv[3]


def describe(data: bytes) -> dict:
    try:
        req = wire.decode_request(data)
    except request.BadRequest as e:
        return {"invalid": str(e)}
    return {
        "op": req.op_name,
        "family": req.family,
        "type": req.type,
        "protocol": req.protocol,
        "flags": req.flags,
        "addr": [str(req.addr.ip), req.addr.port],
        "n_opts": len(req.opts),
    }


def reply(conn: socket.socket, verdict: int, error: int = 0, fd: int | None = None) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
    conn.sendmsg([wire.encode_reply(verdict, error)], anc)


def answer_grant(conn: socket.socket) -> None:
    if answer == "gone":
        os._exit(0)
    if answer == "graft":
        subprocess.run(["nft", "delete", "table", "inet", nft_table], check=True)
    if answer in ("graft", "graft-kept"):
        reply(conn, wire.V_GRAFT)
    elif answer == "graft-fd":
        attached = os.memfd_create("graft-attached")
        reply(conn, wire.V_GRAFT, fd=attached)
        os.close(attached)
    elif answer == "deny":
        reply(conn, wire.V_DENY, errno.EACCES)  # not the kernel's EPERM, so its origin shows
    elif answer == "old":
        reply(conn, wire.V_ERROR, errno.EOPNOTSUPP)
    else:
        raise SystemExit(f"unknown answer {answer}")


def serve(conn: socket.socket) -> bool:
    """One client connection; whether a GRANT was answered on it."""
    while data := conn.recv(wire.REQUEST_SIZE + 1):
        got = describe(data)
        print(json.dumps(got), flush=True)
        if got.get("op") == "grant":
            answer_grant(conn)
            return True
        if got.get("op") != "connect":
            raise SystemExit(f"unexpected request {got}")
        with socket.socket(got["family"], socket.SOCK_DGRAM) as host:
            host.bind(("::" if got["family"] == socket.AF_INET6 else "0.0.0.0", 0))
            reply(conn, wire.V_GRAFT, 0, host.fileno())
    return False


with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
    listener.bind(path)
    listener.listen(8)
    print("ready", flush=True)
    granted = False
    while not granted:
        conn, _ = listener.accept()
        with conn:
            granted = serve(conn)
