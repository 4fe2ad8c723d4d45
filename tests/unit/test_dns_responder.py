"""The tests' DNS responder (support/dns_server.py): its answers, pure; e2e/ has real round trips.

The answers the resolver's TCP tests rest on (tests/e2e/test_names_tcp.py) are pinned here: several
addresses to a name, UDP answers cut at 512 bytes or at what the query's EDNS offers, names a test
wants truncated, and TCP's length-prefixed messages.
"""

from __future__ import annotations

import io
import ipaddress
import struct

import dns.flags
import dns.message

from support.dns_server import (
    TYPE_A,
    TYPE_AAAA,
    Question,
    answer,
    edns_payload,
    encode_query,
    frame,
    parse_question,
    read_framed,
    reply_header,
)

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


# ---- several addresses, truncation over UDP, TCP -------------------------------------------------
# dnspython (the broker's codec, not the responder's) reads the replies and builds the EDNS queries:
# an encoder checked only by its own decoder would agree with itself about any mistake.

MANY = [f"127.0.1.{i}" for i in range(1, 101)]  # 100 records: 1644 bytes, past any UDP limit here
SOME = [f"127.0.2.{i}" for i in range(1, 41)]  # 40 records: past 512 bytes, within 1232
BIG = {"many.graft.test": MANY, "some.graft.test": SOME, "svc.graft.test": "10.9.8.7"}


def read(reply: bytes) -> dns.message.Message:
    return dns.message.from_wire(reply)


def addresses(msg: dns.message.Message) -> list[str]:
    return [rd.address for rrset in msg.answer for rd in rrset]


def edns_query(name: str, payload: int) -> bytes:
    q = dns.message.make_query(name, "A", use_edns=0, payload=payload)
    q.id = 0x4242
    return q.to_wire()


def test_a_name_with_several_addresses_gets_them_all_in_order():
    msg = read(answer(encode_query("many.graft.test", TYPE_A), BIG, ttl=30, transport="tcp"))
    assert addresses(msg) == MANY and {rrset.ttl for rrset in msg.answer} == {30}
    assert not msg.flags & dns.flags.TC and msg.edns == -1  # no OPT to a client that sent none


def test_over_udp_without_edns_an_answer_past_512_bytes_is_the_question_alone_with_tc():
    query = encode_query("some.graft.test", TYPE_A, qid=0xBEEF)
    whole = answer(query, BIG, transport="tcp")
    assert len(whole) > 512 and addresses(read(whole)) == SOME
    cut = answer(query, BIG, transport="udp")
    assert cut == answer(query, BIG)  # UDP is the default, as for the callers from before TCP
    assert reply_header(cut) == (0xBEEF, 0, 1, 0) and cut[12:] == query[12:]
    assert read(cut).flags & dns.flags.TC and not read(whole).flags & dns.flags.TC


def test_512_bytes_fit_and_513_do_not():
    # 12 bytes of header, the question (the name, its type and class), 16 bytes per record: 30 records
    # of "abcdefghi.test" (16 bytes of name) make 512 bytes, of a name one letter longer 513.
    thirty = [f"127.0.3.{i}" for i in range(1, 31)]
    for name, size, truncated in (("abcdefghi.test", 512, False), ("abcdefghij.test", 513, True)):
        query = encode_query(name, TYPE_A)
        assert len(answer(query, {name: thirty}, transport="tcp")) == size
        assert bool(read(answer(query, {name: thirty})).flags & dns.flags.TC) is truncated, name


def test_over_udp_with_edns_the_size_its_opt_offers_is_the_limit():
    some = read(answer(edns_query("some.graft.test", 1232), BIG))
    assert addresses(some) == SOME and not some.flags & dns.flags.TC
    assert (some.edns, some.payload) == (0, 1232)  # the OPT answered with this server's own size
    many = read(answer(edns_query("many.graft.test", 1232), BIG))
    assert many.flags & dns.flags.TC and addresses(many) == [] and many.edns == 0
    # An offer below 512 is taken as 512 (RFC 6891 6.2.5): the small answer fits as without EDNS.
    small = read(answer(edns_query("svc.graft.test", 100), BIG))
    assert addresses(small) == ["10.9.8.7"] and not small.flags & dns.flags.TC
    assert read(answer(edns_query("some.graft.test", 100), BIG)).flags & dns.flags.TC


def test_a_name_to_truncate_is_cut_over_udp_however_small_and_whole_over_tcp():
    for query in (encode_query("svc.graft.test", TYPE_A), edns_query("svc.graft.test", 1232)):
        cut = read(answer(query, BIG, truncate={"svc.graft.test"}))
        assert cut.flags & dns.flags.TC and addresses(cut) == []
        whole = read(answer(query, BIG, truncate={"svc.graft.test"}, transport="tcp"))
        assert addresses(whole) == ["10.9.8.7"] and not whole.flags & dns.flags.TC
    other = read(answer(encode_query("some.graft.test", TYPE_A), {"x.test": "10.0.0.1"}, truncate={"x.test"}))
    assert other.rcode() == 3 and not other.flags & dns.flags.TC  # only the names named


def test_edns_payload_reads_the_opt_record_and_drops_junk_after_the_question():
    plain = encode_query("svc.graft.test", TYPE_A)
    assert edns_payload(plain, len(plain)) is None
    query = edns_query("svc.graft.test", 1400)
    end = parse_question(query)[1]
    assert edns_payload(query, end) == 1400
    assert answer(query[:-1], BIG) is None  # the OPT record cut short
    assert answer(plain[:10] + b"\x00\x01" + plain[12:], BIG) is None  # an additional record that is not there


def test_tcp_messages_carry_their_length():
    reply = answer(encode_query("many.graft.test", TYPE_A), BIG, transport="tcp")
    framed = frame(reply)
    assert framed[:2] == struct.pack("!H", len(reply)) and framed[2:] == reply
    stream = io.BytesIO(framed + frame(b"x"))
    assert [read_framed(stream.read), read_framed(stream.read), read_framed(stream.read)] == [reply, b"x", None]
    assert read_framed(io.BytesIO(framed[:-1]).read) is None  # the stream ended inside a message
    assert read_framed(io.BytesIO(b"\x00").read) is None
