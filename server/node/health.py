"""Whether a node is sick: a running render that has stopped stepping (wedged inside ONNX Runtime or
TensorRT, a lost GPU), or a streak of renders failing with EngineFailure.

A render is stalled when its last step (or its start, before the first) is older than its model's bound:
`stall_factor` times the model's median recent step time, at least `stall_seconds`; before a model has
been seen stepping, `liveness_seconds` (a first SDXL step on a CPU takes minutes). A sick node is not ready
(routers and Services stop sending to it); once it has been sick for `liveness_seconds` it is not live
either, so that an orchestrator restarts it. A failure streak of `failure_limit` or more makes the node
sick; after `stall_seconds` it is ready again on trial (a router sends it work again), the next failure
ends the trial at once and a success ends the streak. Called from render threads and the event loop.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

STEP_SAMPLES = 32  # recent step times per model for the median


@dataclass(frozen=True)
class Limits:
    stall_seconds: float = 60.0
    stall_factor: float = 20.0
    failure_limit: int = 3  # 0: failures never make the node sick
    liveness_seconds: float = 600.0


@dataclass(frozen=True)
class Health:
    ready: bool  # take new work (false: sick)
    live: bool  # false: sick for longer than liveness_seconds, restart me
    problem: str | None = None


@dataclass(eq=False)
class _Render:
    model: str
    last: float  # its start, then its latest step (time.monotonic)
    steps: int = 0


@dataclass
class NodeHealth:
    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[object, _Render] = {}
        self._step_times: dict[str, deque[float]] = {}
        self._streak = 0
        self._streak_sick_since: float | None = None  # when the streak reached the limit, until a success
        self._last_failure = 0.0

    def started(self, key: object, model: str) -> None:
        with self._lock:
            self._running[key] = _Render(model, self.clock())

    def stepped(self, key: object) -> None:
        now = self.clock()
        with self._lock:
            render = self._running.get(key)
            if render is None:
                return
            if render.steps:  # the first interval holds prompt encoding and the start: not a step time
                self._step_times.setdefault(render.model, deque(maxlen=STEP_SAMPLES)).append(now - render.last)
            render.last, render.steps = now, render.steps + 1

    def finished(self, key: object, outcome: str) -> None:
        """`outcome`: "ok", "failed" (EngineFailure) or anything else (cancelled, bad request): not counted."""
        with self._lock:
            self._running.pop(key, None)
            if outcome == "ok":
                self._streak, self._streak_sick_since = 0, None
            elif outcome == "failed":
                self._streak += 1
                self._last_failure = self.clock()
                if self.limits.failure_limit and self._streak >= self.limits.failure_limit:
                    self._streak_sick_since = self._streak_sick_since or self._last_failure

    def step_seconds(self, model: str) -> float | None:
        """The median of the model's recent step times; None before it was seen stepping."""
        with self._lock:
            samples = self._step_times.get(model)
            return statistics.median(samples) if samples else None

    def bound(self, model: str) -> float:
        """Seconds a render of `model` may go without a step before it counts as stalled."""
        samples = self._step_times.get(model)
        if not samples:
            return self.limits.liveness_seconds
        return max(self.limits.stall_seconds, self.limits.stall_factor * statistics.median(samples))

    def check(self) -> Health:
        now = self.clock()
        with self._lock:
            stalled = [(now - r.last, r) for r in self._running.values() if now - r.last > self.bound(r.model)]
            if stalled:
                idle, render = max(stalled, key=lambda pair: pair[0])
                sick_for = idle - self.bound(render.model)
                return Health(ready=False, live=sick_for <= self.limits.liveness_seconds,
                              problem=f"a render of {render.model} has not stepped for {idle:.0f} s "
                                      f"(bound {self.bound(render.model):.0f} s)")
            if self._streak_sick_since is None:
                return Health(ready=True, live=True)
            live = now - self._streak_sick_since <= self.limits.liveness_seconds
            problem = f"the last {self._streak} renders failed in the engine"
            on_trial = now - self._last_failure > self.limits.stall_seconds
            return Health(ready=on_trial and live, live=live, problem=None if on_trial and live else problem)
