"""io/unixsock.accept_forever: a listener's transient errors are waited out, a broken listener is not."""

from __future__ import annotations

import errno

import pytest
import trio

from graft.broker.io.unixsock import ACCEPT_BACKOFF, accept_forever


class Listener:
    """accept() fails with each errno in turn, then hands out the given connections, then waits."""

    def __init__(self, errors: list[int], conns: list[str]):
        self.errors, self.conns = list(errors), list(conns)

    async def accept(self):
        await trio.lowlevel.checkpoint()
        if self.errors:
            e = self.errors.pop(0)
            raise OSError(e, "accept")
        if self.conns:
            return self.conns.pop(0), None
        await trio.sleep_forever()


async def test_transient_errors_are_retried_after_a_pause_and_slots_are_returned(autojump_clock):
    served: list[tuple[str, float]] = []
    limiter = trio.CapacityLimiter(1)

    async def handler(conn):
        served.append((conn, trio.current_time()))

    listener = Listener([errno.EMFILE, errno.ECONNABORTED], ["a", "b"])
    with trio.move_on_after(10):
        await accept_forever(listener, handler, "test", limiter)
    assert [c for c, _ in served] == ["a", "b"]
    assert served[0][1] >= 2 * ACCEPT_BACKOFF  # each failure paused the loop
    assert limiter.borrowed_tokens == 0


def leaves(group: BaseExceptionGroup) -> list[BaseException]:
    return [x for e in group.exceptions for x in (leaves(e) if isinstance(e, BaseExceptionGroup) else [e])]


@pytest.mark.parametrize("err", [errno.EBADF, errno.EINVAL, errno.ENOTSOCK])
async def test_a_broken_listener_is_raised_not_retried(autojump_clock, err):
    async def handler(conn):
        raise AssertionError("nothing was accepted")

    raised = []
    try:
        with trio.fail_after(5):  # a loop that retried it would run on: this ends it, failed
            await accept_forever(Listener([err], []), handler, "test")
    except* OSError as group:
        raised = [e.errno for e in leaves(group)]
    assert raised == [err]
