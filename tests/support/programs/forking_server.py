"""A pre-forking server: the parent binds and listens, forked workers accept.

Each worker also makes one outgoing connect of its own after the fork (to the
echo port in argv), which must go over the worker's own broker connection.
argv: BIND_PORT WORKERS ECHO_PORT. Prints "listening" once ready; each worker
answers one connection with "worker <pid> echo=<reply>".
"""

import os
import socket
import sys

bind_port, workers, echo_port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", bind_port))
ls.listen(64)
print("listening", flush=True)
children = []
for _ in range(workers):
    pid = os.fork()
    if pid == 0:
        conn, _ = ls.accept()
        with socket.create_connection(("127.0.0.1", echo_port), timeout=10) as up:
            up.sendall(b"from-child")
            reply = up.recv(100).decode()
        conn.sendall(f"worker {os.getpid()} echo={reply}\n".encode())
        conn.close()
        os._exit(0)
    children.append(pid)
status = [os.waitpid(pid, 0)[1] for pid in children]
sys.exit(0 if all(s == 0 for s in status) else 1)
