"""A blocking connect that cannot complete (the target's accept queue is full).

Argv: HOST PORT MODE. MODE sndtimeo: SO_SNDTIMEO of 1 s; MODE eintr: a
SIGALRM after 0.5 s, with a handler and no SA_RESTART. The connect is the
raw libc call (ctypes) so its errno is seen exactly. Prints JSON.
"""

import ctypes
import errno
import json
import signal
import socket
import struct
import sys
import time

host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
libc = ctypes.CDLL(None, use_errno=True)
s = socket.socket()
if mode == "sndtimeo":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 1, 0))
else:
    signal.signal(signal.SIGALRM, lambda *_: None)  # CPython installs it without SA_RESTART
    signal.setitimer(signal.ITIMER_REAL, 0.5)
addr = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(host) + bytes(8)
t0 = time.monotonic()
rc = libc.connect(s.fileno(), addr, len(addr))
err = ctypes.get_errno() if rc < 0 else 0
elapsed = time.monotonic() - t0
print(json.dumps({"rc": rc, "errno": errno.errorcode.get(err, err), "elapsed": round(elapsed, 3)}), flush=True)
