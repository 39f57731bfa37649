"""How the next token is chosen from its logits, with Hugging Face's meaning of each argument.

before: logits [batch, vocab] of each sequence's last position
after:  one token id per sequence

Greedy (`do_sample=False`) takes the argmax. Sampling applies Hugging Face's warpers in its order (temperature, then
top-k, then top-p: the smallest set of most probable tokens reaching top_p, at least one), then draws from the
softmax with a `torch.Generator` seeded with `seed` (the global generator without one), one draw per step, as
Hugging Face does, so a seeded run draws the tokens Hugging Face draws after `torch.manual_seed(seed)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from compiler.errors import MoecError


class GenerationError(MoecError):
    """Arguments `generate` cannot honour; raised before any token is computed."""


def check_int(name: str, value: Any, minimum: int) -> int:
    """`value`, when it is an integer >= `minimum` (bools are not); else GenerationError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise GenerationError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise GenerationError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from its logits (Hugging Face's arguments; validated on construction)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise GenerationError(f"do_sample must be True or False, got {self.do_sample!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise GenerationError(f"temperature must be a number, got {type(self.temperature).__name__}")
        if not self.temperature >= 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.do_sample and self.temperature == 0:
            raise GenerationError("temperature=0 cannot sample; use do_sample=False for greedy decoding")
        check_int("top_k", self.top_k, 0)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if self.seed is not None:
            check_int("seed", self.seed, 0)


def process_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Hugging Face's sampling warpers on float logits [batch, vocab]: divide by `temperature`, keep the `top_k`
    largest (0 = all; ties with the k-th are kept), then the smallest set of most probable tokens whose probability
    reaches `top_p` (at least one). Removed tokens get -inf; the result is what the softmax draw sees."""
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # A token is dropped when the more probable tokens before it already reach top_p; the first never is.
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def choose_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """The next token per row of logits [batch, vocab]: argmax, or a draw from the processed distribution."""
    if not sampling.do_sample:
        return logits.float().argmax(dim=-1)
    scores = process_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
