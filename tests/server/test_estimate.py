"""Retry-After's arithmetic (`server.node.estimate`), on a given clock: a full queue has room when its first running
render ends, after its remaining steps at its own measured pace."""

from __future__ import annotations

from server.node.estimate import Progress, seconds_until_room


def stepped(times: list[float], total: int) -> Progress:
    """A render that reported steps 1, 2, … of `total` at these times."""
    progress = Progress()
    for done, now in enumerate(times, 1):
        progress.step(done, total, now=now)
    return progress


def test_the_pace_is_measured_from_the_first_step_on() -> None:
    progress = stepped([10.0, 10.5, 11.0, 11.5], total=40)  # text encoding before step 1 does not count
    assert progress.seconds_per_step() == 0.5
    assert progress.remaining_steps(chunks=1, steps=40) == 36
    progress.step(4, 40, now=99.0)  # the same step reported again (a render held between steps) is no step
    assert progress.seconds_per_step() == 0.5


def test_chunks_of_images_count_their_steps_again() -> None:
    progress = stepped([0.0, 1.0, 2.0, 3.0], total=4)  # the first chunk's last step
    assert progress.remaining_steps(chunks=3, steps=4) == 8
    progress.step(1, 4, now=4.0)  # the second chunk begins
    assert (progress.chunk, progress.remaining_steps(chunks=3, steps=4)) == (1, 7)
    assert Progress().remaining_steps(chunks=2, steps=25) == 50  # nothing reported yet: as requested


def test_room_comes_when_the_first_running_render_ends() -> None:
    slow_start = stepped([0.0, 2.0, 4.0], total=10)  # 7 steps of 2 s left: 14 s
    nearly_done = stepped([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5], total=10)  # 2 steps of 0.5 s left: 1 s
    assert seconds_until_room([(slow_start, 1, 10)], step_seconds=9.0) == 14
    assert seconds_until_room([(slow_start, 1, 10), (nearly_done, 1, 10)], step_seconds=9.0) == 1
    not_stepped = Progress()  # no step timed yet: the model's latest step time, for all of its steps
    assert seconds_until_room([(slow_start, 1, 10), (not_stepped, 1, 3)], step_seconds=1.5) == 5  # 4.5, rounded up
    assert seconds_until_room([], step_seconds=1.0) == 1  # nothing runs: room at once (at least 1 s)
    assert seconds_until_room([(stepped([0.0, 40.0], total=2), 1, 2)], step_seconds=1.0) == 1  # last step: ≥ 1 s
