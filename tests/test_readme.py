"""The README's own examples, run as written against real processes, so that the README cannot drift from
the code.

A README block is run when an HTML comment `<!-- readme-test: NAME -->` (invisible on GitHub) stands right
before it; each name has its test here, and a marked block without a test, or a test whose block is gone,
fails. The blocks run as a reader would paste them, adapted only in ports (8080-8082 become free ports),
`/tmp/` (a temporary folder), `.venv/bin/python` (this interpreter) and the working folder, which holds
`models/` as `make serve` leaves it. Shell blocks run in bash with the servers they start in the background;
their process group is ended afterwards.

Not run here, and why (those blocks carry no marker):
* exports from the hub (`export sdxl`, `sd15`, …), the LoRA and optimum-cli examples: no network here;
* TensorRT, `engines doctor` on a GPU and the GPU benchmarks: no GPU;
* `docker`, `docker compose` and `kubectl`: no container runtime (`tests/deploy` checks those files instead);
* the Performance and batching measurements (`random-sd15`, full size): minutes and gigabytes each.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.processes import ROOT, ServerProcess, free_port

README = ROOT / "README.md"
MARKED = re.compile(r"^<!-- readme-test: ([\w-]+) -->\n```(\w+)\n(.*?)\n```$", re.M | re.S)
RUN = {"quick-start", "export-and-serve", "streaming-python", "streaming-curl", "a1111", "router", "engines-python",
       "model-budgets"}
PORTS = re.compile(r"\b808[0-2]\b")


def readme_blocks() -> dict[str, tuple[str, str]]:
    """Marked block name → (language, code)."""
    found: dict[str, tuple[str, str]] = {}
    for match in MARKED.finditer(README.read_text()):
        assert match.group(1) not in found, f"two README blocks are marked {match.group(1)!r}"
        found[match.group(1)] = (match.group(2), match.group(3))
    return found


def block(name: str) -> str:
    blocks = readme_blocks()
    if name not in blocks:
        pytest.fail(f"README.md has no block marked <!-- readme-test: {name} --> (right before its ``` fence)")
    return blocks[name][1]


def adapt(code: str, ports: dict[int, int], tmp: Path) -> str:
    """The only changes: ports, /tmp/ and the interpreter."""
    code = PORTS.sub(lambda m: str(ports[int(m.group())]), code)
    return code.replace("/tmp/", f"{tmp}/").replace(".venv/bin/python", shlex.quote(sys.executable))


def environment() -> dict[str, str]:
    """This environment without SDSERVE_ variables (a reader's shell has none), with this tree importable."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SDSERVE_")}
    return {**clean, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def run_python(code: str, cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environment(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def run_shell(script: str, cwd: Path, timeout: float = 600) -> tuple[str, str]:
    """The script in bash; then every process it started (its background servers) is ended. Its stdout (the
    curls' answers) and stderr (the servers' logs) go to files: background servers keep pipes open."""
    out, err = cwd / "stdout.txt", cwd / "stderr.txt"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        process = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=environment(), stdout=stdout,
                                   stderr=stderr, start_new_session=True)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the README block did not finish in {timeout} s:\n{out.read_text()}\n{err.read_text()[-5000:]}")
    finally:
        _end_group(process.pid)
    assert process.returncode == 0, out.read_text() + err.read_text()[-5000:]
    return out.read_text(), err.read_text()


def _end_group(pgid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:  # the group is gone once killpg finds no process; SIGKILL after 10 s
            for _ in range(100):
                os.killpg(pgid, 0)
                time.sleep(0.1)
        except ProcessLookupError:
            return


def answers(text: str) -> list[object]:
    """The JSON objects curl printed one after another (after whatever else the block printed, e.g. an
    export's summary, which starts no line with a brace)."""
    decoder, found, at = json.JSONDecoder(), [], text.find("{")
    while at != -1:
        value, end = decoder.raw_decode(text, at)
        found.append(value)
        at = text.find("{", end)
    return found


def png_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.size


def with_models(folder: Path, *models: Path) -> Path:
    """A working folder with `models/` holding these model directories, as `make serve` leaves it."""
    (folder / "models").mkdir(parents=True)
    for model in models:
        (folder / "models" / model.name).symlink_to(model)
    return folder


@pytest.fixture(scope="module")
def demo_server(tiny_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ServerProcess]:
    """What `make serve` starts: a standalone server on models/ holding the demo model."""
    work = with_models(tmp_path_factory.mktemp("demo"), tiny_model("tiny-sd15"))
    process = ServerProcess("standalone", ["--models-dir", str(work / "models"), "--images-dir",
                                           str(work / "images")], work).start()
    yield process
    process.stop()


def test_every_marked_block_has_its_test() -> None:
    assert set(readme_blocks()) == RUN


def test_quick_start_saves_the_image_and_prints_its_path_and_seed(demo_server: ServerProcess,
                                                                  tmp_path: Path) -> None:
    printed = run_python(adapt(block("quick-start"), {8080: demo_server.port}, tmp_path), tmp_path)
    saved = tmp_path / "lighthouse.png"
    assert printed.strip() == f"saved {saved.resolve()} (seed 7)"
    assert png_size(saved.read_bytes()) == (256, 256)


def test_streaming_examples(demo_server: ServerProcess, tmp_path: Path) -> None:
    printed = run_python(adapt(block("streaming-python"), {8080: demo_server.port}, tmp_path), tmp_path)
    assert printed.splitlines() == ["image_generation.partial_image 0", "image_generation.partial_image 1",
                                    "image_generation.completed None"], printed
    out, _ = run_shell(adapt(block("streaming-curl"), {8080: demo_server.port}, tmp_path), tmp_path, timeout=300)
    events = re.findall(r"^event: (\S+)$", out, re.M)
    assert events == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], out[:2000]


def test_a1111_curl_saves_the_image_and_prints_its_seed(demo_server: ServerProcess, tmp_path: Path) -> None:
    out, _ = run_shell(adapt(block("a1111"), {8080: demo_server.port}, tmp_path), tmp_path, timeout=300)
    assert out.strip() == "7"
    assert png_size((tmp_path / "a1111.png").read_bytes()) == (256, 256)


def test_export_then_serve_the_exported_folder(tmp_path: Path) -> None:
    ports = {8080: free_port()}
    out, err = run_shell(adapt(block("export-and-serve"), ports, tmp_path), tmp_path)
    assert out.startswith("exported tiny-sdxl"), out[:1000]
    ready, generated = answers(out[out.index("\n{"):])
    assert ready["status"] == "ready" and ready["models"] == ["tiny-sdxl"], (ready, err[-3000:])
    assert generated["data"][0]["seed"] == 7 and generated["model"] == "tiny-sdxl"
    # the URL points at the server, which the block left running until the group ended: the image was kept
    assert generated["data"][0]["url"].startswith(f"http://127.0.0.1:{ports[8080]}/v1/images/files/")
    kept = list((tmp_path / "images").iterdir())
    assert len(kept) == 1 and png_size(kept[0].read_bytes()) == (512, 512)


def test_router_and_two_nodes(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    ports = {8080: free_port(), 8081: free_port(), 8082: free_port()}
    work = with_models(tmp_path, tiny_model("tiny-sd15"))
    out, err = run_shell(adapt(block("router"), ports, tmp_path), work)
    ready, nodes, generated = answers(out)
    assert ready["status"] == "ready", err[-3000:]
    registered = {node["url"] for node in nodes["data"]}
    assert registered and registered <= {f"http://127.0.0.1:{ports[8081]}", f"http://127.0.0.1:{ports[8082]}"}
    assert generated.get("model") == "tiny-sd15" and len(generated["data"]) == 2, str(generated)[:500]
    assert all(item["url"].startswith(f"http://127.0.0.1:{ports[8080]}/v1/images/") for item in generated["data"])
    kept = list((work / "images").iterdir())  # the router keeps url images
    assert len(kept) == 2 and {png_size(path.read_bytes()) for path in kept} == {(256, 256)}


def test_model_budgets_admin_routes(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    work = with_models(tmp_path / "work", tiny_model("tiny-sd15"), tiny_model("tiny-sd21"))
    out, err = run_shell(adapt(block("model-budgets"), {8080: free_port()}, tmp_path), work)
    ready, loaded, listing, unloaded, rescanned = answers(out)
    assert ready["status"] == "ready", out + err
    assert (loaded["id"], loaded["state"]) == ("tiny-sd15", "loaded"), out + err
    states = {model["id"]: model["state"] for model in listing["data"]}
    assert states == {"tiny-sd15": "available", "tiny-sd21": "loaded"}, out + err  # the request made room
    assert (unloaded["id"], unloaded["state"]) == ("tiny-sd21", "available")
    assert rescanned["added"] == rescanned["removed"] == [] and len(rescanned["models"]["data"]) == 2


def test_engines_from_python(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    work = with_models(tmp_path, tiny_model("tiny-sdxl"))
    printed = run_python(adapt(block("engines-python"), {}, tmp_path), work)
    assert printed.startswith("[1] {"), printed
    assert png_size((work / "cat.png").read_bytes()) == (256, 256)
