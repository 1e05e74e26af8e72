"""How long until a full model queue has room: what a 429's Retry-After says.

A full queue has room again when its first running render ends (a waiting render then takes that slot and
frees its place in the queue). A render ends after its remaining steps, each as long as its own steps have
been so far (when several renders share a slot, that is their shared pace), else as long as the model's
recent steps (`server.node.health`), else a first guess. Text encoding and decoding are left out: they are
short beside the steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

FIRST_STEP_GUESS = 0.5  # seconds per step before any step of the model was timed


@dataclass
class Progress:
    """Where a running render is, and how long its steps take: what Retry-After is estimated from."""

    chunk: int = 0  # chunks of images finished (a render of n > max_batch images runs in chunks)
    done: int = 0  # steps done in the current chunk
    total: int = 0  # steps per chunk (0 until the first step)
    first: float | None = None  # when the first step was reported
    last: float = 0.0  # when the latest one was
    timed: int = 0  # steps reported since the first (intervals measured)

    def step(self, done: int, total: int, now: float | None = None) -> None:
        """A step reported by the render at `now` (default: the clock; the same `done` twice is the same step)."""
        if done == self.done and total == self.total:
            return
        now = time.perf_counter() if now is None else now
        if done < self.done:
            self.chunk += 1
        self.done, self.total = done, total
        if self.first is None:
            self.first = now
        else:
            self.timed += 1
        self.last = now

    def seconds_per_step(self) -> float | None:
        return (self.last - self.first) / self.timed if self.timed and self.first is not None else None

    def remaining_steps(self, chunks: int, steps: int) -> int:
        """Steps left of `chunks` chunks, each of `total` steps (`steps` before the first was reported)."""
        per_chunk = self.total or steps
        return max(0, (chunks - self.chunk) * per_chunk - self.done)


def seconds_until_room(running: Iterable[tuple[Progress, int, int]], step_seconds: float) -> int:
    """Whole seconds (at least 1) until the first of the `running` renders ends: (its progress, its chunks of
    images, its steps per chunk as requested), with `step_seconds` for a render with no step timed yet."""
    ends = [progress.remaining_steps(chunks, steps) * (progress.seconds_per_step() or step_seconds)
            for progress, chunks, steps in running]
    return max(1, math.ceil(min(ends, default=1.0)))
