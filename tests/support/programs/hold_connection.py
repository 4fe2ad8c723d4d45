"""Connect, print "<pid> <fd>", then hold the connection until stdin closes.

argv: HOST PORT.
"""

import os
import socket
import sys

s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print(os.getpid(), s.fileno(), flush=True)
sys.stdin.read()
s.sendall(b"still here")
print(s.recv(100).decode(), flush=True)
