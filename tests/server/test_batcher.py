"""The step-level batcher of one model's queue (`server.node.batcher`), on a real pipeline and real render threads:
turns are fair, a cancelled request leaves the others' images alone, a slot interleaves at most --max-batch
requests and capacity counts them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

import engines
from server.errors import ApiError
from server.metrics import Metrics
from server.node.batcher import Batching
from server.node.queue import ModelQueue
from server.node.ticket import Ticket
from server.wire import PartialImage, RenderOrder
from tests.patience import PATIENCE

Model = Callable[[str], Path]


@pytest.fixture(scope="module")
def pipeline(tiny_model: Model) -> engines.Pipeline:
    return engines.load(tiny_model("tiny-sd15"), backend="cpu")


@pytest.fixture
def queue(pipeline: engines.Pipeline) -> Iterator[ModelQueue]:
    """One slot, calls of 2 rows: one guided request per call, so turns decide who steps."""
    q = ModelQueue(pipeline, slots=1, depth=2, metrics=Metrics(),
                   batching=Batching(max_rows=2, max_renders=2, window=0.0))
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


def test_a_slot_interleaves_at_most_batch_renders_requests(queue: ModelQueue) -> None:
    """Two interleaved (--batch-renders 2) and two waiting in the queue (depth 2): the fifth is refused with
    429, and the waiting ones stay in the queue (counted there) while the slot steps the first two."""
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


def test_renders_per_slot_and_rows_per_call_are_apart(pipeline: engines.Pipeline) -> None:
    """--max-batch 8 rows with --batch-renders 1: the slot takes (and reports) one render at a time although
    four would fit a call, so every call holds one request's 2 rows; it does not wait out the window (30 s)
    for others it could not take."""
    metrics = Metrics()
    alone = ModelQueue(pipeline, slots=1, depth=1, metrics=metrics,
                       batching=Batching(max_rows=8, max_renders=1, window=30.0))

    async def main() -> None:
        first, second = alone.enqueue(order(30, 6)), alone.enqueue(order(31, 2))
        with pytest.raises(ApiError):
            alone.enqueue(order(32, 2))  # one interleaved, one waiting: full
        await asyncio.wait_for(asyncio.gather(alone.outcome(first), alone.outcome(second)), PATIENCE)

    try:
        assert alone.capacity == 1
        asyncio.run(main())
    finally:
        alone.close(wait=30)
    calls = metrics.registry.get_sample_value("sdserve_unet_batch_rows_count", {"model": "tiny-sd15"})
    of_two = metrics.registry.get_sample_value("sdserve_unet_batch_rows_bucket", {"model": "tiny-sd15", "le": "2.0"})
    assert calls == of_two == 6 + 2


def test_the_render_thread_steps_on_while_a_preview_is_finished(queue: ModelQueue) -> None:
    """A stream's preview goes to the model's finishing thread (encoded there, then handed to the stream),
    held there: meanwhile the render thread steps on and finishes the render; its answer follows the
    preview. (The render thread used to encode and hand over each preview itself, between two steps.)"""
    reached, release = threading.Event(), threading.Event()

    def hold(partial: PartialImage) -> None:  # on the finishing thread
        reached.set()
        release.wait(60)

    def rendered(ticket: Ticket) -> bool:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if ticket.rendering is not None and ticket.rendering.finished:
                return True
            time.sleep(0.01)
        return False

    async def main() -> tuple[bool, object]:
        ticket = queue.enqueue(msgspec.structs.replace(order(40, 12), partial_images=1), on_partial=hold)
        assert await asyncio.to_thread(reached.wait, 60)
        finished = await asyncio.to_thread(rendered, ticket)
        release.set()
        return finished, await queue.outcome(ticket)

    try:
        finished, result = asyncio.run(main())
    finally:
        release.set()
    assert finished and len(result.images) == 1


def test_a_prompt_is_tokenized_once_per_request(pipeline: engines.Pipeline) -> None:
    """Checked before the queue, counted for `usage`, encoded by the render: one tokenization of each prompt
    by each tokenizer (there were three)."""
    alone = ModelQueue(pipeline, slots=1, depth=0, metrics=Metrics())
    tokenizer = next(iter(pipeline.tokenizers.values()))
    read: list[str] = []
    ids = tokenizer.ids
    tokenizer.ids = lambda text: read.append(text) or ids(text)  # type: ignore[method-assign]
    try:
        asked = msgspec.structs.replace(order(50, 2), prompt="a lighthouse, once", negative_prompt="fog")
        result = asyncio.run(_submit(alone, asked))
    finally:
        del tokenizer.ids  # the class's own method again
        alone.close(wait=30)
    assert read.count("a lighthouse, once") == 1 and read.count("fog") == 1, read
    assert result.input_tokens == len(ids("a lighthouse, once")) + len(ids("fog"))
