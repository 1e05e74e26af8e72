"""`python -m export PRESET [options]`: parse arguments into ExportSettings, export, print a summary."""

from __future__ import annotations

import argparse
import logging
import sys

from export import presets
from export.errors import ExportError
from export.exporter import ExportReport, ExportSettings, export_model


def parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {p.name:<18} {p.hub_id or '(random weights, offline)':<50} {p.description}"
                        for p in presets.PRESETS.values())
    cli = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a Stable Diffusion checkpoint to an ONNX model directory (model.json + one graph "
        "per component), checking every graph against PyTorch.",
        epilog=f"presets (name, default source, description):\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_argument("preset", help="which architecture and defaults: one of the presets below")
    cli.add_argument("--model", help="hub id, local diffusers folder, or single-file .safetensors/.ckpt "
                     "(default: the preset's hub id, or its random weights for tiny-*)")
    cli.add_argument("--revision", help="hub revision (branch, tag or commit) for a hub id")
    cli.add_argument("--config", help="for single-file checkpoints: a diffusers config folder (offline) or hub id")
    cli.add_argument("--output", help="model directory to write (default: models/<preset>)")
    cli.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                     help="weights of the text encoders and UNet (default fp32)")
    cli.add_argument("--fp16-vae", action="store_true",
                     help="also export the VAE in fp16 (off by default: the SDXL VAE overflows to black images)")
    cli.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    cli.add_argument("--tolerance", type=float,
                     help="max |onnx - torch| relative to the output scale (default 1e-3 fp32, 5e-2 fp16)")
    cli.add_argument("--force", action="store_true", help="replace an existing model directory")
    cli.add_argument("--tensorrt", action="store_true", help="also build TensorRT plans (needs a GPU and TensorRT)")
    return cli


def settings_from(args: argparse.Namespace) -> ExportSettings:
    return ExportSettings(
        preset=args.preset,
        model=args.model,
        revision=args.revision,
        config=args.config,
        output=args.output,
        precision=args.precision,
        vae_precision="fp16" if args.fp16_vae and args.precision == "fp16" else "fp32",
        opset=args.opset,
        force=args.force,
        tolerance=args.tolerance,
    )


def summary(report: ExportReport) -> str:
    rows = [f"exported {report.manifest.name} ({report.manifest.family}/{report.manifest.variant}) to "
            f"{report.output} in {report.seconds:.1f} s",
            f"  {'component':<16}{'precision':<11}{'size':>10}{'time':>9}  max |onnx - torch|"]
    rows += [f"  {c.name:<16}{c.precision:<11}{c.bytes / 1e6:>8.1f}MB{c.seconds:>8.1f}s  {c.max_diff:.2g}"
             for c in report.components]
    sizes = report.manifest.sizes
    rows.append(f"  sizes {sizes.min}-{sizes.max} step {sizes.step}; defaults {report.manifest.defaults.steps} steps, "
                f"{report.manifest.defaults.sampler}, guidance {report.manifest.defaults.guidance_scale}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.tensorrt:
            raise ExportError("--tensorrt: building TensorRT plans is not available yet")
        report = export_model(settings_from(args))
    except ExportError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
