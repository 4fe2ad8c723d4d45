"""IPv6 sockets that talk IPv4.

server N   an AF_INET6 listener with IPV6_V6ONLY off, bound to [::]:80; prints
           "listening", then answers N connections with the peer address it saw.
client HOST PORT   an AF_INET6 client connecting to ::ffff:HOST (v4-mapped);
           prints the echo of "mapped".
"""

import socket
import sys

if sys.argv[1] == "server":
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", 80))
    s.listen(8)
    print("listening", flush=True)
    for _ in range(int(sys.argv[2])):
        conn, peer = s.accept()
        conn.sendall(f"{peer[0]}\n".encode())
        conn.close()
else:
    host, port = sys.argv[2], int(sys.argv[3])
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as c:
        c.connect((f"::ffff:{host}", port))
        c.sendall(b"mapped")
        print(c.recv(100).decode(), flush=True)
