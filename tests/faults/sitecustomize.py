"""Faults inside ONNX Runtime for server processes the tests start (on their PYTHONPATH with
SDSERVE_TEST_FAULTS=DIR; Python imports `sitecustomize` at start-up). Each UNet call first appends its
latent's height and width to DIR/unet.log (so a test can read which render ran when), then blocks while
DIR/pause exists (as a call wedged in a backend would, after writing DIR/paused so a test knows), and raises
while DIR/fail exists (as a lost GPU does: ONNX Runtime's error, which the backend wraps in EngineFailure).
Each ONNX Runtime session's creation (a model's load) blocks while DIR/load-pause exists, after writing
DIR/loading.
Control is by files, not timing: a test creates and removes them.

Between two steps (the engines' per-step hook, so a held render still stops when its request is cancelled):
while DIR/hold exists, a render that has done at least N steps (N: the file's text, default 1) waits, after
appending "done/total" to DIR/held; DIR/step-seconds makes every step last at least that long; while
DIR/collect exists each step first collects garbage (asyncio reports an exception nobody read when its
future is collected, which a reference cycle can otherwise put off indefinitely)."""

import gc
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

    _init = onnxruntime.InferenceSession.__init__

    def init(self, *args, **kwargs):
        while (_folder / "load-pause").exists():  # a model's load held, as a slow disk would
            (_folder / "loading").touch()
            time.sleep(0.01)
        _init(self, *args, **kwargs)

    onnxruntime.InferenceSession.__init__ = init

    from engines import progress

    _hook = progress.StepHook.__call__

    def _held_back(folder: Path, done: int) -> bool:
        try:
            return done >= int((folder / "hold").read_text().strip() or 1)
        except FileNotFoundError:  # released
            return False

    def gated(self, done, total, first_image, denoised):
        if (_folder / "collect").exists():
            gc.collect()
        if (_folder / "step-seconds").exists():
            time.sleep(float((_folder / "step-seconds").read_text() or 0))
        announced = False
        while _held_back(_folder, done):
            if not announced:
                with open(_folder / "held", "a") as held:
                    held.write(f"{done}/{total}\n")
                announced = True
            if self.on_step is not None:  # a cancelled request raises here, as at any step
                progress._report(lambda: self.on_step(done, total))
            time.sleep(0.02)
        _hook(self, done, total, first_image, denoised)

    progress.StepHook.__call__ = gated
