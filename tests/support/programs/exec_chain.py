"""Sockets across exec: a placeholder made before exec is grafted after it,
and a socket grafted before exec keeps carrying data after it.

argv: HOST PORT [stage]. Prints "placeholder=<echo> grafted=<echo>".
"""

import os
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
if len(sys.argv) == 3:
    placeholder = socket.socket()  # not connected yet: the shim's state is lost at exec
    grafted = socket.create_connection((host, port))  # grafted before exec
    for s in (placeholder, grafted):
        os.set_inheritable(s.fileno(), True)
    os.execv(sys.executable, [sys.executable, __file__, host, str(port), f"{placeholder.fileno()},{grafted.fileno()}"])
fd_placeholder, fd_grafted = (int(x) for x in sys.argv[3].split(","))
p = socket.socket(fileno=fd_placeholder)
p.connect((host, port))
p.sendall(b"p")
g = socket.socket(fileno=fd_grafted)
g.sendall(b"g")
print(f"placeholder={p.recv(10).decode()} grafted={g.recv(10).decode()}")
