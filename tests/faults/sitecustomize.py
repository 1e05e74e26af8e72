"""Faults inside ONNX Runtime for server processes the tests start (on their PYTHONPATH with
SDSERVE_TEST_FAULTS=DIR; Python imports `sitecustomize` at start-up). Each UNet call first appends its
latent's height and width to DIR/unet.log (so a test can read which render ran when), then blocks while
DIR/pause exists (as a call wedged in a backend would, after writing DIR/paused so a test knows), and raises
while DIR/fail exists (as a lost GPU does: ONNX Runtime's error, which the backend wraps in EngineFailure).
Control is by files, not timing: a test creates and removes them."""

import os
import time
from pathlib import Path

FAULTS = os.environ.get("SDSERVE_TEST_FAULTS")

if FAULTS:
    import onnxruntime

    _run = onnxruntime.InferenceSession.run
    _folder = Path(FAULTS)

    def run(self, output_names, input_feed, run_options=None):
        if "unet" in (getattr(self, "_model_path", None) or ""):
            height, width = input_feed["sample"].shape[2:]
            with open(_folder / "unet.log", "a") as log:
                log.write(f"{height}x{width}\n")
            if (_folder / "fail").exists():
                raise RuntimeError("injected fault: the device is lost")
            while (_folder / "pause").exists():
                (_folder / "paused").touch()
                time.sleep(0.01)  # polls the file: the pause lasts exactly as long as the test keeps it
        return _run(self, output_names, input_feed, run_options)

    onnxruntime.InferenceSession.run = run
