"""`fuse-norm`: the fused graph's exact structure, bit-identical logits (fp32 and bf16, with kv-cache, fuse-qkv and
quantize-weights in either order), idempotence, sharded ranks (structure and gloo numerics), why a norm is not
fused, `--check-numerics` layers, `shard` refusing fused norms, and ONNX export through onnxruntime."""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from backends.torch.runtime import TorchExecutable
from compiler import collectives, ops
from compiler.errors import PreconditionError
from compiler.ir import Program
from compiler.numerics import check_numerics, residual_stream
from compiler.pass_manager import parse_pipeline, registered_passes, run_pipeline
from compiler.rewrite import create_node, infer_value
from passes.fuse_norm import FuseNorm, site
from tests.models import TINY_CONFIGS, TinyConfig, input_ids, max_rel_err, traced
from tests.passes.test_canonicalize import compiled

FUSED = "canonicalize,fuse-moe,dce"
# GQA (2 layers) and MHA (1 layer, top-1): the configs the other pass tests trace anyway.
CONFIGS = [TINY_CONFIGS[0], TINY_CONFIGS[1]]
NOT_AN_ADD = (
    "layers.0.input_layernorm: not fused: its input %embedding (aten.embedding) is not a residual aten.add.Tensor"
)
aten = torch.ops.aten


def _fused(config: TinyConfig, after: str = "fuse-norm", dtype: torch.dtype = torch.float32) -> Program:
    return run_pipeline(compiled(config, FUSED, dtype), parse_pipeline(after)).program


def _nodes(program: Program, target: object) -> list[torch.fx.Node]:
    return [node for node in program.graph.nodes if node.target == target]


def _results(fused: torch.fx.Node) -> dict[int, torch.fx.Node]:
    return {user.args[1]: user for user in fused.users if user.target == operator.getitem}


def _step_all(program: Program, ids: torch.Tensor) -> torch.Tensor:
    """A prefill of 6 tokens, then one decode step per remaining token, on a program with KV caches."""
    session = TorchExecutable(program).new_session(ids.shape[0])
    batch = ids.shape[0]
    logits = [session.step(ids[:, :6], torch.zeros(batch, dtype=torch.long))]
    logits += [session.step(ids[:, i : i + 1], torch.full((batch,), i)) for i in range(6, ids.shape[1])]
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
def test_every_residual_add_fuses_with_the_norm_that_reads_it(config: TinyConfig) -> None:
    before = compiled(config, FUSED)
    program = _fused(config)
    counts, counts_before = program.op_counts(), before.op_counts()
    # Per layer the post-attention norm and the next norm (the next layer's input norm, or the final norm) read a
    # residual add; layer 0's input norm reads the embedding and stays.
    assert counts["moec.add_rms_norm"] == 2 * config.layers
    assert counts["moec.rms_norm"] == 1
    assert counts["aten.add.Tensor"] == counts_before["aten.add.Tensor"] - 2 * config.layers == 0
    # Every sum but the last is read by the next residual add; the final norm's sum has no other reader.
    assert counts["getitem"] == counts_before.get("getitem", 0) + 2 * (2 * config.layers) - 1
    assert program.weights() == before.weights()  # same expressions: the pass never touches weights
    fused = _nodes(program, ops.add_rms_norm)
    # By the norm each one computes: layer 0 fuses its post-attention norm only, every later layer both, plus the
    # final norm.
    per_norm = Counter(site(node).rsplit(".", 1)[0] for node in fused)
    assert per_norm == {"layers.0": 1, **{f"layers.{i}": 2 for i in range(1, config.layers)}, "norm": 1}
    norm_weights = ["layers_0_post_attention_layernorm_weight"]
    for i in range(1, config.layers):
        norm_weights += [f"layers_{i}_input_layernorm_weight", f"layers_{i}_post_attention_layernorm_weight"]
    assert [node.args[2].name for node in fused] == [*norm_weights, "norm_weight"]
    (unfused,) = _nodes(program, ops.rms_norm)
    assert unfused.args[0].target == aten.embedding.default
    previous_sum = unfused.args[0]  # the residual stream starts at the embedding
    for index, node in enumerate(fused):
        assert node.meta["moec_rule"] == "fuse-norm" and node.args[3] == 1e-05
        assert node.args[0] is previous_sum  # the residual operand is the previous sum, then the layer's output
        results = _results(node)
        last = index == len(fused) - 1
        assert sorted(results) == ([1] if last else [0, 1])
        assert all(result.meta["moec_rule"] == "fuse-norm" for result in results.values())
        assert all(result.meta["val"].shape[-1] == config.hidden for result in results.values())
        previous_sum = results.get(0)
    lm_head = next(n for n in program.graph.nodes if n.target == ops.linear and n.args[1].name == "lm_head_weight")
    assert lm_head.args[0] is _results(fused[-1])[1]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
