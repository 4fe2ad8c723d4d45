"""DNS messages for the broker's resolver: bytes in, bytes out, no sockets (sans-IO).

Every byte a query carries comes from a container, every byte an answer
carries from an upstream server: both are untrusted. The codec is
dnspython's; this module only decides what of a message the resolver
accepts and what it sends back:

* ``parse_query``: one question, opcode QUERY, not a response; anything
  else is ``BadQuery`` with the rcode to answer (FORMERR, NOTIMP) or none
  (a message that cannot even be answered is dropped).
* ``refusal``: the answer to a query the resolver will not forward (the
  policy refused the name, REFUSED or NXDOMAIN; or SERVFAIL).
* ``forwarded``: the query as sent upstream, under the resolver's own id
  (a client's id is not trusted to be unpredictable), without CD.
* ``name_allowed``: a policy's ``names``, matched label by label.
* ``parse_answer``: an upstream's answer, accepted only for the query it
  answers (id, question); its addresses and its cache lifetime (the least
  TTL of its answer, or a negative answer's SOA minimum, RFC 2308).
* ``Cache``: answers by (name, type, class) until their TTL runs out; a hit
  is re-rendered with the TTLs that remain and the client's id.

A stub resolver sends the same bytes again and again, but for the id. So
``Parsed`` keeps the queries it has parsed by their bytes after the id, and
``cached_reply`` keeps an answer's rendering per query bytes and whole
second of age: a cache hit neither parses nor renders (dnspython's cost,
docs/benchmarks.md), and ``with_id`` gives every reply the id of the query
it answers. Nothing is taken from a client's bytes that dnspython has not
read first.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

MAX_TTL = 86400  # seconds an answer is cached at most, whatever its TTL says (a day)
MAX_CACHED_ANSWER = 4096  # bytes: a larger answer is passed on but not kept (bounds a tenant's cache)
MAX_UDP_ANSWER = 1232  # bytes a UDP answer may take without EDNS saying more (the DNS flag day's size)
NEGATIVE_TTL_MAX = 900  # seconds a negative answer is cached at most, whatever its SOA says
PARSED_MAX = 1024  # distinct queries (bytes after the id) a resolver remembers parsed
RENDERS_MAX = 16  # renderings one cached answer keeps (spellings and sizes asked this second)


def name_allowed(name: dns.name.Name, patterns: list[str] | None) -> bool:
    """Whether a policy's `names` admit name: exact, "*.suffix" (a name under it), "*"; None admits any.

    Compared label by label (dnspython's names, case-insensitive): a label
    that holds a dot ("x\\.corp") is one label, not the end of a suffix.
    """
    if patterns is None:
        return True
    for exact, suffix in _compiled(tuple(patterns)):
        if exact is None and suffix is None:
            return True  # "*"
        if suffix is not None and name != suffix and name.is_subdomain(suffix):
            return True
        if exact is not None and name == exact:
            return True
    return False


@functools.lru_cache(maxsize=256)
def _compiled(patterns: tuple[str, ...]) -> tuple[tuple[dns.name.Name | None, dns.name.Name | None], ...]:
    """Each pattern as (the exact name, or None; the suffix, or None): read once per list of patterns."""
    return tuple(
        (None, None)
        if p == "*"
        else (None, dns.name.from_text(p[2:]))
        if p.startswith("*.")
        else (dns.name.from_text(p), None)
        for p in patterns
    )


class BadQuery(Exception):
    """A query the resolver does not serve; ``rcode`` is the answer to send, None to send nothing."""

    def __init__(self, rcode: int | None, reason: str, query_id: int | None = None):
        super().__init__(reason)
        self.rcode = rcode
        self.reason = reason
        self.query_id = query_id


class BadAnswer(Exception):
    """An upstream's message that is not the answer to the query sent."""


@dataclass(frozen=True, slots=True)
class Query:
    """One question of one client, as the resolver judges and forwards it."""

    message: dns.message.Message
    name: dns.name.Name
    rdtype: int
    rdclass: int
    # Worked out once (a query parsed once is judged and audited many times: Parsed):
    # What the cache keys by: the name's canonical (lower-case) wire form, which hashes and compares
    # as bytes do (dnspython's names compare label by label, case-insensitively: far slower).
    key: tuple = field(init=False)
    text: str = field(init=False)  # the name without its trailing dot, for the policy and the audit log
    type_text: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.name.canonicalize().to_wire(), self.rdtype, self.rdclass))
        object.__setattr__(self, "text", self.name.to_text(omit_final_dot=True))
        object.__setattr__(self, "type_text", dns.rdatatype.to_text(self.rdtype))

    @property
    def id(self) -> int:
        return self.message.id


