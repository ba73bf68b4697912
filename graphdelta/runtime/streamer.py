"""Text streaming for ``graphdelta.generate``: tokens in, whole characters out.

A byte-level tokenizer splits a multi-byte character (``é``, ``世``, an emoji) over several
tokens, so decoding one token at a time prints ``\ufffd``. transformers' ``TextStreamer``
decodes the tokens since the last line break together and holds back text that may still
change; this adapts it to ``graphdelta.generate``'s ``stream(sequence, token)`` callback.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import torch
from transformers import TextStreamer

from graphdelta import progress


class TokenPrinter(TextStreamer):
    """``stream=TokenPrinter(tokenizer, prompt)`` prints the prompt with the first token (so that
    what ``generate`` prints before it, e.g. compile progress, comes first), then one sequence's
    generated text as it comes; ``close()`` prints what was held back and a line break.
    ``stamps`` holds the ``time.perf_counter()`` of every token received (for tokens per second)."""

    def __init__(self, tokenizer: Any, prompt: str = "", file: TextIO | None = None):
        super().__init__(tokenizer, skip_prompt=False)
        self.file = file
        self.prompt = prompt
        self.stamps: list[float] = []

    def __call__(self, sequence: int, token: int) -> None:
        if sequence != 0:
            raise ValueError(f"TokenPrinter streams one sequence, got a token of sequence {sequence}")
        self.stamps.append(time.perf_counter())
        self._prompt()
        self.put(torch.tensor([token]))

    def close(self) -> None:
        self._prompt()  # (no token came)
        self.end()

    def _prompt(self) -> None:
        if self.prompt is not None:
            prompt, self.prompt = self.prompt, None
            self.on_finalized_text(prompt)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        text += "\n" if stream_end else ""
        out = self.file or sys.stdout
        out.write(text)
        out.flush()
        if out is sys.stdout and text:  # progress lines then start on a line of their own
            progress.stdout_at_line_start = text.endswith("\n")
