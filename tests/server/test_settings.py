"""Settings out of range, or naming files the process cannot use: one line on stderr and exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.__main__ import main


@pytest.mark.parametrize(("args", "env", "named"), [
    (["--render-slots", "0"], {}, "render_slots"),
    (["--queue-depth", "-1"], {}, "queue_depth"),
    ([], {"SDSERVE_QUEUE_DEPTH": "-3"}, "queue_depth"),
    (["--request-timeout", "0"], {}, "request_timeout"),
    (["--batch-window", "-5"], {}, "batch_window"),
    ([], {"SDSERVE_MAX_BATCH": "0"}, "max_batch"),
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
