"""`fuse-qkv`: the fused graph's exact structure and lazy weight, sharded ranks, numerics against the unfused program
(with and without kv-cache after it), idempotence, why a layer is not fused, and ONNX export through onnxruntime."""

from __future__ import annotations

import operator
from pathlib import Path

import pytest
import torch

from backends.torch.runtime import TorchExecutable
from compiler import ops
from compiler.errors import PreconditionError
from compiler.ir import Program
from compiler.pass_manager import parse_pipeline, run_pipeline
from compiler.rewrite import Rewriter
from compiler.weights import RandomTensor, cast_weight
from passes.fuse_qkv import FuseQkv
from tests.models import TINY_CONFIGS, TinyConfig, input_ids, max_rel_err, traced
from tests.passes.test_canonicalize import compiled

FUSED = "canonicalize,fuse-moe,dce"
# GQA (2 layers), MHA (1 layer, top-1), MQA (tied embeddings).
CONFIGS = [TINY_CONFIGS[0], TINY_CONFIGS[1], TINY_CONFIGS[3]]


def _qkv(config: TinyConfig) -> Program:
    return run_pipeline(compiled(config, FUSED), parse_pipeline("fuse-qkv")).program


def _projections(program: Program) -> list[torch.fx.Node]:
    return [n for n in program.graph.nodes if n.target == ops.linear and "self_attn_" in n.args[1].name]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
def test_each_layer_gets_one_projection_over_a_lazy_concat(config: TinyConfig) -> None:
    before = compiled(config, FUSED)
    program = _qkv(config)
    counts, counts_before = program.op_counts(), before.op_counts()
    # q, k, v become one linear: two fewer per layer; one split and three getitems more per layer.
    assert counts["moec.linear"] == counts_before["moec.linear"] - 2 * config.layers
    assert counts["aten.split_with_sizes"] == config.layers
    assert counts["getitem"] == counts_before["getitem"] + 3 * config.layers
    assert len(program.weight_nodes()) == len(before.weight_nodes()) - 2 * config.layers
    head_dim = config.hidden // config.heads
    sizes = [config.heads * head_dim, config.kv_heads * head_dim, config.kv_heads * head_dim]
    weights = program.weights()
    text = program.format()
    for layer in range(config.layers):
        assert f"layers_{layer}_self_attn_q_proj_weight" not in weights
        expr = weights[f"layers_{layer}_self_attn_qkv_proj_weight"]
        assert expr.shape == (sum(sizes), config.hidden) and expr.dtype == torch.float32
        prefix = f"memory(model.layers.{layer}.self_attn"
        assert expr.describe() == (
            f"concat({prefix}.q_proj.weight), {prefix}.k_proj.weight), {prefix}.v_proj.weight), dim=0)"
        )
        assert f"  %layers_{layer}_self_attn_qkv_proj_weight: f32[{sum(sizes)},{config.hidden}] = weight concat(" in text
    fused = [n for n in program.graph.nodes if n.target == ops.linear and n.args[1].name.endswith("qkv_proj_weight")]
    assert len(fused) == config.layers
    for node in fused:
        assert node.args[0].target == ops.rms_norm and node.meta["moec_rule"] == "fuse-qkv"
        (split,) = node.users
        assert split.target == torch.ops.aten.split_with_sizes.default and split.args[1:] == ([*sizes], -1)
        parts = sorted(split.users, key=lambda n: n.args[1])
        assert [p.target for p in parts] == [operator.getitem] * 3 and [p.args[1] for p in parts] == [0, 1, 2]
        assert [p.meta["val"].shape[-1] for p in parts] == sizes
    # Per layer, the attention's linears are now the fused projection and the output projection.
    expected = [f"layers_{i}_self_attn_{role}_proj_weight" for i in range(config.layers) for role in ("qkv", "o")]
    assert [n.args[1].name for n in _projections(program)] == expected


@pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
def test_logits_equal_the_unfused_program_with_and_without_kv_cache(config: TinyConfig) -> None:
    reference = TorchExecutable(compiled(config, FUSED))
    ids = input_ids(config, 2, 9)
    expected = reference(ids)
    assert max_rel_err(TorchExecutable(_qkv(config))(ids), expected) <= 1e-5
    cached = run_pipeline(_qkv(config), parse_pipeline("kv-cache,dce")).program
    assert cached.op_counts()["aten.split_with_sizes"] == config.layers
    session = TorchExecutable(cached).new_session(2)
    logits = [session.step(ids[:, :6], torch.tensor([0, 0]))]
    logits += [session.step(ids[:, i : i + 1], torch.tensor([i, i])) for i in range(6, 9)]
    assert max_rel_err(torch.cat(logits, dim=1), expected) <= 1e-5


