"""`python -m export PRESET --tensorrt`: TensorRT plans for a model directory's ONNX graphs.

One plan per component (text encoders, UNet, VAE) from the graphs the manifest names, each with the
optimization profiles of `engines.plans.make_profiles` (a static profile per size, an optional dynamic
one). Plans go to `MODEL_DIR/tensorrt/<key>/`, where the key hashes everything that makes them valid
(`engines.plans.plan_key`); a set whose key is already listed and whose files check out is not built
again. The builder's timing cache, `MODEL_DIR/tensorrt/timing-<capability>-<version>.cache`, is reused by
later builds on the same kind of GPU and TensorRT.

Precision: networks are strongly typed, so each plan computes in exactly the types of its graph, the
fp16 conversion that the export checked against PyTorch, and a VAE exported in fp32 (the default, as
the SDXL VAE overflows in fp16) stays fp32. Plans are therefore built from an fp16 export: a model whose
UNet is fp32 is refused with the command that fixes it, rather than turned into a slow fp32 plan.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import Annotated, Any

import msgspec

from engines import gpu, plans
from engines import manifest as mf
from engines.errors import EngineError
from export import model_dir
from export.errors import ExportError
from export.exporter import ExportSettings, output_dir

log = logging.getLogger("sdserve.export")

WORKSPACE_SHARE = 0.9  # of the GPU memory free when a component's build starts


class PlanSettings(msgspec.Struct, frozen=True, kw_only=True):
    model_dir: str
    sizes: list[tuple[int, int]] = []  # static profiles; default the model's native size
    batch: tuple[int, int] | None = None  # images per render chunk; default 1 to the model's max_batch
    dynamic: tuple[int, int] | None = None  # side range of an extra dynamic profile
    optimization_level: Annotated[int, msgspec.Meta(ge=0, le=5)] = 3


class PlanReport(msgspec.Struct, frozen=True):
    name: str
    bytes: int
    seconds: float


class PlanSetReport(msgspec.Struct, frozen=True):
    model_dir: str
    key: str
    device: str
    profiles: list[str]
    built: bool  # False: a valid set with this key existed
    components: list[PlanReport]
    seconds: float


def require() -> gpu.Gpu:
    """The GPU to build for; one clear ExportError where TensorRT, cuda-python or a GPU is missing."""
    try:
        return gpu.probe()
    except EngineError as exc:
        raise ExportError(f"--tensorrt: {exc}") from None


def needs_export(settings: ExportSettings) -> bool:
    """Whether `--tensorrt` must export the model first: not when the output already holds a model of
    this preset and --force is not given (plans are then built for it as it is). Checks TensorRT first,
    so that a machine without it fails before any slow work and writes nothing."""
    require()
    target = output_dir(settings)
    if settings.force or not (target / mf.MANIFEST_FILE).is_file():
        if settings.precision != "fp16":
            raise ExportError("--tensorrt builds plans from an fp16 export; drop --precision fp32")
        return True
    if settings.model or settings.revision or settings.config:
        raise ExportError(f"{target} already holds a model: drop --model/--revision/--config to build TensorRT "
                          "plans for it, or pass --force to export again")
    name = _read(target, verify=False).name
    if name != settings.preset:
        raise ExportError(f"{target} holds {name}, not {settings.preset}")
    return False


def build_plans(settings: PlanSettings) -> PlanSetReport:
    started = time.perf_counter()
    device = require()
    root = Path(settings.model_dir)
    manifest = _read(root, verify=True)
    if manifest.components["unet"].precision != "fp16":
        raise ExportError(f"{root}: TensorRT plans are built from an fp16 export and this UNet is fp32; export "
                          f"again with: python -m export {manifest.name} --precision fp16 --force --output {root}")
    fused = [name for name, c in manifest.components.items() if c.optimized_for is not None]
    if fused:  # TensorRT's ONNX parser knows no ONNX Runtime contrib operators
        raise ExportError(f"{root}: {', '.join(fused)} exported with --optimize; TensorRT plans need the raw graphs: "
                          f"python -m export {manifest.name} --precision fp16 --force --output {root}")
    try:
        profiles = plans.make_profiles(manifest, settings.sizes, settings.batch, settings.dynamic)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    key = plans.plan_key(manifest, profiles, device.tensorrt_version, device.compute_capability)
    labels = [p.label for p in profiles]
    if _already_built(root, manifest, key, settings.optimization_level):
        log.info("TensorRT plans %s for this GPU and these profiles exist; nothing to build", key)
        return PlanSetReport(str(root), key, device.name, labels, False, [], time.perf_counter() - started)
    builder = _Builder(root, manifest, profiles, device, settings.optimization_level)
    reports, refs = [], {}
    with model_dir.staging(root / plans.PLANS_DIR / key, force=True) as stage:
        for index, name in enumerate(manifest.components, 1):
            log.info("[%d/%d] %s: building a TensorRT plan (%s)", index, len(manifest.components), name,
                     "; ".join(labels))
            refs[name], report = builder.build(name, stage, plans.plan_path(key, name))
            log.info("    %s: %.1f MB in %.1f s", name, report.bytes / 1e6, report.seconds)
            reports.append(report)
    plan_set = mf.PlanSet(key=key, tensorrt_version=device.tensorrt_version,
                          compute_capability=device.compute_capability, device=device.name, profiles=profiles,
                          optimization_level=settings.optimization_level, plans=refs)
    _list(root, plan_set)
    return PlanSetReport(str(root), key, device.name, labels, True, reports, time.perf_counter() - started)


def _read(root: Path, verify: bool) -> mf.Manifest:
    try:
        return mf.read(root, verify=verify)
    except EngineError as exc:
        raise ExportError(str(exc)) from None


def _already_built(root: Path, manifest: mf.Manifest, key: str, optimization_level: int) -> bool:
    """The set is listed, complete, intact and built at the asked optimization level (which is not part of
    the key: it changes speed, not validity, but asking for another level means build again)."""
    for plan_set in manifest.tensorrt:
        if (plan_set.key == key and set(plan_set.plans) == set(manifest.components)
                and plan_set.optimization_level == optimization_level):
            try:
                mf.check_refs(root, list(plan_set.plans.values()))
                return True
            except EngineError as exc:
                log.warning("TensorRT plans %s are listed but unusable (%s); building them again", key, exc)
    return False


def _list(root: Path, plan_set: mf.PlanSet) -> None:
    """Add the set to the manifest as it is now (re-read: nothing else in it changes), then remove the
    plans it supersedes."""
    manifest, replaced = plans.with_plan_set(_read(root, verify=False), plan_set)
    model_dir.replace_manifest(root, manifest)
    for old in replaced:
        shutil.rmtree(root / plans.PLANS_DIR / old.key, ignore_errors=True)
        log.info("removed the superseded TensorRT plans %s", old.key)


class _Builder:
    """TensorRT's builder with the settings every component shares (timing cache, level, profiles)."""

    def __init__(self, root: Path, manifest: mf.Manifest, profiles: list[mf.Profile], device: gpu.Gpu,
                 level: int) -> None:
        self.trt = gpu.tensorrt()
        self.root, self.manifest, self.profiles, self.level = root, manifest, profiles, level
        self.logger = gpu.logger()
        self.builder = self.trt.Builder(self.logger)
        version = device.tensorrt_version.replace(".", "_")
        self.cache_path = root / plans.PLANS_DIR / f"timing-{device.compute_capability}-{version}.cache"
        blob = self.cache_path.read_bytes() if self.cache_path.is_file() else b""
        self.cache_config = self.builder.create_builder_config()  # the cache is made through a config
        self.cache = self.cache_config.create_timing_cache(blob)
        log.info("TensorRT %s on %s; timing cache %s", device.tensorrt_version, device.name,
                 "reused" if blob else "new")

    def build(self, name: str, stage: Path, relative: str) -> tuple[mf.FileRef, PlanReport]:
        started = time.perf_counter()
        free, total = gpu.free_memory()
        try:
            network, _parser = self._parse(name)  # the parser owns parts of the network: keep it alive
            plan = self.builder.build_serialized_network(network, self._config(name, free))
        except ExportError:
            raise
        except Exception as exc:  # TensorRT's bindings raise plain RuntimeError/TypeError
            raise ExportError(f"{name}: TensorRT build failed: {exc}") from exc
        if plan is None:
            raise ExportError(f"{name}: TensorRT could not build a plan for the profiles "
                              f"{'; '.join(f'#{i} {p.label}' for i, p in enumerate(self.profiles))} "
                              f"({self.logger.last_error()}); {free / 2**30:.1f} of {total / 2**30:.1f} GiB "
                              "of GPU memory was free")
        data = memoryview(plan)
        (stage / Path(relative).name).write_bytes(data)
        model_dir.write_atomically(self.cache_path, memoryview(self.cache.serialize()))
        ref = mf.FileRef(path=relative, sha256=hashlib.sha256(data).hexdigest(), bytes=data.nbytes)
        return ref, PlanReport(name, data.nbytes, round(time.perf_counter() - started, 1))

    def _parse(self, name: str) -> tuple[Any, Any]:
        trt = self.trt
        network = self.builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, self.logger)
        path = self.root / self.manifest.components[name].graph.path
        if not parser.parse_from_file(str(path)):  # reads the external weights file beside it too
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"{name}: TensorRT cannot parse {path}: {errors}")
        return network, parser

    def _config(self, name: str, free: int) -> Any:
        trt = self.trt
        config = self.builder.create_builder_config()
        config.builder_optimization_level = self.level
        if not config.set_timing_cache(self.cache, False):  # from another driver or CUDA: start afresh
            log.warning("%s: the timing cache %s does not match this setup; starting a new one", name,
                        self.cache_path.name)
            self.cache = config.create_timing_cache(b"")
            config.set_timing_cache(self.cache, False)
        # VRAM-aware: tactics may use at most what is free now, not the whole card
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(free * WORKSPACE_SHARE))
        for shaped in plans.component_profiles(self.manifest, name, self.profiles):
            profile = self.builder.create_optimization_profile()
            for r in shaped.inputs:
                profile.set_shape(r.name, r.min, r.opt, r.max)
            config.add_optimization_profile(profile)
        return config


__all__ = ["PlanSetReport", "PlanSettings", "build_plans", "needs_export", "require"]
