"""Export fails with one exception type; the CLI prints its message as one line and exits 2."""

from __future__ import annotations


class ExportError(Exception):
    """A problem the user can act on: unknown preset, missing file, unreachable hub, full disk…"""
