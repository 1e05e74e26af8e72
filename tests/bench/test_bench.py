"""Smoke runs of `python -m bench` on the tiny models: the harness works and its files are well formed.

These check behaviour (what was run, counted and written), never a timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from PIL import Image

from bench.graphs import GraphResult
from bench.load import HttpResult, _route_cycle
from bench.pipeline import PipelineResult
from engines.backends import openvino
from tests.processes import ROOT, ServerProcess

ADMIN_KEY = "bench-admin-key"


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def check_files(folder: Path, kind: str) -> bytes:
    """The three files exist; the chart is a real PNG; the Markdown holds a table. Returns the JSON."""
    with Image.open(folder / f"{kind}.png") as chart:
        assert chart.format == "PNG" and chart.width > 200 and chart.height > 200
    markdown = (folder / f"{kind}.md").read_text(encoding="utf-8")
    assert "|---|" in markdown
    return (folder / f"{kind}.json").read_bytes()


def test_pipeline_engines_against_reference(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "pipeline"
    done = bench("pipeline", str(tiny_model("tiny-sd15")), "--size", "64x96", "--steps", "3", "--sampler", "euler",
                 "--backend", "cpu", "--repeat", "1", "--warmup", "1", "--threads", "1", "--out", str(out),
                 "--max-seconds", "1000")
    assert done.returncode == 0, done.stderr
    result = msgspec.json.decode(check_files(out, "pipeline"), type=PipelineResult)
    assert result.resolved["width"] == 64 and result.resolved["height"] == 96 and result.resolved["steps"] == 3
    (ours,), (theirs,) = result.of("engines"), result.of("reference")
    assert (ours.name, theirs.name) == ("engines cpu", "PyTorch fp32") and list(result.ratios) == [
        "engines cpu / PyTorch fp32"]
    for side in (ours, theirs):
        assert side.stages["total"].count == 1  # one measured repetition
        assert side.unet_step is not None and side.unet_step.count == 3  # one UNet call per step (CFG batched)
        assert set(side.stages) >= {"text_encoder", "unet", "vae_decoder", "total"}
        assert 0 < side.stages["unet"].median <= side.stages["total"].median
    # Same weights and starting latents: the engines reproduce diffusers (tests/engines/test_parity.py)
    assert result.pixel_diffs["engines cpu"].max < 1e-4 and "PyTorch fp32" not in result.pixel_diffs
    assert 0 < result.pixel_diffs["engines cpu"].mean <= result.pixel_diffs["engines cpu"].max
    assert result.ratios["engines cpu / PyTorch fp32"].median == pytest.approx(ours.totals[0] / theirs.totals[0])
    assert result.hardware.cores >= 1 and result.versions["onnxruntime"] != "absent"
    rows = [line for line in (out / "pipeline.md").read_text().splitlines() if line.startswith("| engines")]
    assert len(rows) == 2  # its row in the sides' table and its ratio


@pytest.mark.skipif(not openvino.available(), reason="the openvino package is not installed")
def test_pipeline_every_side_in_one_run(taesd_model: Path, tmp_path: Path) -> None:
    """Backends × decoders and the reference's precisions, bf16 autocast included, round-robin in one run."""
    done = bench("pipeline", str(taesd_model), "--size", "64x64", "--steps", "2", "--sampler", "euler",
                 "--backend", "cpu,openvino:fp32", "--decoder", "full,tiny", "--precision", "fp32,bf16",
                 "--repeat", "2", "--warmup", "0", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    result = msgspec.json.decode(check_files(tmp_path, "pipeline"), type=PipelineResult)
    names = ["engines cpu", "engines cpu tiny decoder", "engines openvino:fp32", "engines openvino:fp32 tiny decoder",
             "PyTorch fp32", "PyTorch bf16"]
    assert [side.name for side in result.sides] == names
    assert all(side.stages["total"].count == 2 for side in result.sides)
    assert "OpenVINO fp32" in result.sides[2].runs_on and "autocast" in result.sides[5].runs_on
    assert len(result.ratios) == 8 and all(s.count == 2 for s in result.ratios.values())
    diffs = result.pixel_diffs
    assert diffs["engines cpu"].max < 1e-4 and diffs["engines openvino:fp32"].max < 1e-4  # as diffusers computes
    assert diffs["engines cpu tiny decoder"].mean > 1e-2 and diffs["PyTorch bf16"].mean > 1e-5  # another decoder; bf16


def test_graphs_alone_on_each_backend(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    backends = "cpu,openvino:fp32,openvino:bf16" if openvino.available() else "cpu"
    done = bench("graphs", str(tiny_model("tiny-sd15")), "--size", "64x64", "--steps", "3", "--repeat", "2",
                 "--backend", backends, "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    result = msgspec.json.decode(check_files(tmp_path, "graphs"), type=GraphResult)
    assert [(s.component, s.backend) for s in result.sides] == [
        (component, backend) for component in ("unet", "vae_decoder") for backend in backends.split(",")]
    for side in result.sides:
        assert side.call.count == 2 * (3 if side.component == "unet" else 1)  # every step's input, each repetition
        assert len(side.errors) == (3 if side.component == "unet" else 1)
    first, *others = [s for s in result.sides if s.component == "unet"]
    assert first.errors == [0.0, 0.0, 0.0]
    if others:  # fp32 as ONNX Runtime computes; bf16 a visible but small drift
        assert max(others[0].errors) < 1e-4 and 1e-4 < max(others[1].errors) < 0.1


def test_graphs_time_the_tiled_decode_beside_the_whole(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    """640² is 80 latent cells a side: four overlapping 64-cell tiles, each a decoder call, against one call."""
    done = bench("graphs", str(tiny_model("tiny-sd15")), "--size", "640x640", "--repeat", "1", "--backend", "cpu",
                 "--components", "vae_decoder,vae_decoder:tiled", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    result = msgspec.json.decode(check_files(tmp_path, "graphs"), type=GraphResult)
    assert [(s.component, s.call.count) for s in result.sides] == [("vae_decoder", 1), ("vae_decoder:tiled", 1)]
    assert all(s.call.median > 0 for s in result.sides)


def test_pipeline_gate_and_engines_alone(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    done = bench("pipeline", str(tiny_model("tiny-sd15")), "--no-reference", "--size", "64x64", "--steps", "1",
                 "--repeat", "2", "--warmup", "0", "--out", str(tmp_path), "--max-seconds", "1e-9")
    assert done.returncode == 1
    assert "exceeds --max-seconds" in done.stderr
    result = msgspec.json.decode(check_files(tmp_path, "pipeline"), type=PipelineResult)
    assert result.of("reference") == [] and result.ratios == {} and result.pixel_diffs == {}
    assert result.sides[0].stages["total"].count == 2


@pytest.mark.parametrize(("args", "message"), [
    (["{missing}"], "no model directory"),
    (["{model}", "--repeat", "0"], "--repeat and --batch must be at least 1"),
    (["{model}", "--decoder", "full,taesd"], "unknown --decoder or --precision taesd"),
])
def test_pipeline_refuses_before_measuring(tiny_model: Callable[[str], Path], tmp_path: Path, args: list[str],
                                          message: str) -> None:
    args = [a.format(missing=tmp_path / "missing", model=tiny_model("tiny-sd15")) for a in args]
    done = bench("pipeline", *args, "--no-reference", "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert message in done.stderr.splitlines()[-1]
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("bench-server")
    process = ServerProcess("standalone", ["--models-dir", str(models_dir), "--images-dir", str(work / "images"),
                                           "--default-model", "tiny-sd15"], work,
                            env={"SDSERVE_ADMIN_KEY": ADMIN_KEY}).start()
    yield process
    process.stop()


def test_http_load_mix_and_spread(server: ServerProcess, tmp_path: Path) -> None:
    done = bench("http", server.url, "--concurrency", "1,3", "--requests", "5", "--mix",
                 "generations=2,edits=1,variations=1", "--size", "64x64", "--steps", "1", "--n", "2",
                 "--admin-key", ADMIN_KEY, "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    raw = check_files(tmp_path, "http")
    assert ADMIN_KEY.encode() not in raw  # secrets are masked in the results
    result = msgspec.json.decode(raw, type=HttpResult)
    assert "tiny-sd15" in result.models
    assert [level.concurrency for level in result.levels] == [1, 3]
    expected = {"generations": 3, "edits": 1, "variations": 1}  # g e v g | g: the cycle, then its start
    for level in result.levels:
        assert level.statuses == {"200": 5}
        assert level.images == 10  # n = 2 each
        assert {route: counts["200"] for route, counts in level.by_route.items()} == expected
        assert level.latency_p50 is not None and level.latency_p50 <= level.latency_p95 <= level.latency_p99
        assert level.nodes is not None and sum(level.nodes.values()) == 5


def test_http_counts_errors_by_status(server: ServerProcess, tmp_path: Path) -> None:
    done = bench("http", server.url, "--concurrency", "2", "--requests", "3", "--model", "no-such-model",
                 "--max-errors", "0", "--out", str(tmp_path))
    assert done.returncode == 1, done.stderr  # the gate: 3 answers were not 200
    assert "3 requests were not answered 200" in done.stderr
    result = msgspec.json.decode(check_files(tmp_path, "http"), type=HttpResult)
    level = result.levels[0]
    assert level.statuses == {"404": 3} and level.images == 0 and level.latency_p50 is None
    assert level.nodes is None  # no admin key given


def test_http_where_every_request_fails_says_why_and_exits_1(server: ServerProcess, tmp_path: Path) -> None:
    """No gate asked for: a benchmark that measured nothing still fails, with the first error body."""
    done = bench("http", server.url, "--concurrency", "1", "--requests", "2", "--size", "7x7", "--out",
                 str(tmp_path))
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("bench: 2 requests were not answered 200 (none was); the first answer was 400: ")
    error = json.loads(last.split("400: ", 1)[1])["error"]  # the server's own body, as it sent it
    assert error["param"] == "size" and error["code"] == "invalid_size"
    result = msgspec.json.decode(check_files(tmp_path, "http"), type=HttpResult)
    assert result.levels[0].first_error.startswith("400: ") and "invalid_size" in done.stdout  # the table says it too


def test_route_cycle_interleaves_by_weight() -> None:
    assert _route_cycle({"generations": 2, "edits": 1}) == ["generations", "edits", "generations"]
    assert _route_cycle({"generations": 0, "variations": 1}) == ["variations"]
