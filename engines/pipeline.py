"""The denoising pipeline: text to image, image to image and inpainting for SD 1.x, 2.x and SDXL.

`Pipeline.render` reads top to bottom like diffusers' `StableDiffusionPipeline.__call__`:

    1. check inputs      → a `Job` with every value resolved and validated
    2. encode the prompt → per-token embeddings (+ SDXL's pooled embedding and time ids)
    3. timesteps         → the sampler's immutable schedule (shortened by `strength` for image inputs)
    4. prepare latents   → noise, or the encoded image noised to the first timestep
    5. denoise           → one UNet call per step over the guidance-doubled batch, then the sampler step
    6. decode            → the VAE decoder, then pixels in [0, 1]

Steps 4–6 run per chunk of at most `max_batch` images. Every random draw comes from the image's own
seed (`noise.SeededNoise`), so image i of seed s is image 0 of seed s + i.

`render` runs one request alone. The same stages also run request by request for a batcher: `begin`
(1–4), then `step` over several renders at once (5: one UNet call for all their rows, each with its own
timestep, then each one's own guidance and sampler step; 6 for the chunks that ended, those of one size
decoded together, and each one's next chunk's 4), until each is `finished`; a render's state between
steps is an `engines.rendering.Rendering`.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec
import numpy as np

from engines import controlnet, images, optimum_folder, schedulers, vae_tiling
from engines import manifest as mf
from engines.backends import Backend, Session, open_sessions
from engines.errors import EngineError, InvalidRequest, ModelNotFound
from engines.info import AdapterInfo, ModelInfo
from engines.lora import Adapters
from engines.noise import Noise, SeededNoise
from engines.preview import Previewer, PreviewMode
from engines.progress import PartialCallback, StepCallback, StepHook
from engines.render import RenderRequest, RenderResult, Timings
from engines.rendering import Chunk, Inpainting, Job, Prompt, Rendering, as_engine_error
from engines.tokenizer import MAX_WINDOWS, PromptTokenizer

log = logging.getLogger("sdserve.engines")

MAX_STEPS = 150
MAX_SEED = 2**63 - 1


class Pipeline:
    def __init__(self, root: Path, manifest: mf.Manifest, backend: Backend, sessions: dict[str, Session],
                 max_batch: int | None = None) -> None:
        self.root, self.manifest, self.backend, self.sessions = root, manifest, backend, sessions
        self.tokenizers = {key: PromptTokenizer(spec, root) for key, spec in manifest.tokenizers.items()}
        self.scheduler_config = msgspec.json.decode((root / manifest.scheduler.path).read_bytes())
        self.max_batch = max_batch or manifest.max_batch
        self.lora = Adapters(root.name, manifest)
        self.sessions = controlnet.wrap(self.lora.wrap(sessions), manifest)
        self.info = ModelInfo(
            id=root.name, name=manifest.name, family=manifest.family, variant=manifest.variant,
            prediction_type=manifest.prediction_type, sizes=manifest.sizes, defaults=manifest.defaults,
            max_batch=self.max_batch, inpainting_unet=manifest.unet_in_channels == 9,
            samplers=schedulers.SAMPLERS, backend=backend.name, device=backend.device, lora_rank=self.lora.rank,
        )
        timestep = next(i for i in manifest.components["unet"].inputs if i.name == "timestep")
        self._scalar_timestep = not timestep.shape
        self.previewer = Previewer(self.decode_latents, manifest.latent_channels, manifest.vae_scale_factor)

    @property
    def unet_rows(self) -> int | None:
        """The most UNet rows one call runs at its best on this backend (None: no limit); `step` splits above."""
        return self.sessions["unet"].max_rows

    def _timestep(self, t: float, batch: int) -> np.ndarray:
        """One timestep per UNet row, or a scalar for graphs that take one (optimum's UNet export)."""
        return np.float32(t) if self._scalar_timestep else np.full(batch, t, np.float32)

    def render(self, request: RenderRequest, latents: np.ndarray | None = None, noise: Noise | None = None,
               on_step: StepCallback | None = None, on_partial: PartialCallback | None = None,
               partial_images: int = 0, preview: PreviewMode = "full") -> RenderResult:
        """Render `request.n` images. `latents` is the starting noise ε (n, 4, h, w), as diffusers'
        `latents` argument (for image inputs: the noise mixed into the encoded image); `noise` holds
        the other draws. Both default to draws from the seeds. `on_step(done, total)` follows each
        chunk's steps; `on_partial` gets `partial_images` previews per image (`engines.progress`)."""
        rendering = self.begin(request, latents, noise, on_step, on_partial, partial_images, preview)
        while not rendering.finished:
            self.step([rendering])
        return rendering.result()

    @property
    def adapters(self) -> list[AdapterInfo]:
        """The LoRA adapters this model offers (`load(…, lora_dir=…)`)."""
        return self.lora.infos()

    def load_adapters(self, folder: str | Path | None) -> None:
        """(Re)read the LoRA adapter directory: every `.safetensors` file that fits this model is offered."""
        self.lora.load(folder)
        self.info = msgspec.structs.replace(self.info, adapters=self.lora.infos(), refused_adapters=self.lora.refused)

    def begin(self, request: RenderRequest, latents: np.ndarray | None = None, noise: Noise | None = None,
              on_step: StepCallback | None = None, on_partial: PartialCallback | None = None,
              partial_images: int = 0, preview: PreviewMode = "full") -> Rendering:
        """Steps 1–3, and 4 for the first chunk: a render ready for its first `step` (arguments as `render`).
        Raises `InvalidRequest` for bad input, `EngineFailure` when the model fails."""
        started = time.perf_counter()
        timings = Timings()
        lora = self.lora.choose(request.lora)  # this render's LoRA adapters, fed to its own calls only
        # 1. Check inputs
        job = self.check_inputs(request)
        hook = StepHook(on_step, on_partial, partial_images, self.previewer, preview)
        try:
            # 2. Encode the prompt
            with timings.stage("text_encoder"), self.lora.applied(lora):
                prompt = self.encode_prompt(request.prompt, request.negative_prompt, job.guided)
            # 3. Timesteps
            schedule = job.scheduler.schedule(job.steps, job.strength)
            rendering = Rendering(job, prompt, schedule, lora, hook, timings, latents, noise, started)
            # 4. Prepare latents (of the first chunk of images)
            rendering.chunk = self.start_chunk(rendering, 0)
        except EngineError:
            raise
        except Exception as exc:
            raise as_engine_error(exc) from exc
        return rendering

    def step(self, renderings: Sequence[Rendering], max_rows: int | None = None) -> None:
        """5. One denoising step of each rendering's current chunk: one UNet call over all their rows (they
        must share a `batch_key`; split into calls of `max_rows` at most), then each one's guidance and
        sampler step; where chunks end, 6 (`finish_chunks`) and their next chunk's 4. A rendering that fails
        keeps its error (its `result` raises it); the others go on."""
        started = time.perf_counter()
        try:
            predictions = self.predict_noise(renderings, max_rows)
        except Exception as exc:
            if len(renderings) == 1:
                renderings[0].fail(exc)
                return
            for rendering in renderings:  # a shared call failed: alone, only the one at fault fails
                self.step([rendering], max_rows)
            return
        called = time.perf_counter() - started
        for rendering, predicted in zip(renderings, predictions, strict=True):
            try:
                self.advance(rendering, predicted, called)
            except Exception as exc:  # its callback asked to stop, its explicit noise was wrong, …
                rendering.fail(exc)
        self.finish_chunks([r for r in renderings if r.denoised])

    # -- 1 ------------------------------------------------------------------------------------------

    def check_inputs(self, request: RenderRequest) -> Job:
        m = self.manifest
        request = self.with_defaults(request)
        if not isinstance(request.prompt, str):
            raise InvalidRequest("prompt", "prompt must be a string")
        if request.negative_prompt is not None and not isinstance(request.negative_prompt, str):
            raise InvalidRequest("negative_prompt", "negative_prompt must be a string")
        self.check_prompt_lengths(request.prompt, request.negative_prompt)
        width, height = request.width, request.height
        if not (isinstance(width, int) and isinstance(height, int)) or not m.sizes.contains(width, height):
            raise InvalidRequest("size", f"size {width}x{height} is not supported by {self.info.id}: both sides "
                                 f"must be multiples of {m.sizes.step} from {m.sizes.min} to {m.sizes.max}")
        if not isinstance(request.steps, int) or not 1 <= request.steps <= MAX_STEPS:
            raise InvalidRequest("steps", f"steps must be an integer from 1 to {MAX_STEPS}")
        guidance = request.guidance_scale
        if not isinstance(guidance, int | float) or not math.isfinite(guidance) or guidance < 0:
            raise InvalidRequest("guidance_scale", "guidance_scale must be a finite number ≥ 0")
        if not isinstance(request.n, int) or request.n < 1:
            raise InvalidRequest("n", "n must be an integer ≥ 1")
        seed = secrets.randbelow(2**31) if request.seed is None else request.seed
        if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED - request.n:
            raise InvalidRequest("seed", f"seed must be an integer from 0 to {MAX_SEED - request.n}")
        scheduler = schedulers.create(request.sampler, self.scheduler_config)
        image, mask, strength, steps = self._check_images(request, width, height)
        return Job(request=request, width=width, height=height, steps=steps, guided=guidance > 1.0,
                   scheduler=scheduler, seeds=[seed + i for i in range(request.n)], strength=strength,
                   image=image, mask=mask)

    def check_prompt_lengths(self, prompt: str, negative_prompt: str | None) -> None:
        """Each prompt fits in MAX_WINDOWS token windows (cheap: tokenizing only), else InvalidRequest."""
        for param, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if not text:
                continue
            windows = max(tokenizer.count(text) for tokenizer in self.tokenizers.values())
            spans = min(tokenizer.piece for tokenizer in self.tokenizers.values())
            if windows > MAX_WINDOWS:
                raise InvalidRequest(param, f"{param} needs {windows} windows of tokens; the limit is "
                                     f"{MAX_WINDOWS} windows of {spans} tokens")

    def with_defaults(self, request: RenderRequest) -> RenderRequest:
        """The request with the model's defaults where it left size, steps, guidance or sampler unset."""
        d = self.manifest.defaults
        return msgspec.structs.replace(
            request,
            width=d.width if request.width is None else request.width,
            height=d.height if request.height is None else request.height,
            steps=d.steps if request.steps is None else request.steps,
            guidance_scale=d.guidance_scale if request.guidance_scale is None else request.guidance_scale,
            sampler=d.sampler if request.sampler is None else request.sampler,
        )

    def _check_images(self, request: RenderRequest, width: int, height: int
                      ) -> tuple[np.ndarray | None, np.ndarray | None, float, int]:
        if request.mask is not None and request.image is None:
            raise InvalidRequest("mask", "a mask needs an image")
        if request.image is None:
            if self.info.inpainting_unet:  # an inpainting UNet draws from scratch as "repaint everything"
                return np.zeros((1, 3, height, width), np.float32), np.ones((1, 1, height, width), np.float32), \
                    1.0, request.steps
            return None, None, 1.0, request.steps
        if not hasattr(request.image, "size") or not hasattr(request.image, "convert"):
            raise InvalidRequest("image", "image must be a PIL image")
        strength = request.strength
        if not isinstance(strength, int | float) or not 0.0 < strength <= 1.0:
            raise InvalidRequest("strength", "strength must be in (0, 1]")
        image = _decoded("image", lambda: images.to_array(request.image, width, height))
        mask = None
        if request.mask is not None:
            if not hasattr(request.mask, "size") or request.mask.size != request.image.size:
                raise InvalidRequest("mask", f"the mask must have the image's size {request.image.size}")
            mask = _decoded("mask", lambda: images.mask_to_array(request.mask, width, height))
        elif self.info.inpainting_unet:  # image to image on an inpainting UNet: nothing masked
            mask = np.zeros((1, 1, height, width), np.float32)
        steps = request.steps
        while int(steps * strength) < 1:  # low strength: lengthen the schedule so that one step runs
            steps += 1
        return image, mask, float(strength), steps

    # -- 2 ------------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, negative_prompt: str | None, guided: bool) -> Prompt:
        """Every text encoder over the prompt's windows (and the negative prompt's, when guided), in one
        batch per encoder; the encoders' states are concatenated feature-wise (SDXL)."""
        zero_negative = guided and negative_prompt is None and self.manifest.force_zeros_for_empty_prompt
        texts = [prompt] if not guided or zero_negative else [negative_prompt or "", prompt]
        windows = max(self.tokenizers[e.tokenizer].count(t) for e in self.manifest.text_encoders for t in texts)
        states, pooled = [], None
        for encoder in self.manifest.text_encoders:
            tokenizer = self.tokenizers[encoder.tokenizer]
            ids = np.concatenate([tokenizer.windows(t, windows) for t in texts])
            names = [encoder.hidden_output] + ([encoder.pooled_output] if encoder.pooled_output else [])
            out = self.sessions[encoder.component].run({"input_ids": ids}, names)
            hidden = out[encoder.hidden_output]
            states.append(hidden.reshape(len(texts), windows * hidden.shape[1], hidden.shape[2]))
            if encoder.pooled_output:  # the pooled embedding of each text's first window
                pooled = out[encoder.pooled_output].reshape(len(texts), windows, -1)[:, 0]
        embeds = np.concatenate(states, axis=-1)
        if zero_negative:  # SDXL without a negative prompt: zero negative conditioning, as trained
            embeds = np.concatenate([np.zeros_like(embeds), embeds])
            pooled = None if pooled is None else np.concatenate([np.zeros_like(pooled), pooled])
        return Prompt(embeds, pooled)

    # -- 4 ------------------------------------------------------------------------------------------

    def _latent_shape(self, job: Job) -> tuple[int, int, int]:
        scale = self.manifest.vae_scale_factor
        return self.manifest.latent_channels, job.height // scale, job.width // scale

    def prepare_latents(self, job: Job, schedule: schedulers.Schedule, draws: SeededNoise, chunk: slice,
                        latents: np.ndarray | None, noise: Noise | None, timings: Timings
                        ) -> tuple[np.ndarray, Inpainting | None]:
        noise = noise or Noise()
        start = _given(latents, chunk, draws.draw())
        posterior = _given(noise.posterior, chunk, draws.draw()) if job.image is not None else None
        inpaint_unet = self.info.inpainting_unet
        masked_posterior = _given(noise.masked_posterior, chunk, draws.draw()) if inpaint_unet else None
        scheduler = job.scheduler
        from_noise = job.image is None or (job.mask is not None and job.strength >= 1.0)
        image_latents = None
        if job.image is not None and (not from_noise or (job.mask is not None and not inpaint_unet)):
            with timings.stage("vae_encoder"):
                image_latents = self.encode_image(job.image, posterior)
        x = start * schedule.init_noise_sigma if from_noise else scheduler.add_noise(schedule, 0, image_latents, start)
        if job.mask is None:
            return x.astype(np.float32), None
        scale = self.manifest.vae_scale_factor
        mask = job.mask[:, :, ::scale, ::scale]  # nearest-neighbour down to latent size, as diffusers
        masked_latents = None
        if inpaint_unet:
            with timings.stage("vae_encoder"):
                masked_latents = self.encode_image(job.image * (job.mask < 0.5), masked_posterior)
        return x.astype(np.float32), Inpainting(mask, masked_latents, None if inpaint_unet else image_latents, start)

    def encode_image(self, image: np.ndarray, epsilon: np.ndarray) -> np.ndarray:
        """VAE encoder → a sample of the latent distribution per ε (one per image), scaled."""
        moments = self.sessions["vae_encoder"].run({"sample": image}, ["latent_parameters"])["latent_parameters"]
        mean, logvar = np.split(moments, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        return ((mean + std * epsilon) * self.manifest.vae_scaling_factor).astype(np.float32)

    def start_chunk(self, rendering: Rendering, first: int) -> Chunk | None:
        """The chunk of images from `first` (None past the last), its latents prepared."""
        job, n = rendering.job, rendering.job.request.n
        if first >= n:
            return None
        images_in_chunk = slice(first, min(n, first + self.max_batch))
        draws = SeededNoise(job.seeds[images_in_chunk], self._latent_shape(job))
        x, inpainting = self.prepare_latents(job, rendering.schedule, draws, images_in_chunk, rendering.latents,
                                             rendering.noise, rendering.timings)
        count = x.shape[0]
        conditioning = self._unet_conditioning(job, rendering.prompt, count)
        mask_input = None
        if inpainting is not None and inpainting.masked_image_latents is not None:
            mask = np.repeat(inpainting.mask, count * job.copies, axis=0)
            mask_input = np.concatenate([mask, np.tile(inpainting.masked_image_latents, (job.copies, 1, 1, 1))],
                                        axis=1)
        return Chunk(images_in_chunk, draws, x, inpainting, conditioning, mask_input)

    # -- 5 ------------------------------------------------------------------------------------------

    def batch_key(self, rendering: Rendering) -> tuple:
        """Renderings with equal keys may share a UNet call: same latent size, prompt length and LoRA feeds
        (and timestep, for graphs that take one timestep for the whole batch)."""
        chunk = rendering.chunk
        if chunk is None:
            return ()
        scalar_t = rendering.schedule.timesteps[chunk.step] if self._scalar_timestep else None
        return (chunk.x.shape[1:], rendering.prompt.embeds.shape[1:], rendering.lora.key, scalar_t)

    def unet_inputs(self, rendering: Rendering) -> dict[str, np.ndarray]:
        """The UNet's inputs for the current step of a rendering's chunk: the latents once per guidance copy
        (negative half first), scaled for the sampler, with this step's timestep on every row."""
        job, chunk, schedule = rendering.job, rendering.chunk, rendering.schedule
        assert chunk is not None
        model_input = job.scheduler.scale_model_input(schedule, chunk.step, np.concatenate([chunk.x] * job.copies))
        if chunk.mask_input is not None:
            model_input = np.concatenate([model_input, chunk.mask_input], axis=1)
        t = schedule.timesteps[chunk.step]
        return {"sample": model_input, "timestep": self._timestep(t, model_input.shape[0]), **chunk.conditioning}

    def predict_noise(self, renderings: Sequence[Rendering], max_rows: int | None = None) -> list[np.ndarray]:
        """The UNet over every rendering's rows at once, split back per rendering. Calls beyond `max_rows` or
        the backend's rows per call (`unet_rows`: TensorRT's largest batch profile) are split, never refused."""
        if len({self.batch_key(r) for r in renderings}) != 1:
            raise ValueError("these renders cannot share a UNet call (different batch keys)")
        inputs = [self.unet_inputs(r) for r in renderings]
        feeds = {name: np.concatenate([i[name] for i in inputs]) if np.ndim(value) else value
                 for name, value in inputs[0].items()}
        rows = feeds["sample"].shape[0]
        limit = min(limit for limit in (max_rows, self.unet_rows, rows) if limit)
        unet = self.sessions["unet"]
        with self.lora.applied(renderings[0].lora):
            predicted = np.concatenate([
                unet.run({name: value[first:first + limit] if np.ndim(value) else value
                          for name, value in feeds.items()}, ["out_sample"])["out_sample"]
                for first in range(0, rows, limit)])
        return np.split(predicted, np.cumsum([i["sample"].shape[0] for i in inputs])[:-1])

    def advance(self, rendering: Rendering, predicted: np.ndarray, called: float) -> None:
        """After the UNet call (`called` seconds): guidance, the sampler step and the progress hook (after the
        chunk's last step it is `denoised`, for `finish_chunks`)."""
        started = time.perf_counter()
        job, schedule, chunk, noise = rendering.job, rendering.schedule, rendering.chunk, rendering.noise
        assert chunk is not None
        i, total = chunk.step, len(schedule.timesteps)
        if job.guided:
            uncond, cond = np.split(predicted, 2)
            predicted = uncond + job.request.guidance_scale * (cond - uncond)
        step_noise = None
        if job.scheduler.draws_noise(schedule, i):  # the k-th drawing step takes the k-th explicit array
            explicit = noise.steps[chunk.drawn] if noise and noise.steps and chunk.drawn < len(noise.steps) else None
            step_noise = _given(explicit, chunk.images, chunk.draws.draw())
            chunk.drawn += 1
        chunk.previous = job.scheduler.step(schedule, i, predicted, chunk.x, previous=chunk.previous, noise=step_noise)
        chunk.x = chunk.previous.prev_sample
        if chunk.inpainting is not None and chunk.inpainting.image_latents is not None:
            chunk.x = self._blend_outside_mask(job, schedule, i, chunk.x, chunk.inpainting)
        chunk.step += 1
        # progress, cancellation and partial images, from this step's x0 estimate
        rendering.hook(chunk.step, total, chunk.images.start, chunk.previous.denoised)
        elapsed = called + time.perf_counter() - started
        rendering.timings.steps.append(elapsed)
        rendering.timings.stages["unet"] = rendering.timings.stages.get("unet", 0.0) + elapsed

    # -- 6 ------------------------------------------------------------------------------------------

    def finish_chunks(self, renderings: Sequence[Rendering]) -> None:
        """6. Decode the chunks that took their last step, those of one latent size in one VAE call (at most
        `max_batch` images, what a chunk of one render may hold), then 4. prepare each render's next chunk.
        A shared decode that fails is repeated per render, so that only the one at fault fails."""
        sizes: dict[tuple[int, ...], list[Rendering]] = {}
        for rendering in renderings:
            sizes.setdefault(_chunk(rendering).x.shape[1:], []).append(rendering)
        for same_size in sizes.values():
            pack: list[Rendering] = []
            for rendering in same_size:
                if pack and sum(_chunk(r).x.shape[0] for r in pack) + _chunk(rendering).x.shape[0] > self.max_batch:
                    self._decode_together(pack)
                    pack = []
                pack.append(rendering)
            self._decode_together(pack)

    def _decode_together(self, renderings: list[Rendering]) -> None:
        started = time.perf_counter()
        try:
            pixels = self.decode_latents(np.concatenate([_chunk(r).x for r in renderings]))
        except Exception as exc:
            if len(renderings) == 1:
                renderings[0].fail(exc)
                return
            for rendering in renderings:
                self._decode_together([rendering])
            return
        elapsed = time.perf_counter() - started
        counts = [_chunk(r).x.shape[0] for r in renderings]
        for rendering, decoded in zip(renderings, np.split(pixels, np.cumsum(counts)[:-1]), strict=True):
            timings = rendering.timings.stages
            timings["vae_decoder"] = timings.get("vae_decoder", 0.0) + elapsed
            rendering.pixels.append(decoded)
            try:
                rendering.chunk = self.start_chunk(rendering, _chunk(rendering).images.stop)
            except Exception as exc:  # the next chunk's image encode failed: this render's error alone
                rendering.fail(exc)
                continue
            if rendering.chunk is None:
                timings["total"] = time.perf_counter() - rendering.started

    def _unet_conditioning(self, job: Job, prompt: Prompt, count: int) -> dict[str, np.ndarray]:
        """The UNet's text inputs for `count` images, negative half first when guided."""
        feeds = {"encoder_hidden_states": np.repeat(prompt.embeds, count, axis=0)}
        if prompt.pooled is not None:  # SDXL: pooled text and the (size, crop, target size) time ids
            feeds["text_embeds"] = np.repeat(prompt.pooled, count, axis=0)
            size = [job.height, job.width]
            if self.manifest.requires_aesthetics_score:
                ids = [[*size, 0, 0, score] for score in ((2.5, 6.0) if job.guided else (6.0,))]
            else:
                ids = [[*size, 0, 0, *size]] * job.copies
            feeds["time_ids"] = np.repeat(np.array(ids, np.float32), count, axis=0)
        return feeds

    @staticmethod
    def _blend_outside_mask(job: Job, schedule: schedulers.Schedule, i: int, x: np.ndarray,
                            inpainting: Inpainting) -> np.ndarray:
        """Plain UNets inpaint by resetting the unmasked area to the image, noised to the next level."""
        known = inpainting.image_latents
        if i + 1 < len(schedule.timesteps):
            known = job.scheduler.add_noise(schedule, i + 1, known, inpainting.noise)
        return ((1.0 - inpainting.mask) * known + inpainting.mask * x).astype(np.float32)

    def decode_latents(self, x: np.ndarray) -> np.ndarray:
        """The VAE decoder; above the model's native size and the tiling threshold in overlapping tiles
        (`vae_tiling`), capping its memory. Native sizes decode whole: exact, and on the plans' own profile."""
        latents = x / self.manifest.vae_scaling_factor
        session = self.sessions["vae_decoder"]
        scale, defaults = self.manifest.vae_scale_factor, self.manifest.defaults
        native = (defaults.width // scale) * (defaults.height // scale)
        decoded = vae_tiling.decode(lambda z: session.run({"latent_sample": z}, ["sample"])["sample"], latents,
                                    scale, threshold=max(vae_tiling.THRESHOLD, native))
        return images.to_pixels(decoded)

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()


def _chunk(rendering: Rendering) -> Chunk:
    assert rendering.chunk is not None  # a denoised chunk, until its decode
    return rendering.chunk


def _given(explicit: np.ndarray | None, chunk: slice, drawn: np.ndarray) -> np.ndarray:
    """The caller's array for this chunk when given, else the seeded draw (drawn either way, so that
    what follows in each image's stream does not depend on what the caller supplied)."""
    if explicit is None:
        return drawn
    part = np.asarray(explicit, dtype=np.float32)[chunk]
    if part.shape != drawn.shape:
        raise InvalidRequest("noise", f"expected noise of shape {drawn.shape} for this chunk, got {part.shape}")
    return part


def _decoded(param: str, convert: Callable[[], np.ndarray]) -> np.ndarray:
    """PIL decodes lazily: a truncated or corrupt image fails only when its pixels are read, here."""
    try:
        return convert()
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's decoders raise all three
        raise InvalidRequest(param, f"{param} cannot be decoded: {exc}") from exc


def load(model_dir: str | Path, backend: str = "auto", threads: int | None = None, verify: bool = True,
         max_batch: int | None = None, lora_dir: str | Path | None = None) -> Pipeline:
    """Open a model directory: read and check its manifest, then create every component's session once."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelNotFound(str(model_dir), f"no model directory at {model_dir}")
    manifest = optimum_folder.infer(root) if optimum_folder.is_optimum_folder(root) else mf.read(root, verify=verify)
    chosen, sessions = open_sessions(root, manifest, backend, threads, verify=verify)
    log.info("loaded %s (%s/%s) on %s", root.name, manifest.family, manifest.variant, chosen.device)
    pipeline = Pipeline(root, manifest, chosen, sessions, max_batch)
    if lora_dir is not None:
        pipeline.load_adapters(lora_dir)
    return pipeline
