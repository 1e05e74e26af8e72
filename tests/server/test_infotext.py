"""Reading an infotext back (`/sdapi/v1/png-info`) takes time in proportion to its length, whatever it holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from server.a1111 import infotext
from tests.patience import PATIENCE

ROOT = Path(__file__).resolve().parents[2]


def test_a_long_line_without_parameters_reads_as_prompt_in_linear_time() -> None:
    """A PNG text chunk may inflate to a megabyte: a 600 kB line without a colon is prompt, read at once. With
    A1111's unbounded key pattern every position scanned to the line's end (hours for this line)."""
    text = "a lighthouse\n" + "ab " * 200_000
    script = "import json, sys; from server.a1111 import infotext; print(json.dumps(infotext.parse(sys.stdin.read())))"
    try:  # a process of its own: a regular expression holds the interpreter until it ends
        done = subprocess.run([sys.executable, "-c", script], input=text, capture_output=True, text=True, cwd=ROOT,
                              timeout=PATIENCE, check=True)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"parsing a {len(text)}-character infotext took over {PATIENCE} s") from None
    assert json.loads(done.stdout) == {"Prompt": text.strip(), "Negative prompt": ""}


def test_the_parameters_line_still_reads_as_a1111_writes_it() -> None:
    text = 'a cat\nNegative prompt: fog\nSteps: 4, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x96, Lora: "a: 1"'
    assert infotext.parse(text) == {"Prompt": "a cat", "Negative prompt": "fog", "Steps": "4", "Sampler": "Euler a",
                                    "CFG scale": "7", "Seed": "5", "Size-1": "64", "Size-2": "96", "Lora": "a: 1"}
