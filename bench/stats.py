"""Summaries of repeated measurements."""

from __future__ import annotations

import statistics

import msgspec


class Summary(msgspec.Struct, frozen=True):
    median: float
    min: float
    max: float
    count: int


def summarize(values: list[float]) -> Summary | None:
    if not values:
        return None
    return Summary(median=statistics.median(values), min=min(values), max=max(values), count=len(values))


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between closest ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
