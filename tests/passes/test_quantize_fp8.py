"""`calibrate` and `quantize-fp8`: the recorded ranges (against Hugging Face's activations), the rewritten graph, its
numerics against a float computation written out here (ops, whole programs, FP8 KV caches, sharded ranks), bad input,
the recipe flags, and accuracy guards on the trained `tiny`."""

from __future__ import annotations

import argparse
import math
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from backends.torch.runtime import TorchExecutable
from compiler import fp8, ops
from compiler.errors import MoecError, PassOptionError, PreconditionError
from compiler.ir import Calibration, Program
from compiler.pass_manager import parse_pipeline, run_pipeline
from compiler.recipe import add_quantization_arguments, pipeline_with_quantization
from compiler.weights import MemoryTensor
from passes.calibrate import builtin_text_path
from tests.models import TINY_CONFIGS, hf_model, input_ids, max_rel_err, traced

CONFIG = TINY_CONFIGS[0]  # hidden 32, intermediate 48, 4 experts top-2, 2 layers, GQA
LAYERS, HIDDEN, INTERMEDIATE, EXPERTS = CONFIG.layers, CONFIG.hidden, CONFIG.intermediate, CONFIG.experts
CALIBRATE = "calibrate{samples=3,seq_len=16}"
E4M3_MAX = 448.0


def byte_tokenize(text: str) -> list[int]:
    """A stand-in tokenizer for the random-weight configs (their sources have none): one id per UTF-8 byte."""
    return [byte % CONFIG.vocab for byte in text.encode("utf-8")]


@lru_cache(maxsize=None)
def source() -> Program:
    program = traced(CONFIG).clone()  # the shared trace stays untouched
    program.tokenize = byte_tokenize
    return program


@lru_cache(maxsize=None)
def calibrated(kv_cache: bool = False) -> Program:
    cache = "kv-cache," if kv_cache else ""
    return run_pipeline(source(), parse_pipeline(f"canonicalize,fuse-moe,{cache}{CALIBRATE},dce")).program


@lru_cache(maxsize=None)
def quantized(spec: str = "quantize-fp8", kv_cache: bool = False) -> Program:
    return run_pipeline(calibrated(kv_cache), parse_pipeline(spec)).program


# --- the float computation, written out independently of compiler/fp8.py and the kernels --------------------------


def scale_of(amax: float) -> float:
    return float(torch.tensor(amax, dtype=torch.float32) / E4M3_MAX)


