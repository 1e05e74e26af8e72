"""API keys as tenants: who a request is (a hash of its key, never the key), the limits its keys-file line
gives it, and the request rate each key is held to at the front door.

A line of `--api-keys-file` is a key, then optional limits, e.g.

    sk-team-a                                  # no limits
    sk-batch-job   max_concurrent=2 rate=30/m  # at most 2 renders at once (per node), 30 requests a minute

`rate=N/s|m|h` is a token bucket of N tokens refilled over the period: a burst of N, then N per period. A
request over it is refused with 429 `rate_limit_exceeded` and a Retry-After of when the next token comes.
`max_concurrent` is enforced where renders queue: a key at its cap waits its turn, it is not refused.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
PERIOD_NAMES = {1.0: "second", 60.0: "minute", 3600.0: "hour"}


@dataclass(frozen=True)
class Tenant:
    key: str
    max_concurrent: int = 0  # 0: no cap
    rate: float = 0.0  # requests per `period`; 0: no limit
    period: float = 60.0

    @property
    def id(self) -> str:
        """What travels and is logged in place of the key."""
        return tenant_id(self.key)


def tenant_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12] if key else ""


def parse_line(line: str, where: str) -> Tenant | None:
    """One keys-file line (None for a blank or comment line); ValueError naming `where` for anything else."""
    words = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].split()  # a comment: `#` at the start or after a space
    if not words:
        return None
    key, limits = words[0], {}
    for word in words[1:]:
        name, sep, value = word.partition("=")
        if not sep or name not in ("max_concurrent", "rate") or name in limits:
            raise ValueError(f"{where}: {word!r} is not a limit (max_concurrent=N or rate=N/s|m|h, once each)")
        limits[name] = value
    try:
        cap = int(limits.get("max_concurrent", "0"))
        count, _, unit = limits.get("rate", "0/m").partition("/")
        rate, period = float(count), PERIODS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"{where}: limits must read max_concurrent=N and rate=N/s|m|h, "
                         f"not {' '.join(words[1:])!r}") from None
    if cap < 0 or rate < 0 or not math.isfinite(rate):
        raise ValueError(f"{where}: limits must be 0 (none) or more")
    return Tenant(key, cap, rate, period)


@dataclass
class RateLimiter:
    """A token bucket per tenant with a rate."""

    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # id → (tokens, at)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, tenant: Tenant) -> float:
        """0 when the request may go (a token taken), else the seconds until the next token."""
        if not tenant.rate:
            return 0.0
        per_second = tenant.rate / tenant.period
        with self._lock:
            now = self.clock()
            tokens, at = self._buckets.get(tenant.id, (tenant.rate, now))
            tokens = min(tenant.rate, tokens + (now - at) * per_second)
            if tokens >= 1:
                self._buckets[tenant.id] = (tokens - 1, now)
                return 0.0
            self._buckets[tenant.id] = (tokens, now)
            return (1 - tokens) / per_second
