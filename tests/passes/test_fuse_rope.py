"""`fuse-rope`: the fused graph's exact text (GQA, MHA, three layers with a window, sharded ranks), logits
bit-identical to the unfused program over a prefill and decode steps (fp32 and bf16, with fuse-qkv, fuse-norm and
FP8 KV caches in either order), idempotence, why an attention is not fused, the ordering errors, the op's own checks,
and the ONNX decoder export through onnxruntime."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from backends.torch.runtime import TorchExecutable
from compiler import ops
from compiler.errors import PreconditionError
from compiler.ir import Program
from compiler.pass_manager import parse_pipeline, registered_passes, run_pipeline
from compiler.rewrite import create_node, infer_value
from passes.fuse_rope import FuseRope
from tests.models import TINY_CONFIGS, TinyConfig, input_ids, max_rel_err
from tests.passes.test_canonicalize import compiled
from tests.passes.test_fuse_norm import _step_all

CACHED = "canonicalize,fuse-moe,kv-cache{max_seq=32},dce"
# GQA (2 layers), MHA (1 layer, top-1), GQA with a sliding window (3 layers).
CONFIGS = [TINY_CONFIGS[0], TINY_CONFIGS[1], TINY_CONFIGS[2]]
aten = torch.ops.aten


def _fused(config: TinyConfig, after: str = "fuse-rope", dtype: torch.dtype = torch.float32) -> Program:
    return run_pipeline(compiled(config, CACHED, dtype), parse_pipeline(after)).program


def _nodes(program: Program, target: object) -> list[torch.fx.Node]:
    return [node for node in program.graph.nodes if node.target == target]


def _graph_lines(program: Program) -> list[str]:
    lines = program.format().splitlines()
    return lines[lines.index("graph:") + 1 :]


def _expected_graph(before: Program) -> list[str]:
    """`before`'s graph text with each layer's two rope lines gone and its cached_attention line rewritten."""
    fused_names = {}
    replaced = {}
    for layer, attention in enumerate(_nodes(before, ops.cached_attention)):
        q_rope, k_rope, v, k_cache, v_cache, position, scale, window = attention.args
        name = "rope_cached_attention" + (f"_{layer}" if layer else "")
        fused_names[attention.name] = name
        value_type = re.search(r": (\S+) = ", _line_of(before, attention)).group(1)
        replaced[attention.name] = (
            f"  %{name}: {value_type} = moec.rope_cached_attention(%{q_rope.args[0].name}, %{k_rope.args[0].name}, "
            f"%{v.name}, %{k_cache.name}, %{v_cache.name}, %{position.name}, %cos, %sin, {scale}, {window})"
        )
    ropes = {node.name for node in _nodes(before, ops.rope)}
    expected = []
    for line in _graph_lines(before):
        defined = re.match(r"  %(\w+):", line)
        if defined and defined.group(1) in ropes:
            continue
        if defined and defined.group(1) in replaced:
            expected.append(replaced[defined.group(1)])
            continue
        expected.append(re.sub(r"%(cached_attention(?:_\d+)?)\b", lambda m: f"%{fused_names[m.group(1)]}", line))
    return expected


def _line_of(program: Program, node: torch.fx.Node) -> str:
    return next(line for line in _graph_lines(program) if line.startswith(f"  %{node.name}: "))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
def test_each_layer_attends_with_its_rope_inside(config: TinyConfig) -> None:
    before = compiled(config, CACHED)
    program = _fused(config)
    counts = program.op_counts()
    assert counts["moec.rope_cached_attention"] == config.layers
    assert "moec.rope" not in counts and "moec.cached_attention" not in counts
    assert _graph_lines(program) == _expected_graph(before)
    window = config.sliding_window or 0
    for node in _nodes(program, ops.rope_cached_attention):
        assert node.meta["moec_rule"] == "fuse-rope"
        assert node.args[0].target == aten.transpose.int and node.args[1].target == aten.transpose.int
        assert node.args[6].target == aten.cos.default and node.args[7].target == aten.sin.default
        assert node.args[9] == window and node.kwargs == {}
    assert program.weights() == before.weights() and program.cache_bytes_per_sequence() == (
        before.cache_bytes_per_sequence())


def test_the_first_layer_reads_exactly_this() -> None:
    line = next(line for line in _graph_lines(_fused(TINY_CONFIGS[0])) if "= moec.rope_cached_attention(" in line)
    assert line == (
        "  %rope_cached_attention: f32[batch,seq,4,8] = moec.rope_cached_attention(%transpose, %transpose_1, "
        "%transpose_2, %kv_cache_0_key, %kv_cache_0_value, %cache_position, %cos, %sin, 0.3535533905932738, 0)"
    )


@pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
def test_logits_of_prefill_and_decode_are_bit_identical(config: TinyConfig) -> None:
    ids = input_ids(config, 2, 9)
    expected = _step_all(compiled(config, CACHED), ids)
    assert torch.equal(_step_all(_fused(config), ids), expected)
    reference = TorchExecutable(compiled(config, "canonicalize,fuse-moe,dce"))(ids)
    assert max_rel_err(expected, reference) <= 1e-5


def test_bf16_logits_are_bit_identical_too() -> None:
    config = TINY_CONFIGS[0]
    ids = input_ids(config, 2, 9)
    expected = _step_all(compiled(config, CACHED, torch.bfloat16), ids)
    assert expected.dtype == torch.bfloat16
    assert torch.equal(_step_all(_fused(config, dtype=torch.bfloat16), ids), expected)


@pytest.mark.parametrize(
    ("fused", "unfused"),
    [
        ("fuse-rope,fuse-qkv,fuse-norm", "fuse-qkv,fuse-norm"),
        ("fuse-qkv,fuse-norm,fuse-rope", "fuse-qkv,fuse-norm"),
        ("quantize-weights,fuse-rope", "quantize-weights"),
    ],
)
def test_other_fusions_in_either_order_give_the_same_logits(fused: str, unfused: str) -> None:
    config = TINY_CONFIGS[0]
    ids = input_ids(config, 2, 9)
    program, reference = _fused(config, fused), _fused(config, unfused)
    counts = program.op_counts()
    assert counts["moec.rope_cached_attention"] == config.layers and "moec.rope" not in counts
    if "fuse-qkv" in fused:
        assert counts["aten.split_with_sizes"] == config.layers  # fuse-qkv sees through the fused op to q and k
    assert torch.equal(_step_all(program, ids), _step_all(reference, ids))


def test_fp8_kv_caches_before_or_after_fusing() -> None:
    """calibrate records the rotated keys; quantize-fp8{kv_cache=true} scales the fused op's caches as it would
    cached_attention's, before or after fuse-rope."""
    from tests.passes.test_quantize_fp8 import CONFIG, calibrated

    quantize = "quantize-fp8{kv_cache=true}"
    after = run_pipeline(calibrated(True), parse_pipeline(f"{quantize},fuse-rope")).program
    before = run_pipeline(calibrated(True), parse_pipeline(f"fuse-rope,{quantize}")).program
    unfused = run_pipeline(calibrated(True), parse_pipeline(quantize)).program
    for program in (after, before):
        fused = _nodes(program, ops.rope_cached_attention)
        assert len(fused) == CONFIG.layers
        assert [tuple(n.kwargs) for n in fused] == [("k_scale", "v_scale")] * CONFIG.layers
        assert {n.args[3].meta["kv_cache"].dtype for n in fused} == {torch.float8_e4m3fn}
    assert [n.kwargs for n in _nodes(after, ops.rope_cached_attention)] == [
        n.kwargs for n in _nodes(unfused, ops.cached_attention)
    ] == [n.kwargs for n in _nodes(before, ops.rope_cached_attention)]
    ids = input_ids(CONFIG, 2, 9)
    expected = _step_all(unfused, ids)
    assert torch.equal(_step_all(after, ids), expected) and torch.equal(_step_all(before, ids), expected)


