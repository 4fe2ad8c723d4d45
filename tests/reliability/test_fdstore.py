"""Restarts through systemd's fd store: the tenant socket outlives the broker.

BrokerProcess(fdstore=True) plays the service manager's part (it keeps what
the broker pushes and passes it to the next start, as systemd does). A hard
link to the socket file stands in for a container's bind mount of it: both
reach the socket through its inode, not its path.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest

from graft.broker.shim import wire
from support.harness import BrokerProcess, WireClient, connect_request

POLICY = 'version = 1\n[tenants.t]\n[[tenants.t.connect]]\nto = ["127.0.0.1/32"]\nproto = "udp"\n'
TWO_TENANTS = POLICY + "[tenants.u]\n"


def stored_path(broker: BrokerProcess, name: str) -> str:
    """Where the one listener stored under name is bound."""
    (fd,) = broker.stored[name]
    with socket.socket(fileno=os.dup(fd)) as s:
        return s.getsockname()


def ask(client: WireClient) -> int:
    client.send(connect_request(9, udp=True))
    rep, sock = client.reply()
    if sock is not None:
        sock.close()
    return rep.verdict


@pytest.fixture
def stored_broker(short_tmp):
    broker = BrokerProcess(short_tmp / "b", POLICY, fdstore=True)
    try:
        yield broker
    finally:
        broker.stop()
        broker.release_store()


def test_a_restart_keeps_the_socket_and_answers_what_queued_meanwhile(stored_broker, short_tmp):
    broker = stored_broker.start()
    assert set(broker.stored) == {"tenant.t"}
    assert stored_path(broker, "tenant.t") == str(broker.socket_path)
    inode = broker.socket_path.lstat().st_ino
    mounted = short_tmp / "mounted.sock"
    os.link(broker.socket_path, mounted)
    before = WireClient(mounted)
    assert ask(before) == wire.V_GRAFT

    assert broker.stop() == 0
    assert broker.socket_path.lstat().st_ino == inode, "the socket file was replaced or removed at stop"
    # No broker runs: a client still connects (the stored listener's backlog) and asks.
    waiting = WireClient(mounted)
    waiting.send(connect_request(9, udp=True))

    broker.start()
    assert "listener adopted from the service manager's fd store" in broker.stderr()
    rep, sock = waiting.reply()
    assert rep.verdict == wire.V_GRAFT and sock is not None
    sock.close()
    assert broker.socket_path.lstat().st_ino == inode
    assert set(broker.stored) == {"tenant.t"}
    # the connection to the old broker is gone; a new one through the "mount" is served
    with pytest.raises(OSError):
        ask(before)
    fresh = WireClient(mounted)
    assert ask(fresh) == wire.V_GRAFT
    for c in (before, waiting, fresh):
        c.close()


def test_without_the_store_a_restart_strands_a_mounted_socket(short_tmp):
    """The control: a new socket file at the same path is a new inode, unreachable through the old one."""
    broker = BrokerProcess(short_tmp / "b", POLICY)
    try:
        broker.start()
        mounted = short_tmp / "mounted.sock"
        os.link(broker.socket_path, mounted)
        assert broker.stop() == 0
        broker.start()
        with pytest.raises(OSError) as e:
            WireClient(mounted)
        assert e.value.errno == errno.ECONNREFUSED
        c = WireClient(broker.socket_path)
        assert ask(c) == wire.V_GRAFT
        c.close()
    finally:
        assert broker.stop() == 0


def test_a_tenant_removed_by_reload_leaves_the_store_and_its_file_goes(stored_broker):
    broker = stored_broker
    broker.policy_path.write_text(TWO_TENANTS)
    broker.start()
    assert set(broker.stored) == {"tenant.t", "tenant.u"}
    u_path = broker.socket_dir / "u.sock"
    assert u_path.exists()
    broker.reload(POLICY)
    assert set(broker.stored) == {"tenant.t"}
    assert not u_path.exists()


def test_a_stored_tenant_gone_from_the_policy_at_restart_is_dropped(stored_broker):
    broker = stored_broker
    broker.policy_path.write_text(TWO_TENANTS)
    broker.start()
    assert broker.stop() == 0
    broker.policy_path.write_text(POLICY)
    broker.start()
    assert set(broker.stored) == {"tenant.t"}
    assert not (broker.socket_dir / "u.sock").exists()
    assert "tenant u is not in the policy: its stored listener is closed" in broker.stderr()


def test_a_stored_listener_for_another_path_is_replaced(stored_broker, short_tmp):
    broker = stored_broker.start()
    assert broker.stop() == 0
    other = short_tmp / "other"
    broker.start("--socket-dir", str(other))  # argparse: the last --socket-dir wins
    assert "a stored listener cannot be used" in broker.stderr()
    assert stored_path(broker, "tenant.t") == str(other / "t.sock")
    c = WireClient(other / "t.sock")
    assert ask(c) == wire.V_GRAFT
    c.close()


def test_a_stored_listener_whose_path_was_rebound_is_not_adopted(stored_broker):
    """getsockname() still names the path after the file was replaced: the inode decides."""
    broker = stored_broker.start()
    assert broker.stop() == 0
    broker.socket_path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as other:
        other.bind(str(broker.socket_path))  # a new file at the path, whose socket is gone again
    broker.start()
    assert "now belongs to another socket" in broker.stderr()
    c = WireClient(broker.socket_path)
    assert ask(c) == wire.V_GRAFT
    c.close()
    assert stored_path(broker, "tenant.t") == str(broker.socket_path)


def test_duplicates_under_a_name_end_as_one(stored_broker, short_tmp):
    """systemd keeps every fd pushed under a name: the broker leaves exactly its listener there."""
    broker = stored_broker.start()
    assert broker.stop() == 0
    stale_path = short_tmp / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(stale_path))
    stale.listen(1)
    broker.stored["tenant.t"].insert(0, stale.detach())  # e.g. a removal that was lost
    broker.start()
    assert stored_path(broker, "tenant.t") == str(broker.socket_path)
    c = WireClient(broker.socket_path)
    assert ask(c) == wire.V_GRAFT
    c.close()
