"""`--models-dir`: a folder of model directories or one model directory (what `export --output DIR` writes);
a folder with nothing to serve is a loud warning, and /readyz says what is missing rather than "loading"."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.patience import PATIENCE
from tests.processes import ServerProcess


def _readyz_once_settled(process: ServerProcess, timeout: float = PATIENCE) -> httpx.Response:
    """/readyz after the loader has finished (its last word in the log), whatever it says."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = httpx.get(process.url + "/readyz", timeout=PATIENCE)
        if answer.status_code == 200 or "loading" not in answer.text:
            return answer
        time.sleep(0.2)
    raise TimeoutError(process.log())


def test_a_model_directory_itself_is_served(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    model = tiny_model("tiny-sd15")  # as `python -m export tiny-sd15 --output DIR` leaves it
    process = ServerProcess("standalone", ["--models-dir", str(model), "--images-dir", str(tmp_path / "images")],
                            tmp_path).start()
    try:
        assert [m["id"] for m in httpx.get(process.url + "/v1/models", timeout=10).json()["data"]] == ["tiny-sd15"]
        answer = httpx.post(process.url + "/v1/images/generations", timeout=120,
                            json={"prompt": "a lighthouse", "size": "64x64", "steps": 1})
        assert answer.status_code == 200 and answer.json()["model"] == "tiny-sd15", answer.text
    finally:
        process.stop()


def test_a_folder_with_nothing_to_serve_says_why_per_subfolder(tiny_model: Callable[[str], Path],
                                                               tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "empty").mkdir(parents=True)
    (models / "notes").mkdir()
    (models / "notes" / "README.txt").write_text("not a model")
    (models / "exports").mkdir()
    (models / "exports" / "tiny-sd15").symlink_to(tiny_model("tiny-sd15"))  # one level too deep
    process = ServerProcess("standalone", ["--models-dir", str(models), "--images-dir", str(tmp_path / "images")],
                            tmp_path).start(ready=False)
    try:
        answer = _readyz_once_settled(process)
        assert answer.status_code == 503, answer.text
        message = answer.json()["error"]["message"]
        assert f"no models found in {models}" in message and "loading" not in message, message
        assert "empty/ is empty" in message
        assert "notes/ has neither model.json nor model_index.json" in message
        assert f"exports/ holds model directories itself (tiny-sd15): point --models-dir at {models / 'exports'}" \
            in message
        warnings = process.log_lines("WARNING", f"no models found in {models}")
        assert warnings and "notes/ has neither" in warnings[0], process.log()
    finally:
        process.stop()


def test_readyz_names_the_models_that_failed_and_a_missing_folder(tmp_path: Path) -> None:
    broken = tmp_path / "models" / "broken-model"
    broken.mkdir(parents=True)
    (broken / "model.json").write_text("{}")
    process = ServerProcess("standalone", ["--models-dir", str(broken.parent), "--images-dir",
                                           str(tmp_path / "images")], tmp_path).start(ready=False)
    missing = ServerProcess("standalone", ["--models-dir", str(tmp_path / "no-such-folder"), "--images-dir",
                                           str(tmp_path / "images")], tmp_path).start(ready=False)
    try:
        message = _readyz_once_settled(process).json()["error"]["message"]
        assert "every model failed to load: broken-model: " in message, message
        message = _readyz_once_settled(missing).json()["error"]["message"]
        assert f"no models found in {tmp_path / 'no-such-folder'}: it does not exist" in message, message
    finally:
        process.stop()
        missing.stop()
