"""A minimal DNS responder for the tests: A records for a few names, over UDP.

The seccomp-mode tests (tests/e2e/test_static_apps.py) resolve a name with
glibc's own resolver, whose sockets an LD_PRELOAD shim never sees. They need
a name server on the host's loopback that the test controls and can ask what
it was asked. ``answer`` is the protocol, a pure function (tested on its own
in tests/unit/test_dns_responder.py); ``dns_server`` is the I/O edge, a thread that
serves one UDP socket until the test ends.

Only what glibc's stub resolver sends is understood: one question per
query, class IN. For a known name an A query gets its address (authoritative,
TTL 0 unless a test asks for more, so nothing caches it) and any other type an empty NOERROR answer, as
a real zone without that record would give; unknown names get NXDOMAIN, and
what cannot be parsed is dropped, as servers drop junk.
"""

from __future__ import annotations

import ipaddress
import socketserver
import struct
from contextlib import contextmanager
from typing import NamedTuple

from .harness import serving

TYPE_A = 1
TYPE_AAAA = 28
CLASS_IN = 1
RCODE_NOERROR = 0
RCODE_NXDOMAIN = 3
_HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
_QR, _AA, _RA = 0x8000, 0x0400, 0x0080
_OPCODE_RD = 0x7900  # the opcode and RD bits of a query, echoed in the reply


class Question(NamedTuple):
    name: str  # lower case, without the trailing dot
    qtype: int


def encode_query(name: str, qtype: int, qid: int = 0x1234) -> bytes:
    """A standard recursive query for name, as a stub resolver sends it."""
    qname = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.split(".")) + b"\0"
    return _HEADER.pack(qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, CLASS_IN)


def parse_question(query: bytes) -> tuple[Question, int] | None:
    """The question of a standard query and the offset just past it; None if it is not one."""
    if len(query) < _HEADER.size:
        return None
    _id, flags, qdcount, _an, _ns, _ar = _HEADER.unpack_from(query)
    if flags & _QR or qdcount != 1:
        return None
    labels, pos = [], _HEADER.size
    while True:
        if pos >= len(query):
            return None
        length = query[pos]
        pos += 1
        if length == 0:
            break
        if length > 63 or pos + length > len(query):  # a compression pointer has no place in a question
            return None
        labels.append(query[pos : pos + length].decode("ascii", errors="replace").lower())
        pos += length
    if pos + 4 > len(query):
        return None
    qtype, qclass = struct.unpack_from("!HH", query, pos)
    if qclass != CLASS_IN:
        return None
    return Question(".".join(labels), qtype), pos + 4


def answer(query: bytes, records: dict[str, str], ttl: int = 0) -> bytes | None:
    """The reply to one query, given A records {name: IPv4 address}; None to drop the query."""
    parsed = parse_question(query)
    if parsed is None:
        return None
    question, end = parsed
    qid, flags = struct.unpack_from("!HH", query)
    address = records.get(question.name)
    answers = b""
    if address is not None and question.qtype == TYPE_A:
        # The name as a pointer to the question's (offset 12), then type, class, TTL, data.
        answers = struct.pack("!HHHIH", 0xC000 | _HEADER.size, TYPE_A, CLASS_IN, ttl, 4)
        answers += ipaddress.IPv4Address(address).packed
    rcode = RCODE_NOERROR if address is not None else RCODE_NXDOMAIN
    header = _HEADER.pack(qid, _QR | _AA | _RA | (flags & _OPCODE_RD) | rcode, 1, 1 if answers else 0, 0, 0)
    return header + query[_HEADER.size : end] + answers


@contextmanager
def dns_server(host: str, records: dict[str, str], port: int = 53, ttl: int = 0):
    """Serve records on UDP host:port in a thread; yield (port, the questions asked as (Question, peer)).

    The socket is bound before this yields, so it is ready at once.
    """
    asked: list[tuple[Question, tuple]] = []

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            query, sock = self.request
            reply = answer(query, records, ttl)
            if reply is not None:
                asked.append((parse_question(query)[0], self.client_address))
                sock.sendto(reply, self.client_address)

    with serving(socketserver.UDPServer((host, port), Handler)) as bound_port:
        yield bound_port, asked


def reply_header(reply: bytes) -> tuple[int, int, int, int]:
    """(id, rcode, qdcount, ancount) of a reply, with the QR and AA bits checked."""
    qid, flags, qd, an, _ns, _ar = struct.unpack_from("!HHHHHH", reply)
    assert flags & 0x8000 and flags & 0x0400, hex(flags)
    return qid, flags & 0xF, qd, an
