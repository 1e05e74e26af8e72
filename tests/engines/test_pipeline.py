"""The engines' behaviour beyond parity: determinism, seeds, long prompts, errors, backends, the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engines
from engines.backends import openvino
from engines.tokenizer import MAX_WINDOWS

ROOT = Path(__file__).resolve().parents[2]
Model = Callable[[str], Path]


def request(**overrides: object) -> engines.RenderRequest:
    fields = {"prompt": "a lighthouse at dusk", "negative_prompt": "", "width": 64, "height": 64, "steps": 3,
              "guidance_scale": 5.0, "sampler": "euler", "seed": 7} | overrides
    return engines.RenderRequest(**fields)


@pytest.fixture(scope="module")
def sd15(tiny_model: Model) -> engines.Pipeline:
    return engines.load(tiny_model("tiny-sd15"), backend="cpu")


@pytest.fixture(scope="module")
def sdxl(tiny_model: Model) -> engines.Pipeline:
    return engines.load(tiny_model("tiny-sdxl"), backend="cpu")


def test_import_engines_does_not_import_torch() -> None:
    """Nor TensorRT or cuda-python: the TensorRT backend imports them lazily, on a GPU host only."""
    code = ("import sys, engines, engines.pipeline, engines.backends.ort, engines.backends.tensorrt, engines.gpu, "
            "engines.plans\n"
            "heavy = ('torch', 'diffusers', 'transformers', 'tensorrt', 'cuda')\n"
            "heavy = sorted(m for m in heavy if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr


def test_same_request_same_bytes(sd15: engines.Pipeline) -> None:
    first, second = sd15.render(request()), sd15.render(request())
    assert first.images[0].tobytes() == second.images[0].tobytes()
    assert np.array_equal(first.pixels, second.pixels)
    assert first.seeds == [7]


def test_image_i_is_reproduced_by_seed_plus_i(sd15: engines.Pipeline) -> None:
    batch = sd15.render(request(n=3, seed=100))
    assert batch.seeds == [100, 101, 102]
    for i in range(3):
        alone = sd15.render(request(seed=100 + i))
        np.testing.assert_allclose(batch.pixels[i], alone.pixels[0], atol=1e-5)
    assert not np.allclose(batch.pixels[0], batch.pixels[1])  # different seeds, different images


def test_chunks_above_max_batch_give_the_same_images(tiny_model: Model, sd15: engines.Pipeline) -> None:
    small = engines.load(tiny_model("tiny-sd15"), backend="cpu", max_batch=2)
    assert small.info.max_batch == 2
    chunked, whole = small.render(request(n=3)), sd15.render(request(n=3))
    np.testing.assert_allclose(chunked.pixels, whole.pixels, atol=1e-5)


def test_random_seed_is_reported_and_reproduces(sd15: engines.Pipeline) -> None:
    first = sd15.render(request(seed=None))
    again = sd15.render(request(seed=first.seeds[0]))
    np.testing.assert_array_equal(first.pixels, again.pixels)


def test_long_prompt_uses_every_token(sdxl: engines.Pipeline) -> None:
    sentence = "a red fox jumping over a quiet river under the northern lights with snowy mountains behind"
    long_prompt = " ".join((sentence.split(" ") * 20)[:150])
    tokenizer = sdxl.tokenizers["tokenizer"]
    ids = tokenizer.windows(long_prompt)
    assert ids.shape == (tokenizer.count(long_prompt), 77) and ids.shape[0] >= 2  # more than one window
    first_window = tokenizer._tokenizer.decode(ids[0, 1:76].tolist())
    full = sdxl.render(request(prompt=long_prompt))
    truncated = sdxl.render(request(prompt=first_window))
    assert full.pixels.shape == truncated.pixels.shape
    assert np.abs(full.pixels - truncated.pixels).max() > 1e-3


def test_both_sdxl_encoders_read_every_window(sdxl: engines.Pipeline) -> None:
    """Two long prompts that differ only after the first window: the first window's states are equal, and
    each encoder's part of the later states (SDXL concatenates them feature-wise) differs."""
    head = " ".join((["a", "red", "fox", "jumping", "over", "a", "quiet", "river"] * 20)[:90])
    one = sdxl.encode_prompt(sdxl.tokenize(f"{head} under the northern lights", None), guided=False).embeds
    two = sdxl.encode_prompt(sdxl.tokenize(f"{head} in a desert of orange sand", None), guided=False).embeds
    assert one.shape == two.shape and one.shape[1] >= 2 * 77
    np.testing.assert_array_equal(one[:, :77], two[:, :77])
    width = one.shape[2] // 2  # the tiny encoders are equally wide
    for part in (slice(0, width), slice(width, None)):
        assert np.abs(one[:, -77:, part] - two[:, -77:, part]).max() > 1e-4


