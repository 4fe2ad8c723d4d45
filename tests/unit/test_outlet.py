"""broker/io/outlet.py: lines out without blocking, in order, bounded, from any thread."""

from __future__ import annotations

import fcntl
import os

import pytest
import trio
import trio.testing

from graft.broker.io.outlet import Outlet


@pytest.fixture
def pipe():
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) | os.O_NONBLOCK)
    yield r, w
    os.close(r)  # w belongs to the Outlet


def fill(w: int) -> int:
    """Write until the pipe is full (bounded by the pipe's size); the bytes written."""
    total = 0
    while True:
        try:
            total += os.write(w, b"x" * 4096)
        except BlockingIOError:
            return total


def read_all(r: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        out += os.read(r, n - len(out))
    return out


async def drained(out: Outlet) -> None:
    """Until nothing waits (the Outlet reports no event for it: polled, bounded)."""
    with trio.fail_after(5):
        while out.waiting:
            await trio.sleep(0.01)


async def test_lines_wait_in_order_and_are_lost_beyond_the_limit(pipe):
    r, w = pipe
    out = Outlet(w, limit=100)
    filled = fill(w)
    assert out.offer(b"one\n") and out.offer(b"two\n")  # queued: the pipe is full
    assert not out.offer(b"x" * 200 + b"\n") and out.lost == 1  # beyond the limit: lost, and said so
    assert out.waiting == 8
    async with trio.open_nursery() as nursery:
        nursery.start_soon(out.run)
        await trio.to_thread.run_sync(read_all, r, filled)  # the reader makes room
        await drained(out)
        nursery.cancel_scope.cancel()
    assert read_all(r, 8) == b"one\ntwo\n"
    out.close()


async def test_a_line_offered_from_another_thread_wakes_the_writer(pipe):
    """The log handler runs on whatever thread logs (trio's worker threads included)."""
    r, w = pipe
    out = Outlet(w)
    filled = fill(w)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(out.run)
        await trio.testing.wait_all_tasks_blocked()
        assert await trio.to_thread.run_sync(out.offer, b"from a thread\n")
        await trio.to_thread.run_sync(read_all, r, filled)
        await drained(out)
        nursery.cancel_scope.cancel()
    assert read_all(r, 14) == b"from a thread\n"
    out.close()


def test_a_block_of_lines_is_lost_and_counted_line_by_line():
    """The kernel's audit records come in blocks (confine/fastpath.py): a lost block is each of its records lost."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) | os.O_NONBLOCK)
    out = Outlet(w, limit=100)
    fill(w)
    assert out.offer(b"a\nb\n", 2) and out.waiting == 4  # queued whole
    assert not out.offer(b"c\n" * 60, 60) and out.lost == 60  # beyond the limit
    os.close(r)  # the reader goes: what waits is lost, by its lines
    with pytest.raises(OSError):
        out.flush()
    assert out.lost == 62
    out.close()
    assert out.lost == 62
