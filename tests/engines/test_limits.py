"""Each request rule is written once (`engines.limits`, `Sizes.check`, `ModelInfo.rows`, `Pipeline.tokenize`),
and what a server predicts from it is what a render then does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engines
from engines import limits
from tests.engines.test_pipeline import CountingSession, request

Model = Callable[[str], Path]


@pytest.fixture(scope="module")
def sd15(tiny_model: Model) -> engines.Pipeline:
    return engines.load(tiny_model("tiny-sd15"), backend="cpu")


def picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def half_mask() -> Image.Image:
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    return Image.fromarray(mask)


def test_the_largest_seed_is_one_every_client_reads_back_exactly(sd15: engines.Pipeline) -> None:
    """2**53 - 1 is JavaScript's Number.MAX_SAFE_INTEGER: a double holds it and its neighbours below exactly,
    but not 2**53 + 1. Every image's seed (seed + i) stays within it."""
    assert float(limits.MAX_SEED) == limits.MAX_SEED and float(limits.MAX_SEED + 2) != limits.MAX_SEED + 2
    assert sd15.render(request(seed=limits.MAX_SEED, steps=1)).seeds == [limits.MAX_SEED]
    assert sd15.render(request(seed=limits.MAX_SEED - 1, n=2, steps=1)).seeds == [limits.MAX_SEED - 1, limits.MAX_SEED]
    for seed, n in ((limits.MAX_SEED + 1, 1), (limits.MAX_SEED, 2)):
        with pytest.raises(engines.InvalidRequest) as caught:
            sd15.render(request(seed=seed, n=n, steps=1))
        assert caught.value.param == "seed" and str(limits.MAX_SEED - (n - 1)) in caught.value.message


@pytest.mark.parametrize(("field", "value"), [("guidance_scale", limits.MAX_GUIDANCE + 1),
                                              ("steps", limits.MAX_STEPS + 1)])
def test_the_engines_refuse_what_the_api_refuses(sd15: engines.Pipeline, field: str, value: object) -> None:
    with pytest.raises(engines.InvalidRequest) as caught:
        sd15.render(request(**{field: value}))
    assert caught.value.param == field


def test_checks_name_the_callers_field() -> None:
    """A1111 spells guidance cfg_scale and strength denoising_strength: the message names the field it got."""
    with pytest.raises(engines.InvalidRequest) as caught:
        limits.check_guidance(31, "cfg_scale")
    assert caught.value.param == "cfg_scale" and caught.value.message.startswith("cfg_scale must")
    with pytest.raises(engines.InvalidRequest) as caught:
        limits.check_strength(0, "denoising_strength")
    assert caught.value.param == "denoising_strength"


def test_sizes_check_names_the_side_at_fault(sd15: engines.Pipeline) -> None:
    sizes = sd15.info.sizes
    sizes.check(sizes.min, sizes.max, "m")
    for width, height, param in ((sizes.min + 1, sizes.min, "width"), (sizes.min, sizes.max + sizes.step, "height")):
        with pytest.raises(engines.InvalidRequest) as caught:
            sizes.check(width, height, "m", params=("width", "height"))
        assert caught.value.param == param
        assert caught.value.message == (f"size {width}x{height} is not supported by model 'm': both sides must be "
                                        f"multiples of {sizes.step} from {sizes.min} to {sizes.max}")


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20])
@pytest.mark.parametrize("strength", [0.01, 0.1, 0.3, 0.5, 0.75, 1.0])
def test_steps_run_is_what_a_render_runs(sd15: engines.Pipeline, steps: int, strength: float) -> None:
    """The count a server shows progress against (A1111's previews) is the count the render steps."""
    result = sd15.render(request(steps=steps, image=picture(), strength=strength, guidance_scale=1.0))
    assert limits.steps_run(steps, strength) == result.steps_run == len(result.timings.steps)
    assert result.steps_run == max(1, int(steps * strength))


@pytest.mark.parametrize("strength", [1e-300, 5e-324, 1 / limits.LONGEST_SCHEDULE / 2])
def test_a_vanishing_strength_is_refused_at_once(sd15: engines.Pipeline, strength: float) -> None:
    """One step at strength 1e-300 would need a schedule of 1e300 steps, beyond any sampler's: refused,
    neither counted up to nor overflowing (1 / 5e-324 is infinite)."""
    with pytest.raises(engines.InvalidRequest) as caught:
        sd15.render(request(image=picture(), strength=strength))
    assert caught.value.param == "strength"


