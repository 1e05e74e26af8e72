"""`model.json`: the one contract between `export/` (which writes it) and `engines/` (which reads it).

A model directory holds one ONNX graph per component, the tokenizers, the scheduler config and this
manifest. Everything the runtime needs to know about the model is stated here, so the runtime never
guesses from file names or tensor shapes. Every file the manifest names carries its sha256, checked on
load: a file existing is never enough.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path
from typing import Literal

import msgspec

from engines.errors import InvalidRequest, ModelInvalid, ModelNotFound

FORMAT_VERSION = 1
MANIFEST_FILE = "model.json"

Family = Literal["sd1", "sd2", "sdxl"]
Variant = Literal["base", "inpaint", "turbo"]
PredictionType = Literal["epsilon", "v_prediction"]
Precision = Literal["fp32", "fp16"]
OptimizedFor = Literal["cpu", "cuda"]
Sampler = Literal["euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "lcm"]
SAMPLERS: tuple[str, ...] = ("euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "lcm")


class TensorSpec(msgspec.Struct, frozen=True):
    """One graph input or output. Integer dims are fixed; string dims are named dynamic axes."""

    name: str
    dtype: str
    shape: list[int | str]


class FileRef(msgspec.Struct, frozen=True):
    path: str  # relative to the model directory
    sha256: str
    bytes: int


class Component(msgspec.Struct, frozen=True):
    """One ONNX graph: its file (and external weights file, if any), precision and signature."""

    graph: FileRef
    precision: Precision
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external_data: FileRef | None = None
    # Added after format 1 shipped (None: the raw traced graph). "cuda": fused operators with CUDA kernels
    # only (export --optimize cuda), which the CPU provider cannot run; "cpu": fusions every provider runs.
    optimized_for: OptimizedFor | None = None

    def files(self) -> list[FileRef]:
        return [self.graph] if self.external_data is None else [self.graph, self.external_data]


class Tokenizer(msgspec.Struct, frozen=True):
    """A CLIP tokenizer, with the ids the prompt windows need: `file` is a `tokenizers` JSON file, or with
    `merges` set, the vocab.json of transformers' slow layout (vocab.json + merges.txt, as optimum writes)."""

    file: FileRef
    max_length: int
    bos_id: int
    eos_id: int
    pad_id: int
    merges: FileRef | None = None  # added after format 1 shipped; the default keeps older files readable

    def files(self) -> list[FileRef]:
        return [self.file] if self.merges is None else [self.file, self.merges]


class TextEncoder(msgspec.Struct, frozen=True):
    """Which graph outputs a text encoder contributes: the per-token states and, for SDXL's second
    encoder, the pooled embedding."""

    component: str  # key into Manifest.components
    tokenizer: str  # key into Manifest.tokenizers
    hidden_output: str  # e.g. "last_hidden_state" (SD 1.x/2.x) or "hidden_states.11" (SDXL, penultimate)
    pooled_output: str | None = None  # e.g. "text_embeds" (SDXL's text_encoder_2)


class Sizes(msgspec.Struct, frozen=True):
    """Render sizes this model accepts: both sides in [min, max] and multiples of step."""

    min: int
    max: int
    step: int

    def allows(self, side: object) -> bool:
        return isinstance(side, int) and not isinstance(side, bool) and self.min <= side <= self.max \
            and side % self.step == 0

    def contains(self, width: int, height: int) -> bool:
        return self.allows(width) and self.allows(height)

    @property
    def rule(self) -> str:
        return f"both sides must be multiples of {self.step} from {self.min} to {self.max}"

    def check(self, width: object, height: object, model: str, params: tuple[str, str] = ("size", "size")) -> None:
        """InvalidRequest unless both sides fit; `params` name the width's and the height's field (A1111 has
        one for each, OpenAI one for both)."""
        for param, side in zip(params, (width, height), strict=True):
            if not self.allows(side):
                raise InvalidRequest(param, f"size {width}x{height} is not supported by model '{model}': {self.rule}")