def test_running_twice_changes_nothing_and_leaves_the_input_alone() -> None:
    before = compiled(TINY_CONFIGS[0], CACHED)
    text = before.format()
    once = run_pipeline(before, parse_pipeline("fuse-rope"))
    assert before.format() == text
    assert once.history[0].changed is True
    assert once.history[0].stats == {"fused": 2, "not_fused": 0, "already_fused": 0}
    twice = run_pipeline(once.program, parse_pipeline("fuse-rope"))
    assert twice.history[0].changed is False
    assert twice.history[0].stats == {"fused": 0, "not_fused": 0, "already_fused": 2}
    assert twice.program.format() == once.program.format()
    assert FuseRope().explain(once.program) == ["layers.0: already fused", "layers.1: already fused"]


def _attention(program: Program, layer: int) -> torch.fx.Node:
    return _nodes(program, ops.cached_attention)[layer]


def test_explain_says_why_an_attention_is_not_fused() -> None:
    config = TINY_CONFIGS[0]
    before = compiled(config, CACHED)
    fused_lines = [
        "layers.0: fused (%rope, %rope_1 into %cached_attention)",
        "layers.1: fused (%rope_2, %rope_3 into %cached_attention_1)",
    ]
    assert FuseRope().explain(before) == fused_lines

    shared = before.clone()
    q_rope = _attention(shared, 0).args[0]
    with shared.graph.inserting_after(q_rope):
        other = create_node(shared.graph, aten.clone.default, (q_rope,), None, "test")
    other.meta["val"] = infer_value(other)
    assert FuseRope().explain(shared) == [
        "layers.0: not fused: the q rope %rope has other users (%clone): its rotated value must stay", fused_lines[1]
    ]

    swapped = before.clone()
    k_rope = _attention(swapped, 1).args[1]
    k_rope.args = (k_rope.args[0], k_rope.args[2], k_rope.args[1])
    assert FuseRope().explain(swapped)[1] == (
        "layers.1: not fused: the q and k ropes read different cos/sin (q: %cos (aten.cos), %sin (aten.sin); "
        "k: %sin (aten.sin), %cos (aten.cos))"
    )

    unrotated = before.clone()
    attention = _attention(unrotated, 0)
    attention.args = (*attention.args[:1], attention.args[1].args[0], *attention.args[2:])
    assert FuseRope().explain(unrotated)[0] == (
        "layers.0: not fused: its k operand %transpose_1 (aten.transpose.int) is not a moec.rope"
    )
    result = run_pipeline(unrotated, parse_pipeline("fuse-rope,dce"))
    assert result.history[0].stats == {"fused": 1, "not_fused": 1, "already_fused": 0}
    counts = result.program.op_counts()
    assert (counts["moec.cached_attention"], counts["moec.rope_cached_attention"], counts["moec.rope"]) == (1, 1, 1)
    ids = input_ids(config, 2, 9)
    assert torch.equal(_step_all(result.program, ids), _step_all(unrotated, ids))

    uncached = compiled(config, "canonicalize,fuse-moe,dce")
    reason = "moec.attention reads no KV cache (fuse-rope fuses into moec.cached_attention: run kv-cache first)"
    assert FuseRope().explain(uncached) == [f"layers.{i}: not fused: {reason}" for i in range(config.layers)]


