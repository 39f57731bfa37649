"""Perplexity: the yardstick every pass (quantization, sharding, fusions) reports against.

Exact and each token scored once: a text's tokens t[0..N) are cut into windows of at most `seq_len` tokens; a
window scores the targets [first, end) given the context t[max(0, end - seq_len) : end), and the next window
starts at `end`. Every token but the first (it has no context) is scored exactly once, with at least
`seq_len - stride` tokens of context where the text has them. Windows of equal length are batched.

Backend-independent: it takes a function from input ids [B, L] to logits [B, L, V].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from compiler.errors import MoecError

LogitsFunction = Callable[[torch.Tensor], torch.Tensor]
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Perplexity:
    tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood per scored token, in nats

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


@dataclass(frozen=True)
class Window:
    text: int  # index of the text it belongs to
    start: int  # first input token
    end: int  # one past the last input token (and the last target)
    first_target: int  # the first scored token


def windows(lengths: Sequence[int], seq_len: int, stride: int | None = None) -> list[Window]:
    """The scoring windows of texts of `lengths` tokens (see the module docstring)."""
    if seq_len < 2:
        raise MoecError(f"seq_len must be at least 2 (one token of context and one target), got {seq_len}")
    stride = seq_len - 1 if stride is None else stride
    if not 1 <= stride <= seq_len - 1:
        raise MoecError(f"stride must be in [1, seq_len - 1 = {seq_len - 1}], got {stride}")
    result = []
    for text, length in enumerate(lengths):
        first = 1
        while first < length:
            end = min(first + stride, length)
            result.append(Window(text, max(0, end - seq_len), end, first))
            first = end
    return result


@torch.no_grad()
def score(
    logits_of: LogitsFunction,
    token_ids: Sequence[Sequence[int]],
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: ProgressCallback | None = None,
) -> Perplexity:
    """Mean NLL of `token_ids` (one list per text) under `logits_of`; `max_tokens` truncates the texts, in order."""
    if batch_size < 1:
        raise MoecError(f"batch_size must be positive, got {batch_size}")
    texts = [list(ids) for ids in token_ids]
    if max_tokens is not None:
        if max_tokens < 2:
            raise MoecError(f"max_tokens must be at least 2, got {max_tokens}")
        kept, budget = [], max_tokens
        for ids in texts:
            if budget <= 1:
                break
            kept.append(ids[:budget])
            budget -= len(kept[-1])
        texts = kept
    all_windows = windows([len(ids) for ids in texts], seq_len, stride)
    if not all_windows:
        raise MoecError("nothing to score: every text is shorter than two tokens")
    by_length: dict[int, list[Window]] = {}
    for window in all_windows:
        by_length.setdefault(window.end - window.start, []).append(window)
    total, count, done = 0.0, 0, 0
    for length in sorted(by_length, reverse=True):
        group = by_length[length]
        for offset in range(0, len(group), batch_size):
            batch = group[offset : offset + batch_size]
            inputs = torch.tensor([texts[w.text][w.start : w.end] for w in batch], dtype=torch.long)
            log_probs = torch.log_softmax(logits_of(inputs).to(torch.float64), dim=-1)
            for row, window in enumerate(batch):
                # Position p predicts token p + 1: targets [first_target, end) come from positions one earlier.
                positions = torch.arange(window.first_target - 1, window.end - 1) - window.start
                targets = inputs[row, positions + 1]
                total -= float(log_probs[row, positions, targets].sum())
                count += len(targets)
            done += len(batch)
            if progress is not None:
                progress(done, len(all_windows))
    return Perplexity(count, total / count)