class Defaults(msgspec.Struct, frozen=True):
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: Sampler


class Source(msgspec.Struct, frozen=True):
    """Where the weights came from, enough to rebuild the PyTorch reference (bench, tests)."""

    kind: Literal["hub", "folder", "single_file", "random"]
    id: str  # hub id, folder path, checkpoint file name, or the random preset's name
    revision: str | None = None
    sha256: str | None = None  # single-file checkpoints
    seed: int | None = None  # random presets


class Profile(msgspec.Struct, frozen=True):
    """A TensorRT optimization profile in request terms: images per render chunk and pixel sizes, each as
    (min, opt, max). A static profile has one size (the fastest plans); a dynamic one a range. The UNet's
    batch is doubled inside for classifier-free guidance (`engines.plans` derives every tensor's shape)."""

    kind: Literal["static", "dynamic"]
    batch: tuple[int, int, int]
    width: tuple[int, int, int]
    height: tuple[int, int, int]

    @property
    def label(self) -> str:
        batch = f"b{self.batch[0]}-{self.batch[2]}"
        if self.kind == "static":
            return f"{self.width[0]}x{self.height[0]} {batch}"
        return f"dynamic {self.width[0]}-{self.width[2]}x{self.height[0]}-{self.height[2]} {batch}"


class PlanSet(msgspec.Struct, frozen=True, kw_only=True):
    """TensorRT plans for every component, valid only for the ONNX graphs, profiles, TensorRT version and
    GPU compute capability that `key` hashes (`engines.plans.plan_key`). Plan files live under
    `tensorrt/<key>/`; they are checked when the set is selected, not by `read`, so that a missing plan
    costs the TensorRT backend, never the model."""

    key: str
    tensorrt_version: str
    compute_capability: str  # "9.0": plans run only on GPUs of exactly this capability
    device: str  # the GPU it was built on, for people
    profiles: list[Profile]
    optimization_level: int
    plans: dict[str, FileRef]  # component → plan file


class LoraSupport(msgspec.Struct, frozen=True):
    """The text encoders and UNet were exported with LoRA branches (`export --lora-rank`): `rank` is the
    largest total rank a render may feed; `layers_per_block` maps kohya's SDXL (sgm) block numbers."""

    rank: int
    layers_per_block: int


class TinyDecoder(msgspec.Struct, frozen=True):
    """A tiny decoder (TAESD, diffusers' `AutoencoderTiny`) beside the VAE: a fast approximate decode, for
    previews and, per request, final images. Its graph is `components[component]` (`latent_sample` →
    `sample` in [-1, 1]); latents are divided by `scaling_factor` (TAESD's is 1.0) before it."""

    component: str
    source: str  # hub id, folder or "random", as given to `export --tiny-decoder`
    scaling_factor: float = 1.0
class ControlNet(msgspec.Struct, frozen=True, kw_only=True):
    """A ControlNet exported for this model (`python -m export controlnet SOURCE --for MODEL_DIR`), its graph
    under `controlnets/<name>/`. It serves every model of its `family` whose UNet takes residuals of the
    same names, widths and scales (`Residuals`) and whose cross-attention is as wide. Its files are
    checked when the engine loads it, not by `read`: a broken ControlNet costs itself, never the model."""

    component: Component  # inputs: sample, timestep, encoder_hidden_states, controlnet_cond (+ SDXL's two)
    family: Family
    cross_attention_dim: int
    conditioning_channels: int  # channels of the control image (3: RGB in 0..1)
    source: Source
    exporter: dict[str, str]

    def files(self) -> list[FileRef]:
        return self.component.files()


