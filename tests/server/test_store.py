"""The image store's sweep on a real folder: only our names, past anything in its way, under the size cap."""

from __future__ import annotations

import os
import time
from pathlib import Path

from server.openai.store import ImageStore


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_sweep_deletes_only_our_expired_names_and_survives_folders(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ttl=60)
    (tmp_path / "lost+found").mkdir()  # a volume root; iterdir lists it first-ish, the old sweep died on it
    (tmp_path / "aaa-a-folder").mkdir()
    foreign = [tmp_path / "README.txt", tmp_path / "backup.png", tmp_path / ("B" * 32 + ".gif")]
    for path in foreign:
        path.write_bytes(b"not ours")
    ours = [store.directory / store.put(b"x" * 10, "png") for _ in range(3)]
    partial = tmp_path / f".{'C' * 32}.webp.partial"
    partial.write_bytes(b"half")
    for path in [*foreign, *ours[:2], partial, tmp_path / "lost+found", tmp_path / "aaa-a-folder"]:
        _age(path, 3600)
    assert store.sweep() == 3  # two old images and the stale partial write
    assert all(path.exists() for path in foreign)
    assert (tmp_path / "lost+found").is_dir()
    assert [path.exists() for path in ours] == [False, False, True]
    assert not partial.exists()
    assert store.get(ours[2].name) is not None


def test_size_cap_deletes_the_oldest_of_ours(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ttl=3600, max_bytes=250)
    foreign = tmp_path / "operator-notes.txt"
    foreign.write_bytes(b"n" * 1000)  # not ours: neither counted nor deleted
    names = [store.put(b"i" * 100, "png") for _ in range(4)]
    for age, name in zip((40, 30, 20, 10), names, strict=True):
        _age(tmp_path / name, age)
    assert store.sweep() == 2
    assert [(tmp_path / name).exists() for name in names] == [False, False, True, True]
    assert foreign.exists()
    assert ImageStore(tmp_path, ttl=3600).sweep() == 0  # no cap: nothing young goes