@pytest.mark.parametrize("param", ["prompt", "negative_prompt"])
def test_prompts_are_bounded_in_token_windows(sd15: engines.Pipeline, param: str) -> None:
    """A prompt of MAX_WINDOWS full windows is accepted; one token more is refused before any encoder runs."""
    tokenizer = next(iter(sd15.tokenizers.values()))
    words = ["a", "red", "fox", "jumping", "over", "a", "quiet", "river"] * 200
    fits = " ".join(words[: MAX_WINDOWS * tokenizer.piece])
    while tokenizer.count(fits) > MAX_WINDOWS:  # words may take more than one token
        fits = fits.rsplit(" ", 1)[0]
    longer = fits
    while tokenizer.count(longer) <= MAX_WINDOWS:
        longer += " river"
    sd15.tokenize(**({"prompt": "p", "negative_prompt": None} | {param: fits}))
    with pytest.raises(engines.InvalidRequest) as caught:
        sd15.render(request(steps=1, **{param: longer}))
    assert caught.value.param == param


class CountingSession:
    """Our own UNet session, unchanged, with a note of each call's batch size."""

    def __init__(self, session: object) -> None:
        self.session, self.batches = session, []

    def __getattr__(self, name: str) -> object:
        return getattr(self.session, name)

    def run(self, feeds: dict, outputs: list) -> dict:
        self.batches.append(feeds["sample"].shape[0])
        return self.session.run(feeds, outputs)


@pytest.mark.parametrize(("guidance", "n", "max_batch", "batches"), [
    (5.0, 1, 4, [2, 2, 2]),  # guided: negative and positive in one call per step
    (1.0, 1, 4, [1, 1, 1]),  # guidance ≤ 1: no unconditional half
    (0.0, 3, 4, [3, 3, 3]),  # n images in one batch
    (5.0, 3, 2, [4, 4, 4, 2, 2, 2]),  # chunks of max_batch images, each doubled for guidance
])
def test_unet_batches(tiny_model: Model, guidance: float, n: int, max_batch: int, batches: list[int]) -> None:
    pipe = engines.load(tiny_model("tiny-sd15"), backend="cpu", max_batch=max_batch)
    counting = CountingSession(pipe.sessions["unet"])
    pipe.sessions["unet"] = counting
    pipe.render(request(guidance_scale=guidance, n=n, steps=3))
    assert counting.batches == batches


def test_unset_fields_take_the_model_defaults(sd15: engines.Pipeline) -> None:
    d = sd15.info.defaults
    implicit = sd15.render(engines.RenderRequest(prompt="a lighthouse", seed=3))
    explicit = sd15.render(engines.RenderRequest(prompt="a lighthouse", seed=3, width=d.width, height=d.height,
                                                 steps=d.steps, guidance_scale=d.guidance_scale, sampler=d.sampler))
    assert implicit.images[0].size == (d.width, d.height) and implicit.steps_run == d.steps
    np.testing.assert_array_equal(implicit.pixels, explicit.pixels)


def test_truncated_image_is_a_request_error(sd15: engines.Pipeline, tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), "red").save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with Image.open(tmp_path / "cut.png") as cut, pytest.raises(engines.InvalidRequest) as caught:
        sd15.render(request(image=cut, strength=0.5))
    assert caught.value.param == "image"