class Residuals(msgspec.Struct, frozen=True):
    """The UNet takes ControlNet residuals as inputs (`export --controlnet`): `down` names one per down-block
    output (conv_in's, each resnet's and downsampler's), `mid` the mid block's; their shapes are in the
    UNet component's inputs. A render without ControlNet feeds zeros."""

    down: list[str]
    mid: str


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    format_version: int = FORMAT_VERSION
    name: str
    family: Family
    variant: Variant
    prediction_type: PredictionType
    defaults: Defaults
    sizes: Sizes
    max_batch: int
    unet_in_channels: int  # 4, or 9 for inpainting UNets (latents + mask + masked-image latents)
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    vae_scaling_factor: float
    force_zeros_for_empty_prompt: bool = False  # SDXL: no negative prompt → zero negative embeddings
    requires_aesthetics_score: bool = False  # SDXL refiner-style time ids
    text_encoders: list[TextEncoder]
    components: dict[str, Component]
    tokenizers: dict[str, Tokenizer]
    scheduler: FileRef  # diffusers scheduler_config.json
    source: Source
    exporter: dict[str, str]  # library versions and opset that produced the graphs
    # Added after format 1 shipped: the default keeps older model.json files readable (no format bump).
    tensorrt: list[PlanSet] = []
    lora: LoraSupport | None = None
    tiny_decoder: TinyDecoder | None = None
    residuals: Residuals | None = None  # None: exported before ControlNet support, or without --controlnet
    controlnets: dict[str, ControlNet] = {}

    def decoder(self, name: str) -> tuple[str, float]:
        """The component and the latents' scaling factor of a final decoder: "full" the VAE's, "tiny" TAESD's."""
        if name == "tiny" and self.tiny_decoder is not None:
            return self.tiny_decoder.component, self.tiny_decoder.scaling_factor
        return "vae_decoder", self.vae_scaling_factor

    def files(self) -> list[FileRef]:
        refs = [self.scheduler, *(f for t in self.tokenizers.values() for f in t.files())]
        for component in self.components.values():
            refs.extend(component.files())
        return refs


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_ref(root: Path, relative: str) -> FileRef:
    path = root / relative
    return FileRef(path=relative, sha256=sha256_file(path), bytes=path.stat().st_size)


def encode(manifest: Manifest) -> bytes:
    """Stable, human-readable JSON: the same manifest always gives the same bytes."""
    return msgspec.json.format(msgspec.json.encode(manifest, order="sorted"), indent=2) + b"\n"


def read(model_dir: Path | str, verify: bool = True) -> Manifest:
    """Read and validate `model.json`; with `verify`, check every named file's size and sha256."""
    root = Path(model_dir)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ModelNotFound(str(root), f"no model directory at {root} (missing {MANIFEST_FILE}, and no "
                            "model_index.json of an ONNX pipeline folder in the optimum layout either)")
    try:
        manifest = msgspec.json.decode(path.read_bytes(), type=Manifest)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ModelInvalid(f"{path}: {exc}") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise ModelInvalid(
            f"{path}: manifest format {manifest.format_version}, this sdserve reads {FORMAT_VERSION};"
            " re-export the model"
        )
    check_files(root, manifest, hashes=verify)
    return manifest


def check_files(root: Path, manifest: Manifest, hashes: bool = True) -> None:
    check_refs(root, manifest.files(), hashes)


def check_refs(root: Path, refs: list[FileRef], hashes: bool = True) -> None:
    for ref in refs:
        path = root / ref.path
        if not path.is_file():
            raise ModelInvalid(f"{root}: {ref.path} is missing")
        if path.stat().st_size != ref.bytes:
            raise ModelInvalid(f"{root}: {ref.path} has {path.stat().st_size} bytes, manifest says {ref.bytes}")
        if hashes and sha256_file(path) != ref.sha256:
            raise ModelInvalid(f"{root}: {ref.path} does not match its sha256 in {MANIFEST_FILE}")


def sdserve_version() -> str:
    """The installed sdserve's version, as manifests record it and servers report it ("unknown" when run
    from a source tree that is not installed)."""
    try:
        return metadata.version("sdserve")
    except metadata.PackageNotFoundError:
        return "unknown"
