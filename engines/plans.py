"""TensorRT plans without TensorRT: the profiles a build asks for, the tensor shapes they mean for each
component, the key that says when a plan is valid, which profile fits a call, and which plan set (if
any) this GPU may load.

Everything here is pure (msgspec, numpy and the manifest), so the exporter (which builds plans) and the
TensorRT backend (which runs them) derive the same shapes and padding from the same rules, and the tests
check those rules on a machine without a GPU.

Shapes come from the graphs' own signatures in the manifest: fixed dimensions are kept, and each named
dynamic axis ("batch", "height", "width", "sequence") gets a (min, opt, max) range per component:

    component      batch (rows)                      height/width         sequence
    text_encoder*  1 … 2·MAX_PROMPT_WINDOWS          –                    tokenizer length
    unet           images·(1 or 2 for guidance)      latent (pixels / 8)  1 … MAX_PROMPT_WINDOWS windows
    vae_decoder    images                            latent              (tiny_vae_decoder alike)
    vae_encoder    1 … images                        pixels
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import msgspec
import numpy as np

from engines import limits
from engines import manifest as mf
from engines.errors import EngineFailure

log = logging.getLogger("sdserve.engines")

PLANS_DIR = "tensorrt"  # under the model directory: tensorrt/<key>/<component>.plan, tensorrt/timing-*.cache
# Bump when the way plans are built changes (network flags, shape rules): older plans then stop matching.
PLAN_FORMAT = 1
MAX_PROMPT_WINDOWS = 3  # prompts up to 3 × 77 tokens run on the plans; longer ones on ONNX Runtime
PAD_LIMIT = 0.25  # pad a batch up to its bucket when that adds at most this share of rows
BATCH_AXIS = "batch"  # the manifest's name of the rows axis

Range = tuple[int, int, int]
Shapes = Mapping[str, Sequence[int]]


class InputRange(msgspec.Struct, frozen=True):
    """One input's shapes in one profile, as `IOptimizationProfile.set_shape` takes them."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(
            lo <= dim <= hi for lo, dim, hi in zip(self.min, shape, self.max, strict=True))


class ShapeProfile(msgspec.Struct, frozen=True):
    """One component's optimization profile. `static` means the pixel size is fixed, so the same shapes
    recur and the backend captures CUDA graphs for them."""

    static: bool
    inputs: tuple[InputRange, ...]

    def fits(self, shapes: Shapes) -> bool:
        return all(r.name in shapes and r.contains(shapes[r.name]) for r in self.inputs)

    @property
    def batch(self) -> Range:
        first = self.inputs[0]
        return first.min[0], first.opt[0], first.max[0]


# -- profiles in request terms ---------------------------------------------------------------------


def make_profiles(manifest: mf.Manifest, sizes: Sequence[tuple[int, int]] = (), batch: tuple[int, int] | None = None,
                  dynamic: tuple[int, int] | None = None) -> list[mf.Profile]:
    """A static profile per size (default: the model's native size) and, with `dynamic` (min and max
    side), one profile over that range. `batch` is images per render chunk (default 1 to max_batch).
    Raises ValueError naming the option at fault."""
    low, high = batch or (1, manifest.max_batch)
    if not 1 <= low <= high:
        raise ValueError(f"--batch {low}-{high}: need 1 <= min <= max")
    images = (low, low, high)
    native = (manifest.defaults.width, manifest.defaults.height)
    profiles = []
    for width, height in dict.fromkeys(sizes or [native]):  # ordered, without repeats
        if not manifest.sizes.contains(width, height):
            raise ValueError(f"--sizes {width}x{height}: {manifest.name} renders sides from {manifest.sizes.min} "
                             f"to {manifest.sizes.max} in steps of {manifest.sizes.step}")
        profiles.append(mf.Profile("static", images, (width, width, width), (height, height, height)))
    if dynamic is not None:
        smallest, largest = dynamic
        if smallest > largest or not manifest.sizes.contains(smallest, largest):
            raise ValueError(f"--dynamic {smallest}-{largest}: need min <= max, both from {manifest.sizes.min} to "
                             f"{manifest.sizes.max} in steps of {manifest.sizes.step}")
        opt_w, opt_h = (min(max(side, smallest), largest) for side in native)
        profiles.append(mf.Profile("dynamic", images, (smallest, opt_w, largest), (smallest, opt_h, largest)))
    return profiles


# -- shapes per component --------------------------------------------------------------------------


def component_profiles(manifest: mf.Manifest, component: str, profiles: Sequence[mf.Profile]) -> list[ShapeProfile]:
    """The optimization profiles of one component's plan, in build order. Profiles that come out equal
    are merged (the text encoders do not depend on the image size), so the index of a profile in this
    list is its index in the plan."""
    result: list[ShapeProfile] = []
    for profile in profiles:
        shaped = _shape_profile(manifest, component, profile)
        if shaped not in result:
            result.append(shaped)
    return result


