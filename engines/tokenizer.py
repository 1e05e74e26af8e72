"""CLIP tokenization into 77-token windows, with the `tokenizers` package alone.

A prompt longer than one window is not truncated: its tokens are cut into 75-token pieces, each wrapped
as `<bos> piece <eos> <pad>…` and encoded separately, and the hidden states are concatenated along the
sequence (the scheme the WebUI made standard). A short prompt gives exactly the single window diffusers'
`tokenizer(prompt, padding="max_length", truncation=True)` gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from engines import manifest as mf
from engines.errors import ModelInvalid


class PromptTokenizer:
    def __init__(self, spec: mf.Tokenizer, root: Path) -> None:
        try:
            self._tokenizer = Tokenizer.from_file(str(root / spec.file.path))
        except Exception as exc:  # the tokenizers package raises a bare Exception on bad JSON
            raise ModelInvalid(f"{root / spec.file.path}: {exc}") from exc
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.spec = spec
        self.piece = spec.max_length - 2  # room left by <bos> and <eos>

    def count(self, text: str) -> int:
        """How many windows `text` needs (at least one, also for the empty prompt)."""
        return max(1, -(-len(self._ids(text)) // self.piece))

    def tokens(self, text: str) -> int:
        """How many tokens `text` is, without the special and padding tokens (for usage reports)."""
        return len(self._ids(text))

    def windows(self, text: str, count: int | None = None) -> np.ndarray:
        """(windows, max_length) int64 token ids; `count` pads with empty windows so that a prompt and
        its negative prompt line up."""
        ids = self._ids(text)
        pieces = [ids[i : i + self.piece] for i in range(0, len(ids), self.piece)] or [[]]
        pieces += [[]] * ((count or len(pieces)) - len(pieces))
        rows = np.full((len(pieces), self.spec.max_length), self.spec.pad_id, dtype=np.int64)
        for row, piece in zip(rows, pieces, strict=True):
            row[0] = self.spec.bos_id
            row[1 : len(piece) + 1] = piece
            row[len(piece) + 1] = self.spec.eos_id
        return rows

    def _ids(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids
