"""confine/issue.c's graft_issue_close: a batch's fds closed (runs of numbers at once), and nothing else.

Runs of consecutive numbers go in one close_range: a run that reached one
number too far would close a file of the broker's that is not the batch's.
"""

from __future__ import annotations

import os

from graft.broker.confine.fastpath import Batch, ffi


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_a_batch_closes_its_fds_and_only_those():
    base = os.open("/dev/null", os.O_RDONLY)
    # Numbers above anything this process has open: base+100 .. base+111, laid out with gaps.
    start = max(base, 3) + 100
    numbers = list(range(start, start + 12))
    for n in numbers:
        os.dup2(base, n)
    batch = [numbers[0], numbers[1], numbers[2], numbers[4], numbers[6], numbers[7], numbers[9], numbers[8]]
    kept = [n for n in numbers if n not in batch]  # 3, 5, 10, 11: between and after the runs
    try:
        fds = ffi.new("int[]", batch)
        Batch(fds, len(batch)).close()
        assert [n for n in batch if _is_open(n)] == []
        assert [n for n in kept if _is_open(n)] == kept
    finally:
        for n in numbers + [base]:
            try:
                os.close(n)
            except OSError:
                pass
