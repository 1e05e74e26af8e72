"""`python -m bench pipeline|graphs|http`: parse arguments into settings, run, write the results, print the table."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from bench import report

SIZE_HELP = "WIDTHxHEIGHT (default: the model's native size)"


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(prog="python -m bench", description="Measure sdserve: the engines against the "
                                  "PyTorch/diffusers reference, or HTTP load against a server or router.")
    commands = cli.add_subparsers(dest="command", required=True)

    pipe = commands.add_parser("pipeline", help="engines vs the diffusers reference on one model directory",
                               description="Render with the engines and with the diffusers pipeline the model was "
                               "exported from (same weights, size, steps, sampler, guidance, starting latents): each "
                               "engines backend and decoder and each reference precision is a side; after a warm-up "
                               "the repetitions go round the sides; report stage times, memory, time ratios and pixel "
                               "differences.")
    pipe.add_argument("model_dir", help="an exported model directory (python -m export ...)")
    pipe.add_argument("--backend", default="auto", help="engines backends, comma-separated, each a side: "
                      "auto|cpu|openvino|cuda|tensorrt-ep|tensorrt, openvino:fp32 or openvino:bf16 for its precision "
                      "(default auto)")
    pipe.add_argument("--decoder", default="full", help="the engines' final decoder, comma-separated, each a side per "
                      "backend: full (the VAE), tiny (the model's TAESD, export --tiny-decoder); default full")
    pipe.add_argument("--size", help=SIZE_HELP)
    pipe.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    pipe.add_argument("--sampler", help="euler|euler_a|ddim|dpmpp_2m|dpmpp_2m_karras|lcm (default: the model's)")
    pipe.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    pipe.add_argument("--batch", type=int, default=1, help="images per render (default 1)")
    pipe.add_argument("--threads", type=int, help="CPU threads for both sides (default: the libraries' own)")
    pipe.add_argument("--repeat", type=int, default=3, help="measured repetitions per side (default 3)")
    pipe.add_argument("--warmup", type=int, default=1, help="unmeasured renders per side first (default 1)")
    pipe.add_argument("--precision", help="the reference's precisions, comma-separated, each a side: fp32, fp16, "
                      "bf16 (torch.autocast on fp32 weights); default: the exported UNet's")
    pipe.add_argument("--reference-device", help="torch device for the reference (default: cuda if present, else cpu)")
    pipe.add_argument("--checkpoint", help="rebuild the reference from this hub id, folder or single file instead "
                      "of the manifest's source")
    pipe.add_argument("--no-reference", action="store_true", help="time the engines alone (no torch needed)")
    pipe.add_argument("--prompt", help="the prompt to render")
    pipe.add_argument("--seed", type=int, default=0, help="seed of the shared starting latents (default 0)")
    pipe.add_argument("--lora-dir", help="LoRA adapter folder for the engines (with --lora, --no-reference)")
    pipe.add_argument("--lora", action="append", type=_adapter, default=[], metavar="NAME[:SCALE]",
                      help="render with this adapter from --lora-dir (repeatable)")
    pipe.add_argument("--max-seconds", type=float,
                      help="exit 1 when an engines side's end-to-end median exceeds this many seconds (a gate)")
    pipe.add_argument("--out", help="results folder (default: bench/results/<timestamp>/)")

    _graphs_parser(commands)

    http = commands.add_parser("http", help="HTTP load against a running server or router",
                               description="Send requests at each concurrency level and report throughput, latency "
                               "percentiles, errors by status, and (with the admin key) the spread over nodes.")
    http.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8080")
    http.add_argument("--concurrency", default="1,4", help="comma-separated levels (default 1,4)")
    http.add_argument("--requests", type=int, default=20, help="requests per level (default 20)")
    http.add_argument("--mix", default="generations=1",
                      help="route weights, e.g. generations=8,edits=1,variations=1 (default generations=1)")
    http.add_argument("--model", help="the model field (default: the server's default model)")
    http.add_argument("--size", default="256x256", help="the size field (default 256x256)")
    http.add_argument("--steps", type=int, help="the steps extension (default: the model's)")
    http.add_argument("--n", type=int, default=1, help="images per request (default 1)")
    http.add_argument("--response-format", choices=["b64_json", "url"], default="b64_json")
    http.add_argument("--api-key", default=_api_key_from_environment(),
                      help="bearer key for /v1 (default: the first of $SDSERVE_API_KEYS, the server's own variable)")
    http.add_argument("--admin-key", default=os.environ.get("SDSERVE_ADMIN_KEY"),
                      help="admin key for the router's /v0/nodes spread (default $SDSERVE_ADMIN_KEY)")
    http.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    http.add_argument("--stream", action="store_true",
                      help="stream (generations and edits): also time the first partial image and the final one")
    http.add_argument("--partial-images", type=int, default=2, help="with --stream: partial images, 0-3 (default 2)")
    http.add_argument("--max-errors", type=int,
                      help="exit 1 when more requests than this are not answered 200 (a gate; default: none)")
    http.add_argument("--out", help="results folder (default: bench/results/<timestamp>/)")
    return cli


def _graphs_parser(commands: Any) -> None:
    graphs = commands.add_parser("graphs", help="one model's UNet and decoders alone on each backend",
                                 description="Time the graphs alone (ONNX Runtime fp32, OpenVINO fp32 and bf16, …) on "
                                 "the same inputs, interleaved: the UNet on every step of a real schedule, the "
                                 "decoders at the render size; report seconds per call and each output's relative "
                                 "error against the first backend's.")
    graphs.add_argument("model_dir", help="an exported SD 1.x/2.x model directory")
    graphs.add_argument("--components", default="unet,vae_decoder",
                        help="comma-separated: unet, vae_decoder, vae_decoder:tiled (the VAE in the engines' tiles), "
                        "tiny_vae_decoder (default unet,vae_decoder)")
    graphs.add_argument("--backend", default="cpu,openvino:fp32,openvino:bf16",
                        help="comma-separated backends, the first the error's reference (default "
                        "cpu,openvino:fp32,openvino:bf16)")
    graphs.add_argument("--size", help=SIZE_HELP)
    graphs.add_argument("--steps", type=int, default=4, help="UNet inputs: the steps of a schedule (default 4)")
    graphs.add_argument("--sampler", default="euler", help="the schedule's sampler (default euler)")
    graphs.add_argument("--rows", type=int, default=2, help="UNet rows per call (default 2: one guided image)")
    graphs.add_argument("--threads", type=int, help="threads per call (default: all cores)")
    graphs.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    graphs.add_argument("--out", help="results folder (default: bench/results/<timestamp>/)")


def pipeline_settings(args: argparse.Namespace) -> Any:
    from bench.pipeline import PipelineSettings

    width, height = _size(args.size) if args.size else (None, None)
    extra = {"prompt": args.prompt} if args.prompt else {}
    return PipelineSettings(model_dir=args.model_dir, backends=_list(args.backend), decoders=_list(args.decoder),
                            threads=args.threads, width=width,
                            height=height, steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance,
                            batch=args.batch, repeat=args.repeat, warmup=args.warmup, reference=not args.no_reference,
                            reference_device=args.reference_device, precisions=_list(args.precision or ""),
                            checkpoint=args.checkpoint, seed=args.seed, lora_dir=args.lora_dir, lora=args.lora,
                            **extra)


def graph_settings(args: argparse.Namespace) -> Any:
    from bench.graphs import GraphSettings

    width, height = _size(args.size) if args.size else (None, None)
    return GraphSettings(model_dir=args.model_dir, components=_list(args.components), backends=_list(args.backend),
                         width=width, height=height, steps=args.steps, sampler=args.sampler, rows=args.rows,
                         threads=args.threads, repeat=args.repeat)


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _adapter(text: str) -> tuple[str, float]:
    name, _, scale = text.partition(":")
    try:
        return name, float(scale or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME:SCALE, not {text!r}") from None


def http_settings(args: argparse.Namespace) -> Any:
    from bench.load import ROUTES, HttpSettings

    mix = {}
    for part in args.mix.split(","):
        route, _, weight = part.partition("=")
        if route.strip() not in ROUTES or not weight.strip().isdigit():
            raise SystemExit(f"bench: --mix: expected ROUTE=WEIGHT with ROUTE in {', '.join(ROUTES)}, got {part!r}")
        mix[route.strip()] = int(weight)
    if not any(mix.values()):
        raise SystemExit("bench: --mix: at least one route needs a weight above 0")
    levels = [int(level) for level in args.concurrency.split(",") if level.strip()]
    if not levels or min(levels) < 1 or args.requests < 1:
        raise SystemExit("bench: --concurrency levels and --requests must be positive")
    return HttpSettings(url=args.url, concurrency=levels, requests=args.requests, mix=mix, model=args.model,
                        size=args.size, steps=args.steps, n=args.n, response_format=args.response_format,
                        api_key=args.api_key, admin_key=args.admin_key, timeout=args.timeout, stream=args.stream,
                        partial_images=args.partial_images)


def _api_key_from_environment() -> str | None:
    keys = [k.strip() for k in os.environ.get("SDSERVE_API_KEYS", "").split(",") if k.strip()]
    return keys[0] if keys else None


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise SystemExit(f"bench: --size: expected WIDTHxHEIGHT, got {text!r}")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    from tqdm import tqdm

    if args.command == "pipeline":
        from bench import pipeline as kind

        settings = pipeline_settings(args)
        total = kind.total_runs(settings)
    elif args.command == "graphs":
        from bench import graphs as kind

        settings = graph_settings(args)
        total = kind.total_runs(settings)
    else:
        from bench import load as kind

        settings = http_settings(args)
        total = settings.requests * len(settings.concurrency)
    from bench.errors import BenchError
    from engines.errors import EngineError

    with tqdm(total=total, desc=args.command, unit="req" if args.command == "http" else "run") as bar:
        def tick(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update()

        try:
            result, failure = kind.run(settings, tick), None
        except (BenchError, EngineError) as exc:
            result, failure = None, exc
    if failure is not None:  # after the bar has closed: the error is the last line
        print(f"bench: error: {failure}", file=sys.stderr)
        return 2
    folder = report.results_dir(args.out)
    table = kind.markdown(result)
    paths = report.write(folder, args.command, result, table, kind.figure(result))
    print(table)
    print(f"\nwrote {', '.join(str(p) for p in paths)}")
    if args.command == "http" and kind.errors(result) == sum(level.requests for level in result.levels):
        print(f"bench: {kind.errors(result)} requests were not answered 200 (none was); the first answer was "
              f"{kind.first_error(result)}", file=sys.stderr)
        return 1
    if args.command == "http" and args.max_errors is not None and kind.errors(result) > args.max_errors:
        print(f"bench: {kind.errors(result)} requests were not answered 200 (--max-errors {args.max_errors})",
              file=sys.stderr)
        return 1
    if args.command == "pipeline" and args.max_seconds is not None:
        slow = [f"{side.name} {side.stages['total'].median:.2f} s" for side in result.of("engines")
                if side.stages["total"].median > args.max_seconds]
        if slow:
            print(f"bench: the engines' median exceeds --max-seconds {args.max_seconds:g}: {', '.join(slow)}",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
