"""UDP client modes for tests/e2e/test_udp.py; prints one JSON object.

connect HOST PORT         connect(), send, recv: the connected-client path
sendto HOST PORT PORT2    unconnected: sendto PORT (grafts), recvfrom; then sendmsg to PORT2, recvfrom;
                          replies may come from any port (the server answers from a second socket);
                          if the second send is refused: {"first": ..., "second_send": ERRNO}
deny HOST PORT            a sendto the policy denies: errno, and whether the socket got a local port
peers HOST A B C          one unconnected socket (tests/e2e/test_udp_multi_peer.py): sendto A and recvfrom (the
                          graft), sendmsg B and recvfrom, sendto C (no reply expected), sendto B again and
                          recvfrom; {"steps": [[RESULT, REPLY, PEER], ...]}, RESULT "OK" or the send's errno
repoint HOST A B C        one socket, re-pointed with connect(): A (the graft), send and recv; B, send and recv;
                          C (refused or not); send and recv again (B, if C was refused); steps as for peers
exec HOST A B             sendto A (grafts) and recvfrom, then exec this script in mode "inherited", which
                          sends to B on the inherited socket and recvfrom: {"first": REPLY, "second": [RESULT, REPLY]}
"""

import errno
import json
import os
import socket
import sys

mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.settimeout(10)
out = {}
try:
    if mode == "connect":
        s.connect((host, port))
        s.send(b"hello connected")
        data, peer = s.recvfrom(2048)
        out = {"data": data.decode(), "peer": list(peer[:2]), "getpeername": list(s.getpeername()[:2])}
    elif mode == "sendto":
        port2 = int(sys.argv[4])
        s.sendto(b"one", (host, port))
        d1, p1 = s.recvfrom(2048)
        try:
            s.sendmsg([b"two"], [], 0, (host, port2))
        except OSError as e:  # confinement: a socket judged for one destination only
            print(json.dumps({"first": [d1.decode(), list(p1[:2])], "second_send": errno.errorcode[e.errno]}))
            raise SystemExit(0) from None
        d2, p2 = s.recvfrom(2048)
        try:
            s.getpeername()
            connected = True
        except OSError as e:
            connected = errno.errorcode[e.errno]
        out = {
            "replies": [[d1.decode(), list(p1[:2])], [d2.decode(), list(p2[:2])]],
            "connected": connected,
            "local_port": s.getsockname()[1],
        }
    elif mode == "deny":
        try:
            s.sendto(b"must not leave", (host, port))
            out["sendto"] = "OK"
        except OSError as e:
            out["sendto"] = errno.errorcode[e.errno]
        out["local_port"] = s.getsockname()[1]  # a datagram that left would have autobound it
    elif mode == "peers":
        a, b, c = port, int(sys.argv[4]), int(sys.argv[5])
        out["steps"] = []
        for call, msg, to in (("sendto", b"a", a), ("sendmsg", b"b1", b), ("sendto", b"c", c), ("sendto", b"b2", b)):
            try:
                if call == "sendto":
                    s.sendto(msg, (host, to))
                else:
                    s.sendmsg([msg], [], 0, (host, to))
            except OSError as e:
                out["steps"].append([errno.errorcode[e.errno], None, None])
                continue
            if to == c:  # C never answers
                out["steps"].append(["OK", None, None])
                continue
            data, peer = s.recvfrom(2048)
            out["steps"].append(["OK", data.decode(), list(peer[:2])])
    elif mode == "repoint":
        a, b, c = port, int(sys.argv[4]), int(sys.argv[5])
        out["steps"] = []
        for msg, to in ((b"a", a), (b"b1", b), (b"c", c), (b"b2", None)):
            try:
                if to is not None:
                    s.connect((host, to))
                if to == c:  # C never answers
                    out["steps"].append(["OK", None, None])
                    continue
                s.send(msg)
            except OSError as e:
                out["steps"].append([errno.errorcode[e.errno], None, None])
                continue
            data, peer = s.recvfrom(2048)
            out["steps"].append(["OK", data.decode(), list(peer[:2])])
    elif mode == "exec":
        s.sendto(b"one", (host, port))
        first = s.recvfrom(2048)[0].decode()
        os.set_inheritable(s.fileno(), True)
        os.execv(sys.executable, [sys.executable, __file__, "inherited", host, sys.argv[4], str(s.fileno()), first])
    elif mode == "inherited":  # argv: HOST PORT FD FIRST_REPLY; the shim of this image has never seen FD
        s.close()
        s = socket.socket(fileno=int(sys.argv[4]))
        s.settimeout(10)
        out["first"] = sys.argv[5]
        try:
            s.sendto(b"two", (host, port))
            out["second"] = ["OK", s.recvfrom(2048)[0].decode()]
        except OSError as e:
            out["second"] = [errno.errorcode[e.errno], None]
    else:
        raise SystemExit(f"unknown mode {mode}")
except TimeoutError:
    out["error"] = "timeout"
print(json.dumps(out), flush=True)
