"""A TCP server bound on 0.0.0.0:PORT (published elsewhere by the policy).

Prints one JSON line once listening: what getsockname shows the app (the
translated address; a truncated call; a dup of the listener). Then accepts
two connections, the first with accept4 (Python's accept), the second with
plain accept(2) through ctypes, answers each with the getsockname of the
accepted socket, and prints a final JSON line.
"""

import ctypes
import json
import os
import socket
import struct
import sys

port = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(8)

# Truncation exactly like the kernel: min(len, size) bytes copied, len set to the full size.
buf = ctypes.create_string_buffer(b"\xee" * 16, 16)
size = ctypes.c_uint32(4)
rc = libc.getsockname(s.fileno(), buf, ctypes.byref(size))
family, nport = struct.unpack("=H", buf.raw[:2])[0], struct.unpack("!H", buf.raw[2:4])[0]
d = os.dup(s.fileno())
dup_name = socket.socket(fileno=d)
print(
    json.dumps(
        {
            "getsockname": list(s.getsockname()),
            "truncated": [rc, size.value, family, nport, buf.raw[4:].hex()],
            "dup": list(dup_name.getsockname()),
        }
    ),
    flush=True,
)
dup_name.close()

accepted = []
c, _ = s.accept()  # accept4(2) in CPython
accepted.append(["accept4", *c.getsockname()])
c.sendall(b"ok\n")
c.close()
fd = libc.accept(s.fileno(), None, None)
if fd < 0:
    raise OSError(ctypes.get_errno(), "accept")
c = socket.socket(fileno=fd)
accepted.append(["accept", *c.getsockname()])
c.sendall(b"ok\n")
c.close()
print(json.dumps({"accepted": accepted}), flush=True)
