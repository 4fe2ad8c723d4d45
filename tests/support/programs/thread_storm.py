"""THREADS threads, each making CONNECTS blocking connects with an echo, at once.

argv: HOST PORT THREADS CONNECTS. Prints "ok N" with N successful round trips,
then any errors, one per line.
"""

import socket
import sys
import threading

host, port, n_threads, n_connects = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ok, errors, lock = [0], [], threading.Lock()
start = threading.Barrier(n_threads)


def worker(i):
    start.wait()
    for j in range(n_connects):
        try:
            with socket.create_connection((host, port), timeout=30) as s:
                msg = f"{i}:{j}".encode()
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    chunk = s.recv(100)
                    if not chunk:
                        break
                    got += chunk
                if got != msg:
                    raise RuntimeError(f"echo {got!r} != {msg!r}")
            with lock:
                ok[0] += 1
        except Exception as e:  # report, keep going: the test counts
            with lock:
                errors.append(f"thread {i} connect {j}: {e!r}")


threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("ok", ok[0])
print("\n".join(errors[:20]))
