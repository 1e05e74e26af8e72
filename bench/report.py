"""Where a run's results go: `<out>/<kind>.json` (everything), `<kind>.md` (the table people read)
and `<kind>.png` (the chart), in a folder per run (default `bench/results/<timestamp>/`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec


def results_dir(out: str | None) -> Path:
    folder = Path(out) if out else Path("bench") / "results" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats with three significant decimals, None as a dash."""

    def cell(value: object) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write(folder: Path, kind: str, record: msgspec.Struct, markdown: str, figure: Any) -> list[Path]:
    """Write the three files of a run and close the figure; returns their paths."""
    paths = [folder / f"{kind}.json", folder / f"{kind}.md", folder / f"{kind}.png"]
    paths[0].write_bytes(msgspec.json.format(msgspec.json.encode(record), indent=2) + b"\n")
    paths[1].write_text(markdown + "\n", encoding="utf-8")
    figure.savefig(paths[2], dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return paths


def new_figure(ncols: int = 1, width: float = 8.0, height: float = 4.5) -> tuple[Any, Any]:
    """A matplotlib figure and its axes (one row of `ncols`) on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
