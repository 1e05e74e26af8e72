"""FairQueue: keys take turns, each key's requests in order; a capped key is passed over; one key is FIFO."""

from __future__ import annotations

from server.node.fair_queue import FairQueue


def drain(queue: FairQueue[str], may_run=lambda key: True) -> list[str]:
    taken = []
    while (item := queue.take(may_run)) is not None:
        taken.append(item)
    return taken


def test_keys_take_turns_in_arrival_order_within_a_key() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(4):
        queue.append(f"a{i}", "alice")
    queue.append("b0", "bob")
    queue.append("c0", "carol")
    queue.append("b1", "bob")
    assert len(queue) == 7 and "b1" in queue
    assert drain(queue) == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]
    assert len(queue) == 0 and "a0" not in queue


def test_one_key_is_first_in_first_out() -> None:
    queue: FairQueue[int] = FairQueue()
    for i in range(5):
        queue.append(i, "only")
    queue.remove(2)
    assert drain(queue) == [0, 1, 3, 4]


def test_a_key_at_its_cap_is_passed_over() -> None:
    queue: FairQueue[str] = FairQueue()
    for item, key in (("a0", "alice"), ("a1", "alice"), ("b0", "bob")):
        queue.append(item, key)
    assert drain(queue, may_run=lambda key: key != "alice") == ["b0"]
    assert list(queue) == ["a0", "a1"]
    assert queue.take() == "a0"


def test_a_key_that_comes_back_queues_behind_the_others() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.append("a0", "alice")
    queue.append("b0", "bob")
    assert queue.take() == "a0"  # alice has nothing waiting now
    queue.append("b1", "bob")
    queue.append("a1", "alice")
    assert drain(queue) == ["b0", "a1", "b1"]
