"""The step-level batcher of one model's queue (`server.node.batcher`), on a real pipeline and real render threads:
turns are fair, a cancelled request leaves the others' images alone, a slot interleaves at most --max-batch
requests and capacity counts them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import engines
from server.errors import ApiError
from server.metrics import Metrics
from server.node.batcher import Batching
from server.node.queue import ModelQueue
from server.wire import RenderOrder

Model = Callable[[str], Path]


@pytest.fixture(scope="module")
def pipeline(tiny_model: Model) -> engines.Pipeline:
    return engines.load(tiny_model("tiny-sd15"), backend="cpu")


@pytest.fixture
def queue(pipeline: engines.Pipeline) -> Iterator[ModelQueue]:
    """One slot, calls of 2 rows: one guided request per call, so turns decide who steps."""
    q = ModelQueue(pipeline, slots=1, depth=2, metrics=Metrics(), batching=Batching(max_rows=2, window=0.0))
    yield q
    q.close(wait=30)


def order(seed: int, steps: int) -> RenderOrder:
    return RenderOrder(request_id=f"r{seed}", model="tiny-sd15", prompt="a lighthouse", negative_prompt=None,
                     width=64, height=64, steps=steps, guidance_scale=5.0, sampler="euler", seed=seed, n=1,
                     strength=1.0)


def test_a_long_render_does_not_hold_back_a_short_one(queue: ModelQueue) -> None:
    async def main() -> list[str]:
        finished: list[str] = []

        async def run(name: str, ticket: object) -> None:
            await queue.outcome(ticket)
            finished.append(name)

        long = asyncio.create_task(run("long", queue.enqueue(order(1, 150))))
        short = asyncio.create_task(run("short", queue.enqueue(order(2, 2))))
        await asyncio.gather(long, short)
        return finished

    assert asyncio.run(main()) == ["short", "long"]


def test_a_cancelled_request_leaves_the_others_unchanged(queue: ModelQueue, pipeline: engines.Pipeline) -> None:
    async def main() -> tuple[object, object]:
        first, doomed, second = (queue.enqueue(order(s, steps)) for s, steps in ((3, 6), (4, 40), (5, 4)))
        queue.abandon(doomed)  # its client left: it stops at its next step, or never starts
        return await queue.outcome(first), await queue.outcome(second)

    first, second = asyncio.run(main())
    for got, (seed, steps) in ((first, (3, 6)), (second, (5, 4))):
        alone = ModelQueue(pipeline, slots=1, depth=0, metrics=Metrics())  # batching off
        try:
            expected = asyncio.run(_submit(alone, order(seed, steps)))
        finally:
            alone.close(wait=30)
        assert got.images == expected.images and got.seeds == [seed]


async def _submit(queue: ModelQueue, render: RenderOrder) -> object:
    return await queue.submit(render)


def test_a_slot_interleaves_at_most_max_batch_requests(queue: ModelQueue) -> None:
    """Two interleaved (--max-batch 2) and two waiting in the queue (depth 2): the fifth is refused with 429,
    and the waiting ones stay in the queue (counted there) while the slot steps the first two."""
    async def main() -> tuple[int, list[tuple[int, int]]]:
        tickets = [queue.enqueue(order(10 + i, 150)) for i in range(4)]
        with pytest.raises(ApiError) as refused:
            queue.enqueue(order(20, 2))
        seen = []
        for _ in range(40):  # while the first two render their 150 steps
            await asyncio.sleep(0.005)
            seen.append((queue.running, queue.waiting))
        for ticket in tickets:
            queue.abandon(ticket)
        return refused.value.status, seen

    assert queue.capacity == 2
    status, seen = asyncio.run(main())
    assert status == 429
    assert all(running <= 2 for running, _ in seen) and sum(seen[0]) == 4, seen
