"""core/resolved.py: what a tenant's lookups returned, and until when (pure; the clock is passed in)."""

from __future__ import annotations

from ipaddress import ip_address as ip

from graft.broker.core.resolved import Resolved


def test_an_address_counts_as_its_names_until_each_lapses():
    r = Resolved()
    r.learn("API.Example.com.", ["192.0.2.1", "2001:db8::1"], lapses=10.0)
    r.learn("cdn.example", ["192.0.2.1"], lapses=20.0)
    assert r.lookup(ip("192.0.2.1"), now=5.0) == {"api.example.com": 10.0, "cdn.example": 20.0}
    assert r.lookup(ip("2001:db8::1"), now=5.0) == {"api.example.com": 10.0}
    assert r.lookup(ip("192.0.2.1"), now=10.0) == {"cdn.example": 20.0}  # lapsed at 10: gone
    assert r.lookup(ip("192.0.2.1"), now=20.0) == {} and len(r) == 1  # the v6 one has not been asked since
    assert r.lookup(ip("192.0.2.9"), now=0.0) == {}


def test_a_later_answer_extends_and_an_earlier_one_never_shortens():
    r = Resolved()
    r.learn("a.example", ["192.0.2.1"], lapses=10.0)
    r.learn("a.example", ["192.0.2.1"], lapses=4.0)
    assert r.lookup(ip("192.0.2.1"), now=5.0) == {"a.example": 10.0}
    r.learn("a.example", ["192.0.2.1"], lapses=30.0)
    assert r.lookup(ip("192.0.2.1"), now=15.0) == {"a.example": 30.0}


def test_v4_mapped_destinations_are_their_ipv4_address():
    r = Resolved()
    r.learn("a.example", ["192.0.2.1"], lapses=10.0)
    assert r.lookup(ip("::ffff:192.0.2.1"), now=0.0) == {"a.example": 10.0}


def test_names_the_text_form_escapes_are_not_kept():
    """A label holding a dot prints as x\\.corp: as text it would pass for a name under corp.example."""
    r = Resolved()
    r.learn("evil.x\\.corp.example", ["192.0.2.1"], lapses=10.0)
    assert r.lookup(ip("192.0.2.1"), now=0.0) == {}


def test_the_table_is_bounded_and_forgets_the_least_recently_used():
    r = Resolved(max_addresses=2)
    r.learn("a.example", ["192.0.2.1"], lapses=10.0)
    r.learn("b.example", ["192.0.2.2"], lapses=10.0)
    r.lookup(ip("192.0.2.1"), now=0.0)  # a lookup does not refresh: learning does
    r.learn("c.example", ["192.0.2.3"], lapses=10.0)
    assert len(r) == 2 and r.lookup(ip("192.0.2.1"), now=0.0) == {}