def test_windows_match_diffusers_tokenization(tmp_path: Path) -> None:
    from export import presets, tiny

    reference = tiny.build(presets.get("tiny-sdxl"))
    for key, hf in {"tokenizer": reference.tokenizer, "tokenizer_2": reference.tokenizer_2}.items():
        hf.save_pretrained(tmp_path / key)
        spec = engines.manifest.Tokenizer(
            file=engines.manifest.FileRef(path=f"{key}/tokenizer.json", sha256="", bytes=0),
            max_length=77, bos_id=hf.bos_token_id, eos_id=hf.eos_token_id, pad_id=hf.pad_token_id)
        ours = engines.tokenizer.PromptTokenizer(spec, tmp_path)
        for text in ["", "A Photo of a CAT!!", "  spaces   and\ttabs ", "émoji ☕ and ünïcode"]:
            expected = hf(text, padding="max_length", max_length=77, truncation=True).input_ids
            assert ours.windows(text).tolist() == [expected], (key, text)


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"width": 100}, "size"),
        ({"height": 1024}, "size"),
        ({"width": 48}, "size"),
        ({"steps": 0}, "steps"),
        ({"steps": 151}, "steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"sampler": "heun"}, "sampler"),
        ({"n": 0}, "n"),
        ({"seed": -1}, "seed"),
        ({"prompt": None}, "prompt"),
        ({"negative_prompt": 3}, "negative_prompt"),
        ({"image": "not an image"}, "image"),
        ({"image": Image.new("RGB", (64, 64)), "strength": 0.0}, "strength"),
        ({"image": Image.new("RGB", (64, 64)), "strength": 1.5}, "strength"),
        ({"mask": Image.new("L", (64, 64))}, "mask"),
        ({"image": Image.new("RGB", (64, 64)), "mask": Image.new("L", (32, 64))}, "mask"),
    ],
)
def test_bad_requests_name_the_parameter(sd15: engines.Pipeline, overrides: dict, param: str) -> None:
    with pytest.raises(engines.InvalidRequest) as caught:
        sd15.render(request(**overrides))
    assert caught.value.param == param


def test_lcm_beyond_its_original_steps_is_a_request_error(sd15: engines.Pipeline) -> None:
    with pytest.raises(engines.InvalidRequest) as caught:
        sd15.render(request(sampler="lcm", steps=80))
    assert caught.value.param == "steps"


def test_explicit_noise_of_the_wrong_shape_is_a_request_error(sd15: engines.Pipeline) -> None:
    with pytest.raises(engines.InvalidRequest) as caught:
        sd15.render(request(), latents=np.zeros((1, 4, 4, 4), np.float32))
    assert caught.value.param == "noise"


def test_image_to_image_runs_strength_times_steps(sd15: engines.Pipeline) -> None:
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    assert sd15.render(request(image=image, strength=0.5, steps=8)).steps_run == 4
    # Too low a strength for the steps: the schedule is lengthened so that one step still runs.
    assert sd15.render(request(image=image, strength=0.1, steps=2)).steps_run == 1


def test_any_image_size_fits_the_render_size(sd15: engines.Pipeline) -> None:
    for size in [(13, 200), (300, 31), (64, 64), (1, 1)]:
        image = Image.new("RGB", size, (10, 200, 30))
        mask = Image.new("L", size, 255)
        result = sd15.render(request(image=image, mask=mask, width=112, height=64, strength=1.0))
        assert result.images[0].size == (112, 64)


def test_inpainting_keeps_the_unmasked_area_closer(sd15: engines.Pipeline) -> None:
    """With a plain UNet, the area outside the mask is reset to the image every step."""
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    result = sd15.render(request(image=image, mask=Image.fromarray(mask), strength=1.0))
    reconstructed = sd15.render(request(image=image, mask=Image.new("L", (64, 64), 0), strength=1.0))
    # Unmasked columns come out as the VAE round trip of the image; masked ones are re-imagined.
    left = np.abs(result.pixels[0, :, :24] - reconstructed.pixels[0, :, :24]).mean()
    right = np.abs(result.pixels[0, :, 40:] - reconstructed.pixels[0, :, 40:]).mean()
    assert left < right


