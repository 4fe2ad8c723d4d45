"""broker/dns/message.py: what the resolver accepts of a query or an answer, and what it sends back."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graft.broker.dns import message as m


def query(name: str = "myhost.test", rdtype: str = "A", **kw) -> bytes:
    q = dns.message.make_query(name, rdtype, **kw)
    q.id = 0x1234
    return q.to_wire()


def upstream_answer(q: m.Query, upstream_id: int, *rrsets, rcode=dns.rcode.NOERROR, authority=(), flags=0) -> bytes:
    msg = dns.message.make_response(dns.message.from_wire(m.forwarded(q, upstream_id)))
    msg.set_rcode(rcode)
    msg.answer = list(rrsets)
    msg.authority = list(authority)
    msg.flags |= flags
    return msg.to_wire(max_size=65535)


def a(name: str, ttl: int, *addresses: str) -> dns.rrset.RRset:
    return dns.rrset.from_text(name.rstrip(".") + ".", ttl, "IN", "A", *addresses)


def test_a_query_is_read_with_its_question():
    q = m.parse_query(query("MyHost.Test", "AAAA"))
    assert (q.id, q.text, q.type_text) == (0x1234, "MyHost.Test", "AAAA")
    assert q.key == m.parse_query(query("myhost.test", "AAAA")).key  # names compare without case


@pytest.mark.parametrize(
    ("wire", "rcode", "words"),
    [
        (b"\x12\x34\x01", None, "shorter than a DNS header"),
        (query()[:-3], dns.rcode.FORMERR, "malformed"),
        (query() + b"junk", dns.rcode.FORMERR, "malformed"),
    ],
)
def test_malformed_queries_are_refused_with_what_can_be_said(wire, rcode, words):
    with pytest.raises(m.BadQuery) as e:
        m.parse_query(wire)
    assert e.value.rcode == rcode and words in e.value.reason
    reply = m.error_reply(e.value)
    if rcode is None:
        assert reply is None
    else:
        r = dns.message.from_wire(reply)
        assert (r.id, r.rcode(), bool(r.flags & dns.flags.QR)) == (0x1234, rcode, True)


def test_what_is_not_a_single_standard_query_is_refused():
    response = dns.message.make_response(dns.message.from_wire(query())).to_wire()
    with pytest.raises(m.BadQuery) as e:
        m.parse_query(response)
    assert e.value.rcode is None  # answering a response could loop between two servers
    notify = dns.message.make_query("myhost.test", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    with pytest.raises(m.BadQuery) as e:
        m.parse_query(notify.to_wire())
    assert e.value.rcode == dns.rcode.NOTIMP
    two = dns.message.make_query("a.test", "A")
    two.question.append(dns.rrset.RRset(dns.name.from_text("b.test"), 1, 1))
    with pytest.raises(m.BadQuery) as e:
        m.parse_query(two.to_wire())
    assert e.value.rcode == dns.rcode.FORMERR
    with pytest.raises(m.BadQuery) as e:
        m.parse_query(query("zone.test", "AXFR"))
    assert e.value.rcode == dns.rcode.NOTIMP


@pytest.mark.parametrize("rcode", [dns.rcode.REFUSED, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL])
def test_a_refusal_answers_the_question_with_no_records(rcode):
    q = m.parse_query(query())
    r = dns.message.from_wire(m.refusal(q, rcode))
    assert (r.id, r.rcode(), r.question[0].name, r.answer) == (0x1234, rcode, q.name, [])
    assert r.flags & dns.flags.QR and r.flags & dns.flags.RA


def test_the_query_goes_upstream_under_the_resolvers_id():
    q = m.parse_query(query())
    fwd = dns.message.from_wire(m.forwarded(q, 0xBEEF))
    assert (fwd.id, fwd.question[0].name, fwd.question[0].rdtype) == (0xBEEF, q.name, dns.rdatatype.A)
    assert fwd.flags & dns.flags.RD and not fwd.flags & dns.flags.QR
    assert fwd.edns == 0 and fwd.payload == m.MAX_UDP_ANSWER


def test_an_answer_gives_its_addresses_and_least_ttl():
    q = m.parse_query(query())
    ans = m.parse_answer(
        upstream_answer(q, 7, a("myhost.test", 300, "127.0.0.1", "10.0.0.2"), a("other.test", 60, "10.9.9.9")), q, 7
    )
    assert (ans.rcode, ans.ttl, sorted(ans.addresses), ans.truncated) == (
        0,
        60,
        ["10.0.0.2", "10.9.9.9", "127.0.0.1"],
        False,
    )


def test_the_addresses_last_as_long_as_the_least_lived_of_their_records():
    q = m.parse_query(query())
    cname = dns.rrset.from_text("myhost.test.", 30, "IN", "CNAME", "edge.cdn.test.")
    ans = m.parse_answer(
        upstream_answer(q, 7, cname, a("edge.cdn.test", 300, "192.0.2.1"), a("edge.cdn.test", 300, "192.0.2.2")), q, 7
    )
    assert (ans.addresses, ans.addresses_ttl, ans.ttl) == (("192.0.2.1", "192.0.2.2"), 300, 30)
    huge = m.parse_answer(upstream_answer(q, 7, a("myhost.test", 10**7, "192.0.2.1")), q, 7)
    assert huge.addresses_ttl == m.MAX_TTL
    assert m.parse_answer(upstream_answer(q, 7, rcode=dns.rcode.NXDOMAIN), q, 7).addresses_ttl == 0


@pytest.mark.parametrize("mangle", ["id", "question", "not a response", "junk"])
def test_only_the_answer_to_the_query_sent_is_taken(mangle):
    q = m.parse_query(query())
    other = m.parse_query(query("elsewhere.test"))
    wire = {
        "id": lambda: upstream_answer(q, 8, a("myhost.test", 30, "10.0.0.1")),
        "question": lambda: upstream_answer(other, 7, a("elsewhere.test", 30, "10.0.0.1")),
        "not a response": lambda: m.forwarded(q, 7),
        "junk": lambda: upstream_answer(q, 7)[:-2],
    }[mangle]()
    with pytest.raises(m.BadAnswer):
        m.parse_answer(wire, q, 7)


def test_negative_answers_are_cached_for_their_soa_minimum_and_failures_not_at_all():
    q = m.parse_query(query())
    soa = dns.rrset.from_text("test.", 3600, "IN", "SOA", "ns.test. admin.test. 1 3600 600 86400 120")
    nx = m.parse_answer(upstream_answer(q, 7, rcode=dns.rcode.NXDOMAIN, authority=[soa]), q, 7)
    assert (nx.rcode, nx.ttl, nx.addresses) == (dns.rcode.NXDOMAIN, 120, ())
    long_soa = dns.rrset.from_text("test.", 86400, "IN", "SOA", "ns.test. admin.test. 1 3600 600 86400 86400")
    assert m.parse_answer(upstream_answer(q, 7, authority=[long_soa]), q, 7).ttl == m.NEGATIVE_TTL_MAX
    assert m.parse_answer(upstream_answer(q, 7, rcode=dns.rcode.SERVFAIL), q, 7).ttl == 0
    tc = m.parse_answer(upstream_answer(q, 7, a("myhost.test", 30, "10.0.0.1"), flags=dns.flags.TC), q, 7)
    assert (tc.truncated, tc.ttl) == (True, 0)


def test_a_reply_has_the_clients_id_and_spelling_and_the_ttls_that_remain():
    q = m.parse_query(query())
    ans = m.parse_answer(upstream_answer(q, 7, a("myhost.test", 300, "127.0.0.1")), q, 7)
    asker = m.parse_query(query("MYHOST.test"))
    r = dns.message.from_wire(m.reply(asker, ans, age=40))
    assert (r.id, r.question[0].name.to_text(), r.answer[0].ttl) == (0x1234, "MYHOST.test.", 260)
    assert [rd.address for rd in r.answer[0]] == ["127.0.0.1"]
    assert ans.message.answer[0].ttl == 300  # the cached answer is untouched


def test_edns_in_a_reply_is_the_clients_never_the_upstreams():
    """RFC 6891: a client that sent no OPT record gets none; one that did gets the resolver's size, no options."""
    q = m.parse_query(query())
    upstream = dns.message.from_wire(upstream_answer(q, 7, a("myhost.test", 300, "127.0.0.1")))
    upstream.use_edns(0, 0, 4096, options=[dns.edns.GenericOption(65001, b"x")])
    ans = m.parse_answer(upstream.to_wire(), q, 7)
    assert ans.message.edns == 0  # as it came
    assert dns.message.from_wire(m.reply(q, ans)).edns == -1
    with_edns = dns.message.from_wire(m.reply(m.parse_query(query(use_edns=0, payload=4096)), ans))
    assert (with_edns.edns, with_edns.payload, with_edns.options) == (0, m.MAX_UDP_ANSWER, ())
    refused = dns.message.from_wire(m.refusal(m.parse_query(query(use_edns=0, payload=4096)), dns.rcode.REFUSED))
    assert (refused.edns, refused.payload) == (0, m.MAX_UDP_ANSWER)
    assert dns.message.from_wire(m.refusal(q, dns.rcode.REFUSED)).edns == -1


