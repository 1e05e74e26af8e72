"""The playground at / in a real headless browser (Debian's chromium driven by Playwright), against the
shared tiny-model server. Screenshots of the main states are written to the folder in
$SDSERVE_SCREENSHOTS, else `playground-screenshots*/` under pytest's basetemp."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.processes import ServerProcess

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the `test` extra has it)")

SIZE = "128x128"
STEPS = 4
TIMEOUT_MS = 60_000
# Records, in order, every image the page adds to the partial and result areas.
OBSERVE = """() => {
  window.__shown = [];
  const seen = (records) => { for (const r of records) for (const n of r.addedNodes) {
    for (const img of n.querySelectorAll ? [n, ...n.querySelectorAll('img')] : []) {
      if (img.tagName === 'IMG') window.__shown.push({kind: img.dataset.kind, src: img.src});
    }
  } };
  for (const id of ['partials', 'result']) {
    new MutationObserver(seen).observe(document.getElementById(id), {childList: true, subtree: true});
  }
}"""


def chromium() -> str:
    for name in (os.environ.get("SDSERVE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        found = name and shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium found: `make test` installs Debian's chromium when run as root "
                "(or set SDSERVE_CHROMIUM to a Chromium binary)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium()
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("SDSERVE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)
    return tmp_path_factory.mktemp("playground-screenshots")


class Page:
    """A fresh browser tab on the playground, with its console errors collected."""

    def __init__(self, browser: Any, server: ServerProcess, width: int = 1280, height: int = 900) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.goto(server.url + "/")
        sync_api.expect(self.page.locator("#status")).to_have_text("Ready.", timeout=TIMEOUT_MS)

    def script_errors(self) -> list[str]:
        """Console errors other than the browser's own note of an HTTP error status (the tests provoke 4xx)."""
        return [e for e in self.errors if not e.startswith("Failed to load resource")]

    def settings(self, **values: str) -> None:
        for name, value in values.items():
            self.page.fill(f"#{name}", value)

    def final_images(self) -> list[np.ndarray]:
        sources = self.page.eval_on_selector_all("#result img[data-kind=final]", "imgs => imgs.map(i => i.src)")
        return [pixels(src) for src in sources]


def pixels(source: str | bytes) -> np.ndarray:
    if isinstance(source, str):  # a data: URL or bare base64
        source = base64.b64decode(source.rpartition(",")[2])
    return np.asarray(Image.open(io.BytesIO(source)).convert("RGBA"))


def api_render(server: ServerProcess, **fields: Any) -> np.ndarray:
    """The same image straight from the API, not streamed."""
    reply = httpx.post(f"{server.url}/v1/images/generations", timeout=120,
                       json={**fields, "response_format": "b64_json"})
    assert reply.status_code == 200, reply.text
    return pixels(reply.json()["data"][0]["b64_json"])


@pytest.fixture(scope="module")
def generated(browser: Any, server: ServerProcess, shots: Path) -> Iterator[dict[str, Any]]:
    """One streamed generation with a random seed, started from the keyboard (Ctrl+Enter in the prompt)."""
    tab = Page(browser, server)
    page = tab.page
    page.select_option("#model", "tiny-sd15")
    tab.settings(size=SIZE, steps=str(STEPS), seed="", partial_images="2")
    page.evaluate(OBSERVE)
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#result img[data-kind=final]")
    page.screenshot(path=shots / "generated.png", full_page=True)
    (final,) = tab.final_images()
    seed = int(page.get_attribute("#result img[data-kind=final]", "data-seed"))  # the one the server drew
    yield {"tab": tab, "shown": page.evaluate("window.__shown"), "prompt": page.input_value("#prompt"), "final": final,
           "seed": seed}
    tab.context.close()


