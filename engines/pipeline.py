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
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from engines import images, optimum_folder, schedulers, vae_tiling
from engines import manifest as mf
from engines.backends import Backend, Session, open_sessions
from engines.errors import EngineError, EngineFailure, InvalidRequest, ModelNotFound
from engines.info import AdapterInfo, ModelInfo
from engines.lora import Adapters
from engines.noise import Noise, SeededNoise
from engines.preview import Previewer, PreviewMode
from engines.progress import PartialCallback, StepCallback, StepHook
from engines.render import RenderRequest, RenderResult, Timings
from engines.tokenizer import MAX_WINDOWS, PromptTokenizer

log = logging.getLogger("sdserve.engines")

MAX_STEPS = 150
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Job:
    """A request with every value resolved against the model: what the stages below consume."""

    request: RenderRequest
    width: int
    height: int
    steps: int  # schedule length (raised so that at least one step runs at low strength)
    guided: bool  # classifier-free guidance: the UNet also sees the negative prompt
    scheduler: schedulers.Scheduler
    seeds: list[int]
    strength: float  # 1.0 unless an image is given
    image: np.ndarray | None  # (1, 3, H, W) in [-1, 1]
    mask: np.ndarray | None  # (1, 1, H, W), 1 = repaint


@dataclass(frozen=True)
class Prompt:
    """Conditioning for the UNet, negative first when guided (the order of the doubled batch)."""

    embeds: np.ndarray  # (1 or 2, tokens, width)
    pooled: np.ndarray | None  # SDXL: (1 or 2, projection)


@dataclass(frozen=True)
class Inpainting:
    mask: np.ndarray  # (1, 1, h, w) at latent size
    masked_image_latents: np.ndarray | None  # 9-channel UNets: (images, 4, h, w)
    image_latents: np.ndarray | None  # 4-channel UNets blend these back outside the mask every step
    noise: np.ndarray  # the starting noise, reused to noise image_latents to each step's level