def test_logits_are_bit_identical_to_the_unfused_program(config: TinyConfig) -> None:
    ids = input_ids(config, 2, 9)
    expected = TorchExecutable(compiled(config, FUSED))(ids)
    assert torch.equal(TorchExecutable(_fused(config))(ids), expected)


def test_bf16_logits_are_bit_identical_too() -> None:
    config = TINY_CONFIGS[0]
    ids = input_ids(config, 2, 9)
    before = compiled(config, FUSED, torch.bfloat16)
    program = _fused(config, dtype=torch.bfloat16)
    fused = _nodes(program, ops.add_rms_norm)
    assert len(fused) == 2 * config.layers
    assert {value.dtype for node in fused for value in node.meta["val"]} == {torch.bfloat16}
    expected = TorchExecutable(before)(ids)
    assert expected.dtype == torch.bfloat16 and torch.equal(TorchExecutable(program)(ids), expected)


@pytest.mark.parametrize(
    ("fused", "unfused"),
    [
        ("fuse-norm,kv-cache,dce", "kv-cache,dce"),
        ("kv-cache,fuse-norm,dce", "kv-cache,dce"),
        ("fuse-qkv,fuse-norm", "fuse-qkv"),
        ("fuse-norm,fuse-qkv", "fuse-qkv"),
        ("quantize-weights,fuse-norm", "quantize-weights"),
        ("fuse-norm,quantize-weights", "quantize-weights"),
    ],
)
def test_other_passes_in_either_order_give_the_same_logits(fused: str, unfused: str) -> None:
    config = TINY_CONFIGS[0]
    ids = input_ids(config, 2, 9)
    program, reference = _fused(config, fused), _fused(config, unfused)
    assert program.op_counts()["moec.add_rms_norm"] == 2 * config.layers
    if "kv-cache" in fused:
        assert torch.equal(_step_all(program, ids), _step_all(reference, ids))
    else:
        assert torch.equal(TorchExecutable(program)(ids), TorchExecutable(reference)(ids))


def test_running_twice_changes_nothing_and_leaves_the_input_alone() -> None:
    before = compiled(TINY_CONFIGS[0], FUSED)
    text = before.format()
    once = run_pipeline(before, parse_pipeline("fuse-norm"))
    assert before.format() == text
    assert once.history[0].changed is True
    assert once.history[0].stats == {"fused": 4, "not_fused": 1, "already_fused": 0}
    twice = run_pipeline(once.program, parse_pipeline("fuse-norm"))
    assert twice.history[0].changed is False
    assert twice.history[0].stats == {"fused": 0, "not_fused": 1, "already_fused": 4}
    assert twice.program.format() == once.program.format()
    assert FuseNorm().explain(once.program) == [
        NOT_AN_ADD,
        "layers.0.post_attention_layernorm: already fused",
        "layers.1.input_layernorm: already fused",
        "layers.1.post_attention_layernorm: already fused",
        "norm: already fused",
    ]


def _residual_adds(program: Program) -> list[torch.fx.Node]:
    return _nodes(program, aten.add.Tensor)