def test_without_kv_cache_is_a_precondition_error() -> None:
    message = (
        r"pass 'fuse-rope' cannot run \(it ran first\): needs kv-cache first: fuse-rope moves the rotary embedding "
        r"into moec.cached_attention, and the graph has none$"
    )
    with pytest.raises(PreconditionError, match=message):
        run_pipeline(compiled(TINY_CONFIGS[1], "canonicalize,fuse-moe,dce"), parse_pipeline("fuse-rope"))


def test_calibrate_and_shard_refuse_a_fused_program() -> None:
    from tests.passes.test_quantize_fp8 import source

    message = (
        r"pass 'calibrate\{samples=3,seq_len=16\}' cannot run \(after canonicalize, fuse-moe, kv-cache, fuse-rope\): "
        r"calibrate must run before fuse-rope: it records each attention's keys after rope \(what the KV cache "
        r"holds\), and moec.rope_cached_attention rotates them inside the op$"
    )
    pipeline = "canonicalize,fuse-moe,kv-cache,fuse-rope,calibrate{samples=3,seq_len=16}"
    with pytest.raises(PreconditionError, match=message):
        run_pipeline(source(), parse_pipeline(pipeline))
    with pytest.raises(PreconditionError, match=r"shard must run before kv-cache: the graph already attends over KV"):
        run_pipeline(compiled(TINY_CONFIGS[0], CACHED), parse_pipeline("fuse-rope,shard{tp=2}"))


