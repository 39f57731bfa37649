"""`quantize-weights`: the rewritten graph, its numerics against a float computation with the dequantized weights
(one process and sharded), the bytes materialized, the recipe flags, bad input, and accuracy guards on `tiny`."""

from __future__ import annotations

import argparse
import math
from functools import lru_cache

import pytest
import torch

from backends.torch.runtime import TorchExecutable
from compiler import quantization
from compiler.errors import MoecError, PassOptionError, PreconditionError
from compiler.ir import Program
from compiler.pass_manager import parse_pipeline, run_pipeline
from compiler.recipe import add_quantization_arguments, pipeline_with_quantization
from compiler.quantization import quantize_weight
from compiler.weights import MemoryTensor, RandomTensor, Rewrite, concat_weights, stack_weights
from passes.quantize import QuantizeWeights
from tests.models import TINY_CONFIGS, input_ids, max_rel_err, traced

CONFIG = TINY_CONFIGS[0]  # hidden 32, intermediate 48, 4 experts, 2 layers: group 16 divides every input dim
LAYERS, HIDDEN, INTERMEDIATE, EXPERTS = CONFIG.layers, CONFIG.hidden, CONFIG.intermediate, CONFIG.experts
SCHEMES = [("int8", 0), ("int8", 16), ("int4", 0), ("int4", 16)]
# Elements and output rows of the weights quantize-weights rewrites (q, k, v, o and the experts' w13, w2 per layer).
WEIGHT_NUMEL = LAYERS * (2 * HIDDEN * HIDDEN + 2 * (HIDDEN // 2) * HIDDEN + 3 * EXPERTS * INTERMEDIATE * HIDDEN)
ROWS = LAYERS * (HIDDEN + 2 * (HIDDEN // 2) + HIDDEN + EXPERTS * (2 * INTERMEDIATE + HIDDEN))


@lru_cache(maxsize=None)
def fused(dtype: torch.dtype = torch.float32) -> Program:
    return run_pipeline(traced(CONFIG, dtype), parse_pipeline("canonicalize,fuse-moe,dce")).program


@lru_cache(maxsize=None)
def quantized(precision: str, group_size: int, dtype: torch.dtype = torch.float32) -> Program:
    spec = f"quantize-weights{{precision={precision},group_size={group_size}}}"
    return run_pipeline(fused(dtype), parse_pipeline(spec)).program


def reference_dequantize(qweight: torch.Tensor, scales: torch.Tensor, precision: str, group_size: int) -> torch.Tensor:
    """The documented layout, written out independently of compiler.quantization: int4 byte j holds column 2j in its
    low nibble and 2j+1 in its high nibble, offset by 8; every scale covers `group_size` consecutive columns."""
    if precision == "int4":
        assert qweight.dtype == torch.uint8
        shifts = torch.tensor([0, 4], dtype=torch.uint8).repeat(qweight.shape[-1])
        codes = ((qweight.repeat_interleave(2, dim=-1) >> shifts) & 0xF).to(torch.float64) - 8
    else:
        assert qweight.dtype == torch.int8
        codes = qweight.to(torch.float64)
    columns = codes.shape[-1] if group_size == 0 else group_size
    return (codes * scales.to(torch.float64).repeat_interleave(columns, dim=-1)).to(scales.dtype)


def with_dequantized_weights(
    float_program: Program, quantized_program: Program, precision: str, group_size: int
) -> Program:
    """`float_program` with every weight that `quantized_program` quantized replaced by its dequantized value."""
    reference = float_program.clone()
    qweights = quantized_program.weights()
    replaced = 0
    for node in reference.weight_nodes():
        if f"{node.name}_q" in qweights:
            qweight = qweights[f"{node.name}_q"].materialize()
            scales = qweights[f"{node.name}_scales"].materialize()
            value = reference_dequantize(qweight, scales, precision, group_size)
            node.meta = {**node.meta, "weight": MemoryTensor(node.name, value)}
            replaced += 1
    assert replaced == sum(name.endswith("_q") for name in qweights)
    return reference


# --- the rewritten graph ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "precision, group_size, q_type, scales_type, w2_type",
    [
        ("int8", 0, "i8[32,32]", "f32[32,1]", "i8[4,32,48]"),
        ("int4", 16, "u8[32,16]", "f32[32,2]", "u8[4,32,24]"),
    ],
)
def test_rewritten_graph(precision: str, group_size: int, q_type: str, scales_type: str, w2_type: str) -> None:
    program = quantized(precision, group_size)
    counts = program.op_counts()
    assert counts["moec.quantized_linear"] == 4 * LAYERS  # q, k, v, o per layer
    assert counts["moec.quantized_moe"] == LAYERS
    assert counts["moec.linear"] == 1 and "moec.moe" not in counts  # only lm_head stays float
    lines = program.format().splitlines()
    attrs = f"precision={precision}, group_size={group_size}"
    source = "memory(model.layers.0.self_attn.q_proj.weight)"
    assert f"  %layers_0_self_attn_q_proj_weight_q: {q_type} = weight quantize({source}, {attrs})" in lines
    scales_name = "%layers_0_self_attn_q_proj_weight_scales"
    scales_line = f"  {scales_name}: {scales_type} = weight quantize_scales({source}, {attrs})"
    assert scales_line in lines
    assert any(line.startswith(f"  %layers_0_mlp_experts_w2_q: {w2_type} = weight quantize(") for line in lines)
    calls = [line for line in lines if "= moec.quantized_" in line]
    assert any(
        line.endswith(f"moec.quantized_linear(%rms_norm, %layers_0_self_attn_q_proj_weight_q, "
                      f"%layers_0_self_attn_q_proj_weight_scales, None, '{precision}', {group_size})")
        for line in calls
    ), calls
    assert any(
        "moec.quantized_moe(" in line and f", %layers_0_mlp_gate_weight, %layers_0_mlp_experts_w13_q, "
        f"%layers_0_mlp_experts_w13_scales, %layers_0_mlp_experts_w2_q, %layers_0_mlp_experts_w2_scales, 2, "
        f"'renormalize', 'swiglu', '{precision}', {group_size})" in line
        for line in calls
    ), calls
    weights = program.weights()
    # The router, norms, embedding and lm_head keep their float weights; the quantized ones' float weights are gone.
    assert weights["layers_0_mlp_gate_weight"].type_str == f"f32[{EXPERTS},{HIDDEN}]"
    assert {"layers_0_input_layernorm_weight", "embed_tokens_weight", "lm_head_weight"} <= set(weights)
    assert "layers_0_self_attn_q_proj_weight" not in weights and "layers_0_mlp_experts_w13" not in weights


def test_pass_is_functional_and_reports_what_it_did() -> None:
    before = fused().format()
    result = run_pipeline(fused(), parse_pipeline("quantize-weights{precision=int4}"))
    assert fused().format() == before  # the input program is untouched
    record = result.history[0]
    assert record.changed is True
    assert record.stats == {
        "quantized_linear": 8, "quantized_moe": 2, "kept_float": 1, "float_bytes": 4 * WEIGHT_NUMEL,
        "quantized_bytes": WEIGHT_NUMEL // 2 + 4 * ROWS,  # two codes per byte, one f32 scale per row
    }


def test_excluded_ops_and_lm_head_option() -> None:
    program = run_pipeline(fused(), parse_pipeline("quantize-weights{exclude=o_proj|layers.1.mlp}")).program
    counts = program.op_counts()
    assert counts["moec.quantized_linear"] == 3 * LAYERS and counts["moec.linear"] == LAYERS + 1
    assert counts["moec.quantized_moe"] == 1 and counts["moec.moe"] == 1
    with_head = run_pipeline(fused(), parse_pipeline("quantize-weights{quantize_lm_head=true}")).program
    assert "moec.linear" not in with_head.op_counts()
    assert with_head.weights()["lm_head_weight_q"].type_str == f"i8[{CONFIG.vocab},{HIDDEN}]"
    nothing = run_pipeline(fused(), parse_pipeline("quantize-weights{exclude=layers}"))
    assert nothing.history[0].changed is False and nothing.program.format() == fused().format()
    lines = QuantizeWeights(exclude="o_proj").explain(fused())
    assert "layers.0.self_attn.o_proj: kept float: excluded by pattern 'o_proj'" in lines
    assert "lm_head: kept float: lm_head is kept float unless quantize_lm_head=true" in lines
    assert "layers.0.self_attn.q_proj: int8, group_size=0: f32[32,32] -> i8[32,32] + scales f32[32,1]" in lines


def test_lm_head_is_found_without_module_paths() -> None:
    """Graphs that do not record module paths (built by hand, or by other frontends) still keep lm_head float: it is
    the linear the program returns; other ops are named by their weights."""
    bare = fused().clone()
    for node in bare.graph.nodes:
        node.meta.pop("nn_module_stack", None)
    program = run_pipeline(bare, parse_pipeline("quantize-weights{exclude=layers_1_self_attn_o_proj_weight}")).program
    counts = program.op_counts()
    assert counts["moec.linear"] == 2 and counts["moec.quantized_linear"] == 4 * LAYERS - 1
    assert "lm_head_weight" in program.weights() and "lm_head_weight_q" not in program.weights()


# --- numerics -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision, group_size", SCHEMES)
def test_logits_equal_float_computation_with_dequantized_weights(precision: str, group_size: int) -> None:
    program = quantized(precision, group_size)
    ids = input_ids(CONFIG, batch=2, seq=7)
    logits = TorchExecutable(program)(ids)
    reference = TorchExecutable(with_dequantized_weights(fused(), program, precision, group_size))(ids)
    assert max_rel_err(logits, reference) <= 1e-4
    # ... and the dequantized weights are the nearest codes: within half a scale of the float weights.
    float_logits = TorchExecutable(fused())(ids)
    assert 0 < max_rel_err(logits, float_logits) < (0.05 if precision == "int8" else 0.3)


@pytest.mark.parametrize("precision, group_size", SCHEMES)
def test_codes_round_to_nearest_within_half_a_scale(precision: str, group_size: int) -> None:
    qweights, floats = quantized(precision, group_size).weights(), fused().weights()
    for name in ("layers_0_self_attn_q_proj_weight", "layers_1_mlp_experts_w2"):
        weight = floats[name].materialize()
        qweight, scales = qweights[f"{name}_q"].materialize(), qweights[f"{name}_scales"].materialize()
        dequantized = reference_dequantize(qweight, scales, precision, group_size)
        columns = weight.shape[-1] if group_size == 0 else group_size
        half_scale = scales.repeat_interleave(columns, dim=-1) / 2
        assert bool(((dequantized - weight).abs() <= half_scale * (1 + 1e-5)).all()), name
        qmax = 127 if precision == "int8" else 7
        assert torch.allclose(scales.amax(dim=-1), weight.abs().amax(dim=-1) / qmax)  # each row's max is a full code


def test_int4_nibble_order_and_offset() -> None:
    weight = torch.tensor([[7.0, -7.0, 1.0, -2.0] + [0.0] * 12])
    qweight, scales = quantization.quantize(weight, "int4", 16)
    assert scales.tolist() == [[1.0]]
    assert qweight.tolist()[0][:2] == [(8 - 7) << 4 | (8 + 7), (8 - 2) << 4 | (8 + 1)]  # 0x1F, 0x69


def test_kv_cache_before_or_after_and_bfloat16() -> None:
    ids = input_ids(CONFIG, batch=2, seq=5)
    stateless = TorchExecutable(quantized("int4", 16))(ids)
    quantize = "quantize-weights{precision=int4,group_size=16}"
    for spec in (f"kv-cache,{quantize}", f"{quantize},kv-cache"):
        program = run_pipeline(fused(), parse_pipeline(spec)).program
        assert program.op_counts()["moec.cached_attention"] == LAYERS
        assert max_rel_err(TorchExecutable(program)(ids), stateless) <= 1e-5, spec
    program = quantized("int8", 16, torch.bfloat16)
    assert program.weights()["layers_0_self_attn_q_proj_weight_scales"].type_str == "bf16[32,2]"
    reference = with_dequantized_weights(fused(torch.bfloat16), program, "int8", 16)
    assert max_rel_err(TorchExecutable(program)(ids), TorchExecutable(reference)(ids)) <= 1e-4


def test_sharded_ranks_equal_float_ranks_with_dequantized_weights() -> None:
    """tp=2 with moe_ep=2: each rank quantizes its own slices (o_proj's column half gets its own per-channel scales)
    and materializes exactly its quantized bytes; the ranks' logits equal the float ranks' on dequantized weights."""
    from tests.backends.test_distributed import run_ranks

    program = run_pipeline(fused(), parse_pipeline("shard{tp=2,moe_ep=2},quantize-weights{precision=int4},dce")).program
    reference = run_pipeline(fused(), parse_pipeline("shard{tp=2,moe_ep=2},dce")).program
    reference.ranks = tuple(
        with_dequantized_weights(float_rank, quantized_rank, "int4", 0)
        for float_rank, quantized_rank in zip(reference.ranks, program.ranks)
    )
    rank1 = program.ranks[1]
    moe_lines = [line for line in rank1.format().splitlines() if "moec.quantized_moe(" in line]
    assert len(moe_lines) == LAYERS and all(line.endswith("'int4', 0, expert_offset=2)") for line in moe_lines)
    assert rank1.weights()["layers_0_self_attn_o_proj_weight_scales"].type_str == f"f32[{HIDDEN},1]"
    assert rank1.weights()["layers_0_self_attn_o_proj_weight_q"].type_str == f"u8[{HIDDEN},{HIDDEN // 4}]"
    ids = input_ids(CONFIG, batch=2, seq=5)
    results, expected = run_ranks(program, ids), run_ranks(reference, ids)
    for rank in (0, 1):
        assert max_rel_err(torch.from_numpy(results[rank][0]), torch.from_numpy(expected[rank][0])) <= 1e-4
        assert results[rank][1] == program.ranks[rank].weight_bytes() < expected[rank][1] / 3


def test_materialized_bytes_are_the_compact_codes_and_scales() -> None:
    float_bytes = TorchExecutable(fused()).materialized_bytes
    for precision, group_size in SCHEMES:
        executable = TorchExecutable(quantized(precision, group_size))
        quantized_weights = {name: t for name, t in executable.weights.items() if name.endswith(("_q", "_scales"))}
        codes = sum(t.nbytes for name, t in quantized_weights.items() if name.endswith("_q"))
        scales = sum(t.nbytes for name, t in quantized_weights.items() if name.endswith("_scales"))
        assert codes == WEIGHT_NUMEL // (1 if precision == "int8" else 2)  # 1/4 (int8) or 1/8 (int4) of fp32
        assert scales == 4 * (ROWS if group_size == 0 else WEIGHT_NUMEL // group_size)
        assert executable.materialized_bytes == float_bytes - 4 * WEIGHT_NUMEL + codes + scales
        dtypes = {t.dtype for name, t in quantized_weights.items() if name.endswith("_q")}
        assert dtypes == {torch.int8 if precision == "int8" else torch.uint8}


def test_weights_stay_lazy_and_quantize_expert_by_expert(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = quantization.quantize
    monkeypatch.setattr(quantization, "quantize", lambda w, p, g: calls.append(tuple(w.shape)) or original(w, p, g))
    program = run_pipeline(fused(), parse_pipeline("quantize-weights{precision=int4,group_size=16}")).program
    assert calls == []  # nothing is read or quantized at compile time
    experts = [RandomTensor(f"expert{e}", (2 * INTERMEDIATE, HIDDEN), torch.float32, seed=e) for e in range(3)]
    qweight, scales = quantize_weight(stack_weights(experts), "int4", 16)
    assert isinstance(qweight, Rewrite) and qweight.kind == "stack"
    assert qweight.shape == (3, 2 * INTERMEDIATE, HIDDEN // 2)
    whole_q, whole_scales = original(torch.stack([e.read() for e in experts]), "int4", 16)
    assert torch.equal(qweight.materialize(), whole_q) and torch.equal(scales.materialize(), whole_scales)
    assert calls == [(2 * INTERMEDIATE, HIDDEN)] * 6  # one expert at a time (codes, then scales)
    concat_q, _ = quantize_weight(concat_weights(experts, 0), "int8", 0)
    assert concat_q.kind == "concat"
    del program


# --- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pipeline, error, message",
    [
        ("quantize-weights{precision=int4,group_size=32}", PreconditionError,
         "layers.0.mlp.experts: weight %layers_0_mlp_experts_w2 f32[4,32,48]: int4: group_size=32 does not divide the "
         "input dim 48"),
        ("quantize-weights,quantize-weights", PreconditionError,
         "the program is already quantized (10 quantized ops); quantize-weights runs once"),
        ("quantize-weights{precision=fp8}", PassOptionError,
         "option precision='fp8' of pass 'quantize-weights' must be one of int8, int4"),
        ("quantize-weights{precision=int8,group_size=24}", PassOptionError,
         "quantize-weights: group_size=24 must be 0 (one scale per output channel) or a power of two >= 16"),
        ("quantize-weights{exclude=qproj}", PreconditionError, "exclude pattern 'qproj' matches no linear or moe op"),
        ("quantize-weights,shard{tp=2}", PreconditionError,
         "shard must run before quantize-weights: each rank quantizes its own weight slices"),
    ],
)
def test_bad_input_gets_one_clear_error(pipeline: str, error: type, message: str) -> None:
    with pytest.raises(error) as raised:
        run_pipeline(fused(), parse_pipeline(pipeline))
    assert message in str(raised.value)


def test_bad_input_in_python_and_order() -> None:
    with pytest.raises(PassOptionError, match="unknown precision 'int3'"):
        QuantizeWeights(precision="int3")  # type: ignore[arg-type]
    unfused = run_pipeline(traced(CONFIG), parse_pipeline("canonicalize")).program
    with pytest.raises(PreconditionError, match="needs fuse-moe first: a router .* is not fused"):
        run_pipeline(unfused, parse_pipeline("quantize-weights"))


# --- recipe flags -------------------------------------------------------------------------------------------------


def _flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_quantization_arguments(parser)
    return parser.parse_args(list(argv))


def test_recipe_flags_place_the_pass(capsys: pytest.CaptureFixture[str]) -> None:
    default = "canonicalize,fuse-moe,kv-cache,dce"
    assert pipeline_with_quantization(default, _flags()) == default
    flags = _flags("--use_weight_only", "--weight_only_precision", "int4", "--group_size", "128")
    chosen = pipeline_with_quantization(default, flags)
    assert chosen == "canonicalize,fuse-moe,quantize-weights{precision=int4,group_size=128},kv-cache,dce"
    assert capsys.readouterr().err == f"pipeline: {chosen}\n"
    # After fuse-qkv when the pipeline fuses (the default one does): the fused projection is quantized as one.
    fused = pipeline_with_quantization("canonicalize,fuse-moe,kv-cache,fuse-qkv,fuse-norm,dce", flags)
    assert fused == "canonicalize,fuse-moe,kv-cache,fuse-qkv,quantize-weights{precision=int4,group_size=128},fuse-norm,dce"
    capsys.readouterr()
    sharded = pipeline_with_quantization("canonicalize,fuse-moe,shard{tp=2},dce", _flags("--use-weight-only"))
    assert sharded == "canonicalize,fuse-moe,shard{tp=2},quantize-weights{precision=int8},dce"
    for argv, spec, message in [
        (["--weight-only-precision", "int4"], default, "--weight-only-precision need --use-weight-only"),
        (["--use-weight-only"], "canonicalize,dce", "--use-weight-only needs fuse-moe in the pipeline"),
        (["--use-weight-only"], "canonicalize,fuse-moe,quantize-weights", "the pipeline already quantizes"),
        (["--use-weight-only", "--group-size", "100"], default, "group_size=100 must be 0"),
    ]:
        with pytest.raises(MoecError, match=message):
            pipeline_with_quantization(spec, _flags(*argv))


def test_compile_cli_prints_the_chosen_pipeline_and_quantized_graph(capsys: pytest.CaptureFixture[str]) -> None:
    from compiler import cli

    argv = ["compile", "tiny-random", "--no-weights", "--use-weight-only", "--weight-only-precision", "int4",
            "--group-size", "32"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert ("pipeline: canonicalize,fuse-moe,kv-cache,fuse-qkv,quantize-weights{precision=int4,group_size=32},"
            "fuse-norm,dce") in captured.err
    # Per layer: the fused q/k/v projection and o_proj (tiny-random: 2 layers; lm_head stays float).
    assert "#   moec.quantized_moe: 2" in captured.out and "#   moec.quantized_linear: 4" in captured.out
    assert cli.main(["passes"]) == 0
    listed = capsys.readouterr().out
    assert "\nquantize-weights  (precision: int8|int4 = int8, group_size: int = 0, exclude: str = , " in listed
    for command in ("run", "eval"):  # the same flags parse on run and eval
        args = cli.build_parser().parse_args([command, "tiny", "--use_weight_only", "--weight_only_precision", "int8"])
        assert (args.use_weight_only, args.weight_only_precision, args.group_size) == (True, "int8", None)


# --- accuracy on the trained tiny ---------------------------------------------------------------------------------

# As test_embedded_tiny.py. The sample matters: on the first 6,000 tokens int4 group 128 is +8.0% (BENCHMARKS.md has
# the whole text's numbers).
EVAL_TOKENS = 12_000


@lru_cache(maxsize=None)
def _tiny_score(quantize: str) -> tuple[float, torch.Tensor]:
    """Perplexity and top-1 tokens of the trained tiny, quantized by `quantize` after its fuse-moe (the float model
    and its trace are shared with tests/frontends/test_embedded_tiny.py)."""
    from compiler.api import CompiledModel
    from tests.frontends.test_embedded_tiny import EVAL_TEXT, compiled_tiny

    compiled = compiled_tiny()
    if quantize:
        result = run_pipeline(compiled.graph_after("fuse-moe"), parse_pipeline(f"{quantize},dce"))
        compiled = CompiledModel(result.program, compiled.traced, result.history, tokenizer=compiled.tokenizer)
    ids = compiled.tokenizer(EVAL_TEXT, verbose=False)["input_ids"]
    top1 = compiled(torch.tensor(ids[: 8 * 256]).view(8, 256)).argmax(-1)
    return compiled.perplexity(EVAL_TEXT, max_tokens=EVAL_TOKENS), top1


@pytest.mark.parametrize(
    "quantize, max_change, min_agreement",
    [("quantize-weights{precision=int8}", 0.01, 0.97), ("quantize-weights{precision=int4,group_size=128}", 0.08, 0.80)],
)
def test_trained_tiny_accuracy_targets(quantize: str, max_change: float, min_agreement: float) -> None:
    """Issue #13's targets on held-out text: int8 perplexity within 1% of float, int4 group 128 within 8%; top-1
    agreement with the float model bounded below with room for rounding (measured values in BENCHMARKS.md)."""
    base, base_top1 = _tiny_score("")
    perplexity, top1 = _tiny_score(quantize)
    assert math.isfinite(perplexity) and perplexity != base
    assert abs(perplexity / base - 1) <= max_change, (perplexity, base)
    assert float((top1 == base_top1).float().mean()) >= min_agreement
