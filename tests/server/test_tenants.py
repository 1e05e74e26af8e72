"""Keys-file lines with limits, and the per-key token bucket on a clock the test moves."""

from __future__ import annotations

import pytest

from server.tenants import RateLimiter, Tenant, parse_line


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_lines_with_and_without_limits() -> None:
    assert parse_line("  # a comment", "keys:1") is None and parse_line("", "keys:2") is None
    assert parse_line("sk-plain", "keys:3") == Tenant("sk-plain")
    assert parse_line("sk-b max_concurrent=2 rate=30/m  # batch jobs", "keys:4") == Tenant("sk-b", 2, 30.0, 60.0)
    assert parse_line("sk-c rate=5/s", "keys:5") == Tenant("sk-c", 0, 5.0, 1.0)


@pytest.mark.parametrize("line", ["sk max_concurrency=2", "sk rate=30", "sk rate=30/day", "sk max_concurrent=-1",
                                  "sk rate=x/m", "sk rate=1/m rate=2/m", "sk 2"])
def test_a_limit_not_understood_is_an_error_naming_the_line(line: str) -> None:
    with pytest.raises(ValueError, match="keys:7"):
        parse_line(line, "keys:7")


def test_a_burst_then_the_rate_with_an_honest_wait() -> None:
    clock = Clock()
    limiter, tenant = RateLimiter(clock=clock), Tenant("sk", rate=3, period=60)  # one token every 20 s
    assert [limiter.admit(tenant) for _ in range(3)] == [0, 0, 0]
    assert limiter.admit(tenant) == pytest.approx(20)
    clock.now += 15
    assert limiter.admit(tenant) == pytest.approx(5)  # what is left of the 20 s
    clock.now += 5
    assert limiter.admit(tenant) == 0 and limiter.admit(tenant) == pytest.approx(20)
    assert limiter.admit(Tenant("sk-other", rate=3, period=60)) == 0  # each key its own bucket
    assert all(limiter.admit(Tenant("sk-free")) == 0 for _ in range(100))
