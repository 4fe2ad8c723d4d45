"""The tests' DNS responder (support/dns_server.py) answers over real UDP on loopback.

Its message handling is tested pure in tests/unit/test_dns_responder.py.
"""

from __future__ import annotations

import socket

from support.dns_server import TYPE_A, Question, dns_server, encode_query, reply_header

RECORDS = {"svc.graft.test": "10.9.8.7"}


def test_served_over_udp():
    with dns_server("127.0.0.1", RECORDS, port=0) as (port, asked):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(10)
            s.sendto(encode_query("svc.graft.test", TYPE_A), ("127.0.0.1", port))
            reply = s.recv(512)
            me = s.getsockname()
    assert reply_header(reply)[1:] == (0, 1, 1)
    assert asked == [(Question("svc.graft.test", TYPE_A), ("127.0.0.1", me[1]))]
