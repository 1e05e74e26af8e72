"""`python -m export PRESET [options]`: parse arguments into ExportSettings, export, print a summary."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before transformers is imported: no import-time noise
from engines import manifest as mf
from export import adopt, optimize, presets
from export.errors import ExportError

if TYPE_CHECKING:
    from export import tensorrt
    from export.controlnet import ControlNetReport
    from export.exporter import ExportReport, ExportSettings


def parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {p.name:<18} {p.hub_id or '(random weights, offline)':<50} {p.description}"
                        for p in presets.PRESETS.values())
    cli = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a Stable Diffusion checkpoint to an ONNX model directory (model.json + one graph "
        "per component), checking every graph against PyTorch.",
        epilog=f"presets (name, default source, description):\n{listing}\n\n"
        "python -m export adopt DIR writes model.json into an ONNX folder in optimum's layout (see its --help).\n"
        "python -m export controlnet SOURCE --for DIR adds a ControlNet to a model directory (see its --help).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_argument("preset", help="which architecture and defaults: one of the presets below")
    cli.add_argument("--model", help="hub id, local diffusers folder, or single-file .safetensors/.ckpt "
                     "(default: the preset's hub id, or its random weights for tiny-* and random-*)")
    cli.add_argument("--revision", help="hub revision (branch, tag or commit) for a hub id")
    cli.add_argument("--config", help="for single-file checkpoints: a diffusers config folder (offline) or hub id")
    cli.add_argument("--output", help="model directory to write (default: models/<preset>)")
    cli.add_argument("--precision", choices=["fp32", "fp16"],
                     help="weights of the text encoders and UNet (default fp32; fp16 with --tensorrt)")
    cli.add_argument("--fp16-vae", action="store_true",
                     help="also export the VAE in fp16 (off by default: the SDXL VAE overflows to black images)")
    cli.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    cli.add_argument("--tolerance", type=float,
                     help="max |onnx - torch| relative to the output scale (default 1e-3 fp32, 5e-2 fp16)")
    cli.add_argument("--force", action="store_true", help="replace an existing model directory")
    cli.add_argument("--optimize", choices=list(optimize.CHOICES), default="auto",
                     help="fuse the graphs with ONNX Runtime's transformer optimizer for this provider. cpu: "
                     "attention, LayerNorm and Gelu fusions that every provider runs; cuda: also GroupNorm, "
                     "NhwcConv, BiasSplitGelu and packed attention, whose kernels exist only on CUDA (such a model "
                     "does not load on the cpu backend, and is not checked against PyTorch here); none: the graphs "
                     "as traced. auto (default): cpu for fp32 exports, none for fp16 and --tensorrt")
    cli.add_argument("--lora-rank", type=int, default=0, metavar="R",
                     help="LoRA support: the text encoders and UNet take adapters per request, up to a total "
                     "rank R (sum of the ranks of a request's adapters; default 0: no LoRA support)")
    cli.add_argument("--tiny-decoder", nargs="?", const="auto", metavar="SOURCE",
                     help="also export TAESD (diffusers' AutoencoderTiny) as the tiny decoder, for previews and fast "
                     "final images: a hub id, a local AutoencoderTiny folder, 'random' (seeded random weights), or "
                     "nothing: madebyollin/taesd (taesdxl for SDXL), random weights for the tiny-*/random-* presets")
    cli.add_argument("--controlnet", action="store_true",
                     help="ControlNet support: the UNet takes ControlNet residuals as inputs (zeros when a render "
                     "uses none); then add ControlNets with python -m export controlnet SOURCE --for OUTPUT")
    trt = cli.add_argument_group(
        "TensorRT plans (need an NVIDIA GPU, TensorRT and cuda-python: pip install .[tensorrt])",
        "With --tensorrt, an --output that already holds a model of this preset is not exported again\n"
        "(unless --force): plans are built for it as it is. Plans are built from an fp16 export and go to\n"
        "OUTPUT/tensorrt/<key>/, the key hashing the graphs, profiles, TensorRT version and GPU; a valid\n"
        "set with that key is kept, not rebuilt. The model then renders with --backend tensorrt (or auto).")
    trt.add_argument("--tensorrt", action="store_true", help="build TensorRT plans for every component")
    trt.add_argument("--sizes", type=_sizes, default=[], metavar="WxH[,WxH...]",
                     help="a static profile (the fastest plans) per size (default: the model's native size)")
    trt.add_argument("--batch", type=_range, metavar="MIN-MAX",
                     help="images per render (default 1 to the model's max batch; doubled inside for guidance)")
    trt.add_argument("--dynamic", type=_range, metavar="MIN-MAX",
                     help="also a dynamic profile over sides MIN..MAX pixels (slower than static, any size in range)")
    trt.add_argument("--opt-level", type=int, choices=range(6), default=3, metavar="0-5",
                     help="TensorRT builder optimization level (default 3; higher builds longer, may run faster)")
    return cli


def _sizes(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(w), int(h)) for w, h in (part.lower().split("x") for part in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH[,WxH...], like 512x512,768x512, not {text!r}") from None


def _range(text: str) -> tuple[int, int]:
    try:
        low, _, high = text.partition("-")
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX or one number, not {text!r}") from None


def settings_from(args: argparse.Namespace) -> ExportSettings:
    from export.exporter import ExportSettings

    precision = args.precision or ("fp16" if args.tensorrt else "fp32")
    return ExportSettings(
        preset=args.preset,
        model=args.model,
        revision=args.revision,
        config=args.config,
        output=args.output,
        precision=precision,
        vae_precision="fp16" if args.fp16_vae and precision == "fp16" else "fp32",
        opset=args.opset,
        force=args.force,
        tolerance=args.tolerance,
        lora_rank=args.lora_rank,
        tiny_decoder=args.tiny_decoder,
        controlnet=args.controlnet,
        # TensorRT's parser knows no ONNX Runtime contrib operators: plans are built from the raw graphs
        optimize="none" if args.tensorrt and args.optimize == "auto" else args.optimize,
    )


def summary(report: ExportReport) -> str:
    rows = [f"exported {report.manifest.name} ({report.manifest.family}/{report.manifest.variant}) to "
            f"{report.output} in {report.seconds:.1f} s",
            f"  {'component':<18}{'precision':<11}{'size':>10}{'time':>9}  max |onnx - torch|"]
    rows += [f"  {c.name:<18}{c.precision:<11}{c.bytes / 1e6:>8.1f}MB{c.seconds:>8.1f}s  {_difference(c.max_diff)}"
             for c in report.components]
    sizes = report.manifest.sizes
    rows.append(f"  sizes {sizes.min}-{sizes.max} step {sizes.step}; defaults {report.manifest.defaults.steps} steps, "
                f"{report.manifest.defaults.sampler}, guidance {report.manifest.defaults.guidance_scale}")
    return "\n".join(rows)


def _difference(value: float) -> str:
    return "not checked (optimized for CUDA)" if math.isnan(value) else f"{value:.2g}"


def plan_summary(report: tensorrt.PlanSetReport) -> str:
    if not report.built:
        return f"TensorRT plans {report.key} for {report.device} already built in {report.model_dir}"
    rows = [f"built TensorRT plans {report.key} for {report.device} in {report.seconds:.1f} s "
            f"(profiles: {'; '.join(report.profiles)})",
            *(f"  {c.name:<16}{c.bytes / 1e6:>8.1f}MB{c.seconds:>8.1f}s" for c in report.components)]
    return "\n".join(rows)


def adopt_parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="python -m export adopt",
        description="Write model.json (with every file's sha256) into an ONNX pipeline folder in optimum's layout "
        "(optimum-cli export onnx, or a hub repository's onnx folder), so that later loads check its files. "
        "Such folders are served without it too; nothing is converted.")
    cli.add_argument("folder", help="the folder holding model_index.json, unet/model.onnx, tokenizer/, …")
    cli.add_argument("--force", action="store_true", help="infer and write model.json again if it exists")
    return cli


def adopt_main(argv: list[str]) -> int:
    args = adopt_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        manifest = adopt.adopt(args.folder, force=args.force)
    except ExportError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    sizes = manifest.sizes
    print(f"adopted {args.folder}: {manifest.family}/{manifest.variant}, {manifest.prediction_type}, "
          f"components {', '.join(manifest.components)}; sizes {sizes.min}-{sizes.max} step {sizes.step}; "
          f"wrote {mf.MANIFEST_FILE}")
    return 0


def controlnet_parser() -> argparse.ArgumentParser:
    from export.controlnet import PRESETS

    listing = "\n".join(f"  {p.name:<24} made from {p.base}'s UNet" for p in PRESETS.values())
    cli = argparse.ArgumentParser(
        prog="python -m export controlnet",
        description="Export a ControlNet to ONNX beside the model it serves (MODEL_DIR/controlnets/NAME/, recorded "
        "in MODEL_DIR's model.json), checked against PyTorch. The model must have been exported with --controlnet; "
        "a node offers the ControlNet to every model of the same family it hosts.",
        epilog=f"random-weight presets (tests, benchmarks):\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("source", help="hub id (lllyasviel/control_v11p_sd15_canny), local diffusers ControlNetModel "
                     "folder, single .safetensors file (with --config), or a preset below")
    cli.add_argument("--for", dest="model_dir", required=True, metavar="MODEL_DIR",
                     help="the model directory it serves (exported with --controlnet)")
    cli.add_argument("--name", help="its name in requests (default: the preset, folder or file name, or the hub id's "
                     "last part)")
    cli.add_argument("--revision", help="hub revision (branch, tag or commit) for a hub id")
    cli.add_argument("--config", help="for a single file: a diffusers ControlNet config folder (offline) or hub id")
    cli.add_argument("--tolerance", type=float,
                     help="max |onnx - torch| relative to the output scale (default by the UNet's precision)")
    cli.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    cli.add_argument("--force", action="store_true", help="replace a ControlNet of the same name")
    return cli


def controlnet_main(argv: list[str]) -> int:
    args = controlnet_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from export.controlnet import ControlNetSettings, export_controlnet

    settings = ControlNetSettings(source=args.source, model_dir=args.model_dir, name=args.name,
                                  revision=args.revision, config=args.config, force=args.force,
                                  tolerance=args.tolerance, opset=args.opset)
    return _reported(lambda: controlnet_summary(export_controlnet(settings)))


def controlnet_summary(report: ControlNetReport) -> str:
    c = report.component
    return (f"exported ControlNet {report.name} ({report.family}) for {report.model_dir} in {report.seconds:.1f} s\n"
            f"  {'component':<16}{'precision':<11}{'size':>10}{'time':>9}  max |onnx - torch|\n"
            f"  {c.name:<16}{c.precision:<11}{c.bytes / 1e6:>8.1f}MB{c.seconds:>8.1f}s  {_difference(c.max_diff)}")


def _reported(work: Callable[[], str]) -> int:
    """Run an export and print its summary: 0; or print one line saying why it failed: 2 (130 interrupted)."""
    try:
        summary_text = work()
    except ExportError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # torch's and onnx's own errors (a full disk in the C++ writer, say): one line
        logging.getLogger("sdserve.export").debug("export failed", exc_info=True)
        reason = (str(exc).strip().splitlines() or [""])[0]
        print(f"export: error: {type(exc).__name__}: {reason}; nothing was written", file=sys.stderr)
        return 2
    print(summary_text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["adopt"]:
        return adopt_main(argv[1:])
    if argv[:1] == ["controlnet"]:
        return controlnet_main(argv[1:])
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    settings = settings_from(args)
    return _reported(lambda: _export(args, settings))


def _export(args: argparse.Namespace, settings: ExportSettings) -> str:
    from export import tensorrt  # torch and diffusers take seconds: imported only here
    from export.exporter import export_model, output_dir

    if args.fp16_vae and settings.precision != "fp16":
        raise ExportError("--fp16-vae needs --precision fp16")
    if args.tensorrt and settings.optimize != "none":
        raise ExportError("--tensorrt builds plans from standard ONNX operators only: drop --optimize "
                          f"{settings.optimize}")
    lines = []
    # With --tensorrt, TensorRT is checked before any export work: without it nothing is written.
    if not args.tensorrt or tensorrt.needs_export(settings):
        lines.append(summary(export_model(settings)))
    if args.tensorrt:
        plan_settings = tensorrt.PlanSettings(model_dir=str(output_dir(settings)), sizes=args.sizes,
                                              batch=args.batch, dynamic=args.dynamic,
                                              optimization_level=args.opt_level)
        lines.append(plan_summary(tensorrt.build_plans(plan_settings)))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