@dataclass(frozen=True, slots=True)
class Answer:
    """An upstream's answer to a query: what the cache and the audit log need of it."""

    message: dns.message.Message
    rcode: int
    ttl: int  # seconds it may be cached; 0: not at all
    addresses: tuple[str, ...]  # the A/AAAA records of the answer section
    ips: tuple  # the same, as ipaddress objects (read once: each cache hit passes them on)
    truncated: bool
    addresses_ttl: int = 0  # seconds the least-lived of those records may be used (at most MAX_TTL)
    # (query bytes after the id, age, size limit) -> the reply: see cached_reply
    renders: dict = field(default_factory=dict, compare=False, repr=False)


def parse_query(wire: bytes) -> Query:
    """Validate a client's query; raise BadQuery for anything the resolver does not serve."""
    try:
        msg = dns.message.from_wire(wire)
    except dns.message.ShortHeader:
        raise BadQuery(None, "shorter than a DNS header") from None
    except dns.exception.DNSException as e:
        # The header was read: the client can be told its message was malformed.
        qid = int.from_bytes(wire[:2], "big")
        raise BadQuery(dns.rcode.FORMERR, f"malformed query: {e}", qid) from None
    if msg.flags & dns.flags.QR:
        raise BadQuery(None, "a response, not a query")  # answering it could loop between two servers
    if msg.opcode() != dns.opcode.QUERY:
        raise BadQuery(dns.rcode.NOTIMP, f"opcode {dns.opcode.to_text(msg.opcode())}", msg.id)
    if len(msg.question) != 1:
        raise BadQuery(dns.rcode.FORMERR, f"{len(msg.question)} questions", msg.id)
    q = msg.question[0]
    if (
        q.rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR)
        or dns.rdatatype.is_metatype(q.rdtype)
        and (q.rdtype != dns.rdatatype.ANY)
    ):
        raise BadQuery(dns.rcode.NOTIMP, f"type {dns.rdatatype.to_text(q.rdtype)}", msg.id)
    return Query(msg, q.name, q.rdtype, q.rdclass)


def _response(query: Query, rcode: int) -> dns.message.Message:
    r = dns.message.make_response(query.message, recursion_available=True, our_payload=MAX_UDP_ANSWER)
    r.set_rcode(rcode)
    return r


def refusal(query: Query, rcode: int) -> bytes:
    """The answer to a query the resolver does not forward: REFUSED, NXDOMAIN or SERVFAIL, no records."""
    return _response(query, rcode).to_wire()


def error_reply(bad: BadQuery) -> bytes | None:
    """The answer to a query BadQuery refused (FORMERR, NOTIMP), or None when none can be sent."""
    if bad.rcode is None or bad.query_id is None:
        return None
    msg = dns.message.Message(id=bad.query_id)
    msg.flags = dns.flags.QR | dns.flags.RA
    msg.set_rcode(bad.rcode)
    return msg.to_wire()


def forwarded(query: Query, upstream_id: int) -> bytes:
    """The query as the resolver sends it upstream: the client's question and flags, the resolver's id."""
    msg = dns.message.make_query(query.name, query.rdtype, query.rdclass, use_edns=0, payload=MAX_UDP_ANSWER)
    msg.id = upstream_id
    # RD as the client asked; CD never: an answer the upstream did not validate would be cached
    # for every program of the tenant, whatever they asked.
    msg.flags = (query.message.flags & dns.flags.RD) | (msg.flags & ~(dns.flags.RD | dns.flags.CD))
    return msg.to_wire()


def parse_answer(wire: bytes, query: Query, upstream_id: int) -> Answer:
    """An upstream's answer to what ``forwarded`` sent; BadAnswer if it answers anything else."""
    try:
        msg = dns.message.from_wire(wire)
    except dns.exception.DNSException as e:
        raise BadAnswer(f"malformed answer: {e}") from None
    if msg.id != upstream_id or not msg.flags & dns.flags.QR:
        raise BadAnswer("not the answer to the query sent")
    if len(msg.question) != 1 or (msg.question[0].name, msg.question[0].rdtype, msg.question[0].rdclass) != (
        query.name,
        query.rdtype,
        query.rdclass,
    ):
        raise BadAnswer("answers another question")
    rcode = msg.rcode()
    records = [rrset for rrset in msg.answer if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)]
    ips = tuple(ipaddress.ip_address(rd.address) for rrset in records for rd in rrset)
    addresses_ttl = min((MAX_TTL, *(rrset.ttl for rrset in records))) if records else 0
    addresses = tuple(str(ip) for ip in ips)
    return Answer(msg, rcode, _cache_ttl(msg, rcode), addresses, ips, bool(msg.flags & dns.flags.TC), addresses_ttl)


def wire_of(msg: dns.message.Message) -> bytes:
    return msg.to_wire(max_size=65535)