def test_page_loads_without_console_errors_and_fits_a_phone(browser: Any, server: ServerProcess, shots: Path) -> None:
    tab = Page(browser, server, width=1280)
    assert tab.page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")[0] == "tiny-sd15"
    card = next(m for m in httpx.get(server.url + "/v1/models").json()["data"] if m["id"] == "tiny-sd15")
    shown = [tab.page.input_value(f"#{name}") for name in ("size", "steps", "guidance_scale", "sampler")]
    assert shown == [card["default_size"], str(card["default_steps"]), "7.5", "euler"]  # the tiny presets' defaults
    bounds = card["limits"]  # the form's bounds and strength default come from the card, not the page
    shown_bounds = {name: [float(tab.page.get_attribute(f"#{name}", end)) for end in ("min", "max")]
                    for name in ("n", "steps", "guidance_scale", "seed")}
    assert shown_bounds == {"n": [1, bounds["max_images"]], "steps": [bounds["min_steps"], bounds["max_steps"]],
                            "guidance_scale": [bounds["min_guidance"], bounds["max_guidance"]],
                            "seed": [0, bounds["max_seed"]]}
    assert float(tab.page.get_attribute("#strength", "max")) == bounds["max_strength"]
    assert float(tab.page.input_value("#strength")) == card["default_strength"]["image"]
    assert tab.page.is_hidden("#key-box")  # no keys configured
    tab.page.screenshot(path=shots / "loaded.png", full_page=True)
    assert tab.errors == []
    tab.context.close()
    phone = Page(browser, server, width=390, height=844)
    overflow = phone.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    phone.page.screenshot(path=shots / "phone.png", full_page=True)
    assert overflow <= 0, f"the page is {overflow} px wider than a phone screen"
    assert phone.errors == []
    phone.context.close()
    headers = httpx.get(server.url + "/").headers
    assert "default-src 'self'" in headers["content-security-policy"]  # nothing from elsewhere


def test_stream_shows_two_partials_then_the_final_image_equal_to_the_api(generated: dict[str, Any],
                                                                           server: ServerProcess) -> None:
    kinds = [shown["kind"] for shown in generated["shown"]]
    assert kinds == ["partial", "partial", "final"]
    for shown in generated["shown"]:
        assert pixels(shown["src"]).shape == (128, 128, 4)
    tab = generated["tab"]
    caption = tab.page.inner_text("#result figcaption")
    assert f"seed {generated['seed']}" in caption
    expected = api_render(server, model="tiny-sd15", prompt=generated["prompt"], size=SIZE, seed=generated["seed"],
                          steps=STEPS,
                          guidance_scale=7.5, sampler="euler")
    np.testing.assert_array_equal(generated["final"], expected)
    assert tab.script_errors() == []


def _copied(tab: Page, button: str) -> str:
    card = tab.page.locator("#gallery li").first
    card.get_by_role("button", name=button).click()
    sync_api.expect(tab.page.locator("#status")).to_contain_text(f"Copied: {button.lower()}")
    return tab.page.evaluate("navigator.clipboard.readText()")


def test_copied_curl_command_returns_the_same_image(generated: dict[str, Any]) -> None:
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    tab = generated["tab"]
    command = _copied(tab, "Copy as curl")
    assert f'"seed":{generated["seed"]}' in command and f'"steps":{STEPS}' in command and '"sampler":"euler"' in command
    run = subprocess.run(["bash", "-c", command], capture_output=True, timeout=120, check=True)
    url = httpx.Response(200, content=run.stdout).json()["data"][0]["url"]
    np.testing.assert_array_equal(pixels(httpx.get(url, timeout=30).content), generated["final"])


def test_copied_python_code_returns_the_same_image(generated: dict[str, Any], tmp_path: Path) -> None:
    tab = generated["tab"]
    code = _copied(tab, "Copy as Python")
    assert "extra_body=" in code
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, timeout=120, check=True)
    written = tmp_path / f"sdserve-{generated['seed']}.png"
    np.testing.assert_array_equal(pixels(written.read_bytes()), generated["final"])


def test_use_these_settings_again_makes_the_same_image(generated: dict[str, Any]) -> None:
    tab = generated["tab"]
    tab.settings(seed="1", steps="2", size="64x64", prompt="something else")
    tab.page.locator("#gallery li").first.get_by_role("button", name="Use these settings again").click()
    restored = [tab.page.input_value(f"#{name}") for name in ("seed", "steps", "size")]
    assert restored == [str(generated["seed"]), str(STEPS), SIZE]
    assert tab.page.evaluate("document.activeElement.id") == "prompt"  # back in the form, for the keyboard
    tab.page.click("#run")
    tab.page.wait_for_selector("#gallery li:nth-child(2)")
    np.testing.assert_array_equal(tab.final_images()[0], generated["final"])


