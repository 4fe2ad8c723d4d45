"""The token bucket behind tenants.<name>.max_rate (pure, with a fake clock)."""

from graft.broker.core.ratelimit import TokenBucket


def test_burst_of_one_second_then_the_rate():
    b = TokenBucket(100, now=0.0)
    assert sum(b.take(0.0) for _ in range(150)) == 100  # the burst
    assert sum(b.take(0.5) for _ in range(100)) == 50  # half a second refills half
    assert not b.take(0.5)


def test_idle_time_does_not_bank_more_than_one_second():
    b = TokenBucket(10, now=0.0)
    assert sum(b.take(100.0) for _ in range(50)) == 10
