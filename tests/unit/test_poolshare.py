"""core/poolshare.py: the pools that asked lately split a tenant's pool share (no sockets, no broker)."""

from __future__ import annotations

from graft.broker.core.poolshare import ACTIVE_S, CRAMPED, MIN_BATCH, WARN_EVERY_S, PoolShare


def test_one_pool_gets_what_it_wants_up_to_half_the_share():
    pools = PoolShare()
    assert pools.batch("a", 64, 512, now=0.0) == 64
    assert pools.batch("a", 64, 100, now=0.1) == 50  # it may hold two requests' worth


def test_a_burst_of_pools_fits_in_the_share_together():
    pools, share = PoolShare(), 512
    # each pool asks twice (a shim's pool asks again when down to one batch): what they hold at most
    held = {p: sum(pools.batch(p, 64, share, now=0.001 * p) for _ in range(2)) for p in range(64)}
    assert len(pools) == 64
    # the last to ask gets share / (2 * 64); the first ones, asking when fewer were active, more
    assert held[63] == 2 * (share // (2 * 64))
    assert all(pools.batch(p, 64, share, now=0.1) * 2 <= share // 64 for p in range(64))
    assert sum(2 * pools.batch(p, 64, share, now=0.1) for p in range(64)) <= share


def test_quiet_pools_stop_counting():
    pools = PoolShare()
    for p in range(8):
        pools.batch(p, 64, 512, now=0.0)
    assert pools.batch("busy", 64, 512, now=0.5) == 512 // (2 * 9)
    assert pools.batch("busy", 64, 512, now=0.5 + ACTIVE_S) == 64  # the eight asked over ACTIVE_S ago
    assert len(pools) == 1


def test_a_pool_that_asks_again_is_one_pool_and_stays_active():
    pools = PoolShare()
    pools.batch("a", 64, 100, now=0.0)
    pools.batch("b", 64, 100, now=0.0)
    pools.batch("a", 64, 100, now=0.9)  # a asked again: now the newest
    assert pools.batch("c", 64, 100, now=1.5) == 100 // (2 * 2)  # b lapsed, a did not
    assert len(pools) == 2


def test_never_below_the_smallest_batch_nor_above_what_is_wanted():
    pools = PoolShare()
    for p in range(1000):
        assert pools.batch(p, 64, 512, now=0.0) >= MIN_BATCH
    assert PoolShare().batch("a", 3, 512, now=0.0) == 3


def test_a_share_too_small_for_what_pools_want_is_told_once_a_while():
    pools = PoolShare()
    for p in range(64):  # 64 processes at the default max_sockets: the pools' half is 512
        assert pools.batch(p, 64, 512, now=0.0) >= MIN_BATCH
    assert pools.each == 512 // (2 * 64) < CRAMPED
    assert pools.warn_now(0.0)
    assert not pools.warn_now(1.0)  # told already
    for p in range(64):  # still at it a minute later: told again
        pools.batch(p, 64, 512, now=WARN_EVERY_S)
    assert pools.warn_now(WARN_EVERY_S)


def test_no_word_when_the_share_is_enough_or_the_pool_wants_little():
    pools = PoolShare()
    for p in range(8):  # 8 processes: refills of 32
        pools.batch(p, 64, 512, now=0.0)
    assert pools.each == 32 and not pools.warn_now(0.0)
    for p in range(64):
        pools.batch(p, 4, 512, now=0.1)  # slow processes ask for 4: the share gives them all of it
    assert pools.each == 4 and not pools.warn_now(0.1)