class Pipeline:
    def __init__(self, root: Path, manifest: mf.Manifest, backend: Backend, sessions: dict[str, Session],
                 max_batch: int | None = None) -> None:
        self.root, self.manifest, self.backend, self.sessions = root, manifest, backend, sessions
        self.tokenizers = {key: PromptTokenizer(spec, root) for key, spec in manifest.tokenizers.items()}
        self.scheduler_config = msgspec.json.decode((root / manifest.scheduler.path).read_bytes())
        self.max_batch = max_batch or manifest.max_batch
        self.lora = Adapters(root.name, manifest)
        self.sessions = self.lora.wrap(sessions)
        self.info = ModelInfo(
            id=root.name, name=manifest.name, family=manifest.family, variant=manifest.variant,
            prediction_type=manifest.prediction_type, sizes=manifest.sizes, defaults=manifest.defaults,
            max_batch=self.max_batch, inpainting_unet=manifest.unet_in_channels == 9,
            samplers=schedulers.SAMPLERS, backend=backend.name, device=backend.device, lora_rank=self.lora.rank,
        )
        self.previewer = Previewer(self.decode_latents, manifest.latent_channels, manifest.vae_scale_factor)

    def _timestep(self, t: float, batch: int) -> np.ndarray:
        """One timestep per image, or a scalar for graphs that take one (optimum's UNet export)."""
        spec = next(i for i in self.manifest.components["unet"].inputs if i.name == "timestep")
        return np.float32(t) if not spec.shape else np.full(batch, t, np.float32)

    def render(self, request: RenderRequest, latents: np.ndarray | None = None, noise: Noise | None = None,
               on_step: StepCallback | None = None, on_partial: PartialCallback | None = None,
               partial_images: int = 0, preview: PreviewMode = "full") -> RenderResult:
        with self.lora.applied(request.lora):  # this render's LoRA adapters, seen by this thread only
            return self._render(request, latents, noise, on_step, on_partial, partial_images, preview)

    @property
    def adapters(self) -> list[AdapterInfo]:
        """The LoRA adapters this model offers (`load(…, lora_dir=…)`)."""
        return self.lora.infos()

    def load_adapters(self, folder: str | Path | None) -> None:
        """(Re)read the LoRA adapter directory: every `.safetensors` file that fits this model is offered."""
        self.lora.load(folder)
        self.info = msgspec.structs.replace(self.info, adapters=self.lora.infos(), refused_adapters=self.lora.refused)

    def _render(self, request: RenderRequest, latents: np.ndarray | None = None, noise: Noise | None = None,
                on_step: StepCallback | None = None, on_partial: PartialCallback | None = None,
                partial_images: int = 0, preview: PreviewMode = "full") -> RenderResult:
        """Render `request.n` images. `latents` is the starting noise ε (n, 4, h, w), as diffusers'
        `latents` argument (for image inputs: the noise mixed into the encoded image); `noise` holds
        the other draws. Both default to draws from the seeds. `on_step(done, total)` follows each
        chunk's steps; `on_partial` gets `partial_images` previews per image (`engines.progress`)."""
        started = time.perf_counter()
        timings = Timings()
        # 1. Check inputs
        job = self.check_inputs(request)
        hook = StepHook(on_step, on_partial, partial_images, self.previewer, preview)
        try:
            # 2. Encode the prompt
            with timings.stage("text_encoder"):
                prompt = self.encode_prompt(request.prompt, request.negative_prompt, job.guided)
            # 3. Timesteps
            schedule = job.scheduler.schedule(job.steps, job.strength)
            # 4.–6. Latents, denoising and decoding, one chunk of images at a time
            pixels = []
            for first in range(0, request.n, self.max_batch):
                chunk = slice(first, min(request.n, first + self.max_batch))
                pixels.append(self._render_chunk(job, prompt, schedule, chunk, latents, noise, hook, timings))
        except EngineError:
            raise
        except Exception as exc:  # a numpy or backend error is our fault, never the caller's
            log.exception("render failed")
            raise EngineFailure(f"render failed: {type(exc).__name__}: {exc}") from exc
        timings.stages["total"] = time.perf_counter() - started
        result = np.concatenate(pixels)
        return RenderResult(images=images.to_pil(result), seeds=job.seeds, timings=timings, pixels=result,
                            steps_run=len(schedule.timesteps))

    def _render_chunk(self, job: Job, prompt: Prompt, schedule: schedulers.Schedule, chunk: slice,
                      latents: np.ndarray | None, noise: Noise | None, hook: StepHook,
                      timings: Timings) -> np.ndarray:
        draws = SeededNoise(job.seeds[chunk], self._latent_shape(job))
        # 4. Prepare latents
        x, inpainting = self.prepare_latents(job, schedule, draws, chunk, latents, noise, timings)
        # 5. Denoise
        with timings.stage("unet"):
            x = self.denoise(job, prompt, schedule, x, inpainting, draws, chunk, noise, hook, timings)
        # 6. Decode
        with timings.stage("vae_decoder"):
            return self.decode_latents(x)

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

    # -- 5 ------------------------------------------------------------------------------------------

    def denoise(self, job: Job, prompt: Prompt, schedule: schedulers.Schedule, x: np.ndarray,
                inpainting: Inpainting | None, draws: SeededNoise, chunk: slice, noise: Noise | None,
                hook: StepHook | None, timings: Timings) -> np.ndarray:
        scheduler, images_in_chunk = job.scheduler, x.shape[0]
        copies = 2 if job.guided else 1
        conditioning = self._unet_conditioning(job, prompt, images_in_chunk)
        mask_input = None
        if inpainting is not None and inpainting.masked_image_latents is not None:
            mask = np.repeat(inpainting.mask, images_in_chunk * copies, axis=0)
            mask_input = np.concatenate([mask, np.tile(inpainting.masked_image_latents, (copies, 1, 1, 1))], axis=1)
        previous, drawn = None, 0
        total = len(schedule.timesteps)
        for i, t in enumerate(schedule.timesteps):
            step_started = time.perf_counter()
            model_input = scheduler.scale_model_input(schedule, i, np.concatenate([x] * copies))
            if mask_input is not None:
                model_input = np.concatenate([model_input, mask_input], axis=1)
            feeds = {"sample": model_input, "timestep": self._timestep(t, model_input.shape[0]), **conditioning}
            predicted = self.sessions["unet"].run(feeds, ["out_sample"])["out_sample"]
            if job.guided:
                uncond, cond = np.split(predicted, 2)
                predicted = uncond + job.request.guidance_scale * (cond - uncond)
            step_noise = None
            if scheduler.draws_noise(schedule, i):  # the k-th drawing step takes the k-th explicit array
                explicit = noise.steps[drawn] if noise and noise.steps and drawn < len(noise.steps) else None
                step_noise = _given(explicit, chunk, draws.draw())
                drawn += 1
            previous = scheduler.step(schedule, i, predicted, x, previous=previous, noise=step_noise)
            x = previous.prev_sample
            if inpainting is not None and inpainting.image_latents is not None:
                x = self._blend_outside_mask(job, schedule, i, x, inpainting)
            timings.steps.append(time.perf_counter() - step_started)
            if hook is not None:  # progress, cancellation and partial images, from this step's x0 estimate
                hook(i + 1, total, chunk.start, previous.denoised)
        return x

    def _unet_conditioning(self, job: Job, prompt: Prompt, count: int) -> dict[str, np.ndarray]:
        """The UNet's text inputs for `count` images, negative half first when guided."""
        feeds = {"encoder_hidden_states": np.repeat(prompt.embeds, count, axis=0)}
        if prompt.pooled is not None:  # SDXL: pooled text and the (size, crop, target size) time ids
            feeds["text_embeds"] = np.repeat(prompt.pooled, count, axis=0)
            size = [job.height, job.width]
            if self.manifest.requires_aesthetics_score:
                ids = [[*size, 0, 0, score] for score in ((2.5, 6.0) if job.guided else (6.0,))]
            else:
                ids = [[*size, 0, 0, *size]] * (2 if job.guided else 1)
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

    # -- 6 ------------------------------------------------------------------------------------------

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
