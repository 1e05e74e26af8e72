"""`python -m engines render MODEL_DIR --prompt … --out out.png`: one image, with per-stage timings.
`python -m engines info MODEL_DIR`: what a model supports and which backend it loads on.
`python -m engines doctor [MODEL_DIR] [--json]`: which packages, providers, GPU and TensorRT work here."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import msgspec
from PIL import Image

from engines import SAMPLERS, EngineError, RenderRequest, load
from engines.backends import BACKENDS, PRECISIONS
from engines.job import with_defaults

PRECISION_HELP = ("what the openvino backend computes in: auto (default) is bf16 where the processor has bf16 "
                  "instructions (AVX-512 BF16, AMX), else fp32; the other backends compute in the graphs' precision")


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(prog="python -m engines", description="Render with sdserve's ONNX pipeline.")
    commands = cli.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print a model's capabilities and the backend it loads on")
    info.add_argument("model_dir")
    info.add_argument("--backend", choices=BACKENDS, default="auto")
    info.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    doctor = commands.add_parser("doctor", help="check this host: onnxruntime, providers, GPU, TensorRT (and a "
                                 "model's plans and a small render per backend); exit 1 on a problem")
    doctor.add_argument("model_dir", nargs="?", help="also check this model directory")
    shown = doctor.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print the report as JSON")
    shown.add_argument("--summary", action="store_true", help="print one line per backend: with MODEL_DIR where each "
                       "component really ran (ONNX Runtime's providers, TensorRT plans or their fallback)")
    render = commands.add_parser("render", help="render images and print per-stage timings")
    render.add_argument("model_dir", help="a model directory written by `python -m export`, or an ONNX folder "
                        "in optimum's layout (optimum-cli export onnx; its manifest is inferred)")
    render.add_argument("--prompt", required=True)
    render.add_argument("--negative-prompt")
    render.add_argument("--out", default="out.png", help="output PNG; with -n > 1, out-0.png, out-1.png, …")
    render.add_argument("--size", help="WxH (default: the model's native size)")
    render.add_argument("--steps", type=int, help="default: the model's")
    render.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    render.add_argument("--sampler", choices=SAMPLERS, help="default: the model's")
    render.add_argument("--seed", type=int, help="default: random (printed)")
    render.add_argument("-n", type=int, default=1, help="number of images")
    render.add_argument("--image", help="input image: image to image, or inpainting with --mask")
    render.add_argument("--mask", help="mask image, white = repaint (the OpenAI API's alpha masks are the server's)")
    render.add_argument("--strength", type=float,
                        help="how much of --image to re-imagine (0-1]; default 0.75, 1.0 with --mask")
    render.add_argument("--backend", choices=BACKENDS, default="auto")
    render.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    render.add_argument("--threads", type=int, help="threads per graph call (default: all cores)")
    return cli


def _size(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None  # the model's default
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"engines: error: --size must look like 512x512, not {text!r}") from None
    return width, height


def _progress(stream: TextIO) -> Callable[[int, int], None]:
    """Steps as they finish: rewritten in place on a terminal, one line each elsewhere (a pipe, a log file,
    where a carriage return would run them together)."""
    live = stream.isatty()

    def on_step(done: int, total: int) -> None:
        if live:
            print(f"\rstep {done}/{total}", end="\n" if done == total else "", file=stream, flush=True)
        else:
            print(f"step {done}/{total}", file=stream, flush=True)

    return on_step


def render(args: argparse.Namespace) -> int:
    pipe = load(args.model_dir, backend=args.backend, threads=args.threads, precision=args.precision)
    width, height = _size(args.size)
    request = with_defaults(RenderRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, width=width, height=height, steps=args.steps,
        guidance_scale=args.guidance, sampler=args.sampler, seed=args.seed, n=args.n,
        image=Image.open(args.image) if args.image else None, mask=Image.open(args.mask) if args.mask else None,
        strength=args.strength,
    ), pipe.info.defaults)  # to print what was rendered
    result = pipe.render(request, on_step=_progress(sys.stderr))
    out = Path(args.out)
    paths = [out] if len(result.images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}")
                                                   for i in range(len(result.images))]
    for image, path in zip(result.images, paths, strict=True):
        image.save(path)
    stages = result.timings.stages
    print(f"{pipe.info.id} on {pipe.info.backend} ({pipe.info.device}): {request.width}x{request.height}, "
          f"{result.steps_run} steps "
          f"of {request.sampler}, guidance {request.guidance_scale}, seeds {result.seeds}")
    for stage in ("text_encoder", "vae_encoder", "unet", "vae_decoder", "total"):
        if stage in stages:
            print(f"  {stage:<13}{stages[stage]:8.3f} s")
    for i, seconds in enumerate(result.timings.steps, 1):
        print(f"    unet step {i:>3}{seconds:8.3f} s")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "doctor":
        from engines import doctor

        report = doctor.run(args.model_dir)
        if args.json:
            print(msgspec.json.format(msgspec.json.encode(report)).decode())
        else:
            print(doctor.summary(report) if args.summary else doctor.text(report))
        return 0 if report.ok else 1
    try:
        if args.command == "info":
            info = load(args.model_dir, backend=args.backend, precision=args.precision).info
            print(msgspec.json.format(msgspec.json.encode(info)).decode())
            return 0
        return render(args)
    except EngineError as exc:
        print(f"engines: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an --image/--mask that cannot be read
        print(f"engines: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
