"""confine/graft_maps.h: one definition of what the maps hold, for the broker, the C loop and the BPF programs."""

from __future__ import annotations

import socket

import pytest

from graft.broker.confine import maps, programs
from graft.broker.seccomp import fast
from support.c_layout import layouts

STRUCTS = ["struct graft_mark", "struct graft_grant_key", "struct graft_grant_value", "struct graft_event"]


def test_cffi_reads_the_maps_header_as_the_compiler_lays_it_out(tmp_path):
    from_c, from_cffi = layouts(maps.ffi, maps.HEADER, STRUCTS, tmp_path)
    assert from_cffi == from_c
    # The sizes the kernel's maps were created with by earlier brokers: a change is a new layout.
    assert {s: size for s, (size, _) in from_c.items()} == {
        "struct graft_mark": 32,
        "struct graft_grant_key": 28,
        "struct graft_grant_value": 8,
        "struct graft_event": 40,
    }


def test_the_c_loop_reads_the_same_header():
    """seccomp_fast.h declares no map layout of its own: the loop compiles against graft_maps.h."""
    text = fast.HEADER.read_text()
    assert '#include "../confine/graft_maps.h"' in text
    assert "struct graft_mark {" not in text and "struct graft_grant_key {" not in text


def test_a_mark_and_a_key_read_back_field_by_field():
    mark = maps.encode_mark(("2001:db8::7", 8080), any_peer=True, tenant_id=9)
    m = maps.ffi.from_buffer("struct graft_mark *", mark)
    assert (m.flags, m.tenant) == (maps.F_HAS_DEST | maps.F_ANY_PEER, 9)
    assert bytes(maps.ffi.buffer(m.ip6)) == socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    assert maps.mark_flags_and_tenant(mark) == (maps.F_HAS_DEST | maps.F_ANY_PEER, 9)
    v4 = maps.ffi.from_buffer("struct graft_mark *", maps.encode_mark(("10.1.2.3", 53), any_peer=False))
    assert v4.flags == maps.F_HAS_DEST | maps.F_DEST_V4
    assert maps.ffi.buffer(maps.ffi.addressof(v4, "ip4"))[:] == socket.inet_aton("10.1.2.3")
    assert maps.unconnected_preissued(maps.encode_preissued_mark(4))
    key = maps.ffi.from_buffer("struct graft_grant_key *", maps.grant_key(9, socket.AF_INET, "10.1.2.3", 443))
    assert (key.tenant, key.kind) == (9, maps.grant_kind(socket.SOCK_STREAM, socket.AF_INET))
    assert bytes(key.addr) == socket.inet_aton("10.1.2.3") + bytes(12)
    assert maps.ffi.buffer(maps.ffi.addressof(key, "port"))[:2] == (443).to_bytes(2, "big")
    udp6 = maps.ffi.from_buffer(
        "struct graft_grant_key *", maps.grant_key(9, socket.AF_INET6, "2001:db8::1", 8080, socket.SOCK_DGRAM)
    )
    assert (udp6.tenant, udp6.kind) == (9, maps.grant_kind(socket.SOCK_DGRAM, socket.AF_INET6))
    assert bytes(udp6.addr) == socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    # a v4-mapped UDP destination is keyed by its IPv4 form (the IPv4 sendmsg hook runs for it)
    mapped = maps.ffi.from_buffer(
        "struct graft_grant_key *", maps.grant_key(9, socket.AF_INET6, "::ffff:10.1.2.3", 53, socket.SOCK_DGRAM)
    )
    assert (mapped.kind, bytes(mapped.addr)) == (
        maps.grant_kind(socket.SOCK_DGRAM, socket.AF_INET),
        socket.inet_aton("10.1.2.3") + bytes(12),
    )


def test_an_event_decodes_from_its_layout():
    ev = maps.ffi.new("struct graft_event *")
    ev.tenant, ev.rule, ev.pid, ev.uid, ev.family = 3, 1, 4242, 1000, socket.AF_INET6
    ev.port = (8443).to_bytes(2, "big")
    ev.addr = socket.inet_pton(socket.AF_INET6, "fd00::5")
    assert maps.decode_event(bytes(maps.ffi.buffer(ev))) == maps.ConnectEvent(
        3, 1, 4242, 1000, socket.AF_INET6, "fd00::5", 8443
    )


def test_the_programs_address_the_fields_where_the_header_puts_them():
    """The offsets the kernel's pinned maps were made with, literally: a change is a new layout."""
    mark = ("flags", "port", "ip4", "ip6", "tenant")
    assert (
        [maps.ffi.offsetof("struct graft_mark", f) for f in mark]
        == [0, 4, 8, 12, 28]
        == [
            programs.M_FLAGS,
            programs.M_PORT,
            programs.M_IP4,
            programs.M_IP6,
            programs.M_TENANT,
        ]
    )
    key = {f: maps.ffi.offsetof("struct graft_grant_key", f) for f in ("tenant", "kind", "port", "addr")}
    assert key == {"tenant": 0, "kind": 4, "port": 8, "addr": 12}
    assert tuple(key.values()) == (programs.K_TENANT, programs.K_KIND, programs.K_PORT, programs.K_ADDR)
    assert (programs.E_PORT, programs.E_ADDR) == (20, 24)


def test_a_short_value_is_refused_not_read_past():
    with pytest.raises(ValueError, match="needs 32 bytes"):
        maps.mark_flags_and_tenant(bytes(4))
    with pytest.raises(ValueError, match="needs 40 bytes"):
        maps.decode_event(bytes(39))
