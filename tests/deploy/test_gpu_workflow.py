""".github/workflows/gpu-bench.yml, checked where no GPU is: every step that can still run after a failure
does, nothing waits on a doctor's verdict, the first step after installing prints one line per backend (run
here for real, on the CPU), the benchmarks run the backends that step found, the SDXL plans cover the batched
HTTP runs, every command's flags exist, and the shell passes shellcheck."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.processes import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "gpu-bench.yml"
Step = dict[str, Any]


@pytest.fixture(scope="module")
def steps() -> list[Step]:
    return yaml.safe_load(WORKFLOW.read_text())["jobs"]["gpu"]["steps"]


def _by_id(steps: list[Step]) -> dict[str, Step]:
    return {s["id"]: s for s in steps if "id" in s}


def _lines(run: str) -> list[str]:
    """The script's logical lines (continuations joined)."""
    return re.sub(r"\\\n\s*", " ", run).splitlines()


def test_every_step_after_the_first_install_runs_whatever_failed_before(steps: list[Step]) -> None:
    first = next(i for i, s in enumerate(steps) if s.get("id") == "install")
    for step in steps[first + 1:]:
        condition = step.get("if", "")
        assert "!cancelled()" in condition or "always()" in condition, step["name"]


def test_no_step_waits_on_a_doctors_verdict(steps: list[Step]) -> None:
    """The doctor exits 1 on any problem: a step others depend on may run it only for its report."""
    by_id = _by_id(steps)
    for step in steps:
        for needed in re.findall(r"steps\.(\w+)\.outcome", step.get("if", "")):
            for line in _lines(by_id[needed].get("run", "")):
                assert "engines doctor" not in line or "|| true" in line, (step["name"], needed, line)


def test_the_first_step_after_installing_says_what_runs_where(steps: list[Step], tmp_path: Path) -> None:
    """Run for real on this CPU host, with this interpreter as .venv and no .venv-ep: one line per backend
    (the cpu one rendered, the GPU ones absent), the block on the summary page, no benchmark legs."""
    installs = [i for i, s in enumerate(steps) if s.get("id", "").startswith("install")]
    step = steps[max(installs) + 1]
    assert step.get("id") == "summary" and "--summary" in step["run"]
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RESULTS": str(tmp_path / "results"),
           "GITHUB_OUTPUT": str(tmp_path / "output"), "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md")}
    done = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "output").read_text().splitlines() == ["legs="]  # no GPU backend here: nothing to measure
    page = (tmp_path / "summary.md").read_text().splitlines()
    assert page[0] == "### What runs where" and page[1] == page[-1] == "```"
    block = page[2:-1]
    assert block[0].startswith("== .venv: ") and block[-1] == "== .venv-ep: not installed"
    backends = block[1:-1]
    assert [line.split()[:2] for line in backends] == [["cpu", "ok"], ["cuda", "absent"], ["tensorrt-ep", "absent"],
                                                        ["tensorrt", "absent"]], backends
    assert "text_encoder, unet, vae_decoder on ONNX Runtime [CPU]" in backends[0]


def test_benchmarks_run_the_backends_the_summary_found(steps: list[Step]) -> None:
    benches = [s for s in steps if "bench pipeline" in s.get("run", "")]
    assert benches
    for step in benches:
        assert not re.search(r"--backend (tensorrt|tensorrt-ep)\b", step["run"]), step["name"]  # never hard-coded
        assert "for backend in" not in step["run"], step["name"]  # nor a list of its own
        if '--backend "$backend"' in step["run"]:
            assert step["env"]["LEGS"] == "${{ steps.summary.outputs.legs }}", step["name"]
            assert "steps.summary.outcome == 'success'" in step["if"]


def test_sdxl_plans_cover_the_batched_http_runs(steps: list[Step]) -> None:
    """With plans for one image a guided request fills the UNet's profile: batching could never put two
    requests in one call, nor decode n > 1 images on the plans."""
    lines = [line for s in steps for line in _lines(s.get("run", ""))]
    (plans,) = [line for line in lines if re.search(r"-m export sdxl .*--tensorrt", line)]
    most_images = int(re.search(r"--batch \d+-(\d+)", plans).group(1))
    batched = [s["run"] for s in steps if "--batch-window" in s.get("run", "")]
    assert batched
    for run in batched:
        concurrency = re.search(r"bench http .*--concurrency ([\d,]+)", " ".join(_lines(run))).group(1)
        assert most_images >= max(int(c) for c in concurrency.split(",")), (most_images, concurrency)


@cache
def _help(module: str, command: str | None) -> str:
    args = [sys.executable, "-m", module, *([command] if command else []), "--help"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_command_the_workflow_runs_has_its_flags(steps: list[Step]) -> None:
    commands = [m for s in steps for line in _lines(s.get("run", ""))
                for m in re.finditer(r"bin/python -m (export|engines|bench|server)((?: [^|;&>]*)?)", line)]
    assert len(commands) > 15
    for match in commands:
        module, words = match.group(1), match.group(2).split()
        command = words[0] if module != "export" and words and not words[0].startswith("-") else None
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", _help(module, command)))
        for word in words:
            if word.startswith("--"):
                assert word.split("=")[0] in flags, f"python -m {module} {command or ''}: {word}"


def test_the_workflow_shell_passes_shellcheck(steps: list[Step], tmp_path: Path) -> None:
    found = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    if not Path(found).is_file():
        pytest.fail("shellcheck is missing: it comes with the test extra (pip install -e .[test])")
    for index, step in enumerate(s for s in steps if "run" in s):
        script = tmp_path / f"step{index}.sh"
        script.write_text("#!/bin/bash -e\n" + re.sub(r"\$\{\{[^}]*\}\}", "EXPR", step["run"]))
        done = subprocess.run([found, "-s", "bash", str(script)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{step['name']}:\n{done.stdout}"
