"""The reference kernel of `moec.cached_attention` (backends/torch/kernels.py) against `moec.attention` over the
whole sequence: prefill, chunks and decode steps at per-sequence positions, GQA and MHA, sliding windows, a cache
dtype other than q's, and cache slots past the written ones holding anything (even NaN)."""

from __future__ import annotations

import pytest
import torch

import backends.torch.kernels  # noqa: F401 - registers the reference kernels
from compiler import ops
from tests.models import max_rel_err


def _qkv(batch: int, heads: int, kv_heads: int, seq: int, dim: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(heads * 100 + kv_heads * 10 + seq)
    q = torch.randn(batch, heads, seq, dim, generator=generator)
    k = torch.randn(batch, kv_heads, seq, dim, generator=generator)
    v = torch.randn(batch, kv_heads, seq, dim, generator=generator)
    return q, k, v


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("window", [0, 3])
def test_chunks_and_decode_steps_equal_attention_over_the_whole_sequence(
    heads: int, kv_heads: int, window: int
) -> None:
    q, k, v = _qkv(2, heads, kv_heads, 11, 8)
    scale = 8**-0.5
    expected = ops.attention(q, k, v, scale, window)
    k_cache = torch.full((2, kv_heads, 16, 8), float("nan"))  # never-written slots must not leak into the output
    v_cache = torch.full((2, kv_heads, 16, 8), float("nan"))
    pieces = []
    for start, stop in [(0, 4), (4, 9), (9, 10), (10, 11)]:
        position = torch.full((2,), start, dtype=torch.int64)
        part = slice(start, stop)
        pieces.append(
            ops.cached_attention(q[:, :, part], k[:, :, part], v[:, :, part], k_cache, v_cache, position, scale, window)
        )
    assert max_rel_err(torch.cat(pieces, dim=1), expected) <= 1e-6
    assert torch.equal(k_cache[:, :, :11], k) and torch.equal(v_cache[:, :, :11], v)  # written in place
    assert k_cache[:, :, 11:].isnan().all()  # and nowhere else


def test_each_sequence_writes_and_reads_at_its_own_position() -> None:
    q, k, v = _qkv(2, 4, 2, 6, 8)
    scale = 0.3
    k_cache, v_cache = torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8)
    # Sequence 0 has 5 tokens cached, sequence 1 has 2: the new token sits at position 5 and 2 respectively.
    k_cache[0, :, :5], v_cache[0, :, :5] = k[0, :, :5], v[0, :, :5]
    k_cache[1, :, :2], v_cache[1, :, :2] = k[1, :, :2], v[1, :, :2]
    new = [torch.stack([t[0, :, 5:6], t[1, :, 2:3]]) for t in (q, k, v)]
    out = ops.cached_attention(*new, k_cache, v_cache, torch.tensor([5, 2]), scale, 0)
    assert max_rel_err(out[0], ops.attention(q[:1, :, :6], k[:1, :, :6], v[:1, :, :6], scale)[0, -1:]) <= 1e-6
    assert max_rel_err(out[1], ops.attention(q[1:, :, :3], k[1:, :, :3], v[1:, :, :3], scale)[0, -1:]) <= 1e-6


def test_a_bfloat16_cache_rounds_keys_and_values_on_write() -> None:
    q, k, v = _qkv(1, 4, 2, 5, 8)
    k_cache, v_cache = torch.zeros(1, 2, 8, 8, dtype=torch.bfloat16), torch.zeros(1, 2, 8, 8, dtype=torch.bfloat16)
    out = ops.cached_attention(q, k, v, k_cache, v_cache, torch.zeros(1, dtype=torch.int64), 0.3, 0)
    assert out.dtype == torch.float32
    rounded = ops.attention(q, k.bfloat16().float(), v.bfloat16().float(), 0.3)
    assert max_rel_err(out, rounded) <= 1e-6