def test_explain_says_why_a_norm_is_not_fused() -> None:
    config = TINY_CONFIGS[0]
    before = compiled(config, FUSED)
    adds = [add.name for add in _residual_adds(before)]
    sites = ["layers.0.post_attention_layernorm", "layers.1.input_layernorm", "layers.1.post_attention_layernorm"]
    sites.append("norm")
    fused_lines = [f"{site}: fused with the residual add %{add} (f32[batch,seq,32])" for site, add in zip(sites, adds)]
    assert FuseNorm().explain(before) == [NOT_AN_ADD, *fused_lines]

    def explained(edit: Callable[[Program, torch.fx.Node], None]) -> list[str]:
        """`explain` of a clone whose first residual add `edit` changed."""
        program = before.clone()
        edit(program, _residual_adds(program)[0])
        return FuseNorm().explain(program)

    def with_alpha(program: Program, add: torch.fx.Node) -> None:
        add.kwargs = {"alpha": 2}

    def with_scalar(program: Program, add: torch.fx.Node) -> None:
        add.args = (add.args[0], 1.0)

    def broadcasting(program: Program, add: torch.fx.Node) -> None:
        weight = next(n for n in program.weight_nodes() if n.name == "layers_0_post_attention_layernorm_weight")
        add.args = (add.args[0], weight)

    def mixed_dtypes(program: Program, add: torch.fx.Node) -> None:
        with program.graph.inserting_before(add):
            cast = create_node(program.graph, aten._to_copy.default, (add.args[1],), {"dtype": torch.bfloat16}, "test")
        cast.meta["val"] = infer_value(cast)
        add.args = (add.args[0], cast)

    first = f"layers.0.post_attention_layernorm: not fused: the add %{adds[0]}"
    assert explained(with_alpha)[1] == f"{first} has alpha=2"
    assert explained(with_scalar)[1] == f"{first} has a scalar operand (1.0)"
    assert explained(broadcasting)[1] == f"{first} broadcasts (f32[batch,seq,32] + f32[32])"
    assert explained(mixed_dtypes)[1] == f"{first} mixes dtypes (f32[batch,seq,32] + bf16[batch,seq,32])"
    assert explained(with_alpha)[2:] == fused_lines[1:]

    alpha = before.clone()
    with_alpha(alpha, _residual_adds(alpha)[0])
    result = run_pipeline(alpha, parse_pipeline("fuse-norm"))
    assert result.history[0].stats == {"fused": 3, "not_fused": 2, "already_fused": 0}
    assert result.program.op_counts()["aten.add.Tensor"] == 1  # the alpha=2 add stays, with its norm
    ids = input_ids(config, 2, 7)
    assert torch.equal(TorchExecutable(result.program)(ids), TorchExecutable(alpha)(ids))


def test_each_rank_fuses_its_own_norms() -> None:
    from tests.backends.test_distributed import run_ranks

    config = TINY_CONFIGS[0]
    result = run_pipeline(compiled(config, FUSED), parse_pipeline("shard{tp=2},fuse-norm,dce"))
    assert result.history[1].stats == {"fused": 8, "not_fused": 2, "already_fused": 0}  # 4 norms x 2 ranks fuse
    assert "moec.add_rms_norm" not in result.program.op_counts()  # the logical graph stays unsharded
    for program in result.program.ranks:
        assert program.op_counts()["moec.add_rms_norm"] == 2 * config.layers
        (unfused,) = _nodes(program, ops.rms_norm)
        assert unfused.args[0].target == collectives.all_reduce  # of the vocabulary-parallel embedding
        # Each residual add's second operand is the all_reduce of a row-parallel o_proj, or (viewed) of a moe.
        for node in _nodes(program, ops.add_rms_norm):
            operand = node.args[1].args[0] if node.args[1].target == aten.view.default else node.args[1]
            assert operand.target == collectives.all_reduce
        assert FuseNorm().explain(program)[0] == (
            f"layers.0.input_layernorm: not fused: its input %{unfused.args[0].name} (moec.all_reduce) is not a "
            "residual aten.add.Tensor"
        )
    ids = input_ids(config, 2, 7)
    expected = TorchExecutable(compiled(config, FUSED))(ids)
    unfused = run_ranks(run_pipeline(compiled(config, FUSED), parse_pipeline("shard{tp=2},dce")).program, ids)
    for rank, (logits, _) in run_ranks(result.program, ids).items():
        assert torch.equal(torch.from_numpy(logits), torch.from_numpy(unfused[rank][0]))
        assert max_rel_err(torch.from_numpy(logits), expected) <= 1e-5


def test_pipeline_stages_fuse_what_they_hold() -> None:
    sharded = run_pipeline(compiled(TINY_CONFIGS[0], FUSED), parse_pipeline("shard{pp=2}")).program
    # Stage 0: layer 0's post-attention norm (its last sum is sent, not normalized). Stage 1: the post-attention
    # and final norms; its input norm reads the received hidden state. `explain` speaks of each rank's program.
    recv = next(node.name for node in sharded.ranks[1].graph.nodes if node.target == collectives.recv)
    assert FuseNorm().explain(sharded) == [
        "rank 0: " + NOT_AN_ADD,
        f"rank 0: layers.0.post_attention_layernorm: fused with the residual add %{_residual_adds(sharded.ranks[0])[0]}"
        " (f32[batch,seq,32])",
        f"rank 1: layers.1.input_layernorm: not fused: its input %{recv} (moec.recv) is not a residual aten.add.Tensor",
        *(f"rank 1: {site}: fused with the residual add %{add} (f32[batch,seq,32])"
          for site, add in zip(("layers.1.post_attention_layernorm", "norm"), _residual_adds(sharded.ranks[1]))),
    ]
    first, second = run_pipeline(sharded, parse_pipeline("fuse-norm")).program.ranks
    assert (first.op_counts()["moec.add_rms_norm"], second.op_counts()["moec.add_rms_norm"]) == (1, 2)
    assert first.op_counts()["aten.add.Tensor"] == 1


