"""A minimal DNS responder for the tests: A records for a few names, over UDP and TCP.

The seccomp-mode tests (tests/e2e/test_static_apps.py) resolve a name with
glibc's own resolver, whose sockets an LD_PRELOAD shim never sees, and the
resolver's tests (tests/e2e/test_names.py, test_names_tcp.py) need an
upstream for the broker's resolver. They need a name server on the host's
loopback that the test controls and can ask what it was asked. ``answer``
is the protocol, a pure function (tested on its own in
tests/unit/test_dns_responder.py); ``dns_server`` is the I/O edge, two
threads that serve one UDP socket and one TCP listener on the same port
until the test ends.

Only what glibc's stub resolver and the broker send is understood: one
question per query, class IN, and an EDNS OPT record's UDP size. For a
known name an A query gets its addresses (authoritative, TTL 0 unless a
test asks for more, so nothing caches it) and any other type an empty
NOERROR answer, as a real zone without that record would give; unknown
names get NXDOMAIN, and what cannot be parsed is dropped, as servers drop
junk.

Over UDP an answer is at most 512 bytes, or the size the query's OPT
record offers (RFC 6891): a larger one goes out as a real server sends it,
the question alone with TC set, so that the client asks again over TCP
(RFC 7766), where messages carry a two-byte length and are never cut. A
test can also name the names whose UDP answers are always truncated, to
make a client's TCP retry happen with a small answer. Every question
answered is recorded with the transport it came over.
"""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

from .harness import serving

TYPE_A = 1
TYPE_AAAA = 28
TYPE_OPT = 41
CLASS_IN = 1
RCODE_NOERROR = 0
RCODE_NXDOMAIN = 3
UDP_LIMIT = 512  # bytes of a UDP message without EDNS (RFC 1035 4.2.1)
EDNS_PAYLOAD = 1232  # the UDP size this server offers in its own OPT record (the DNS flag day's)
TCP_IDLE_TIMEOUT = 10.0  # seconds a TCP client may stay silent before its connection is closed
_HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
_RR = struct.Struct("!HHIH")  # the fixed part of a resource record after its name: type, class, TTL, data length
_QR, _AA, _TC, _RA = 0x8000, 0x0400, 0x0200, 0x0080
_OPCODE_RD = 0x7900  # the opcode and RD bits of a query, echoed in the reply
_OPT = b"\0" + _RR.pack(TYPE_OPT, EDNS_PAYLOAD, 0, 0)  # root name, our UDP size, version 0, no options

Addresses = str | Sequence[str]  # a records value: one IPv4 address or several, answered in this order


class Question(NamedTuple):
    name: str  # lower case, without the trailing dot
    qtype: int


class Asked(tuple):
    """One question answered: (Question, peer), and ``transport``, "udp" or "tcp".

    A pair, as the callers written before TCP unpack and compare it
    (``for q, peer in asked``, ``asked == [(q, peer)]``); the transport is an
    attribute beside it.
    """

    transport: str

    def __new__(cls, question: Question, peer: tuple, transport: str):
        self = super().__new__(cls, (question, peer))
        self.transport = transport
        return self

    @property
    def question(self) -> Question:
        return self[0]

    @property
    def peer(self) -> tuple:
        return self[1]

    def __repr__(self) -> str:
        return f"Asked({self[0]!r}, {self[1]!r}, {self.transport!r})"


def encode_query(name: str, qtype: int, qid: int = 0x1234) -> bytes:
    """A standard recursive query for name, as a stub resolver sends it (no EDNS)."""
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


