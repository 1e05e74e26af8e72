"""Settings out of range, naming files the process cannot use, or an SDSERVE_ variable that is no setting: one
line on stderr and exit status 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import msgspec
import pytest

from server.__main__ import main
from server.settings import Settings, env_name, variables
from tests.processes import ROOT, ServerProcess, free_port


@pytest.mark.parametrize(("args", "env", "named"), [
    (["--render-slots", "0"], {}, "render_slots"),
    (["--queue-depth", "-1"], {}, "queue_depth"),
    ([], {"SDSERVE_QUEUE_DEPTH": "-3"}, "queue_depth"),
    (["--request-timeout", "0"], {}, "request_timeout"),
    (["--batch-window", "-5"], {}, "batch_window"),
    ([], {"SDSERVE_MAX_BATCH": "0"}, "max_batch"),
    (["--batch-renders", "0"], {}, "batch_renders"),
    (["--heartbeat-interval", "15", "--heartbeat-timeout", "15"], {}, "heartbeat_interval"),
    ([], {"SDSERVE_HEARTBEAT_INTERVAL": "30"}, "heartbeat_interval"),
    (["--api-keys-file", "{tmp}/no-such-keys.txt"], {}, "api_keys_file"),
    (["--api-keys-file", "{tmp}/keys.txt"], {}, "api_keys_file line 3"),  # a limit not understood
    (["--stall-factor", "0.5"], {}, "stall_factor"),
    (["--unhealthy-after-failures", "-1"], {}, "unhealthy_after_failures"),
    ([], {"SDSERVE_LIVENESS_SECONDS": "0"}, "liveness_seconds"),
    (["--images-dir", "{tmp}/a-file/images"], {}, "images_dir"),
    (["--images-max-bytes", "0"], {}, "images_max_bytes"),
    (["--threads", "0"], {}, "threads"),
    (["--fetch-allow-networks", "127.0.0.0/8,not-a-network"], {}, "fetch_allow_networks"),
    ([], {"SDSERVE_FETCH_ALLOW_NETWORKS": "10.0.0.0/33"}, "fetch_allow_networks"),
    (["--fetch-timeout", "0"], {}, "fetch_timeout"),
    ([], {"SDSERVE_FETCH_IMAGE_URLS": "disabled"}, "SDSERVE_FETCH_IMAGE_URLS"),  # was read as on
])
def test_bad_settings_are_one_line_and_exit_2(args: list[str], env: dict[str, str], named: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a-file").write_text("a file where a folder should be")
    (tmp_path / "keys.txt").write_text("# keys\nsk-a max_concurrent=2 rate=30/m\nsk-b rate=30\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # the default images dir is relative
    status = main(["standalone", "--models-dir", str(tmp_path), *[a.format(tmp=tmp_path) for a in args]])
    err = capsys.readouterr().err
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("server: error: ") and named in lines[0], err


def test_boolean_variables_take_only_yes_or_no_words_and_empty_is_unset() -> None:
    from server.settings import from_sources

    assert from_sources("standalone", None, {"SDSERVE_FETCH_IMAGE_URLS": "", "SDSERVE_IMAGES_DIR": "/tmp"}
                        ).fetch_image_urls is False  # a compose ${VAR} that expands to nothing
    assert from_sources("standalone", None, {"SDSERVE_FETCH_IMAGE_URLS": "on", "SDSERVE_IMAGES_DIR": "/tmp"}
                        ).fetch_image_urls is True
    assert from_sources("standalone", None, {"SDSERVE_PLAYGROUND": "no", "SDSERVE_IMAGES_DIR": "/tmp"}
                        ).playground is False


# --- SDSERVE_* variables: one per setting, named in --help; any other one stops the server -----------------

def _server(env: dict[str, str], tmp_path: Path, timeout: float = 90.0) -> subprocess.CompletedProcess[str] | None:
    """`python -m server standalone` with these variables: its exit, or None when it was still serving after
    `timeout` (then it is stopped)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SDSERVE_")}
    command = [sys.executable, "-m", "server", "standalone", "--port", str(free_port()), "--models-dir",
               str(tmp_path / "models"), "--images-dir", str(tmp_path / "images")]
    try:
        return subprocess.run(command, cwd=ROOT, env={**clean, **env}, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.parametrize(("variable", "meant"), [
    ("SDSERVE_API_KEY", "SDSERVE_API_KEYS"),  # the server stayed open with it set
    ("SDSERVE_MODEL", "SDSERVE_MODELS"),
    ("SDSERVE_NO_PLAYGROUND", "SDSERVE_PLAYGROUND=false"),
    ("SDSERVE_DRAIN_TIMOUT", "SDSERVE_DRAIN_TIMEOUT"),
])
def test_an_unknown_variable_stops_the_server_naming_the_one_meant(variable: str, meant: str,
                                                                 tmp_path: Path) -> None:
    done = _server({variable: "secret"}, tmp_path, timeout=120)  # only a server that stays up waits this long
    assert done is not None, f"the server started and served with {variable} set"
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"{variable} (did you mean {meant}" in lines[0] and lines[0].startswith("server: error: "), lines[0]


def test_known_variables_start_a_server_that_applies_them(tmp_path: Path) -> None:
    """SDSERVE_API_KEYS closes the server; SDSERVE_CACHE_DIR (the engines' variable) is accepted."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SDSERVE_")}
    env = {**clean, "SDSERVE_API_KEYS": "key-one,key-two", "SDSERVE_CACHE_DIR": str(tmp_path / "cache"),
           "SDSERVE_PORT": str(port)}
    process = ServerProcess("standalone", ["--models-dir", str(tmp_path / "models"), "--images-dir",
                                           str(tmp_path / "images")], tmp_path, env=env, port=port)
    process.env = env  # exactly these SDSERVE_ variables, none from the caller
    process.start(ready=False)
    try:
        assert httpx.get(f"{process.url}/v1/models", timeout=10).status_code == 401
        keyed = httpx.get(f"{process.url}/v1/models", headers={"Authorization": "Bearer key-two"}, timeout=10)
        assert keyed.status_code == 200
    finally:
        process.stop()


def test_help_names_every_settings_variable() -> None:
    done = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    named = set(re.findall(r"\[(SDSERVE_[A-Z_]+)", " ".join(done.stdout.split())))
    settings = {env_name(f.name) for f in msgspec.structs.fields(Settings) if f.name != "role"}
    assert named == settings, (sorted(settings - named), sorted(named - settings))


def test_every_sdserve_variable_the_project_names_is_one_a_server_accepts() -> None:
    """The README, deploy files, bench, playground and engines use the server's names. (Tests and the settings
    module name wrong ones on purpose.)"""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    used: dict[str, set[str]] = {}
    for name in files:
        path = ROOT / name
        if name.startswith("tests/") or name == "server/settings.py" or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for variable in re.findall(r"\bSDSERVE_[A-Z][A-Z0-9_]*", text):
            used.setdefault(variable, set()).add(name)
    unknown = {variable: sorted(where) for variable, where in used.items() if variable not in variables()}
    assert not unknown, unknown
    assert "SDSERVE_API_KEYS" in used and "SDSERVE_CACHE_DIR" in used  # the scan sees them
