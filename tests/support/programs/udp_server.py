"""A UDP echo server: bind 0.0.0.0:PORT, print "listening <getsockname>", echo COUNT datagrams
with recvfrom/sendto, printing the peer each came from, then exit."""

import socket
import sys

port, count = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
host, bound = s.getsockname()
print(f"listening {host} {bound}", flush=True)
s.settimeout(30)
for _ in range(count):
    data, peer = s.recvfrom(2048)
    s.sendto(b"echo:" + data, peer)
    print(f"peer {peer[0]} {peer[1]}", flush=True)