def fake_quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x on the e4m3 grid of `scale`: divide in float32, saturate at ±448, round (torch's cast), multiply back."""
    codes = (x.to(torch.float32) / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes.to(torch.float32) * scale


def dequantized(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    assert codes.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    return codes.to(torch.float32) * scales.reshape(*scales.shape, *([1] * (codes.dim() - scales.dim())))


def reference_moe(
    x: torch.Tensor, router: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int, input_scale: float,
    intermediate_scale: float, expert_offset: int = 0,
) -> torch.Tensor:
    """Token by token: top-k renormalized float32 routing; per routed expert of this block, fake-quantized input,
    gate/up, silu(gate) * up fake-quantized, down projection, weighted sum."""
    flat = x.reshape(-1, x.shape[-1])
    probs = torch.softmax((flat @ router.T).float(), dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(flat)
    for token in range(flat.shape[0]):
        row = fake_quantize(flat[token], input_scale)
        for slot in range(top_k):
            expert = int(experts[token, slot]) - expert_offset
            if not 0 <= expert < w13.shape[0]:
                continue
            gate, up = (w13[expert] @ row).chunk(2)
            down = w2[expert] @ fake_quantize(F.silu(gate) * up, intermediate_scale)
            out[token] += weights[token, slot] * down
    return out.reshape(x.shape)


def float_reference(float_program: Program, quantized_program: Program, fp8_kv: bool = False) -> Program:
    """`float_program` computing what `quantized_program` should: every op it quantized gets the dequantized weights,
    its inputs fake-quantized with the calibrated scales, and each moe becomes `reference_moe`; with `fp8_kv`, the
    keys and values entering each cached attention are fake-quantized with the layer's scales."""
    from passes.quantize import module_path

    reference = float_program.clone()
    graph, qweights = reference.graph, quantized_program.weights()
    calibration = reference.calibration
    assert calibration is not None

    def dequantized_weight(node: torch.fx.Node) -> torch.fx.Node:
        value = dequantized(qweights[f"{node.name}_fp8"].materialize(), qweights[f"{node.name}_scale"].materialize())
        node.meta = {**node.meta, "weight": MemoryTensor(node.name, value)}
        return node

    def fake_quantized(value: torch.fx.Node, scale: float, before: torch.fx.Node) -> torch.fx.Node:
        with graph.inserting_before(before):
            return graph.call_function(fake_quantize, (value, scale))

    for node in list(graph.nodes):
        if node.target not in (ops.linear, ops.moe, ops.cached_attention):
            continue
        path = module_path(node)
        if node.target == ops.linear and f"{node.args[1].name}_fp8" in qweights:
            x = fake_quantized(node.args[0], scale_of(calibration.amax(path, "input")), node)
            node.args = (x, dequantized_weight(node.args[1]), *node.args[2:])
        elif node.target == ops.moe and f"{node.args[2].name}_fp8" in qweights:
            x, router, w13, w2, top_k = node.args[:5]
            scales = (scale_of(calibration.amax(path, "input")), scale_of(calibration.amax(path, "intermediate")))
            offset = node.kwargs.get("expert_offset", 0)
            args = (x, router, dequantized_weight(w13), dequantized_weight(w2), top_k, *scales, offset)
            with graph.inserting_before(node):
                replacement = graph.call_function(reference_moe, args)
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
        elif node.target == ops.cached_attention and fp8_kv:
            q, k, v = node.args[:3]
            k = fake_quantized(k, scale_of(calibration.amax(path, "key")), node)
            v = fake_quantized(v, scale_of(calibration.amax(path, "value")), node)
            node.args = (q, k, v, *node.args[3:])
    reference.graph_module.recompile()
    return reference


# --- calibrate ----------------------------------------------------------------------------------------------------


def test_calibrate_records_hugging_face_activation_ranges_and_prints_them() -> None:
    """Each range is the amax of an activation Hugging Face's modules compute on the same tokens: linear inputs
    (forward pre-hooks), the moe input, its experts' silu(gate) * up (computed here from the routed tokens), keys
    after rope and values (k_proj / v_proj outputs)."""
    from transformers.models.mixtral.modeling_mixtral import apply_rotary_pos_emb

    program, before = calibrated(), run_pipeline(source(), parse_pipeline("canonicalize,fuse-moe,dce")).program
    calibration = program.calibration
    assert calibration is not None
    paths = [f"layers.{i}.{name}" for i in range(LAYERS) for name in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn", "self_attn.o_proj",
              "mlp.experts")]
    assert list(calibration.ranges) == [*paths, "lm_head"]  # graph order
    assert list(calibration.ranges["layers.0.mlp.experts"]) == ["input", "intermediate"]
    assert list(calibration.ranges["layers.1.self_attn"]) == ["key", "value"]

    ids = torch.tensor(byte_tokenize(builtin_text_path().read_text(encoding="utf-8"))[: 3 * 16]).view(3, 16)
    model, expected, captured = hf_model(CONFIG), {}, {}

    def record(path: str, role: str, value: torch.Tensor) -> None:
        expected[path, role] = max(expected.get((path, role), 0.0), float(value.abs().amax()))

    hooks = [model.lm_head.register_forward_pre_hook(lambda module, args: record("lm_head", "input", args[0]))]
    for index, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            path = f"layers.{index}.self_attn.{name}"
            hooks.append(getattr(layer.self_attn, name).register_forward_pre_hook(
                lambda module, args, path=path: record(path, "input", args[0])))
        for name in ("k_proj", "v_proj"):
            hooks.append(getattr(layer.self_attn, name).register_forward_hook(
                lambda module, args, out, key=(index, name): captured.__setitem__(key, out)))
        hooks.append(layer.mlp.register_forward_pre_hook(
            lambda module, args, key=(index, "mlp"): captured.__setitem__(key, args[0])))
    with torch.no_grad():
        model(ids)
        for hook in hooks:
            hook.remove()
        head_dim = HIDDEN // CONFIG.heads
        cos, sin = model.model.rotary_emb(captured[0, "k_proj"], torch.arange(16)[None])
        for index, layer in enumerate(model.model.layers):
            keys = captured[index, "k_proj"].view(3, 16, CONFIG.kv_heads, head_dim).transpose(1, 2)
            record(f"layers.{index}.self_attn", "key", apply_rotary_pos_emb(keys, keys, cos, sin)[0])
            record(f"layers.{index}.self_attn", "value", captured[index, "v_proj"])
            x = captured[index, "mlp"].reshape(-1, HIDDEN)
            record(f"layers.{index}.mlp.experts", "input", x)
            routed = torch.softmax(x @ layer.mlp.gate.weight.T, dim=-1).topk(CONFIG.top_k, dim=-1).indices
            w13 = before.weights()[f"layers_{index}_mlp_experts_w13"].materialize()
            for expert in range(EXPERTS):
                gate, up = (x[(routed == expert).any(dim=-1)] @ w13[expert].T).chunk(2, dim=-1)
                record(f"layers.{index}.mlp.experts", "intermediate", F.silu(gate) * up)
    assert len(expected) == sum(len(roles) for roles in calibration.ranges.values())
    for (path, role), amax in expected.items():
        assert math.isclose(calibration.amax(path, role), amax, rel_tol=1e-5), (path, role)

    lines = program.format().splitlines()
    header = "# calibration: 3 sequences x 16 tokens of the builtin calibration text; activation amax per op:"
    moe = calibration.ranges["layers.0.mlp.experts"]
    table = [header] + [f"#   {path}: " + ", ".join(f"{role} {amax:.4g}" for role, amax in roles.items())
                        for path, roles in calibration.ranges.items()]
    assert f"#   layers.0.mlp.experts: input {moe['input']:.4g}, intermediate {moe['intermediate']:.4g}" in table
    start = lines.index(header)
    assert lines[start : start + len(table)] == table
    # Nothing else changes: without the table, the program prints as before.
    assert lines[:start] + lines[start + len(table) :] == before.format().splitlines()


def test_calibrate_options_clipping_and_idempotence(tmp_path: Path) -> None:
    result = run_pipeline(calibrated(), parse_pipeline(CALIBRATE))
    assert result.history[0].changed is False  # the same text measures the same ranges
    assert result.program.calibration == calibrated().calibration
    text = tmp_path / "calibration.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 3, encoding="utf-8")  # 81 bytes: 5 sequences of 16
    clipped = run_pipeline(calibrated(), parse_pipeline(f"calibrate{{dataset={text},samples=100,seq_len=16}}"))
    record = clipped.history[0]
    assert record.changed is True
    assert record.stats == {"sequences": 5, "tokens": 80, "ops": 13,
                            "note": "the text holds 81 tokens: 5 sequences of 16, not the 100 asked"}
    assert clipped.program.calibration.description == f"5 sequences x 16 tokens of {text}"
    cached = calibrated(kv_cache=True).calibration
    assert cached.ranges.keys() == calibrated().calibration.ranges.keys()  # kv-cache before or after: the same ops
    for path, roles in cached.ranges.items():
        for role, amax in roles.items():
            assert math.isclose(amax, calibrated().calibration.amax(path, role), rel_tol=1e-5), (path, role)


# --- the rewritten graph ------------------------------------------------------------------------------------------


def test_rewritten_graph() -> None:
    program, calibration = quantized(), calibrated().calibration
    counts = program.op_counts()
    assert counts["moec.fp8_linear"] == 4 * LAYERS and counts["moec.fp8_moe"] == LAYERS
    assert counts["moec.linear"] == 1 and "moec.moe" not in counts  # lm_head stays float
    lines = program.format().splitlines()
    source_expr = "memory(model.layers.0.self_attn.q_proj.weight)"
    assert f"  %layers_0_self_attn_q_proj_weight_fp8: f8e4m3[32,32] = weight fp8_quantize({source_expr})" in lines
    assert f"  %layers_0_self_attn_q_proj_weight_scale: f32[] = weight fp8_scale({source_expr})" in lines
    w13_line = next(line for line in lines if line.startswith("  %layers_0_mlp_experts_w13_fp8:"))
    assert w13_line.startswith("  %layers_0_mlp_experts_w13_fp8: f8e4m3[4,96,32] = weight stack(fp8_quantize(")
    assert any(line.startswith("  %layers_0_mlp_experts_w13_scale: f32[4] = weight stack(fp8_scale(") for line in lines)
    assert any(line.startswith("  %layers_1_mlp_experts_w2_scale: f32[4] = weight stack(fp8_scale(") for line in lines)
    q_scale = scale_of(calibration.amax("layers.0.self_attn.q_proj", "input"))
    assert any(line.endswith(f"= moec.fp8_linear(%rms_norm, %layers_0_self_attn_q_proj_weight_fp8, "
                             f"%layers_0_self_attn_q_proj_weight_scale, {q_scale!r}, None)") for line in lines)
    moe_scales = [scale_of(calibration.amax("layers.0.mlp.experts", role)) for role in ("input", "intermediate")]
    assert any(f"moec.fp8_moe(%view_4, %layers_0_mlp_gate_weight, %layers_0_mlp_experts_w13_fp8, "
               f"%layers_0_mlp_experts_w13_scale, %layers_0_mlp_experts_w2_fp8, %layers_0_mlp_experts_w2_scale, 2, "
               f"'renormalize', 'swiglu', {moe_scales[0]!r}, {moe_scales[1]!r})" in line for line in lines)
    weights = program.weights()
    assert weights["layers_0_mlp_gate_weight"].type_str == f"f32[{EXPERTS},{HIDDEN}]"  # the router stays float
    assert "layers_0_self_attn_q_proj_weight" not in weights and "layers_0_mlp_experts_w13" not in weights
    assert program.calibration == calibration  # the ranges stay on the program


def test_per_tensor_and_per_expert_scales_are_amax_over_448() -> None:
    weights, floats = quantized().weights(), calibrated().weights()
    q = floats["layers_0_self_attn_q_proj_weight"].materialize()
    assert weights["layers_0_self_attn_q_proj_weight_scale"].materialize() == q.abs().amax() / E4M3_MAX
    w13 = floats["layers_1_mlp_experts_w13"].materialize()
    scales = weights["layers_1_mlp_experts_w13_scale"].materialize()
    assert torch.equal(scales, w13.abs().amax(dim=(1, 2)) / E4M3_MAX)  # w1 and w3 rows of an expert share one
    codes = weights["layers_1_mlp_experts_w13_fp8"].materialize()
    assert codes.dtype == torch.float8_e4m3fn and codes.to(torch.float32).abs().amax() == E4M3_MAX
    assert torch.equal(codes, (w13 / scales[:, None, None]).to(torch.float8_e4m3fn))
    error = (dequantized(codes, scales) - w13).abs()
    assert bool((error <= w13.abs() * 2**-4 + 2**-10 * scales[:, None, None]).all())  # half an e4m3 ulp


def test_fp8_kv_cache_graph() -> None:
    program, calibration = quantized("quantize-fp8{kv_cache=true}", kv_cache=True), calibrated(True).calibration
    specs = program.cache_specs()
    assert {spec.dtype for spec in specs.values()} == {torch.float8_e4m3fn} and len(specs) == 2 * LAYERS
    lines = program.format().splitlines()
    assert "# kv cache: 4 tensors, 8,192 bytes per sequence (max_seq 128, f8e4m3)" in lines
    assert "  %kv_cache_0_key: f8e4m3[batch,2,128,8] = kv cache (layer 0 key, max_seq 128)" in lines
    key, value = (scale_of(calibration.amax("layers.1.self_attn", role)) for role in ("key", "value"))
    calls = [line for line in lines if "moec.cached_attention(" in line]
    assert calls[1].endswith(f"%kv_cache_1_key, %kv_cache_1_value, %cache_position, 0.3535533905932738, 0, "
                             f"k_scale={key!r}, v_scale={value!r})"), calls
    stats = run_pipeline(calibrated(True), parse_pipeline("quantize-fp8{kv_cache=true}")).history[0].stats
    assert stats["fp8_kv_layers"] == LAYERS and stats["cache_bytes_per_sequence"] == 8192


def test_pass_is_functional_changed_and_excludes() -> None:
    before = calibrated().format()
    result = run_pipeline(calibrated(), parse_pipeline("quantize-fp8"))
    assert calibrated().format() == before
    assert result.history[0].changed is True
    numel = LAYERS * (2 * HIDDEN * HIDDEN + 2 * (HIDDEN // 2) * HIDDEN + 3 * EXPERTS * INTERMEDIATE * HIDDEN)
    scales = LAYERS * (4 + 2 * EXPERTS)
    assert result.history[0].stats == {"fp8_linear": 8, "fp8_moe": 2, "kept_float": 1, "float_bytes": 4 * numel,
                                       "quantized_bytes": numel + 4 * scales}
    nothing = run_pipeline(calibrated(), parse_pipeline("quantize-fp8{exclude=layers}"))
    assert nothing.history[0].changed is False
    assert nothing.program.format() == calibrated().format()
    partial = run_pipeline(calibrated(), parse_pipeline("quantize-fp8{exclude=o_proj|layers.1.mlp}")).program
    counts = partial.op_counts()
    assert counts["moec.fp8_linear"] == 3 * LAYERS and counts["moec.linear"] == LAYERS + 1
    assert counts["moec.fp8_moe"] == 1 and counts["moec.moe"] == 1
    head = run_pipeline(calibrated(), parse_pipeline("quantize-fp8{quantize_lm_head=true}")).program
    assert "moec.linear" not in head.op_counts()
    from passes.quantize_fp8 import QuantizeFP8

    lines = QuantizeFP8(exclude="o_proj").explain(calibrated())
    assert "lm_head: kept float: lm_head is kept float unless quantize_lm_head=true" in lines
    assert any(line.startswith("layers.0.mlp.experts: fp8: f32[4,96,32] -> f8e4m3[4,96,32] + scale f32[4]; "
                               "f32[4,32,48] -> f8e4m3[4,32,48] + scale f32[4]; input scale ") for line in lines)


# --- numerics -----------------------------------------------------------------------------------------------------


def test_fp8_linear_op_equals_float_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, generator=generator)
    weight, bias = torch.randn(40, 24, generator=generator) * 0.1, torch.randn(40, generator=generator)
    codes, weight_scale = fp8.quantize_tensor(weight)
    input_scale = scale_of(float(x.abs().amax()) * 0.5)  # half the range: the largest inputs saturate
    out = ops.fp8_linear(x, codes, weight_scale, input_scale, bias)
    clipped = (x / input_scale).clamp(-E4M3_MAX, E4M3_MAX)
    assert bool((clipped.abs() == E4M3_MAX).any())
    expected = fake_quantize(x, input_scale).double() @ dequantized(codes, weight_scale).double().T + bias.double()
    assert out.dtype == torch.float32 and max_rel_err(out, expected) <= 1e-4
    half = ops.fp8_linear(x.bfloat16(), codes, weight_scale, input_scale, None)
    assert half.dtype == torch.bfloat16
    assert max_rel_err(half, fake_quantize(x.bfloat16(), input_scale) @ dequantized(codes, weight_scale).T) <= 1e-2


@pytest.mark.parametrize("expert_offset", [0, 2])
def test_fp8_moe_op_equals_float_computation(expert_offset: int) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, HIDDEN, generator=generator)
    router = torch.randn(EXPERTS, HIDDEN, generator=generator)
    local = EXPERTS - expert_offset
    w13 = torch.randn(local, 2 * INTERMEDIATE, HIDDEN, generator=generator) * 0.2
    w2 = torch.randn(local, HIDDEN, INTERMEDIATE, generator=generator) * 0.2
    (w13_q, w13_s), (w2_q, w2_s) = (
        tuple(e.materialize() for e in fp8.quantize_weight(MemoryTensor("w", w), per_expert=True)) for w in (w13, w2)
    )
    assert w13_s.shape == (local,) and torch.equal(w13_s, w13.abs().amax(dim=(1, 2)) / E4M3_MAX)
    scales = (scale_of(float(x.abs().amax())), 0.01)
    out = ops.fp8_moe(x, router, w13_q, w13_s, w2_q, w2_s, 2, "renormalize", "swiglu", *scales, expert_offset)
    expected = reference_moe(x, router, dequantized(w13_q, w13_s), dequantized(w2_q, w2_s), 2, *scales, expert_offset)
    assert max_rel_err(out, expected) <= 1e-4


def test_program_logits_equal_float_computation() -> None:
    """The whole fp8 program against the float program computing the same arithmetic (dequantized weights,
    fake-quantized inputs, `reference_moe`), and close to the float model."""
    ids = input_ids(CONFIG, batch=2, seq=7)
    program = quantized()
    logits = TorchExecutable(program)(ids)
    reference = TorchExecutable(float_reference(calibrated(), program))(ids)
    assert max_rel_err(logits, reference) <= 1e-4
    assert 0 < max_rel_err(logits, TorchExecutable(calibrated())(ids)) < 0.3  # random weights, byte-text ranges


def test_fp8_kv_cache_logits_stateless_and_decoding() -> None:
    """FP8 caches hold k / k_scale: a prefill and two decode steps equal float caches fed fake-quantized k and v."""
    program = quantized("quantize-fp8{kv_cache=true}", kv_cache=True)
    reference = TorchExecutable(float_reference(calibrated(True), program, fp8_kv=True))
    executable = TorchExecutable(program)
    ids = input_ids(CONFIG, batch=2, seq=7)
    assert max_rel_err(executable(ids), reference(ids)) <= 1e-4
    session, expected = executable.new_session(2), reference.new_session(2)
    position = torch.zeros(2, dtype=torch.int64)
    for step in (ids[:, :5], ids[:, 5:6], ids[:, 6:7]):
        assert max_rel_err(session.step(step, position), expected.step(step, position)) <= 1e-4
        position = position + step.shape[1]
    assert session.caches[0].dtype == torch.float8_e4m3fn
    float_kv = TorchExecutable(quantized(kv_cache=True))(ids)
    assert 0 < max_rel_err(executable(ids), float_kv) < 0.1


def test_sharded_ranks_equal_float_ranks_computation() -> None:
    """calibrate on the unsharded program, shard{tp=2,moe_ep=2}, quantize-fp8 per rank: each rank's weight scales
    come from its own slices (an expert block each), activation scales from the whole."""
    from tests.backends.test_distributed import run_ranks

    shard = "shard{tp=2,moe_ep=2}"
    program = run_pipeline(calibrated(), parse_pipeline(f"{shard},quantize-fp8,dce")).program
    float_ranks = run_pipeline(calibrated(), parse_pipeline(f"{shard},dce")).program
    rank1 = program.ranks[1]
    assert rank1.weights()["layers_0_mlp_experts_w13_scale"].type_str == "f32[2]"
    assert all(line.endswith(", expert_offset=2)") for line in rank1.format().splitlines() if "fp8_moe(" in line)
    reference = float_ranks.clone()
    reference.ranks = tuple(float_reference(f, q) for f, q in zip(float_ranks.ranks, program.ranks))
    ids = input_ids(CONFIG, batch=2, seq=5)
    results, expected = run_ranks(program, ids), run_ranks(reference, ids)
    for rank in (0, 1):
        assert max_rel_err(torch.from_numpy(results[rank][0]), torch.from_numpy(expected[rank][0])) <= 1e-4


# --- bad input ----------------------------------------------------------------------------------------------------


def _fused() -> Program:
    return run_pipeline(source(), parse_pipeline("canonicalize,fuse-moe,dce")).program


@pytest.mark.parametrize(
    "start, pipeline, error, message",
    [
        ("fused", "quantize-fp8", PreconditionError, "needs calibrate first: static fp8 activation scales"),
        ("calibrated", "quantize-fp8{kv_cache=true}", PreconditionError,
         "kv_cache=true needs kv-cache first: the program has no KV caches"),
        ("calibrated", "quantize-fp8,quantize-fp8", PreconditionError,
         "the program is already quantized (10 quantized ops: quantize-fp8 ran); quantize once"),
        ("calibrated", "quantize-weights,quantize-fp8", PreconditionError,
         "the program is already quantized (10 quantized ops: quantize-weights ran); quantize once"),
        ("calibrated", "quantize-fp8,quantize-weights", PreconditionError,
         "the program is already quantized (10 quantized ops); quantize-weights runs once"),
        ("calibrated", "quantize-fp8,calibrate", PreconditionError,
         "calibrate measures the float program, and this one has 10 quantized ops"),
        ("calibrated", "quantize-fp8,shard{tp=2}", PreconditionError, "shard must run before quantize-fp8"),
        ("calibrated", "shard{tp=2},calibrate", PreconditionError,
         "calibrate measures the unsharded program, and this one is sharded over 2 ranks: run calibrate before shard"),
        ("calibrated", "quantize-fp8{exclude=qproj}", PreconditionError, "exclude pattern 'qproj' matches no"),
        ("calibrated", "quantize-fp8{kv_cache=maybe}", PassOptionError,
         "option kv_cache='maybe' of pass 'quantize-fp8' is not a valid bool"),
        ("calibrated", "quantize-fp8{precision=int8}", PassOptionError,
         "pass 'quantize-fp8' has no option 'precision'"),
        ("fused", "calibrate{samples=0}", PassOptionError, "calibrate: samples=0 must be a positive integer"),
        ("fused", "calibrate{dataset=/no/such/text.txt}", PassOptionError,
         "calibrate: dataset='/no/such/text.txt' is neither 'builtin' nor a text file"),
        ("fused", "calibrate{seq_len=100000}", PreconditionError,
         "calibrate: the builtin calibration text has 98660 tokens, fewer than one sequence of seq_len=100000"),
    ],
)
def test_bad_input_gets_one_clear_error(start: str, pipeline: str, error: type, message: str) -> None:
    program = _fused() if start == "fused" else calibrated()
    with pytest.raises(error) as raised:
        run_pipeline(program, parse_pipeline(pipeline))
    assert message in str(raised.value)


def test_bad_input_without_tokenizer_canonical_ops_or_ranges() -> None:
    unfused = run_pipeline(source(), parse_pipeline("canonicalize")).program
    with pytest.raises(PreconditionError, match="needs fuse-moe first"):
        run_pipeline(unfused, parse_pipeline("calibrate"))
    bare = _fused().clone()
    bare.tokenize = None
    with pytest.raises(PreconditionError, match="calibrate reads the builtin calibration text as text, but the "
                                                "program has no tokenizer"):
        run_pipeline(bare, parse_pipeline("calibrate"))
    missing = calibrated().clone()
    ranges = {path: roles for path, roles in missing.calibration.ranges.items() if "o_proj" not in path}
    missing.calibration = Calibration("hand-made", ranges)
    with pytest.raises(PreconditionError, match="layers.0.self_attn.o_proj: calibrate recorded no input range"):
        run_pipeline(missing, parse_pipeline("quantize-fp8"))


def test_onnx_export_is_explicit_qdq_and_runs_in_onnxruntime(tmp_path: Path) -> None:
    """ootb: FP8 E4M3 initializers, Q/DQ on the activations; onnxruntime computes the torch backend's logits. The ort
    MoE mode and FP8 KV caches are one clear error each, before a file is written."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx_graphsurgeon")
    from backends.onnx import export_onnx
    from backends.tensorrt.verify import onnxruntime_session
    from backends.torch.runtime import TorchExecutable
    from tests.models import input_ids, max_rel_err

    program = quantized()
    exported = export_onnx(program, tmp_path / "model.onnx", moe="ootb")
    model = onnx.load(str(exported.path), load_external_data=False)
    kinds = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= kinds
    assert any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in model.graph.initializer)
    session = onnxruntime_session(exported.path)
    ids = input_ids(CONFIG, 2, 9)
    (logits,) = session.run(None, {"input_ids": ids.numpy()})
    assert max_rel_err(torch.from_numpy(logits), TorchExecutable(program)(ids)) <= 1e-4
    with pytest.raises(MoecError, match="moe='ort' takes no FP8 experts"):
        export_onnx(program, tmp_path / "ort.onnx", moe="ort")
    with pytest.raises(MoecError, match="ONNX export of FP8 KV caches is not supported yet"):
        export_onnx(quantized("quantize-fp8{kv_cache=true}", kv_cache=True), tmp_path / "kv.onnx")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_plugin_export_carries_the_fp8_experts_and_tensorrt_builds_it(tmp_path: Path) -> None:
    """plugin: one `MoE` node per layer over the e4m3 bytes (typed INT8), the per-expert float32 scales and the static
    input scales as attributes; onnxruntime cannot run it (a clear error); TensorRT-RTX builds the engine (not run)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnx_graphsurgeon")
    from backends.onnx import export_onnx
    from backends.tensorrt.runtime import tensorrt_available, tensorrt_info

    program = quantized()
    exported = export_onnx(program, tmp_path / "plugin" / "model.onnx", moe="plugin")
    model = onnx.load(str(exported.path), load_external_data=False)
    types = {t.name: t.data_type for t in model.graph.initializer}
    plugins = [node for node in model.graph.node if node.op_type == "MoE"]
    assert len(plugins) == CONFIG.layers
    moe_nodes = [node for node in program.graph.nodes if node.target == ops.fp8_moe]
    for plugin, node in zip(plugins, moe_nodes):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in plugin.attribute}
        assert attrs["precision"] == b"fp8" and attrs["w13_input_scale"] == pytest.approx(float(node.args[9]))
        assert attrs["w2_input_scale"] == pytest.approx(float(node.args[10]))
        assert [types[name] for name in plugin.input[2:]] == [onnx.TensorProto.INT8] * 2 + [onnx.TensorProto.FLOAT] * 2
    from backends.tensorrt.verify import onnxruntime_session

    with pytest.raises(MoecError, match="an FP8 MoE plugin node has no onnxruntime form"):
        onnxruntime_session(exported.path)
    if not tensorrt_available():
        pytest.skip("no TensorRT (tensorrt or tensorrt_rtx) importable")
    from backends.tensorrt.build import BuildOptions, build_engines

    targets = ("sm89",) if tensorrt_info().targets else ()
    built = build_engines(program, tmp_path / "engines", BuildOptions(moe_plugin=True, targets=targets, max_seq=16),
                          progress=lambda line: None)
    assert built.config["moe_lowering"] == "plugin" and (tmp_path / "engines" / "rank0.engine").stat().st_size > 0


# --- recipe flags -------------------------------------------------------------------------------------------------


def _flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_quantization_arguments(parser)
    return parser.parse_args(list(argv))


def test_recipe_flags_place_the_passes(capsys: pytest.CaptureFixture[str]) -> None:
    default = "canonicalize,fuse-moe,kv-cache,fuse-qkv,fuse-norm,dce"
    chosen = pipeline_with_quantization(default, _flags("--qformat", "fp8", "--kv_cache_dtype", "fp8",
                                                        "--calib_size", "64"))
    assert chosen == (
        "canonicalize,fuse-moe,kv-cache,fuse-qkv,calibrate{samples=64},quantize-fp8{kv_cache=true},fuse-norm,dce"
    )
    assert capsys.readouterr().err == f"pipeline: {chosen}\n"
    plain = pipeline_with_quantization("canonicalize,fuse-moe,dce", _flags("--qformat", "fp8"))
    assert plain == "canonicalize,fuse-moe,calibrate,quantize-fp8,dce"
    sharded = pipeline_with_quantization("canonicalize,fuse-moe,shard{tp=2},kv-cache,dce",
                                         _flags("--qformat", "fp8", "--kv-cache-dtype", "fp8"))
    assert sharded == "canonicalize,fuse-moe,calibrate,shard{tp=2},kv-cache,quantize-fp8{kv_cache=true},dce"
    for argv, spec, message in [
        (["--kv-cache-dtype", "fp8"], default, "--kv-cache-dtype need --qformat fp8"),
        (["--calib-size", "8"], default, "--calib-size need --qformat fp8"),
        (["--qformat", "fp8", "--use-weight-only"], default, "give --use-weight-only or --qformat fp8, not both"),
        (["--qformat", "fp8"], "canonicalize,dce", "--qformat fp8 needs fuse-moe in the pipeline"),
        (["--qformat", "fp8", "--kv-cache-dtype", "fp8"], "canonicalize,fuse-moe,dce",
         "--kv-cache-dtype fp8 needs kv-cache in the pipeline"),
        (["--qformat", "fp8"], "canonicalize,fuse-moe,calibrate,dce", "the pipeline already has calibrate"),
        (["--use-weight-only"], "canonicalize,fuse-moe,quantize-fp8", "the pipeline already quantizes"),
        (["--qformat", "fp8", "--calib-size", "0"], default, "calibrate: samples=0 must be a positive integer"),
    ]:
        with pytest.raises(MoecError, match=message):
            pipeline_with_quantization(spec, _flags(*argv))


def test_cli_flags_on_compile_run_and_eval(capsys: pytest.CaptureFixture[str]) -> None:
    from compiler import cli

    # The chosen pipeline is printed first; a bad --explain then refuses before anything is traced.
    assert cli.main(["compile", "tiny", "--qformat", "fp8", "--calib-size", "4", "--explain", "fuse-mo"]) == 2
    err = capsys.readouterr().err
    chosen = "canonicalize,fuse-moe,kv-cache,fuse-qkv,calibrate{samples=4},quantize-fp8,fuse-norm,dce"
    assert err.splitlines()[0] == f"pipeline: {chosen}"
    assert "moec: error: pass 'fuse-mo' is not in the pipeline" in err
    for command in ("compile", "run", "eval"):
        args = cli.build_parser().parse_args([command, "tiny", "--qformat", "fp8", "--kv_cache_dtype", "fp8",
                                              "--calib_size", "32"])
        assert (args.qformat, args.kv_cache_dtype, args.calib_size) == ("fp8", "fp8", 32)
    assert cli.main(["passes"]) == 0
    listed = capsys.readouterr().out
    assert "\ncalibrate  (dataset: str = builtin, samples: int = 512, seq_len: int = 256)" in listed
    assert "\nquantize-fp8  (kv_cache: bool = False, exclude: str = , quantize_lm_head: bool = False)" in listed


# --- accuracy on the trained tiny ---------------------------------------------------------------------------------

ACCURACY_TOKENS = 4_000  # 16 windows of 256: the guard's sample (the whole held-out text is in bench/quant_accuracy.py)


@lru_cache(maxsize=None)
def _tiny_scores() -> dict[str, tuple[float, torch.Tensor]]:
    """Perplexity and top-1 tokens (of the same windows) of the trained tiny in float32, fp8 and fp8 + fp8 KV cache;
    one calibration of 16 sequences of the builtin text serves both."""
    from compiler.api import CompiledModel
    from compiler.evaluation import score
    from tests.frontends.test_embedded_tiny import EVAL_TEXT, compiled_tiny

    base = compiled_tiny()
    calibrated_tiny = run_pipeline(base.graph_after("fuse-moe"), parse_pipeline("kv-cache,calibrate{samples=16}"))
    ids = base.tokenizer(EVAL_TEXT, verbose=False)["input_ids"]
    scores = {}
    for label, spec in (("float32", None), ("fp8", "quantize-fp8"), ("fp8 kv", "quantize-fp8{kv_cache=true}")):
        compiled = base
        if spec is not None:
            result = run_pipeline(calibrated_tiny.program, parse_pipeline(f"{spec},dce"))
            compiled = CompiledModel(result.program, base.traced, result.history, tokenizer=base.tokenizer)
        top1: list[torch.Tensor] = []

        def logits_of(inputs: torch.Tensor, compiled: CompiledModel = compiled) -> torch.Tensor:
            logits = compiled(inputs)
            top1.append(logits.argmax(-1).flatten())
            return logits

        scored = score(logits_of, [ids], 256, max_tokens=ACCURACY_TOKENS)
        scores[label] = (scored.perplexity, torch.cat(top1))
    return scores


@pytest.mark.parametrize("label, min_agreement", [("fp8", 0.9), ("fp8 kv", 0.9)])
def test_trained_tiny_accuracy_targets(label: str, min_agreement: float) -> None:
    """Issue #13's target on held-out text: fp8 (and fp8 + fp8 KV cache) perplexity within 2% of float; top-1
    agreement with the float model bounded below with room for rounding (the measured values are in the report of
    bench/quant_accuracy.py)."""
    scores = _tiny_scores()
    (base, base_top1), (perplexity, top1) = scores["float32"], scores[label]
    assert math.isfinite(perplexity) and perplexity != base
    assert abs(perplexity / base - 1) <= 0.02, (perplexity, base)
    assert float((top1 == base_top1).float().mean()) >= min_agreement