def test_a_reply_too_large_for_the_client_is_truncated():
    q = m.parse_query(query())
    many = a("myhost.test", 300, *(f"10.0.{i // 250}.{i % 250}" for i in range(100)))
    ans = m.parse_answer(upstream_answer(q, 7, many), q, 7)
    small = dns.message.from_wire(m.reply(q, ans, max_size=m.udp_limit(q)))
    assert small.flags & dns.flags.TC and small.answer == []
    assert len(dns.message.from_wire(m.reply(q, ans)).answer[0]) == 100


def test_the_udp_limit_is_the_clients_within_bounds():
    assert m.udp_limit(m.parse_query(query())) == 512
    assert m.udp_limit(m.parse_query(query(use_edns=0, payload=4096))) == m.MAX_UDP_ANSWER
    assert m.udp_limit(m.parse_query(query(use_edns=0, payload=800))) == 800


def test_the_cache_keeps_an_answer_for_its_ttl_and_forgets_the_least_recent():
    cache = m.Cache(max_entries=2)
    q1, q2, q3 = (m.parse_query(query(n)) for n in ("one.test", "two.test", "three.test"))
    answers = {q.text: m.parse_answer(upstream_answer(q, 7, a(q.text, 30, "10.0.0.1")), q, 7) for q in (q1, q2, q3)}
    cache.put(q1, answers["one.test"], now=100.0)
    assert cache.get(q1, now=110.5) == (answers["one.test"], 10)
    assert cache.get(m.parse_query(query("ONE.test")), now=111.0)[1] == 11  # the same question
    assert cache.get(q1, now=130.0) is None and len(cache) == 0  # its TTL ran out
    cache.put(q1, answers["one.test"], now=200.0)
    cache.put(q2, answers["two.test"], now=200.0)
    assert cache.get(q1, now=201.0) is not None  # q1 is now the more recent
    cache.put(q3, answers["three.test"], now=202.0)
    assert (cache.get(q2, now=202.0), len(cache)) == (None, 2)
    failed = m.parse_answer(upstream_answer(q2, 7, rcode=dns.rcode.SERVFAIL), q2, 7)
    cache.put(q2, failed, now=203.0)
    assert cache.get(q2, now=203.0) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_are_a_query_or_bad_query(raw):
    try:
        q = m.parse_query(raw)
    except m.BadQuery as e:
        assert e.rcode in (None, dns.rcode.FORMERR, dns.rcode.NOTIMP)
        return
    m.refusal(q, dns.rcode.REFUSED)  # and whatever was accepted can be answered


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_from_upstream_are_an_answer_or_bad_answer(raw):
    q = m.parse_query(query())
    try:
        m.parse_answer(raw, q, 0x1234)
    except m.BadAnswer:
        pass