def test_shard_refuses_a_fused_program() -> None:
    message = (
        r"pass 'shard\{tp=2\}' cannot run \(after fuse-norm\): shard must run before fuse-norm: pipeline stages are "
        r"cut between a residual add and the next layer's input norm, which moec.add_rms_norm fuses"
    )
    with pytest.raises(PreconditionError, match=message):
        run_pipeline(compiled(TINY_CONFIGS[0], FUSED), parse_pipeline("fuse-norm,shard{tp=2}"))


def test_before_canonicalize_is_a_precondition_error() -> None:
    with pytest.raises(PreconditionError, match=r"needs canonicalize first: the graph has no moec.rms_norm$"):
        run_pipeline(traced(TINY_CONFIGS[1], torch.float32), parse_pipeline("fuse-norm"))


def test_check_numerics_reads_every_layer_of_a_fused_program() -> None:
    config = TINY_CONFIGS[0]
    result = run_pipeline(traced(config, torch.float32), parse_pipeline("canonicalize,fuse-moe,fuse-norm,dce"))
    fused = result.history[2].program
    states = residual_stream(fused)
    assert sorted(states) == [0, 1] and all(node.target == ops.add_rms_norm for node in states.values())
    sample = input_ids(config, 2, 9).tolist()
    report = check_numerics(traced(config, torch.float32), result.history, input_ids=sample, layers=True)
    assert report.first_diverging is None
    fuse_norm = report.rows[3]
    assert fuse_norm.spec == "fuse-norm" and fuse_norm.step.max_rel_err == 0.0
    assert fuse_norm.layers_step == {0: 0.0, 1: 0.0}


def test_registered_and_in_the_default_pipeline_after_kv_cache() -> None:
    from compiler.api import DEFAULT_PIPELINE

    assert registered_passes()["fuse-norm"] is FuseNorm
    names = [p.name for p in parse_pipeline(DEFAULT_PIPELINE)]  # measured on the H200: BENCHMARKS.md
    assert names == ["canonicalize", "fuse-moe", "kv-cache", "fuse-qkv", "fuse-norm", "dce"]


def test_onnx_export_of_the_fused_program_runs_in_onnxruntime(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx_graphsurgeon")
    from backends.onnx import export_onnx

    config = TINY_CONFIGS[0]
    program = _fused(config)
    ids = input_ids(config, 2, 7)
    expected = TorchExecutable(program)(ids)
    for decompose in ((), ("rms_norm",)):
        exported = export_onnx(program, tmp_path / f"norm{len(decompose)}.onnx", decompose=decompose)
        onnx.checker.check_model(str(exported.path), full_check=True)
        ops_used = exported.op_types
        assert ops_used.get("RMSNormalization", 0) == (0 if decompose else 2 * config.layers + 1)
        session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"input_ids": ids.numpy()})
        assert max_rel_err(torch.from_numpy(logits), expected) <= 1e-4


def test_onnx_decoder_and_sharded_ranks_of_fused_programs(tmp_path: Path) -> None:
    """A fused program with KV caches exports as a past/present decoder that decodes like the torch backend; a fused
    tp=2 x pp=2 program's rank segments, simulated together, give the unsharded logits."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx_graphsurgeon")
    from backends.onnx import export_onnx
    from backends.onnx.decoder import OnnxDecoder, greedy_generate
    from backends.onnx.ranks import export_ranks, simulate_ranks
    from tests.backends.test_onnx_decoder import torch_reference

    config = TINY_CONFIGS[0]
    cached = _fused(config, "fuse-norm,kv-cache{max_seq=64},dce")
    exported = export_onnx(cached, tmp_path / "decoder.onnx", moe="ort")
    prompts = [input_ids(config, 1, 7)[0].tolist(), input_ids(config, 1, 3, seed=2)[0].tolist()]
    sequences, expected = torch_reference(cached, prompts, 4)
    result = greedy_generate(OnnxDecoder(exported.path), prompts, 4)
    assert result.sequences == sequences
    assert all(max_rel_err(torch.from_numpy(a), e) <= 1e-4 for a, e in zip(result.logits, expected, strict=True))

    sharded = _fused(config, "shard{tp=2,pp=2},fuse-norm,dce")
    ids = input_ids(config, 2, 7)
    reference = TorchExecutable(compiled(config, FUSED))(ids)
    logits = [out for out in simulate_ranks(export_ranks(sharded, tmp_path / "ranks"), ids.numpy()) if out.ndim == 3]
    assert len(logits) == 2  # the last stage's two tp ranks
    assert all(max_rel_err(torch.from_numpy(out), reference) <= 1e-4 for out in logits)
