"""The denoising pipeline: text to image, image to image and inpainting for SD 1.x, 2.x and SDXL.

`Pipeline.render` tells the story of a render, as diffusers' `StableDiffusionPipeline.__call__` does; each
numbered stage is one method here. The same stages run request by request for a server's batcher:
`begin` (1–4), then `step` over several renders at once (5: one UNet call for all their rows, each with its
own timestep; 6: the chunks that end together decoded together), until each is `finished`; a render's state
between steps is an `engines.rendering.Rendering`, the UNet's feeds are `engines.unet_feeds`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import numpy as np

from engines import controlnet, images, schedulers, unet_feeds, vae_tiling
from engines import manifest as mf
from engines.backends import Backend, Session, open_sessions
from engines.description import model_info, read_manifest
from engines.errors import EngineError, InvalidRequest
from engines.info import AdapterInfo
from engines.job import Job, resolve
from engines.lora import Adapters
from engines.noise import Noise, SeededNoise, given
from engines.preview import Previewer, PreviewMode
from engines.progress import PartialCallback, StepCallback, StepHook
from engines.render import RenderRequest, RenderResult, Timings, Tokens
from engines.rendering import Blend, Chunk, Prompt, Rendering, as_engine_error
from engines.tokenizer import PromptTokenizer, tokenize

log = logging.getLogger("sdserve.engines")


class Pipeline:
    def __init__(self, root: Path, manifest: mf.Manifest, backend: Backend, sessions: dict[str, Session],
                 max_batch: int | None = None, verify: bool = True) -> None:
        self.root, self.manifest, self.backend = root, manifest, backend
        self.tokenizers = {key: PromptTokenizer(spec, root) for key, spec in manifest.tokenizers.items()}
        self.scheduler_config = msgspec.json.decode((root / manifest.scheduler.path).read_bytes())
        self.max_batch = max_batch or manifest.max_batch
        self.lora = Adapters(root.name, manifest)
        self.sessions = controlnet.wrap(self.lora.wrap(sessions), manifest)
        self.controlnets = controlnet.ControlNets(root, manifest, backend, verify)
        self.info = model_info(root, manifest, backend.name, backend.device, self.max_batch, self.lora,
                               self.controlnets)
        timestep = next(i for i in manifest.components["unet"].inputs if i.name == "timestep")
        self._scalar_timestep = not timestep.shape
        self.previewer = Previewer(self.decode_latents, manifest.latent_channels, manifest.vae_scale_factor,
                                   tiny=self.info.tiny_decoder)

    @property
    def unet_rows(self) -> int | None:
        """The most UNet rows one call runs at its best on this backend (None: no limit); `step` splits above."""
        return self.sessions["unet"].max_rows

    @property
    def adapters(self) -> list[AdapterInfo]:
        """The LoRA adapters this model offers (`load(…, lora_dir=…)`)."""
        return self.lora.infos()

    def load_adapters(self, folder: str | Path | None) -> None:
        """(Re)read the LoRA adapter directory: every `.safetensors` file that fits this model is offered."""
        self.lora.load(folder)
        self.info = msgspec.structs.replace(self.info, adapters=self.lora.infos(), refused_adapters=self.lora.refused)

    def render(self, request: RenderRequest, latents: np.ndarray | None = None, noise: Noise | None = None,
               on_step: StepCallback | None = None, on_partial: PartialCallback | None = None,
               partial_images: int = 0, preview: PreviewMode = "full") -> RenderResult:
        """Render `request.n` images:

            1. check inputs      → a `Job`: every value resolved against the model and checked, and the kind
                                   of input (text, image, inpainting) decided (`engines.job`)
            2. encode the prompt → per-token embeddings (+ SDXL's pooled embedding and time ids)
            3. timesteps         → the sampler's immutable schedule (shortened by `strength` for image inputs)
            4. prepare latents   → noise, or the encoded image noised to the first timestep; and for
                                   inpainting the mask latents
            5. denoise           → per step: the ControlNets of the units active at that step, one UNet
                                   call over the guidance-doubled rows (with their residuals), guidance,
                                   the sampler step (and for inpainting with a plain UNet, the blend)
            6. decode            → the VAE decoder, then pixels in [0, 1]

        Stages 4–6 run per chunk of at most `max_batch` images. Every random draw comes from the image's own
        seed (`noise.SeededNoise`), so image i of seed s is image 0 of seed s + i.

        `latents` is the starting noise ε (n, 4, h, w), as diffusers' `latents` argument (for image inputs:
        the noise mixed into the encoded image); `noise` holds the other draws. Both default to draws from
        the seeds. `on_step(done, total)` follows each chunk's steps; `on_partial` gets `partial_images`
        previews per image (`engines.progress`). Raises `InvalidRequest` for bad input, `EngineFailure`
        when the model fails."""
        # 1–3, and 4 for the first chunk
        rendering = self.begin(request, latents, noise, on_step, on_partial, partial_images, preview)
        while not rendering.finished:
            # 5, and where a chunk took its last step: 6, then 4 for the next chunk
            self.step([rendering])
        return rendering.result()

    def begin(self, request: RenderRequest, latents: np.ndarray | None = None, noise: Noise | None = None,
              on_step: StepCallback | None = None, on_partial: PartialCallback | None = None,
              partial_images: int = 0, preview: PreviewMode = "full") -> Rendering:
        """Stages 1–3, and 4 for the first chunk: a render ready for its first `step` (arguments as `render`)."""
        started = time.perf_counter()
        timings = Timings()
        # 1. Check inputs
        lora = self.lora.choose(request.lora)  # this render's LoRA adapters, fed to its own calls only
        job = self.check_inputs(request)
        hook = StepHook(on_step, on_partial, partial_images, self.previewer, preview)
        try:
            # 2. Encode the prompt
            with timings.stage("text_encoder"), self.lora.applied(lora):
                prompt = self.encode_prompt(job.tokens, job.guided)
            # 3. Timesteps
            schedule = self.timesteps(job)
            rendering = Rendering(job, prompt, schedule, lora, hook, timings, latents, noise, started)
            # 4. Prepare latents (of the first chunk of images)
            rendering.chunk = self.start_chunk(rendering, 0)
        except EngineError:
            raise
        except Exception as exc:
            raise as_engine_error(exc) from exc
        return rendering

    def step(self, renderings: Sequence[Rendering], max_rows: int | None = None) -> None:
        """Stage 5 for each rendering's current chunk: one UNet call over all their rows (they must share a
        `batch_key`; split into calls of `max_rows` at most), then each one's guidance and sampler step;
        where chunks took their last step, 6 (`finish_chunks`, those of one size decoded together) and
        their next chunk's 4. A rendering that fails keeps its error (its `result` raises it); the others
        go on."""
        started = time.perf_counter()
        try:
            # 5. Denoise: the UNet
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
                # 5. Denoise: guidance and the sampler step
                self.advance(rendering, predicted, called)
            except Exception as exc:  # its callback asked to stop, its explicit noise was wrong, …
                rendering.fail(exc)
        # 6. Decode the chunks that took their last step, and 4. prepare their renders' next chunks
        self.finish_chunks([r for r in renderings if r.denoised])

    # -- 1 ------------------------------------------------------------------------------------------

    def check_inputs(self, request: RenderRequest) -> Job:
        """The request resolved against this model (`engines.job`), or InvalidRequest naming the field at fault."""
        return resolve(request, self.info, self.tokenizers, self.scheduler_config)

    def tokenize(self, prompt: str, negative_prompt: str | None) -> Tokens:
        """Both prompts tokenized once, their length checked (InvalidRequest): a server calls this before it
        queues a request and hands the result to the render as `RenderRequest.tokens`."""
        return tokenize(self.info.id, self.tokenizers, prompt, negative_prompt)

    # -- 2 ------------------------------------------------------------------------------------------

    def encode_prompt(self, tokens: Tokens, guided: bool) -> Prompt:
        """Every text encoder over the prompt's windows (and the negative prompt's, when guided), in one
        batch per encoder; the encoders' states are concatenated feature-wise (SDXL)."""
        zero_negative = guided and tokens.negative_prompt is None and self.manifest.force_zeros_for_empty_prompt
        texts = {key: [prompt] if not guided or zero_negative else [negative, prompt]
                 for key, (prompt, negative) in tokens.ids.items()}
        windows = max(self.tokenizers[e.tokenizer].count(ids) for e in self.manifest.text_encoders
                      for ids in texts[e.tokenizer])
        states, pooled = [], None
        for encoder in self.manifest.text_encoders:
            tokenizer = self.tokenizers[encoder.tokenizer]
            ids = np.concatenate([tokenizer.windows(t, windows) for t in texts[encoder.tokenizer]])
            names = [encoder.hidden_output] + ([encoder.pooled_output] if encoder.pooled_output else [])
            out = self.sessions[encoder.component].run({"input_ids": ids}, names)
            hidden = out[encoder.hidden_output]
            count = len(texts[encoder.tokenizer])
            states.append(hidden.reshape(count, windows * hidden.shape[1], hidden.shape[2]))
            if encoder.pooled_output:  # the pooled embedding of each text's first window
                pooled = out[encoder.pooled_output].reshape(count, windows, -1)[:, 0]
        embeds = np.concatenate(states, axis=-1)
        if zero_negative:  # SDXL without a negative prompt: zero negative conditioning, as trained
            embeds = np.concatenate([np.zeros_like(embeds), embeds])
            pooled = None if pooled is None else np.concatenate([np.zeros_like(pooled), pooled])
        return Prompt(embeds, pooled)

    # -- 3 ------------------------------------------------------------------------------------------

    @staticmethod
    def timesteps(job: Job) -> schedulers.Schedule:
        """The sampler's schedule for `job.steps`, shortened by strength (`limits.schedule_steps` lengthened it
        where a low strength would keep no step: beyond the sampler's longest schedule, strength is at fault)."""
        try:
            return job.scheduler.schedule(job.steps, job.strength)
        except InvalidRequest as exc:
            if job.steps == job.request.steps:
                raise
            raise InvalidRequest("strength", f"strength {job.strength:g} is too low: one step would need a longer "
                                 f"schedule than this sampler's ({exc.message}); raise strength") from exc

    # -- 4 ------------------------------------------------------------------------------------------

    def start_chunk(self, rendering: Rendering, first: int) -> Chunk | None:
        """The chunk of images from `first` (None past the last): its latents, mask latents and UNet inputs."""
        job, n = rendering.job, rendering.job.request.n
        if first >= n:
            return None
        chunk = slice(first, min(n, first + self.max_batch))
        scale = self.manifest.vae_scale_factor
        draws = SeededNoise(job.seeds[chunk], (self.manifest.latent_channels, job.height // scale, job.width // scale))
        noise, timings = rendering.noise or Noise(), rendering.timings
        x, start, image_latents = self.prepare_latents(job, rendering.schedule, draws, chunk, rendering.latents,
                                                       noise, timings)
        mask_input, blend = None, None
        if job.inputs.masking == "condition":
            mask_input = self.prepare_mask_latents(job, draws, chunk, noise, timings)
        elif job.inputs.masking == "blend":
            blend = Blend(self.latent_mask(job), image_latents, start)
        conditioning = unet_feeds.text_conditioning(job, rendering.prompt, x.shape[0],
                                                    self.manifest.requires_aesthetics_score)
        return Chunk(chunk, draws, x, conditioning, mask_input, blend)

    def prepare_latents(self, job: Job, schedule: schedulers.Schedule, draws: SeededNoise, chunk: slice,
                        latents: np.ndarray | None, noise: Noise, timings: Timings
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The chunk's starting latents, the starting noise ε they hold, and the image's latents where a
        later stage needs them: noise scaled to the first σ, or the image's latents noised to the first
        timestep."""
        start = given(latents, chunk, draws.draw())
        image_latents = None
        if job.inputs.image is not None:
            posterior = given(noise.posterior, chunk, draws.draw())
            if job.inputs.needs_image_latents:
                with timings.stage("vae_encoder"):
                    image_latents = self.encode_image(job.inputs.image, posterior)
        if job.inputs.from_noise:
            x = start * schedule.init_noise_sigma
        else:
            x = job.scheduler.add_noise(schedule, 0, image_latents, start)
        return x.astype(np.float32), start, image_latents

    def prepare_mask_latents(self, job: Job, draws: SeededNoise, chunk: slice, noise: Noise, timings: Timings
                             ) -> np.ndarray:
        """9-channel UNets: the mask at latent size and the masked image's latents, side by side as the UNet's
        extra input channels, one row per UNet row."""
        masked_posterior = given(noise.masked_posterior, chunk, draws.draw())
        with timings.stage("vae_encoder"):
            masked = self.encode_image(job.inputs.image * (job.inputs.mask < 0.5), masked_posterior)
        mask = np.repeat(self.latent_mask(job), masked.shape[0] * job.copies, axis=0)
        return np.concatenate([mask, np.tile(masked, (job.copies, 1, 1, 1))], axis=1)

    def latent_mask(self, job: Job) -> np.ndarray:
        """The mask at latent size: nearest neighbour, as diffusers."""
        scale = self.manifest.vae_scale_factor
        return job.inputs.mask[:, :, ::scale, ::scale]

    def encode_image(self, image: np.ndarray, epsilon: np.ndarray) -> np.ndarray:
        """VAE encoder → a sample of the latent distribution per ε (one per image), scaled."""
        moments = self.sessions["vae_encoder"].run({"sample": image}, ["latent_parameters"])["latent_parameters"]
        mean, logvar = np.split(moments, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        return ((mean + std * epsilon) * self.manifest.vae_scaling_factor).astype(np.float32)

    # -- 5 ------------------------------------------------------------------------------------------

    def batch_key(self, rendering: Rendering) -> tuple:
        """Renderings with equal keys may share a UNet call (`unet_feeds.batch_key`)."""
        return unet_feeds.batch_key(rendering, self._scalar_timestep)

    def predict_noise(self, renderings: Sequence[Rendering], max_rows: int | None = None) -> list[np.ndarray]:
        """The UNet over every rendering's rows at once, split back per rendering. Calls beyond `max_rows` or
        the backend's rows per call (`unet_rows`: TensorRT's largest batch profile) are split, never refused."""
        if len({self.batch_key(r) for r in renderings}) != 1:
            raise ValueError("these renders cannot share a UNet call (different batch keys)")
        inputs = [unet_feeds.step_inputs(r, self._scalar_timestep) for r in renderings]
        inputs = self.controlnets.guide([(r.job.controls, r.progress) for r in renderings], inputs)  # + residuals
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
        """After the UNet call (`called` seconds): guidance, the sampler step, the blend of plain-UNet
        inpainting, and the progress hook (which may stop the render, or show its x0 estimate)."""
        started = time.perf_counter()
        job, schedule, chunk, noise = rendering.job, rendering.schedule, rendering.chunk, rendering.noise
        assert chunk is not None
        i = chunk.step
        if job.guided:
            uncond, cond = np.split(predicted, 2)
            predicted = uncond + job.request.guidance_scale * (cond - uncond)
        step_noise = None
        if job.scheduler.draws_noise(schedule, i):  # the k-th drawing step takes the k-th explicit array
            explicit = noise.steps[chunk.drawn] if noise and noise.steps and chunk.drawn < len(noise.steps) else None
            step_noise = given(explicit, chunk.images, chunk.draws.draw())
            chunk.drawn += 1
        chunk.previous = job.scheduler.step(schedule, i, predicted, chunk.x, previous=chunk.previous, noise=step_noise)
        chunk.x = chunk.previous.prev_sample
        if chunk.blend is not None:  # plain-UNet inpainting: outside the mask, the image at the next noise level
            chunk.x = chunk.blend.apply(job.scheduler, schedule, i, chunk.x)
        chunk.step += 1
        rendering.hook(chunk.step, len(schedule.timesteps), chunk.images.start, chunk.previous.denoised)
        elapsed = called + time.perf_counter() - started
        rendering.timings.steps.append(elapsed)
        rendering.timings.stages["unet"] = rendering.timings.stages.get("unet", 0.0) + elapsed

    # -- 6 ------------------------------------------------------------------------------------------

    def finish_chunks(self, renderings: Sequence[Rendering]) -> None:
        """6. Decode the chunks that took their last step, those of one latent size and decoder in one call (at
        most `max_batch` images, what a chunk of one render may hold), then 4. prepare each render's next chunk.
        A shared decode that fails is repeated per render, so that only the one at fault fails."""
        sizes: dict[tuple, list[Rendering]] = {}
        for rendering in renderings:
            sizes.setdefault((_chunk(rendering).x.shape[1:], rendering.job.request.decoder), []).append(rendering)
        for (_, decoder), same_size in sizes.items():
            pack: list[Rendering] = []
            for rendering in same_size:
                if pack and sum(_chunk(r).x.shape[0] for r in pack) + _chunk(rendering).x.shape[0] > self.max_batch:
                    self._decode_together(pack, decoder)
                    pack = []
                pack.append(rendering)
            self._decode_together(pack, decoder)

    def _decode_together(self, renderings: list[Rendering], decoder: str) -> None:
        started = time.perf_counter()
        try:
            pixels = self.decode_latents(np.concatenate([_chunk(r).x for r in renderings]), decoder)
        except Exception as exc:
            if len(renderings) == 1:
                renderings[0].fail(exc)
                return
            for rendering in renderings:
                self._decode_together([rendering], decoder)
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

    def decode_latents(self, x: np.ndarray, decoder: str = "full") -> np.ndarray:
        """The VAE decoder (with "tiny" the model's TAESD); above the native size and the tiling threshold in
        overlapping tiles (`vae_tiling`), capping memory. Native sizes decode whole, exact."""
        component, scaling = self.manifest.decoder(decoder)
        latents, session = x / scaling, self.sessions[component]
        scale, defaults = self.manifest.vae_scale_factor, self.manifest.defaults
        native = (defaults.width // scale) * (defaults.height // scale)
        decoded = vae_tiling.decode(lambda z: session.run({"latent_sample": z}, ["sample"])["sample"], latents,
                                    scale, threshold=max(self.backend.tile_above, native))
        return images.to_pixels(decoded)

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()
        self.controlnets.close()


def _chunk(rendering: Rendering) -> Chunk:
    assert rendering.chunk is not None  # a denoised chunk, until its decode
    return rendering.chunk


def load(model_dir: str | Path, backend: str = "auto", threads: int | None = None, verify: bool = True,
         max_batch: int | None = None, lora_dir: str | Path | None = None, precision: str = "auto") -> Pipeline:
    """Open a model directory: read and check its manifest, then create every component's session once
    (`precision`: what the openvino backend computes in)."""
    root = Path(model_dir)
    manifest = read_manifest(root, verify)
    chosen, sessions = open_sessions(root, manifest, backend, threads, verify=verify, precision=precision)
    log.info("loaded %s (%s/%s) on %s", root.name, manifest.family, manifest.variant, chosen.device)
    pipeline = Pipeline(root, manifest, chosen, sessions, max_batch, verify)
    if lora_dir is not None:
        pipeline.load_adapters(lora_dir)
    return pipeline