def _shape_profile(manifest: mf.Manifest, component: str, profile: mf.Profile) -> ShapeProfile:
    axes = _axes(manifest, component, profile)
    ranges = []
    for spec in manifest.components[component].inputs:
        dims = []
        for dim in spec.shape:
            if isinstance(dim, int):
                dims.append((dim, dim, dim))
            elif dim in axes:
                dims.append(axes[dim])
            else:
                raise ValueError(f"{component}.{spec.name}: no TensorRT shape rule for the dynamic axis {dim!r}")
        ranges.append(InputRange(spec.name, *(tuple(d[i] for d in dims) for i in range(3))))
    static = profile.kind == "static" or _is_text_encoder(manifest, component)
    return ShapeProfile(static=static, inputs=tuple(ranges))


def _axes(manifest: mf.Manifest, component: str, profile: mf.Profile) -> dict[str, Range]:
    axes = _component_axes(manifest, component, profile)
    if manifest.lora is not None:  # LoRA inputs: rank 1 (zeros) without adapters, up to the export's cap
        axes["lora_rank"] = (1, 1, manifest.lora.rank)
    for spec in manifest.components[component].inputs:  # ControlNet residuals: "height/2" is ceil(height / 2)
        for dim in spec.shape:
            base, _, divisor = str(dim).partition("/")
            if divisor and base in axes:
                axes[str(dim)] = tuple(-(-side // int(divisor)) for side in axes[base])
    return axes


def _component_axes(manifest: mf.Manifest, component: str, profile: mf.Profile) -> dict[str, Range]:
    low, opt, high = profile.batch
    copies = limits.rows_per_image(manifest.defaults.guidance_scale)  # what the model's default render feeds
    scale = manifest.vae_scale_factor
    pixels = {"height": profile.height, "width": profile.width}
    latent = {axis: (r[0] // scale, r[1] // scale, r[2] // scale) for axis, r in pixels.items()}
    tokens = _tokens_per_window(manifest, component)
    if _is_text_encoder(manifest, component):  # (negative +) prompt, in windows of `tokens`
        return {"batch": (1, copies, 2 * MAX_PROMPT_WINDOWS), "sequence": (tokens, tokens, tokens)}
    if component == "unet":  # guidance doubles the rows: the negative half first
        return {"batch": (low, opt * copies, high * 2), **latent,
                "sequence": (tokens, tokens, tokens * MAX_PROMPT_WINDOWS)}
    if component in ("vae_decoder", "tiny_vae_decoder"):
        return {"batch": (low, opt, high), **latent}
    if component == "vae_encoder":  # the pipeline encodes one image per render
        return {"batch": (1, 1, high), **pixels}
    raise ValueError(f"no TensorRT shape rules for the component {component!r}")


def _is_text_encoder(manifest: mf.Manifest, component: str) -> bool:
    return any(e.component == component for e in manifest.text_encoders)


def _tokens_per_window(manifest: mf.Manifest, component: str) -> int:
    encoder = next((e for e in manifest.text_encoders if e.component == component), manifest.text_encoders[0])
    return manifest.tokenizers[encoder.tokenizer].max_length


# -- at run time -----------------------------------------------------------------------------------


def choose_profile(profiles: Sequence[ShapeProfile], shapes: Shapes) -> int | None:
    """The plan profile to run `shapes` on: a static one when one fits (fastest, and CUDA graphs), else
    a dynamic one, else None (the backend then runs that call on ONNX Runtime)."""
    for wanted in (True, False):
        for index, profile in enumerate(profiles):
            if profile.static == wanted and profile.fits(shapes):
                return index
    return None


def batch_buckets(profile: ShapeProfile) -> list[int]:
    """Row counts a profile prefers: its opt batch, the powers of two in range and its max."""
    low, opt, high = profile.batch
    powers = [1 << k for k in range(high.bit_length()) if low <= 1 << k <= high]
    return sorted({opt, high, *powers})


def padded_batch(rows: int, profile: ShapeProfile) -> int:
    """Rows to run `rows` at. Padding up to the next bucket (repeating the last row, dropped afterwards)
    pays when it adds few rows: TensorRT tuned its kernels for the opt batch, and a recurring shape replays
    one captured CUDA graph instead of capturing another. Beyond PAD_LIMIT the extra rows cost more."""
    low, _, high = profile.batch
    if not low <= rows <= high:
        raise ValueError(f"batch {rows} is outside the profile's {low}-{high}")
    bucket = next(b for b in batch_buckets(profile) if b >= rows)
    return bucket if bucket - rows <= PAD_LIMIT * rows else rows


def batch_inputs(component: mf.Component) -> frozenset[str]:
    """The inputs whose first axis is the batch. The others (LoRA's rank-shaped matrices, a scalar
    timestep) are the same for every row: padding must leave them alone."""
    return frozenset(t.name for t in component.inputs if t.shape and t.shape[0] == BATCH_AXIS)


def call_rows(feeds: Mapping[str, np.ndarray], batched: frozenset[str]) -> int:
    """The rows of one call: the first axis of its batch inputs (1 when it has none)."""
    return next((feeds[name].shape[0] for name in feeds if name in batched), 1)


def pad_rows(feeds: Mapping[str, np.ndarray], batched: frozenset[str], rows: int) -> dict[str, np.ndarray]:
    """`feeds` with every batch input padded to `rows` by repeating its last row (their outputs are
    dropped afterwards); every other input as it is, 0-d ones included."""
    padded = {}
    for name, array in feeds.items():
        if name in batched and array.shape[0] < rows:
            array = np.concatenate([array, np.repeat(array[-1:], rows - array.shape[0], axis=0)])
        padded[name] = array
    return padded


# -- validity --------------------------------------------------------------------------------------


def plan_key(manifest: mf.Manifest, profiles: Sequence[mf.Profile], tensorrt_version: str,
             compute_capability: str) -> str:
    """A hash of everything that makes a plan set valid: the ONNX graphs' content, their precision, the
    profiles (and the per-component shapes derived from them), the TensorRT version and the GPU's compute
    capability. The builder's optimization level is left out: it changes speed, not validity."""
    payload = {
        "format": PLAN_FORMAT,
        "components": {
            name: {"onnx": [ref.sha256 for ref in component.files()], "precision": component.precision,
                   "shapes": component_profiles(manifest, name, profiles)}
            for name, component in manifest.components.items()
        },
        "profiles": list(profiles),
        "tensorrt": tensorrt_version,
        "compute_capability": compute_capability,
    }
    return hashlib.sha256(msgspec.json.encode(payload, order="sorted")).hexdigest()[:16]


def plan_path(key: str, component: str) -> str:
    return f"{PLANS_DIR}/{key}/{component}.plan"


def select(root: Path, manifest: mf.Manifest, tensorrt_version: str, compute_capability: str,
           verify: bool = True) -> mf.PlanSet:
    """The plan set this GPU and TensorRT may load. A set built for another GPU or TensorRT version is
    never returned; neither is one whose graphs changed since or whose files are missing or altered.
    Raises EngineFailure with the reason, which callers log before falling back to ONNX Runtime."""
    here = f"compute capability {compute_capability}, TensorRT {tensorrt_version}"
    candidates = [s for s in manifest.tensorrt
                  if s.tensorrt_version == tensorrt_version and s.compute_capability == compute_capability]
    if not candidates:
        built = "; ".join(f"compute capability {s.compute_capability}, TensorRT {s.tensorrt_version}"
                          for s in manifest.tensorrt) or "none"
        raise EngineFailure(f"{root.name}: no TensorRT plans for this GPU ({here}); built for: {built}. "
                            f"Build them with: python -m export {manifest.name} --tensorrt --output {root}")
    plan_set = candidates[-1]
    expected = plan_key(manifest, plan_set.profiles, tensorrt_version, compute_capability)
    if plan_set.key != expected:
        raise EngineFailure(f"{root.name}: the TensorRT plans {plan_set.key} no longer match the model's graphs; "
                            f"rebuild them with: python -m export {manifest.name} --tensorrt --output {root}")
    missing = sorted(set(manifest.components) - set(plan_set.plans))
    if missing:
        raise EngineFailure(f"{root.name}: TensorRT plan set {plan_set.key} has no plan for {', '.join(missing)}")
    try:
        mf.check_refs(root, list(plan_set.plans.values()), hashes=verify)
    except EngineFailure as exc:
        raise EngineFailure(f"TensorRT plan set {plan_set.key}: {exc}") from exc
    return plan_set


def with_plan_set(manifest: mf.Manifest, plan_set: mf.PlanSet) -> tuple[mf.Manifest, list[mf.PlanSet]]:
    """The manifest listing `plan_set`, and the sets it replaces: one set per GPU compute capability and
    TensorRT version, so that a rebuild with other profiles supersedes the old plans."""
    replaced = [s for s in manifest.tensorrt if s.key == plan_set.key or (
        s.tensorrt_version == plan_set.tensorrt_version and s.compute_capability == plan_set.compute_capability)]
    kept = [s for s in manifest.tensorrt if s not in replaced]
    return msgspec.structs.replace(manifest, tensorrt=[*kept, plan_set]), [s for s in replaced if s.key != plan_set.key]