def test_on_step_reports_progress_and_can_cancel(sd15: engines.Pipeline) -> None:
    seen: list[tuple[int, int]] = []
    sd15.render(request(steps=4), on_step=lambda i, total: seen.append((i, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    def stop(i: int, total: int) -> None:
        if i == 2:
            raise ConnectionAbortedError("client went away")

    with pytest.raises(engines.RenderCancelled) as caught:
        sd15.render(request(steps=4), on_step=stop)
    assert isinstance(caught.value.__cause__, ConnectionAbortedError)


def test_timings_cover_every_stage(sd15: engines.Pipeline) -> None:
    result = sd15.render(request(steps=3, image=Image.new("RGB", (64, 64)), strength=1.0))
    assert {"text_encoder", "vae_encoder", "unet", "vae_decoder", "total"} <= set(result.timings.stages)
    assert len(result.timings.steps) == 3
    assert all(seconds > 0 for seconds in result.timings.stages.values())


def test_info_describes_the_model(sdxl: engines.Pipeline) -> None:
    info = sdxl.info
    assert (info.id, info.family, info.variant, info.backend) == ("tiny-sdxl", "sdxl", "base", "cpu")
    assert info.sizes.min == 64 and info.sizes.max == 512 and info.sizes.step == 16
    assert set(info.samplers) == set(engines.SAMPLERS)


def test_auto_backend_picks_what_actually_runs(tiny_model: Model) -> None:
    expected = "openvino" if openvino.available() else "cpu"  # bf16 where the processor has it
    assert engines.load(tiny_model("tiny-sd15"), backend="auto").info.backend == expected


def test_unavailable_backend_fails_clearly(tiny_model: Model) -> None:
    with pytest.raises(engines.EngineFailure, match="CUDAExecutionProvider"):
        engines.load(tiny_model("tiny-sd15"), backend="cuda")
    with pytest.raises(engines.InvalidRequest) as caught:
        engines.load(tiny_model("tiny-sd15"), backend="metal")
    assert caught.value.param == "backend"


def test_thread_count_is_configurable(tiny_model: Model) -> None:
    pipe = engines.load(tiny_model("tiny-sd15"), backend="cpu", threads=1)
    assert "1 threads" in pipe.info.device
    assert pipe.render(request()).images[0].size == (64, 64)


def test_missing_and_tampered_models(tiny_model: Model, tmp_path: Path) -> None:
    with pytest.raises(engines.ModelNotFound):
        engines.load(tmp_path / "nothing-here")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model("tiny-sd15"), copy)
    unet = copy / "unet" / "model.onnx"
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 0xFF
    unet.write_bytes(bytes(data))
    with pytest.raises(engines.ModelInvalid, match="sha256"):
        engines.load(copy)
    (copy / "vae_decoder" / "model.onnx").unlink()
    with pytest.raises(engines.ModelInvalid, match="missing"):
        engines.load(copy)


def test_cli_renders_and_prints_timings(tiny_model: Model, tmp_path: Path) -> None:
    out = tmp_path / "cat.png"
    result = subprocess.run(
        [sys.executable, "-m", "engines", "render", str(tiny_model("tiny-sdxl")), "--prompt", "a cat",
         "--out", str(out), "--steps", "3", "--seed", "5", "--size", "96x64", "--sampler", "dpmpp_2m"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (96, 64)
    for stage in ("text_encoder", "unet", "vae_decoder", "unet step   3"):
        assert stage in result.stdout
    assert "seeds [5]" in result.stdout


def test_cli_reports_bad_input_in_one_line(tiny_model: Model, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "engines", "render", str(tiny_model("tiny-sd15")), "--prompt", "x",
         "--size", "100x100", "--out", str(tmp_path / "x.png")],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("engines: error: size:")
