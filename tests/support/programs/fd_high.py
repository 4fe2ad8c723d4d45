"""Graft a placeholder that dup2 moved to a high fd number. Argv: HOST PORT FD.

RLIMIT_NOFILE is raised as far as needed (the hard limit too, which takes
CAP_SYS_RESOURCE; exit 77 if that is refused).
"""

import json
import os
import resource
import socket
import sys

host, port, HIGH = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (HIGH + 1, max(hard, HIGH + 1)))
except (ValueError, OSError) as e:  # raising the hard limit needs CAP_SYS_RESOURCE
    print(f"cannot raise RLIMIT_NOFILE to {HIGH + 1}: {e}", file=sys.stderr)
    sys.exit(77)
s = socket.socket()
placeholder = os.fstat(s.fileno()).st_ino
os.dup2(s.fileno(), HIGH)
s.close()
t = socket.socket(fileno=HIGH)
t.connect((host, port))
t.sendall(b"high")
print(
    json.dumps({"fd": t.fileno(), "grafted": os.fstat(HIGH).st_ino != placeholder, "echo": t.recv(100).decode()}),
    flush=True,
)
