"""A fake broker that SIGKILLs itself at one point of a request.

argv: SOCKET_PATH POINT, POINT one of:
  accept     - die as soon as a client connects
  request    - die after reading the request, before any reply
  socket     - die after opening the host socket it would hand out
  reply      - die right after sending a GRAFT reply with a host socket
Prints "ready" once listening. Used to check what the app sees when the real
broker is killed at that point: the shim must fail the call with the
documented errno, quickly, leaking nothing.
"""

import array
import os
import signal
import socket
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
from graft.broker.shim import wire  # noqa: E402

path, point = sys.argv[1], sys.argv[2]
ls = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
ls.bind(path)
ls.listen(8)
print("ready", flush=True)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


conn, _ = ls.accept()
if point == "accept":
    die()
data = conn.recv(wire.REQUEST_SIZE)
if point == "request":
    die()
host = socket.socket()
if point == "socket":
    die()
conn.sendmsg(
    [wire.encode_reply(wire.V_GRAFT, 0)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [host.fileno()]))]
)
die()
