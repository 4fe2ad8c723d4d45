"""confine/fastpath.KernelAudit (kaudit.c): the kernel's ring records as audit lines, on a ring laid out here.

The lines C writes must be the ones audit.Record.to_json writes for the same
connect, byte for byte but the time; records Python must write come back in
their place in the ring's order; the consumer position moves past exactly
what was read.
"""

from __future__ import annotations

import json
import mmap
import socket
import struct

from graft.broker.confine import fastpath, maps
from graft.broker.core.audit import Record, json_string

PAGE = mmap.PAGESIZE
SIZE = 1 << 12  # the data area: small, so that records wrap
BUSY, DISCARD = 1 << 31, 1 << 30


class Ring:
    """A ring as the kernel lays it out: consumer page, producer page, the data area twice."""

    def __init__(self):
        self.consumer = bytearray(PAGE)
        self.producer = bytearray(PAGE + 2 * SIZE)
        self.prod = 0

    def put(self, raw: bytes, flags: int = 0) -> int:
        """A record at the producer position (flags: BUSY, DISCARD); its position."""
        at = self.prod
        whole = struct.pack("=II", len(raw) | flags, 0) + raw
        whole += bytes(-len(whole) % 8)
        for i, b in enumerate(whole):  # both copies of the data area, as the kernel maps it
            off = (at + i) & (SIZE - 1)
            self.producer[PAGE + off] = self.producer[PAGE + SIZE + off] = b
        self.prod += len(whole)
        struct.pack_into("=Q", self.producer, 0, self.prod)
        return at

    def commit(self, at: int) -> None:
        off = PAGE + (at & (SIZE - 1))
        word = struct.unpack_from("=I", self.producer, off)[0] & ~BUSY
        struct.pack_into("=I", self.producer, off, word)
        struct.pack_into("=I", self.producer, off + SIZE, word)

    @property
    def consumed(self) -> int:
        return struct.unpack_from("=Q", self.consumer, 0)[0]


def event(gid: int, rule: int, addr: str, port: int, family: int = socket.AF_INET, pid: int = 7, uid: int = 1000):
    ev = maps.ffi.new("struct graft_event *")
    ev.tenant, ev.rule, ev.pid, ev.uid, ev.family = gid, rule, pid, uid, family
    ev.port = port.to_bytes(2, "big")
    packed = socket.inet_pton(family, addr)
    ev.addr = packed + bytes(16 - len(packed))
    return bytes(maps.ffi.buffer(ev))


RULES = ["tenants.web.connect[0]", "tenants.db.connect[1]"]


def reader(ring: Ring, cls=fastpath.KernelAudit) -> fastpath.KernelAudit:
    k = cls(ring.consumer, ring.producer, SIZE)
    tenants = [(17, False, json_string("web")), (3, False, json_string("db")), (9, True, json_string("named"))]
    k.set_names(tenants, [json_string(r) for r in RULES], json_string("on"))
    return k


def python_line(line: bytes, tenant: str, ev: bytes) -> bytes:
    """What audit.Record.to_json writes for ev, at the time the C line says."""
    d = maps.decode_event(ev)
    return Record(
        tenant=tenant,
        pid=d.pid,
        uid=d.uid,
        op="connect",
        proto="tcp",
        family={socket.AF_INET: "inet", socket.AF_INET6: "inet6"}[d.family],
        addr=d.addr,
        port=d.port,
        host_addr=None,
        action="graft",
        rule=RULES[d.rule_id] if d.rule_id < len(RULES) else None,
        errno=0,
        confinement="on",
        via="kernel",
    ).to_json(json.loads(line)["ts"])


def test_lines_are_the_records_python_writes():
    ring = Ring()
    events = [
        ("web", event(17, 0, "127.0.0.1", 8080)),
        ("db", event(3, 1, "fd00::5", 5432, socket.AF_INET6, pid=4242, uid=0)),
        ("web", event(17, 99, "10.1.2.3", 1, pid=2**32 - 1)),  # a rule id beyond the table: null
        ("web", event(17, 0, "0.255.100.9", 65535, uid=2**32 - 1)),  # every width of octet, the top port
        ("db", event(3, 1, "::ffff:10.0.0.1", 0, socket.AF_INET6, pid=0)),
    ]
    for _, ev in events:
        ring.put(ev)
    k = reader(ring)
    (out,) = list(k.drain())
    lines, n, held = out
    assert (n, held) == (5, None)
    got = lines.splitlines(keepends=True)
    assert got == [python_line(line, t, ev) for line, (t, ev) in zip(got, events, strict=True)]
    assert json.loads(got[2])["rule"] is None
    assert ring.consumed == ring.prod
    assert k.take_written() == {17: 3, 3: 2} and k.take_written() == {}
    assert list(k.drain()) == []  # consumed: nothing twice


def test_records_python_writes_come_back_in_order():
    ring = Ring()
    ring.put(event(17, 0, "127.0.0.1", 1))
    ring.put(held_unknown := event(12345, 0, "127.0.0.1", 2))  # an earlier broker's grant id
    ring.put(event(17, 0, "127.0.0.1", 3))
    ring.put(held_named := event(9, 0, "127.0.0.1", 4))  # a grant id left to Python
    k = reader(ring)
    out = list(k.drain())
    assert [(n, held) for _, n, held in out] == [(1, None), (0, held_unknown), (1, None), (0, held_named)]
    assert [json.loads(lines)["port"] for lines, _, _ in out if lines] == [1, 3]
    assert ring.consumed == ring.prod


def test_an_uncommitted_record_waits_and_a_discarded_one_is_skipped():
    ring = Ring()
    ring.put(event(17, 0, "127.0.0.1", 1), DISCARD)
    ring.put(event(17, 0, "127.0.0.1", 2))
    busy = ring.put(event(17, 0, "127.0.0.1", 3), BUSY)
    ring.put(event(17, 0, "127.0.0.1", 4))
    k = reader(ring)
    assert [json.loads(x)["port"] for lines, _, _ in k.drain() for x in lines.splitlines()] == [2]
    assert ring.consumed == busy  # stopped at the reserved one
    ring.commit(busy)
    assert [json.loads(x)["port"] for lines, _, _ in k.drain() for x in lines.splitlines()] == [3, 4]
    assert ring.consumed == ring.prod


def test_records_that_wrap_and_a_full_buffer():
    class Small(fastpath.KernelAudit):
        BUFFER = 700  # room for two lines a call

    ring = Ring()
    k = reader(ring, Small)
    ports = []
    for rnd in range(3):  # 3 x 50 records of 48 bytes: past the 4 KiB data area's end twice
        for i in range(50):
            ring.put(event(17, 0, "127.0.0.1", rnd * 100 + i))
        out = list(k.drain())
        assert len(out) > 1 and all(n <= 2 for _, n, _ in out)
        ports += [json.loads(x)["port"] for lines, _, _ in out for x in lines.splitlines()]
    assert ports == [rnd * 100 + i for rnd in range(3) for i in range(50)]
    assert k.take_written() == {17: 150}
