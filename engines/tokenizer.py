"""CLIP tokenization into 77-token windows, with the `tokenizers` package alone.

A prompt longer than one window is not truncated: its tokens are cut into 75-token pieces, each wrapped
as `<bos> piece <eos> <pad>…` and encoded separately, and the hidden states are concatenated along the
sequence (the scheme the WebUI made standard). A short prompt gives exactly the single window diffusers'
`tokenizer(prompt, padding="max_length", truncation=True)` gives.

A prompt may take at most MAX_WINDOWS windows (600 tokens): far beyond what prompts use (the WebUI's
long prompts are 2–3 windows), while the text encoders' work and the UNet's cross-attention keys grow
linearly with windows, so an unbounded prompt (1 MB, or 4000 emoji of ~4 tokens each) would cost gigabytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from engines import manifest as mf
from engines.errors import InvalidRequest, ModelInvalid
from engines.render import Tokens

MAX_WINDOWS = 8


class PromptTokenizer:
    def __init__(self, spec: mf.Tokenizer, root: Path) -> None:
        try:
            self._tokenizer = (Tokenizer.from_file(str(root / spec.file.path)) if spec.merges is None
                               else _clip_bpe(root / spec.file.path, root / spec.merges.path))
        except Exception as exc:  # the tokenizers package raises a bare Exception on bad files
            raise ModelInvalid(f"{root / spec.file.path}: {exc}") from exc
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.spec = spec
        self.piece = spec.max_length - 2  # room left by <bos> and <eos>

    def ids(self, text: str) -> list[int]:
        """`text`'s token ids, without the special and padding tokens."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def count(self, text: str | list[int]) -> int:
        """How many windows `text` (or its `ids`) needs (at least one, also for the empty prompt)."""
        ids = self.ids(text) if isinstance(text, str) else text
        return max(1, -(-len(ids) // self.piece))

    def tokens(self, text: str) -> int:
        """How many tokens `text` is (for usage reports; `Tokens.count` counts without tokenizing again)."""
        return len(self.ids(text))

    def windows(self, text: str | list[int], count: int | None = None) -> np.ndarray:
        """(windows, max_length) int64 token ids of `text` (or its `ids`); `count` pads with empty windows
        so that a prompt and its negative prompt line up."""
        ids = self.ids(text) if isinstance(text, str) else text
        pieces = [ids[i : i + self.piece] for i in range(0, len(ids), self.piece)] or [[]]
        pieces += [[]] * ((count or len(pieces)) - len(pieces))
        rows = np.full((len(pieces), self.spec.max_length), self.spec.pad_id, dtype=np.int64)
        for row, piece in zip(rows, pieces, strict=True):
            row[0] = self.spec.bos_id
            row[1 : len(piece) + 1] = piece
            row[len(piece) + 1] = self.spec.eos_id
        return rows


def tokenize(model: str, tokenizers: dict[str, PromptTokenizer], prompt: object, negative_prompt: object) -> Tokens:
    """Both prompts by every tokenizer, once; InvalidRequest when one is not a string or needs more than
    MAX_WINDOWS windows (checked here, before any encoder runs or a server queues the request)."""
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt", "prompt must be a string")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise InvalidRequest("negative_prompt", "negative_prompt must be a string")
    ids = {key: (t.ids(prompt), t.ids(negative_prompt or "")) for key, t in tokenizers.items()}
    for index, param in enumerate(("prompt", "negative_prompt")):
        windows = max((t.count(ids[key][index]) for key, t in tokenizers.items()), default=1)
        if windows > MAX_WINDOWS:
            spans = min(t.piece for t in tokenizers.values())
            raise InvalidRequest(param, f"{param} needs {windows} windows of tokens; the limit is "
                                 f"{MAX_WINDOWS} windows of {spans} tokens")
    return Tokens(model, prompt, negative_prompt, ids)


# CLIP's word rule: contractions, letter runs, single digits, runs of other non-space characters.
_CLIP_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _clip_bpe(vocab: Path, merges: Path) -> Tokenizer:
    """The CLIP tokenizer of a vocab.json + merges.txt pair, with the rules transformers' CLIPTokenizer
    applies: NFC, whitespace runs to one space, lower case; CLIP's word split; byte-level BPE with '</w>'
    closing each word."""
    model = BPE.from_file(str(vocab), str(merges), continuing_subword_prefix="", end_of_word_suffix="</w>",
                          unk_token="<|endoftext|>", fuse_unk=False)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_CLIP_WORDS), behavior="removed", invert=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tokenizer
