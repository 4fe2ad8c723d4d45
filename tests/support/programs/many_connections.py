"""Hold N grafted connections; on each stdin line, do a round of work and report.

argv: HOST PORT N. Prints "open N" once connected. For each line read:
"echo" sends a message on every held connection and checks the echo, then
opens and closes NEW fresh connections (checking each); prints
"round ok=<held echoes> new=<fresh connects ok> errors=<first error or ->".
"""

import socket
import sys

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = [socket.create_connection((host, port), timeout=10) for _ in range(n)]
print("open", len(held), flush=True)
for line in sys.stdin:
    fresh = int(line.split()[1]) if len(line.split()) > 1 else 0
    ok, new, errors = 0, 0, []
    for i, s in enumerate(held):
        msg = f"held-{i}".encode()
        try:
            s.sendall(msg)
            if s.recv(100) == msg:
                ok += 1
        except OSError as e:
            errors.append(f"held {i}: {e}")
    for j in range(fresh):
        try:
            with socket.create_connection((host, port), timeout=10) as s:
                s.sendall(b"fresh")
                if s.recv(100) == b"fresh":
                    new += 1
        except OSError as e:
            errors.append(f"fresh {j}: {e}")
    print(f"round ok={ok} new={new} errors={errors[0] if errors else '-'}", flush=True)
