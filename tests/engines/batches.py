"""Renders stepped together, as a batching render slot steps them (`server.batcher`), driven by hand so that
a test decides when each one joins."""

from __future__ import annotations

from collections.abc import Callable

import engines
from engines.rendering import Rendering

Begin = Callable[[], Rendering]


def run(pipeline: engines.Pipeline, joins: list[tuple[int, Begin]]) -> tuple[list[Rendering], list[list[int]]]:
    """Begin each rendering when `call` UNet calls have run, then step until all finish: each call takes the
    rendering that waited longest and every other that may share its call. Returns the renderings (in the
    order of `joins`) and, per call, the indices of the renderings in it."""
    renderings: list[Rendering | None] = [None] * len(joins)
    turns: dict[int, int] = {}
    calls: list[list[int]] = []
    while True:
        for index, (call, begin) in enumerate(joins):
            if renderings[index] is None and call <= len(calls):
                renderings[index] = begin()
                turns[index] = len(calls)
        live = [i for i, r in enumerate(renderings) if r is not None and not r.finished]
        if not live and all(r is not None for r in renderings):
            return renderings, calls
        if not live:  # nobody runs until the next one joins
            calls.append([])
            continue
        live.sort(key=lambda i: turns[i])
        key = pipeline.batch_key(renderings[live[0]])
        call = [i for i in live if pipeline.batch_key(renderings[i]) == key]
        pipeline.step([renderings[i] for i in call])
        calls.append(call)
        for i in call:
            turns[i] = len(calls)
