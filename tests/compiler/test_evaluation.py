"""Perplexity windows: every token but a text's first is scored exactly once, with the context promised."""

from __future__ import annotations

import math

import pytest
import torch

from compiler.errors import MoecError
from compiler.evaluation import score, windows


@pytest.mark.parametrize("seq_len, stride", [(2, None), (5, None), (5, 2), (8, 7), (8, 1)])
def test_each_token_scored_once_with_its_context(seq_len: int, stride: int | None) -> None:
    lengths = [1, 2, 9, 23]
    step = seq_len - 1 if stride is None else stride
    scored: dict[tuple[int, int], int] = {}
    for window in windows(lengths, seq_len, stride):
        assert window.end - window.start <= seq_len
        assert window.start < window.first_target < window.end <= lengths[window.text]
        assert window.end - window.first_target <= step
        for token in range(window.first_target, window.end):
            scored[(window.text, token)] = scored.get((window.text, token), 0) + 1
            # context: everything before the token inside the window, at least seq_len - step tokens where there are
            assert token - window.start >= min(token, seq_len - step)
    assert scored == {(text, t): 1 for text, n in enumerate(lengths) for t in range(1, n)}


def test_score_of_a_known_distribution() -> None:
    """A 'model' that gives every token probability 1/4 has perplexity exactly 4, whatever the batching."""
    logits_of = lambda ids: torch.zeros(*ids.shape, 4)  # noqa: E731
    result = score(logits_of, [[0, 1, 2, 3] * 5, [1, 2, 3]], seq_len=6, batch_size=3)
    assert result.tokens == 19 + 2
    assert math.isclose(result.perplexity, 4.0, rel_tol=1e-12)


def test_score_uses_the_right_targets() -> None:
    """A model that always predicts the next token of a counting sequence with certainty scores 0 nats."""

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        logits = torch.full((*ids.shape, 10), -1e9, dtype=torch.float64)
        logits.scatter_(-1, ((ids + 1) % 10)[..., None], 0.0)
        return logits

    result = score(logits_of, [list(range(10)) * 3], seq_len=4, stride=2, batch_size=2)
    assert result.tokens == 29 and result.nll == pytest.approx(0.0, abs=1e-9)


def test_max_tokens_truncates_in_order() -> None:
    logits_of = lambda ids: torch.zeros(*ids.shape, 4)  # noqa: E731
    assert score(logits_of, [[0] * 10, [0] * 10], seq_len=4, max_tokens=13).tokens == 9 + 2


@pytest.mark.parametrize(
    "seq_len, stride, message",
    [
        (1, None, "seq_len must be at least 2 (one token of context and one target), got 1"),
        (4, 4, "stride must be in [1, seq_len - 1 = 3], got 4"),
        (4, 0, "stride must be in [1, seq_len - 1 = 3], got 0"),
    ],
)
def test_bad_windows(seq_len: int, stride: int | None, message: str) -> None:
    with pytest.raises(MoecError) as error:
        windows([10], seq_len, stride)
    assert str(error.value) == message


def test_nothing_to_score() -> None:
    with pytest.raises(MoecError, match="every text is shorter than two tokens"):
        score(lambda ids: torch.zeros(*ids.shape, 4), [[1], [2]], seq_len=4)
