"""Renders that share UNet calls (`Pipeline.begin` / `step`) give the images they give alone: other seeds,
samplers, step counts, guidance on and off, image to image and inpainting in the same calls, joining and
leaving at different steps; a cancelled or failing one ends alone; streaming partials are unchanged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engines
from tests.engines import batches

Model = Callable[[str], Path]
TOLERANCE = 1e-5  # on 0–1 pixels


def request(**overrides: object) -> engines.RenderRequest:
    fields = {"prompt": "a lighthouse at dusk", "negative_prompt": "", "width": 64, "height": 64, "steps": 4,
              "guidance_scale": 5.0, "sampler": "euler", "seed": 7} | overrides
    return engines.RenderRequest(**fields)


def picture(seed: int, mode: str = "RGB") -> Image.Image:
    pixels = (np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def mask() -> Image.Image:
    rows = np.arange(64)[:, None] * np.ones((1, 64))
    return Image.fromarray(((rows > 30) * 255).astype(np.uint8))


MIXES = {  # per model: (call at which it joins, request)
    "tiny-sd15": [
        (0, request(sampler="euler_a", n=2, seed=1, steps=6)),
        (0, request(sampler="dpmpp_2m_karras", seed=2, steps=9, negative_prompt="fog")),
        (2, request(sampler="ddim", guidance_scale=1.0, seed=3)),  # unguided: one row next to guided pairs
        (3, request(image=picture(1), strength=0.5, sampler="dpmpp_2m", steps=8, seed=4)),
        (3, request(image=picture(2), mask=mask(), strength=0.8, steps=5, seed=5)),  # 4-channel inpainting
        (5, request(sampler="lcm", guidance_scale=1.0, steps=3, seed=6)),
        (6, request(n=6, steps=2, seed=8)),  # two chunks (max_batch 4): the second joins mid-batch
    ],
    "tiny-sd15-inpaint": [
        (0, request(image=picture(3), mask=mask(), strength=1.0, sampler="euler_a", seed=1)),
        (1, request(image=picture(4), strength=0.6, steps=6, seed=2)),
        (1, request(guidance_scale=1.0, seed=3)),
    ],
    "tiny-sdxl": [
        (0, request(sampler="dpmpp_2m", steps=5, negative_prompt=None, seed=1)),
        (1, request(guidance_scale=0.0, steps=3, seed=2)),
        (1, request(width=64, height=96, seed=3)),  # another latent size: calls of its own size
        (2, request(width=64, height=96, seed=4, guidance_scale=1.0, sampler="euler_a")),
    ],
}


@pytest.fixture(scope="module")
def pipelines(tiny_model: Model) -> dict[str, engines.Pipeline]:
    return {name: engines.load(tiny_model(name), backend="cpu") for name in MIXES}


@pytest.mark.parametrize("name", MIXES)
def test_batched_renders_equal_alone(pipelines: dict[str, engines.Pipeline], name: str) -> None:
    pipeline, mix = pipelines[name], MIXES[name]
    renderings, calls = batches.run(pipeline, [(call, lambda r=r: pipeline.begin(r)) for call, r in mix])
    for index, (rendering, (_, alone)) in enumerate(zip(renderings, mix, strict=True)):
        expected = pipeline.render(alone).pixels
        np.testing.assert_allclose(rendering.result().pixels, expected, atol=TOLERANCE, err_msg=f"request {index}")
        assert any(index in call and len(call) > 1 for call in calls), f"request {index} never shared a call"
    assert max(len(call) for call in calls) >= min(3, len(mix) - 2)


def test_a_cancelled_render_leaves_the_others_unchanged(pipelines: dict[str, engines.Pipeline]) -> None:
    pipeline = pipelines["tiny-sd15"]
    first, second, third = request(seed=1, steps=6), request(seed=2, sampler="euler_a"), request(seed=3, steps=5)

    def stop_at_3(done: int, total: int) -> None:
        if done == 3:
            raise RuntimeError("client gone")

    joins = [(0, lambda: pipeline.begin(first)), (0, lambda: pipeline.begin(second, on_step=stop_at_3)),
             (1, lambda: pipeline.begin(third))]
    (a, b, c), calls = batches.run(pipeline, joins)
    with pytest.raises(engines.RenderCancelled, match="client gone"):
        b.result()
    assert sum(1 in call for call in calls) == 3  # it left the batch at its third step
    for rendering, alone in ((a, first), (c, third)):
        np.testing.assert_allclose(rendering.result().pixels, pipeline.render(alone).pixels, atol=TOLERANCE)


def test_a_failing_render_fails_alone(pipelines: dict[str, engines.Pipeline]) -> None:
    """Explicit step noise of the wrong shape fails at the first step that draws noise, inside the batch."""
    pipeline = pipelines["tiny-sd15"]
    good = request(sampler="euler_a", seed=4)
    bad_noise = engines.Noise(steps=[np.zeros((1, 4, 3, 3), np.float32)])
    joins = [(0, lambda: pipeline.begin(good)),
             (0, lambda: pipeline.begin(request(sampler="euler_a"), noise=bad_noise))]
    (ok, failed), _ = batches.run(pipeline, joins)
    with pytest.raises(engines.InvalidRequest, match="noise"):
        failed.result()
    np.testing.assert_allclose(ok.result().pixels, pipeline.render(good).pixels, atol=TOLERANCE)


def test_streaming_partials_in_a_batch_equal_alone(pipelines: dict[str, engines.Pipeline]) -> None:
    pipeline = pipelines["tiny-sd15"]
    streamed = request(n=2, steps=6, sampler="dpmpp_2m", seed=11)

    def partials_of(begin: Callable[[Callable[[engines.Partial], None]], object]) -> list[tuple]:
        got: list[engines.Partial] = []
        begin(got.append)
        return [(p.index, p.partial_index, p.step, np.asarray(p.image)) for p in got]

    alone = partials_of(lambda keep: pipeline.render(streamed, on_partial=keep, partial_images=2))

    def batched(keep: Callable[[engines.Partial], None]) -> None:
        joins = [(0, lambda: pipeline.begin(request(seed=12, steps=9))),
                 (1, lambda: pipeline.begin(streamed, on_partial=keep, partial_images=2)),
                 (2, lambda: pipeline.begin(request(seed=13, guidance_scale=1.0)))]
        batches.run(pipeline, joins)

    together = partials_of(batched)
    assert [p[:3] for p in together] == [p[:3] for p in alone] and len(alone) == 4
    for (*_, mine), (*_, theirs) in zip(together, alone, strict=True):
        assert np.abs(mine.astype(int) - theirs.astype(int)).max() <= 1  # 8-bit previews: one level at most


def test_calls_above_the_backends_rows_are_split(tiny_model: Model, pipelines: dict[str, engines.Pipeline]) -> None:
    """A backend that runs at most 3 rows per call (a TensorRT profile's max batch) gets calls of 3 rows
    or fewer, and the same images."""
    pipeline = engines.load(tiny_model("tiny-sd15"), backend="cpu")
    unet = pipeline.sessions["unet"]
    unet.max_rows = 3
    rows: list[int] = []
    run = unet.run
    unet.run = lambda feeds, outputs: rows.append(feeds["sample"].shape[0]) or run(feeds, outputs)
    mix = [request(seed=1), request(seed=2, n=2), request(seed=3, guidance_scale=1.0)]  # 2 + 4 + 1 rows
    renderings, calls = batches.run(pipeline, [(0, lambda r=r: pipeline.begin(r)) for r in mix])
    assert len(calls) == 4 and all(len(call) == 3 for call in calls)
    assert rows == [3, 3, 1] * 4
    for rendering, alone in zip(renderings, mix, strict=True):
        expected = pipelines["tiny-sd15"].render(alone).pixels
        np.testing.assert_allclose(rendering.result().pixels, expected, atol=TOLERANCE)



def test_chunks_that_end_on_the_same_step_decode_together(tiny_model: Model,
                                                          pipelines: dict[str, engines.Pipeline]) -> None:
    """Renders whose chunks take their last step in the same call share a VAE decode, up to a chunk's
    `max_batch` images (4 here), and give the images they give alone."""
    pipeline = engines.load(tiny_model("tiny-sd15"), backend="cpu")
    vae = pipeline.sessions["vae_decoder"]
    decoded: list[int] = []
    run = vae.run
    vae.run = lambda feeds, outputs: decoded.append(feeds["latent_sample"].shape[0]) or run(feeds, outputs)
    mix = [request(seed=1), request(seed=2, n=2), request(seed=3, n=3, guidance_scale=1.0)]  # 4 steps each
    renderings, calls = batches.run(pipeline, [(0, lambda r=r: pipeline.begin(r)) for r in mix])
    assert calls == [[0, 1, 2]] * 4
    assert decoded == [1 + 2, 3]  # the third would make 6 images: a decode of its own
    for rendering, alone in zip(renderings, mix, strict=True):
        expected = pipelines["tiny-sd15"].render(alone).pixels
        np.testing.assert_allclose(rendering.result().pixels, expected, atol=TOLERANCE)
