"""The tests' DNS responder (support/dns_server.py): its answers, pure; e2e/ has a real round trip."""

from __future__ import annotations

import ipaddress
import struct

from support.dns_server import TYPE_A, TYPE_AAAA, Question, answer, encode_query, parse_question, reply_header

RECORDS = {"svc.graft.test": "10.9.8.7"}


def test_a_query_for_a_known_name_gets_its_address():
    query = encode_query("SVC.graft.test", TYPE_A, qid=0xBEEF)
    reply = answer(query, RECORDS)
    assert reply_header(reply) == (0xBEEF, 0, 1, 1)
    assert reply[12 : len(query)] == query[12:]  # the question, echoed
    rr = reply[len(query) :]
    assert struct.unpack("!HHHIH", rr[:12]) == (0xC00C, TYPE_A, 1, 0, 4)
    assert ipaddress.IPv4Address(rr[12:]) == ipaddress.IPv4Address("10.9.8.7")


def test_other_types_of_a_known_name_get_an_empty_answer():
    assert reply_header(answer(encode_query("svc.graft.test", TYPE_AAAA), RECORDS))[1:] == (0, 1, 0)


def test_an_unknown_name_gets_nxdomain():
    assert reply_header(answer(encode_query("other.graft.test", TYPE_A), RECORDS))[1:] == (3, 1, 0)


def test_junk_is_dropped():
    query = encode_query("svc.graft.test", TYPE_A)
    assert parse_question(query) == (Question("svc.graft.test", TYPE_A), len(query))
    for junk in (
        b"",
        query[:11],
        query[:-1],
        query[:-5] + b"\xc0\x0c" + query[-4:],
        struct.pack("!H", 0x1234) + struct.pack("!H", 0x8100) + query[4:],  # a reply, not a query
        query[:-2] + struct.pack("!H", 3),
    ):  # class CH
        assert answer(junk, RECORDS) is None, junk