def test_a_huge_ttl_is_cut_to_a_day_and_a_large_answer_is_not_kept():
    q = m.parse_query(query())
    forever = m.parse_answer(upstream_answer(q, 7, a("myhost.test", 2**31 - 1, "10.0.0.1")), q, 7)
    assert forever.ttl == m.MAX_TTL
    big = a("myhost.test", 300, *(f"10.{i // 250}.{i % 250}.1" for i in range(400)))
    assert m.parse_answer(upstream_answer(q, 7, big), q, 7).ttl == 0  # passed on, never cached


def test_checking_disabled_is_never_forwarded():
    """An answer the upstream did not validate would be cached for every program of the tenant."""
    cd = dns.message.make_query("myhost.test", "A")
    cd.flags |= dns.flags.CD
    fwd = dns.message.from_wire(m.forwarded(m.parse_query(cd.to_wire()), 9))
    assert not fwd.flags & dns.flags.CD and fwd.flags & dns.flags.RD


def test_a_repeated_query_is_parsed_once_and_its_reply_rendered_once_per_second_of_age():
    parsed = m.Parsed(max_entries=2)
    first, again = query(), b"\x99\x99" + query()[2:]  # the same bytes but for the id
    q = parsed.parse(first)
    assert parsed.parse(again) is q  # remembered: the bytes after the id are the same
    ans = m.parse_answer(upstream_answer(q, 7, a("myhost.test", 300, "127.0.0.1")), q, 7)
    wire = m.cached_reply(again[2:], q, ans, 40, 512)
    assert m.cached_reply(again[2:], q, ans, 40, 512) is wire  # rendered once for that second
    assert wire == m.reply(q, ans, 40, max_size=512)
    out = dns.message.from_wire(m.with_id(wire, again))
    assert (out.id, out.answer[0].ttl) == (0x9999, 260)  # the client's id, the TTL that remains
    assert dns.message.from_wire(m.cached_reply(again[2:], q, ans, 41, 512)).answer[0].ttl == 259
    with pytest.raises(m.BadQuery):
        parsed.parse(b"\x00\x01junk")
    parsed.parse(query("b.test"))
    parsed.parse(query("c.test"))
    assert parsed.parse(first) is not q  # evicted (least recently used): parsed afresh


def test_renderings_of_one_answer_are_bounded():
    q = m.parse_query(query())
    ans = m.parse_answer(upstream_answer(q, 7, a("myhost.test", 300, "127.0.0.1")), q, 7)
    for age in range(m.RENDERS_MAX * 3):
        m.cached_reply(query()[2:], q, ans, age, 512)
    assert len(ans.renders) <= m.RENDERS_MAX