def _cache_ttl(msg: dns.message.Message, rcode: int) -> int:
    if msg.flags & dns.flags.TC:
        return 0  # incomplete: asked again over TCP, never kept
    if len(wire_of(msg)) > MAX_CACHED_ANSWER:
        return 0  # passed on, not kept: a tenant's cache stays bounded in bytes
    if rcode == dns.rcode.NOERROR and msg.answer:
        return min(MAX_TTL, *(rrset.ttl for rrset in msg.answer))
    if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):  # a negative answer: its SOA says how long
        soas = [rrset for rrset in msg.authority if rrset.rdtype == dns.rdatatype.SOA]
        if soas:
            return min(NEGATIVE_TTL_MAX, soas[0].ttl, soas[0][0].minimum)
    return 0  # SERVFAIL, REFUSED, ...: not kept


def reply(query: Query, answer: Answer, age: int = 0, max_size: int = 65535) -> bytes:
    """The answer as the client gets it: its id, question and EDNS, TTLs less the seconds it was cached.

    Larger than max_size (a UDP client without EDNS for more): truncated,
    so that the client asks again over TCP.
    """
    msg = dns.message.from_wire(answer.message.to_wire(max_size=65535))  # a copy: the cached one stays as it came
    msg.id = query.id
    # EDNS is hop by hop (RFC 6891): the client's own, never the upstream's record, options or size.
    if query.message.edns >= 0:
        msg.use_edns(0, 0, MAX_UDP_ANSWER, options=[])
    else:
        msg.use_edns(False)
    msg.question = [dns.rrset.RRset(query.name, query.rdclass, query.rdtype)]  # the client's spelling of the name
    for section in (msg.answer, msg.authority, msg.additional):
        for rrset in section:
            rrset.ttl = max(0, rrset.ttl - age)
    wire = msg.to_wire(max_size=65535)
    if len(wire) > max_size:
        msg.answer, msg.authority, msg.additional = [], [], []
        msg.flags |= dns.flags.TC
        wire = msg.to_wire(max_size=65535)
    return wire


def cached_reply(query_bytes: bytes, query: Query, answer: Answer, age: int, max_size: int) -> bytes:
    """reply(), rendered once per query bytes (after the id), whole second of age and size limit.

    query is what those bytes parse to (``Parsed``); the reply carries the
    id of whichever query was parsed first: ``with_id`` puts the client's in.
    """
    key = (query_bytes, age, max_size)
    wire = answer.renders.get(key)
    if wire is None:
        if len(answer.renders) >= RENDERS_MAX:
            answer.renders.clear()  # a second gone by: the older ages are asked no more
        wire = answer.renders[key] = reply(query, answer, age, max_size)
    return wire


def with_id(reply_wire: bytes, query_wire: bytes) -> bytes:
    """reply_wire with the id of the query it answers (its first two bytes)."""
    return query_wire[:2] + reply_wire[2:]


class Parsed:
    """Queries already parsed, by their bytes after the id; a repeat is not parsed again.

    What is remembered is parse_query's judgement of those very bytes, so a
    repeat is judged alike; a BadQuery is not remembered (it costs its
    sender the parse each time). The least recently used go first.
    """

    def __init__(self, max_entries: int = PARSED_MAX):
        self.max_entries = max_entries
        self._queries: OrderedDict[bytes, Query] = OrderedDict()

    def parse(self, wire: bytes) -> Query:
        """parse_query(wire), from memory if these bytes were parsed before; its id is the first's."""
        key = wire[2:]
        q = self._queries.get(key)
        if q is not None and len(wire) >= 2:
            self._queries.move_to_end(key)
            return q
        q = parse_query(wire)
        self._queries[key] = q
        if len(self._queries) > self.max_entries:
            self._queries.popitem(last=False)
        return q


def udp_limit(query: Query) -> int:
    """How large a UDP answer this client takes: 512, or what its EDNS says, at most MAX_UDP_ANSWER."""
    if query.message.edns < 0:
        return 512
    return max(512, min(query.message.payload, MAX_UDP_ANSWER))


class Cache:
    """Answers by question until their TTL runs out; the least recently used go first when full."""

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, tuple[Answer, float]] = OrderedDict()  # key -> (answer, expires at)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, query: Query, now: float) -> tuple[Answer, int] | None:
        """(answer, whole seconds it has been cached) while its TTL lasts, else None."""
        entry = self._entries.get(query.key)
        if entry is None:
            return None
        answer, expires = entry
        if now >= expires:
            del self._entries[query.key]
            return None
        self._entries.move_to_end(query.key)
        return answer, int(answer.ttl - (expires - now))

    def put(self, query: Query, answer: Answer, now: float) -> None:
        if answer.ttl <= 0:
            return
        self._entries[query.key] = (answer, now + answer.ttl)
        self._entries.move_to_end(query.key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