def test_each_rank_fuses_its_own_layers() -> None:
    from tests.backends.test_distributed import run_ranks

    config = TINY_CONFIGS[0]  # per rank 2 query heads and 1 kv head
    pipeline = "canonicalize,fuse-moe,shard{tp=2},kv-cache{max_seq=32}"
    result = run_pipeline(compiled(config, pipeline), parse_pipeline("fuse-rope,dce"))
    assert result.history[0].stats == {"fused": 4, "not_fused": 0, "already_fused": 0}  # 2 layers x 2 ranks
    unfused = run_pipeline(compiled(config, pipeline), parse_pipeline("dce")).program
    for rank, program in enumerate(result.program.ranks):
        assert _graph_lines(program) == _expected_graph(unfused.ranks[rank])
        assert [tuple(n.args[0].meta["val"].shape[1:2]) for n in _nodes(program, ops.rope_cached_attention)] == [
            (2,), (2,)
        ]
    assert FuseRope().explain(result.program)[0] == "rank 0: layers.0: already fused"
    ids = input_ids(config, 2, 7)
    expected = run_ranks(unfused, ids)
    for rank, (logits, _) in run_ranks(result.program, ids).items():
        assert torch.equal(torch.from_numpy(logits), torch.from_numpy(expected[rank][0]))


def test_the_op_checks_its_rotary_operands() -> None:
    def meta(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device="meta")

    q, k, caches, position = meta(2, 4, 1, 8), meta(2, 2, 1, 8), meta(2, 2, 16, 8), torch.empty(2, device="meta")
    out = ops.rope_cached_attention(q, k, k, caches, caches.clone(), position.long(), meta(2, 1, 8), meta(2, 1, 8), 0.5)
    assert out.shape == (2, 1, 4, 8)
    with pytest.raises(RuntimeError, match=r"cos \(2, 1, 4\) / sin \(2, 1, 4\) are not \[batch, seq, D\]"):
        ops.rope_cached_attention(q, k, k, caches, caches.clone(), position.long(), meta(2, 1, 4), meta(2, 1, 4), 0.5)


def test_registered_and_not_in_the_default_pipeline() -> None:
    from compiler.api import DEFAULT_PIPELINE

    assert registered_passes()["fuse-rope"] is FuseRope
    # measured on the H200: two launches fewer per layer, no decode time saved (BENCHMARKS.md, fifth session)
    assert "fuse-rope" not in [p.name for p in parse_pipeline(DEFAULT_PIPELINE)]


@pytest.mark.parametrize("decompose", [(), ("attention", "rope")], ids=["fused", "decomposed"])
def test_onnx_decoder_export_decodes_like_the_torch_backend(tmp_path: Path, decompose: tuple[str, ...]) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx_graphsurgeon")
    from backends.onnx import export_onnx
    from backends.onnx.decoder import OnnxDecoder, greedy_generate
    from tests.backends.test_onnx_decoder import torch_reference

    config = TINY_CONFIGS[0]
    program = _fused(config, "fuse-qkv,fuse-rope")
    exported = export_onnx(program, tmp_path / "decoder.onnx", decompose=decompose)
    assert exported.op_types.get("Attention", 0) == (0 if decompose else config.layers)
    prompts = [input_ids(config, 1, 7)[0].tolist(), input_ids(config, 1, 3, seed=2)[0].tolist()]
    sequences, expected = torch_reference(program, prompts, 4)
    assert sequences == torch_reference(_fused(config, "fuse-qkv"), prompts, 4)[0]
    result = greedy_generate(OnnxDecoder(exported.path), prompts, 4)
    assert result.sequences == sequences
    assert all(max_rel_err(torch.from_numpy(a), e) <= 1e-4 for a, e in zip(result.logits, expected, strict=True))


def test_cli_explains_fuse_rope(capsys: pytest.CaptureFixture[str]) -> None:
    from compiler import cli

    passes = "canonicalize,fuse-moe,kv-cache{max_seq=64},fuse-rope,dce"
    assert cli.main(["compile", "tiny-random", "--passes", passes, "--explain", "fuse-rope", "--no-weights"]) == 0
    out = capsys.readouterr().out
    assert "== explain fuse-rope\nlayers.0: fused (%rope, %rope_1 into %cached_attention)\n" in out
    assert "fuse-rope" in out and "changed=True  fused=2, not_fused=0, already_fused=0" in out