def test_inpainting_with_a_painted_mask(browser: Any, server: ServerProcess, shots: Path, tmp_path: Path) -> None:
    tab = Page(browser, server)
    page = tab.page
    upload = tmp_path / "input.png"
    Image.new("RGB", (200, 150), (40, 120, 200)).save(upload)
    page.check("input[name=mode][value=edit]")
    page.select_option("#model", "tiny-sd15-inpaint")
    page.set_input_files("#image", str(upload))
    page.uncheck("#stream")  # the plain JSON answer: its render time comes from `server-timing`
    tab.settings(size=SIZE, steps=str(STEPS), seed="5")
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5, steps=5)
    page.mouse.up()
    page.click("#run")
    page.wait_for_selector("#result img[data-kind=final]")
    page.screenshot(path=shots / "inpainted.png", full_page=True)
    # the mask the request carried, as the gallery's download link gives it
    card = page.locator("#gallery li").first
    for link in ("Input image", "Mask"):
        with page.expect_download() as download:
            card.get_by_role("link", name=link).click()
        download.value.save_as(tmp_path / download.value.suggested_filename)
    mask = np.asarray(Image.open(tmp_path / "sdserve-5-mask.png"))
    assert mask.shape == (150, 200, 4)  # the image's own size, with alpha
    assert mask[75, 80, 3] == 0 and mask[75, 100, 3] == 0  # painted: transparent = edit (OpenAI)
    assert mask[10, 10, 3] == 255 and mask[140, 190, 3] == 255  # unpainted: kept
    (final,) = tab.final_images()
    assert final.shape == (128, 128, 4)
    assert "s render" in page.inner_text("#result figcaption")  # server-timing reached the page
    # the copied commands, run next to the downloaded input and mask, make the same image
    curl = subprocess.run(["bash", "-c", _copied(tab, "Copy as curl")], cwd=tmp_path, capture_output=True,
                          timeout=120, check=True)
    url = httpx.Response(200, content=curl.stdout).json()["data"][0]["url"]
    np.testing.assert_array_equal(pixels(httpx.get(url, timeout=30).content), final)
    subprocess.run([sys.executable, "-c", _copied(tab, "Copy as Python")], cwd=tmp_path, capture_output=True,
                   timeout=120, check=True)
    np.testing.assert_array_equal(pixels((tmp_path / "sdserve-5.png").read_bytes()), final)
    assert tab.script_errors() == []
    tab.context.close()


def test_invalid_size_shows_the_api_message_next_to_the_size_control(browser: Any, server: ServerProcess,
                                                                      shots: Path) -> None:
    tab = Page(browser, server)
    tab.settings(size="100x7")
    tab.page.click("#run")
    error = tab.page.locator("#size-error")
    error.wait_for()
    expected = httpx.post(f"{server.url}/v1/images/generations", timeout=30,
                          json={"prompt": "x", "model": "tiny-sd15", "size": "100x7"}).json()["error"]
    assert expected["param"] == "size"
    assert error.inner_text() == expected["message"]
    # in the size control's own field, and the control is marked invalid
    assert tab.page.locator(".field", has=tab.page.locator("#size")).locator("#size-error").count() == 1
    assert tab.page.get_attribute("#size", "aria-invalid") == "true"
    tab.page.screenshot(path=shots / "invalid-size.png", full_page=True)
    assert tab.script_errors() == []
    tab.context.close()


def test_api_key_typed_in_is_kept_for_the_tab(browser: Any, tmp_path: Path) -> None:
    process = ServerProcess("standalone", ["--models-dir", str(tmp_path), "--api-key", "sesame"], tmp_path)
    process.start(ready=False)  # no models: /v1/models answers an empty list once the key is right
    try:
        context = browser.new_context()
        page = context.new_page()
        page.goto(process.url + "/")
        page.locator("#api-key").wait_for()  # shown after /v1/models answered 401
        sync_api.expect(page.locator("#api-key-error")).to_have_text("This server needs an API key.")
        page.fill("#api-key", "sesame")
        page.press("#api-key", "Enter")
        sync_api.expect(page.locator("#status")).to_contain_text("No model is ready yet")
        assert page.evaluate("sessionStorage.getItem('sdserve-api-key')") == "sesame"
        context.close()
    finally:
        process.stop()


def test_no_playground_flag(tmp_path: Path) -> None:
    process = ServerProcess("standalone", ["--models-dir", str(tmp_path), "--no-playground"], tmp_path)
    process.start(ready=False)
    try:
        reply = httpx.get(process.url + "/", timeout=10)
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found"
        assert httpx.get(process.url + "/playground/main.js", timeout=10).status_code == 404
    finally:
        process.stop()