def test_running_twice_changes_nothing_and_leaves_the_input_alone() -> None:
    before = compiled(TINY_CONFIGS[0], FUSED)
    text = before.format()
    once = run_pipeline(before, parse_pipeline("fuse-qkv"))
    assert before.format() == text
    assert once.history[0].changed is True
    assert once.history[0].stats == {"fused": 2, "not_fused": 0, "already_fused": 0}
    twice = run_pipeline(once.program, parse_pipeline("fuse-qkv"))
    assert twice.history[0].changed is False
    assert twice.history[0].stats == {"fused": 0, "not_fused": 0, "already_fused": 2}
    assert twice.program.format() == once.program.format()
    assert FuseQkv().explain(once.program) == ["layers.0: already fused", "layers.1: already fused"]


def test_each_rank_concatenates_its_own_slices() -> None:
    config = TINY_CONFIGS[0]  # 4 query heads, 2 kv heads of 8: per rank 2 query heads and 1 kv head
    result = run_pipeline(compiled(config, FUSED), parse_pipeline("shard{tp=2},fuse-qkv,dce"))
    assert result.history[1].stats == {"fused": 4, "not_fused": 0, "already_fused": 0}  # 2 layers x 2 ranks
    for rank, program in enumerate(result.program.ranks):
        expr = program.weights()["layers_1_self_attn_qkv_proj_weight"]
        assert expr.shape == (16 + 8 + 8, 32)
        prefix = "memory(model.layers.1.self_attn"
        assert expr.describe() == (
            f"concat(slice({prefix}.q_proj.weight), dim=0, start={16 * rank}, stop={16 * rank + 16}), "
            f"slice({prefix}.k_proj.weight), dim=0, start={8 * rank}, stop={8 * rank + 8}), "
            f"slice({prefix}.v_proj.weight), dim=0, start={8 * rank}, stop={8 * rank + 8}), dim=0)"
        )
        split = next(n for n in program.graph.nodes if n.target == torch.ops.aten.split_with_sizes.default)
        assert split.args[1] == [16, 8, 8]
    assert "aten.split_with_sizes" not in result.program.op_counts()  # the logical graph stays unsharded


def _projection_of(program: Program, layer: int, role: str) -> torch.fx.Node:
    return next(n for n in _projections(program) if n.args[1].name == f"layers_{layer}_self_attn_{role}_proj_weight")


def test_explain_says_why_a_layer_is_not_fused() -> None:
    config = TINY_CONFIGS[0]
    before = compiled(config, FUSED)
    assert FuseQkv().explain(before) == [f"layers.{i}: fused (q 32 + k 16 + v 16 rows of 32, f32)" for i in range(2)]

    with_bias = before.clone()
    k_proj = _projection_of(with_bias, 0, "k")
    bias = Rewriter(with_bias).weight("k_bias", RandomTensor("k_bias", (16,), torch.float32, seed=0))
    k_proj.args = (*k_proj.args[:2], bias)
    assert FuseQkv().explain(with_bias) == [
        "layers.1: fused (q 32 + k 16 + v 16 rows of 32, f32)", "layers.0: not fused: the k projection has a bias"
    ]
    result = run_pipeline(with_bias, parse_pipeline("fuse-qkv"))
    assert result.history[0].stats == {"fused": 1, "not_fused": 1, "already_fused": 0}
    assert result.program.op_counts()["moec.linear"] == with_bias.op_counts()["moec.linear"] - 2
    assert _projection_of(result.program, 0, "k").args[2].name == "k_bias"  # layer 0 untouched

    other_input = before.clone()
    v_proj = _projection_of(other_input, 1, "v")
    v_proj.args = (v_proj.args[0].args[0], v_proj.args[1])  # reads the residual, not the normalized input
    assert FuseQkv().explain(other_input)[-1] == "layers.1: not fused: the q, k and v projections do not share one input"

    mixed = before.clone()
    q_weight = _projection_of(mixed, 0, "q").args[1]
    q_weight.meta["weight"] = cast_weight(q_weight.meta["weight"], torch.float16)
    assert FuseQkv().explain(mixed)[-1] == "layers.0: not fused: mismatched weight dtypes (q f16, k f32, v f32)"


def test_before_canonicalize_is_a_precondition_error() -> None:
    with pytest.raises(PreconditionError, match=r"needs canonicalize first: the projections are still aten.linear$"):
        run_pipeline(traced(TINY_CONFIGS[1]), parse_pipeline("fuse-qkv"))


def test_onnx_export_of_the_fused_program_runs_in_onnxruntime(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx_graphsurgeon")
    from backends.onnx import export_onnx

    config = TINY_CONFIGS[1]
    program = _qkv(config)
    exported = export_onnx(program, tmp_path / "qkv.onnx", moe="ort")
    onnx.checker.check_model(str(exported.path), full_check=True)
    model = onnx.load(str(exported.path), load_external_data=False)
    assert [n.op_type for n in model.graph.node].count("Split") == config.layers
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    ids = input_ids(config, 2, 7)
    (logits,) = session.run(None, {"input_ids": ids.numpy()})
    assert max_rel_err(torch.from_numpy(logits), TorchExecutable(program)(ids)) <= 1e-4
