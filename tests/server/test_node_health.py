"""NodeHealth's rules on a clock the test moves (no waiting): the stall bound comes from the model's own step
times, a failure streak makes the node sick and a trial brings it back, liveness fails only after longer."""

from __future__ import annotations

from server.node.health import Limits, NodeHealth


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tracker(**limits: float) -> tuple[NodeHealth, Clock]:
    clock = Clock()
    return NodeHealth(Limits(**limits), clock=clock), clock


def render(health: NodeHealth, clock: Clock, key: object, step: float, steps: int, model: str = "m") -> None:
    health.started(key, model)
    for _ in range(steps):
        clock.now += step
        health.stepped(key)


def test_a_stall_is_measured_against_the_models_own_step_times() -> None:
    health, clock = tracker(stall_seconds=1, stall_factor=10, liveness_seconds=100)
    render(health, clock, "warm", step=2.0, steps=5)  # this model steps every 2 s: its bound is 20 s
    health.finished("warm", "ok")
    assert health.bound("m") == 20 and health.bound("other") == 100  # never seen stepping: the liveness bound
    render(health, clock, "slow", step=2.0, steps=1)
    clock.now += 19.5
    assert health.check().ready
    clock.now += 1
    sick = health.check()
    assert not sick.ready and sick.live and "has not stepped for 20 s" in sick.problem
    clock.now += 100  # sick for longer than liveness_seconds: restart me
    assert not health.check().live
    health.stepped("slow")  # it moved after all
    assert health.check().ready and health.check().live


def test_a_failure_streak_makes_the_node_sick_until_a_trial_or_a_success() -> None:
    health, clock = tracker(stall_seconds=5, failure_limit=3, liveness_seconds=60)
    for key in range(2):
        health.started(key, "m")
        health.finished(key, "failed")
    health.started("bad-input", "m")
    health.finished("bad-input", "cancelled")  # neither a success nor an engine failure
    assert health.check().ready
    health.started(3, "m")
    health.finished(3, "failed")
    sick = health.check()
    assert not sick.ready and sick.live and "last 3 renders failed" in sick.problem
    clock.now += 6  # on trial: ready again, the streak kept
    assert health.check().ready
    health.started(4, "m")
    health.finished(4, "failed")  # the trial fails: out at once
    assert not health.check().ready
    clock.now += 60  # sick, trials and all, for longer than liveness_seconds without a success
    assert not health.check().live
    health.started(5, "m")
    health.finished(5, "ok")
    assert health.check() == health.check().__class__(ready=True, live=True)


def test_failures_never_make_the_node_sick_with_a_limit_of_zero() -> None:
    health, _ = tracker(failure_limit=0)
    for key in range(10):
        health.started(key, "m")
        health.finished(key, "failed")
    assert health.check().ready