def test_the_lowest_strength_runs_one_step(sd15: engines.Pipeline) -> None:
    lowest = 1 / limits.LONGEST_SCHEDULE
    assert sd15.render(request(image=picture(), strength=lowest, steps=1)).steps_run == 1
    with pytest.raises(engines.InvalidRequest) as caught:  # LCM's schedules are short: strength is at fault
        sd15.render(request(image=picture(), strength=lowest, steps=1, sampler="lcm", guidance_scale=1.0))
    assert caught.value.param == "strength"


@pytest.mark.parametrize(("n", "guidance"), [(1, 5.0), (1, 1.0), (3, 5.0), (3, 0.0)])
def test_rows_are_the_rows_of_the_first_unet_call(tiny_model: Model, n: int, guidance: float) -> None:
    pipe = engines.load(tiny_model("tiny-sd15"), backend="cpu", max_batch=2)
    counting = CountingSession(pipe.sessions["unet"])
    pipe.sessions["unet"] = counting
    pipe.render(request(n=n, guidance_scale=guidance, steps=1))
    assert pipe.info.rows(n, guidance) == counting.batches[0]


def test_default_strength_is_the_render_default(sd15: engines.Pipeline) -> None:
    for mask, strength in ((half_mask(), 1.0), (None, 0.75)):
        assert limits.default_strength(mask is not None) == strength
        implicit = sd15.render(request(image=picture(), mask=mask, steps=4))
        explicit = sd15.render(request(image=picture(), mask=mask, steps=4, strength=strength))
        np.testing.assert_array_equal(implicit.pixels, explicit.pixels)
        assert implicit.steps_run == limits.steps_run(4, strength)


class CountingTokenizer:
    """A `tokenizers.Tokenizer`, unchanged, counting the texts it encodes."""

    def __init__(self, inner: object) -> None:
        self.inner, self.texts = inner, []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def encode(self, text: str, **kwargs: object) -> object:
        self.texts.append(text)
        return self.inner.encode(text, **kwargs)


def test_each_prompt_is_tokenized_once(tiny_model: Model) -> None:
    """Once by `tokenize` (which a server calls before queueing) and never again when the render gets the
    tokens; a render without them tokenizes each text once per tokenizer."""
    pipe = engines.load(tiny_model("tiny-sdxl"), backend="cpu")
    counters = {}
    for key, tokenizer in pipe.tokenizers.items():
        counters[key] = tokenizer._tokenizer = CountingTokenizer(tokenizer._tokenizer)
    tokens = pipe.tokenize("a lighthouse at dusk", "fog")
    assert all(c.texts == ["a lighthouse at dusk", "fog"] for c in counters.values())
    assert tokens.count == len(pipe.tokenizers["tokenizer"].ids("a lighthouse at dusk")) + len(
        pipe.tokenizers["tokenizer"].ids("fog"))
    for counter in counters.values():
        counter.texts.clear()
    given = pipe.render(request(prompt="a lighthouse at dusk", negative_prompt="fog", tokens=tokens))
    assert all(c.texts == [] for c in counters.values())
    alone = pipe.render(request(prompt="a lighthouse at dusk", negative_prompt="fog"))
    assert all(c.texts == ["a lighthouse at dusk", "fog"] for c in counters.values())
    np.testing.assert_array_equal(given.pixels, alone.pixels)


def test_tokens_of_other_prompts_are_refused(sd15: engines.Pipeline) -> None:
    with pytest.raises(engines.InvalidRequest) as caught:
        sd15.render(request(tokens=sd15.tokenize("a cat", "fog")))
    assert caught.value.param == "tokens"


def test_lora_limits_hold_before_a_model_is_asked() -> None:
    limits.check_adapters([("a", limits.MAX_LORA_SCALE)] * limits.MAX_ADAPTERS)
    for choice, part in (([("a", 1.0)] * (limits.MAX_ADAPTERS + 1), "at most 8"),
                         ([("a", -limits.MAX_LORA_SCALE - 0.5)], "scale -4.5 is outside [-4, 4]"),
                         ([("a", float("nan"))], "outside"), ([("", 1.0)], "needs a name")):
        with pytest.raises(engines.InvalidRequest, match=part.replace("[", r"\[").replace("]", r"\]")) as caught:
            limits.check_adapters(choice)
        assert caught.value.param == "lora"
