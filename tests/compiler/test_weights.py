"""Lazy weight expressions: every rewrite materializes to exactly what eager torch computes, types are inferred
without reading a byte, and slices push through stacks/concatenations down to the leaves they cover."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from compiler.weights import (
    CheckpointTensor,
    MemoryTensor,
    Rewrite,
    RewriteRule,
    cast_weight,
    concat_weights,
    register_rewrite,
    reshape_weight,
    select_weight,
    slice_weight,
    stack_weights,
    transpose_weight,
)

EXPERTS, ROWS, COLS = 8, 6, 4


def _tensor(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _memory(name: str, tensor: torch.Tensor) -> MemoryTensor:
    return MemoryTensor(name, tensor)


@pytest.fixture
def expert_file(tmp_path: Path) -> tuple[list[CheckpointTensor], list[torch.Tensor]]:
    """Eight expert matrices in one safetensors file, as lazy leaves and as eager tensors."""
    tensors = [_tensor(ROWS, COLS, seed=e) for e in range(EXPERTS)]
    path = tmp_path / "experts.safetensors"
    save_file({f"expert{e}": t for e, t in enumerate(tensors)}, str(path))
    leaves = [CheckpointTensor(str(path), f"expert{e}", (ROWS, COLS), torch.float32) for e in range(EXPERTS)]
    return leaves, tensors


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, int]]:
    """Records every checkpoint read as (key, index, bytes returned)."""
    recorded: list[tuple[str, Any, int]] = []
    original = CheckpointTensor.read

    def recording_read(self: CheckpointTensor, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        data = original(self, index)
        recorded.append((self.key, index, data.numel() * data.element_size()))
        return data

    monkeypatch.setattr(CheckpointTensor, "read", recording_read)
    return recorded


def test_slice_stack_cast_match_eager_torch() -> None:
    parts = [_tensor(ROWS, COLS, seed=e) for e in range(EXPERTS)]
    expr = cast_weight(slice_weight(stack_weights([_memory(f"e{i}", p) for i, p in enumerate(parts)]), 2, 1, 3), torch.bfloat16)
    expected = torch.stack(parts)[:, :, 1:3].to(torch.bfloat16)
    assert (expr.shape, expr.dtype) == (tuple(expected.shape), torch.bfloat16)
    assert torch.equal(expr.materialize(), expected)


def test_concat_select_transpose_reshape_match_eager_torch() -> None:
    a, b, c = _tensor(2, COLS, seed=1), _tensor(3, COLS, seed=2), _tensor(4, COLS, seed=3)
    concat = concat_weights([_memory("a", a), _memory("b", b), _memory("c", c)], 0)
    eager = torch.cat([a, b, c], 0)
    cases = [
        (concat, eager),
        (slice_weight(concat, 0, 1, 6), eager[1:6]),
        (slice_weight(concat, 1, 1, 3), eager[:, 1:3]),
        (select_weight(concat, 0, -1), eager[-1]),
        (transpose_weight(concat, 0, 1), eager.t()),
        (slice_weight(transpose_weight(concat, 0, 1), 1, 2, 7), eager.t()[:, 2:7]),
        (reshape_weight(concat, (COLS, 9)), eager.reshape(COLS, 9)),
        (cast_weight(cast_weight(concat, torch.float16), torch.bfloat16), eager.to(torch.bfloat16)),
    ]
    for expr, expected in cases:
        assert (expr.shape, expr.dtype) == (tuple(expected.shape), expected.dtype), expr.describe()
        assert torch.equal(expr.materialize(), expected), expr.describe()


def test_types_are_inferred_without_reading(expert_file: tuple[list[CheckpointTensor], list[torch.Tensor]], reads: list) -> None:
    leaves, _ = expert_file
    stacked = stack_weights(leaves, 0)
    assert stacked.type_str == f"f32[{EXPERTS},{ROWS},{COLS}]"
    assert stack_weights(leaves, 1).shape == (ROWS, EXPERTS, COLS)
    assert cast_weight(stacked, torch.bfloat16).type_str == f"bf16[{EXPERTS},{ROWS},{COLS}]"
    assert cast_weight(stacked, torch.bfloat16).nbytes == EXPERTS * ROWS * COLS * 2
    assert transpose_weight(stacked, -1, 0).shape == (COLS, ROWS, EXPERTS)
    assert concat_weights(leaves, 1).shape == (ROWS, EXPERTS * COLS)
    assert select_weight(stacked, 2, 0).shape == (EXPERTS, ROWS)
    assert reads == []


def test_slice_of_stack_keeps_only_covered_leaves(
    expert_file: tuple[list[CheckpointTensor], list[torch.Tensor]], reads: list
) -> None:
    leaves, tensors = expert_file
    expr = slice_weight(stack_weights(leaves, 0), 0, 3, 5)
    assert [leaf.key for leaf in expr.leaves()] == ["expert3", "expert4"]
    assert expr.describe() == "stack(ckpt(expert3), ckpt(expert4), dim=0)"
    assert torch.equal(expr.materialize(), torch.stack(tensors)[3:5])
    assert sorted(key for key, _, _ in reads) == ["expert3", "expert4"]


def test_select_of_stack_is_the_part_itself(expert_file: tuple[list[CheckpointTensor], list[torch.Tensor]]) -> None:
    leaves, _ = expert_file
    assert select_weight(stack_weights(leaves, 0), 0, 5) is leaves[5]
    assert select_weight(stack_weights(leaves, 0), 0, -1) is leaves[-1]


def test_slice_of_concat_keeps_only_covered_parts() -> None:
    a, b, c = (_memory(name, _tensor(rows, COLS)) for name, rows in (("a", 2), ("b", 3), ("c", 4)))
    concat = concat_weights([a, b, c], 0)
    assert slice_weight(concat, 0, 2, 5) is b
    straddling = slice_weight(concat, 0, 1, 3)
    assert [leaf.name for leaf in straddling.leaves()] == ["a", "b"]
    assert straddling.describe() == (
        "concat(slice(memory(a), dim=0, start=1, stop=2), slice(memory(b), dim=0, start=0, stop=1), dim=0)"
    )
    assert slice_weight(concat, 0, 0, 9) is concat


def test_slice_pushes_through_inner_stack_dim_and_cast(
    expert_file: tuple[list[CheckpointTensor], list[torch.Tensor]], reads: list
) -> None:
    leaves, tensors = expert_file
    expr = slice_weight(cast_weight(stack_weights(leaves[:2], 0), torch.bfloat16), 1, 2, 4)
    assert expr.describe() == (
        "cast(stack(slice(ckpt(expert0), dim=0, start=2, stop=4), slice(ckpt(expert1), dim=0, start=2, stop=4), "
        "dim=0), dtype=bf16)"
    )
    assert torch.equal(expr.materialize(), torch.stack(tensors[:2])[:, 2:4].to(torch.bfloat16))
    # Nested slices compose into one slice of the leaf.
    nested = slice_weight(slice_weight(leaves[0], 0, 1, 5), 0, 1, 3)
    assert nested.describe() == "slice(ckpt(expert0), dim=0, start=2, stop=4)"
    assert len(reads) == 2


def test_slicing_a_checkpoint_tensor_reads_only_that_slice(
    expert_file: tuple[list[CheckpointTensor], list[torch.Tensor]], reads: list
) -> None:
    leaves, tensors = expert_file
    assert torch.equal(slice_weight(leaves[2], 1, 1, 3).materialize(), tensors[2][:, 1:3])
    assert torch.equal(select_weight(leaves[6], 0, 4).materialize(), tensors[6][4])
    assert reads == [
        ("expert2", (slice(None), slice(1, 3)), ROWS * 2 * 4),
        ("expert6", (slice(4, 5),), COLS * 4),
    ]


def test_out_of_range_slices_and_selects_are_rejected() -> None:
    leaf = _memory("w", torch.zeros(EXPERTS, COLS))
    with pytest.raises(ValueError, match=r"^slice \[2:9\] out of range for dim 0 of f32\[8,4\]$"):
        slice_weight(leaf, 0, 2, 9)
    with pytest.raises(ValueError, match=r"^slice \[3:2\] out of range for dim 1 of f32\[8,4\]$"):
        slice_weight(leaf, 1, 3, 2)
    with pytest.raises(ValueError, match=r"^dim 2 out of range for a 2-d weight$"):
        slice_weight(leaf, 2, 0, 1)
    with pytest.raises(ValueError, match=r"^index 8 out of range for dim 0 of f32\[8,4\]$"):
        select_weight(leaf, 0, 8)


def test_mismatched_joins_are_rejected_when_built() -> None:
    a, b = _memory("a", torch.zeros(2, 3)), _memory("b", torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"^cannot stack weights of shapes f32\[2,3\] and f32\[3,3\]$"):
        stack_weights([a, b])
    with pytest.raises(ValueError, match=r"^cannot concatenate f32\[2,3\] and f32\[3,3\] on dim 1$"):
        concat_weights([a, b], 1)
    with pytest.raises(ValueError, match=r"^cannot join weights of dtypes f32\[2,3\] and bf16\[2,3\]$"):
        stack_weights([a, _memory("c", torch.zeros(2, 3, dtype=torch.bfloat16))])
    with pytest.raises(ValueError, match=r"^cannot reshape f32\[2,3\] to \[4, 2\]$"):
        reshape_weight(a, (4, 2))


def test_registered_rewrite_kind_infers_and_applies() -> None:
    register_rewrite(
        "test-weights-negate", RewriteRule(lambda xs, a: (xs[0].shape, xs[0].dtype), lambda xs, a: -xs[0])
    )
    source = _tensor(3, COLS)
    expr = slice_weight(Rewrite("test-weights-negate", (_memory("w", source),)), 0, 1, 3)
    assert expr.describe() == "slice(test-weights-negate(memory(w)), dim=0, start=1, stop=3)"
    assert torch.equal(expr.materialize(), -source[1:3])
    with pytest.raises(ValueError, match="^weight rewrite 'slice' is already registered$"):
        register_rewrite("slice", RewriteRule(lambda xs, a: (xs[0].shape, xs[0].dtype), lambda xs, a: xs[0]))