def _skip_name(msg: bytes, pos: int) -> int | None:
    """The offset past a name at pos (labels, ending in a root label or a pointer); None if it runs off the end."""
    while pos < len(msg):
        length = msg[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2 if pos + 2 <= len(msg) else None
        if length > 63:
            return None
        pos += 1 + length
    return None


def edns_payload(query: bytes, end: int) -> int | None:
    """The UDP size the query's OPT record offers (None: it has none), or -1 if its records past end are junk.

    end is where its question ends (``parse_question``); a stub's query
    has nothing after it, the broker's an OPT record in the additional
    section.
    """
    _id, _flags, _qd, an, ns, ar = _HEADER.unpack_from(query)
    pos, payload = end, None
    for i in range(an + ns + ar):
        after_name = _skip_name(query, pos)
        if after_name is None or after_name + _RR.size > len(query):
            return -1
        rtype, rclass, _ttl, rdlength = _RR.unpack_from(query, after_name)
        pos = after_name + _RR.size + rdlength
        if pos > len(query):
            return -1
        if rtype == TYPE_OPT and i >= an + ns:
            payload = rclass
    return payload


def answer(
    query: bytes,
    records: Mapping[str, Addresses],
    ttl: int = 0,
    *,
    transport: str = "udp",
    truncate: Collection[str] = (),
) -> bytes | None:
    """The reply to one query, given A records {name: address or addresses}; None to drop the query.

    Over "udp" the reply is truncated (TC, the question alone) when it
    exceeds the client's limit (512 bytes, or its OPT's size, never less
    than 512) or when the name is in truncate; over "tcp" it is whole.
    """
    parsed = parse_question(query)
    if parsed is None:
        return None
    question, end = parsed
    payload = edns_payload(query, end)
    if payload == -1:
        return None
    qid, flags = struct.unpack_from("!HH", query)
    found = records.get(question.name)
    addresses = [] if found is None else [found] if isinstance(found, str) else list(found)
    if question.qtype != TYPE_A:
        addresses = []
    # Each record's name is a pointer to the question's (offset 12), then type, class, TTL, data.
    answers = b"".join(
        struct.pack("!H", 0xC000 | _HEADER.size) + _RR.pack(TYPE_A, CLASS_IN, ttl, 4) + ipaddress.IPv4Address(a).packed
        for a in addresses
    )
    rcode = RCODE_NOERROR if found is not None else RCODE_NXDOMAIN
    opt = _OPT if payload is not None else b""  # an OPT only to a client that sent one (RFC 6891 7)
    reply_flags = _QR | _AA | _RA | (flags & _OPCODE_RD) | rcode
    question_wire = query[_HEADER.size : end]  # echoed as the client spelled it
    whole = _HEADER.pack(qid, reply_flags, 1, len(addresses), 0, 1 if opt else 0) + question_wire + answers + opt
    if transport == "tcp":
        assert len(whole) <= 0xFFFF, "a TCP message carries at most 65535 bytes"
        return whole
    assert transport == "udp", transport
    limit = UDP_LIMIT if payload is None else max(UDP_LIMIT, payload)  # RFC 6891 6.2.5: below 512 is 512
    if len(whole) <= limit and question.name not in truncate:
        return whole
    return _HEADER.pack(qid, reply_flags | _TC, 1, 0, 0, 1 if opt else 0) + question_wire + opt


def frame(message: bytes) -> bytes:
    """A DNS message as TCP carries it: its length in two bytes, then the message (RFC 1035 4.2.2)."""
    return struct.pack("!H", len(message)) + message


def read_framed(read: Callable[[int], bytes]) -> bytes | None:
    """One message from a TCP stream, given read(n) (n bytes, fewer only at its end); None at its end."""
    head = read(2)
    if len(head) < 2:
        return None
    (length,) = struct.unpack("!H", head)
    body = read(length)
    return body if len(body) == length else None


class _TcpServer(socketserver.ThreadingTCPServer):
    """One thread per connection; closing it closes the connections still open, so no test waits for a client."""

    allow_reuse_address = True  # a fixed port (53) again while the last test's connections are in TIME_WAIT

    def __init__(self, address, handler):
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.closing = False
        super().__init__(address, handler)

    def track(self, conn: socket.socket) -> bool:
        """Whether conn may be served (False once the server is closing); it is shut down when the server closes."""
        with self.lock:
            if self.closing:
                return False
            self.connections.add(conn)
            return True

    def untrack(self, conn: socket.socket) -> None:
        with self.lock:
            self.connections.discard(conn)

    def server_close(self):
        with self.lock:
            self.closing = True
            for conn in self.connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)  # its handler reads the end and returns
                except OSError:
                    pass
        super().server_close()  # joins the handlers' threads


def _bind_both(host: str, port: int, udp_handler, tcp_handler) -> tuple[socketserver.UDPServer, _TcpServer]:
    """A UDP server and a TCP listener on one port; port 0: a free one, tried again if TCP has it taken."""
    for _ in range(20):
        udp = socketserver.UDPServer((host, port), udp_handler)
        try:
            return udp, _TcpServer((host, udp.server_address[1]), tcp_handler)
        except OSError:
            udp.server_close()
            if port != 0:
                raise
    raise OSError(f"no port on {host} is free for both UDP and TCP")


@contextmanager
def dns_server(
    host: str,
    records: Mapping[str, Addresses],
    port: int = 53,
    ttl: int = 0,
    truncate: Collection[str] = (),
):
    """Serve records on host:port, UDP and TCP, in threads; yield (port, the questions answered as ``Asked``).

    truncate: names whose UDP answers are always truncated (asked again
    over TCP, they are whole). Both sockets are bound before this yields,
    so it is ready at once; a question is recorded before it is answered,
    so a client that has its answer finds it in the list.
    """
    asked: list[Asked] = []

    class UdpHandler(socketserver.BaseRequestHandler):
        def handle(self):
            query, sock = self.request
            reply = answer(query, records, ttl, transport="udp", truncate=truncate)
            if reply is not None:
                asked.append(Asked(parse_question(query)[0], self.client_address, "udp"))
                sock.sendto(reply, self.client_address)

    class TcpHandler(socketserver.StreamRequestHandler):
        timeout = TCP_IDLE_TIMEOUT  # a silent client does not hold a thread past it

        def handle(self):
            if not self.server.track(self.connection):
                return
            try:
                while (query := read_framed(self.rfile.read)) is not None:
                    reply = answer(query, records, ttl, transport="tcp", truncate=truncate)
                    if reply is None:
                        return  # junk: the connection is closed, as servers do
                    asked.append(Asked(parse_question(query)[0], self.client_address, "tcp"))
                    self.wfile.write(frame(reply))
            except OSError:  # the client went, or was silent too long
                return
            finally:
                self.server.untrack(self.connection)

    udp, tcp = _bind_both(host, port, UdpHandler, TcpHandler)
    with ExitStack() as servers:
        bound_port = servers.enter_context(serving(udp))
        servers.enter_context(serving(tcp))
        yield bound_port, asked


def reply_header(reply: bytes) -> tuple[int, int, int, int]:
    """(id, rcode, qdcount, ancount) of a reply, with the QR and AA bits checked."""
    qid, flags, qd, an, _ns, _ar = struct.unpack_from("!HHHHHH", reply)
    assert flags & 0x8000 and flags & 0x0400, hex(flags)
    return qid, flags & 0xF, qd, an
