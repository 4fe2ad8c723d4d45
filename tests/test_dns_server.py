"""The tests' DNS responder (tests/dns_server.py): its answers, and one real round trip."""
from __future__ import annotations

import ipaddress
import socket
import struct

from dns_server import TYPE_A, TYPE_AAAA, Question, answer, dns_server, encode_query, parse_question

RECORDS = {"svc.graft.test": "10.9.8.7"}


def header(reply: bytes) -> tuple[int, int, int, int]:
    """(id, rcode, qdcount, ancount) of a reply, with the QR and AA bits checked."""
    qid, flags, qd, an, _ns, _ar = struct.unpack_from("!HHHHHH", reply)
    assert flags & 0x8000 and flags & 0x0400, hex(flags)
    return qid, flags & 0xF, qd, an


def test_a_query_for_a_known_name_gets_its_address():
    query = encode_query("SVC.graft.test", TYPE_A, qid=0xBEEF)
    reply = answer(query, RECORDS)
    assert header(reply) == (0xBEEF, 0, 1, 1)
    assert reply[12:len(query)] == query[12:]  # the question, echoed
    rr = reply[len(query):]
    assert struct.unpack("!HHHIH", rr[:12]) == (0xC00C, TYPE_A, 1, 0, 4)
    assert ipaddress.IPv4Address(rr[12:]) == ipaddress.IPv4Address("10.9.8.7")


def test_other_types_of_a_known_name_get_an_empty_answer():
    assert header(answer(encode_query("svc.graft.test", TYPE_AAAA), RECORDS))[1:] == (0, 1, 0)


def test_an_unknown_name_gets_nxdomain():
    assert header(answer(encode_query("other.graft.test", TYPE_A), RECORDS))[1:] == (3, 1, 0)


def test_junk_is_dropped():
    query = encode_query("svc.graft.test", TYPE_A)
    assert parse_question(query) == (Question("svc.graft.test", TYPE_A), len(query))
    for junk in (b"", query[:11], query[:-1], query[:-5] + b"\xc0\x0c" + query[-4:],
                 struct.pack("!H", 0x1234) + struct.pack("!H", 0x8100) + query[4:],  # a reply, not a query
                 query[:-2] + struct.pack("!H", 3)):  # class CH
        assert answer(junk, RECORDS) is None, junk


def test_served_over_udp():
    with dns_server("127.0.0.1", RECORDS, port=0) as (port, asked):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(10)
            s.sendto(encode_query("svc.graft.test", TYPE_A), ("127.0.0.1", port))
            reply = s.recv(512)
            me = s.getsockname()
    assert header(reply)[1:] == (0, 1, 1)
    assert asked == [(Question("svc.graft.test", TYPE_A), ("127.0.0.1", me[1]))]
