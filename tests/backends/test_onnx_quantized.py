"""ONNX export of weight-only quantized programs (`quantize-weights`): every MoE mode that takes them exports int8 and
int4, per channel and grouped, keeps the weights compact (no float copy of a quantized weight in the file), and
computes backends/torch's logits in onnxruntime (CPU) to 1e-4; the decoder form generates torch's tokens; what a
mode cannot take is one clear error; a TensorRT engine builds from the `ootb` form."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_graphsurgeon")

from backends.onnx import export_onnx  # noqa: E402
from backends.onnx.context import OnnxExportError  # noqa: E402
from backends.onnx.decoder import OnnxDecoder, greedy_generate  # noqa: E402
from backends.onnx.export import OnnxExport  # noqa: E402
from backends.onnx.quantized import xor_bytes  # noqa: E402
from backends.tensorrt.verify import onnxruntime_session  # noqa: E402
from backends.torch.runtime import TorchExecutable  # noqa: E402
from compiler.generation import generate  # noqa: E402
from compiler.ir import Program  # noqa: E402
from compiler.pass_manager import parse_pipeline, run_pipeline  # noqa: E402
from compiler.quantization import pack_int4  # noqa: E402
from compiler.weights import MemoryTensor, stack_weights  # noqa: E402
from tests.models import TINY_CONFIGS, TinyConfig, input_ids, max_rel_err, traced  # noqa: E402

TOLERANCE = 1e-4
# hidden 32, intermediate 48: group 16 divides every input dim, and every linear's K (32) is a MatMulNBits block.
SMALL = TINY_CONFIGS[0]
# hidden 96, intermediate 64, one layer: group 32 divides every input dim, and K = 96 is no MatMulNBits block, so
# per-channel linears keep DequantizeLinear in `ort` mode.
WIDE = TinyConfig("gqa-h96-i64-e4-k2-l1", layers=1, hidden=96, intermediate=64)
CASES = [
    (SMALL, "int8", 0, "ootb"),
    (SMALL, "int8", 0, "ort"),
    (SMALL, "int8", 16, "ootb"),
    (SMALL, "int4", 0, "ootb"),
    (SMALL, "int4", 0, "ort"),
    (SMALL, "int4", 16, "ootb"),
    (SMALL, "int4", 16, "ort"),
    (WIDE, "int4", 32, "ootb"),
    (WIDE, "int4", 32, "ort"),
    (WIDE, "int8", 0, "ort"),
]
QUANTIZED_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4}


@lru_cache(maxsize=None)
def fused(config: TinyConfig) -> Program:
    return run_pipeline(traced(config), parse_pipeline("canonicalize,fuse-moe,dce")).program


@lru_cache(maxsize=None)
def quantized(config: TinyConfig, precision: str, group_size: int, exclude: str = "") -> Program:
    options = f"precision={precision},group_size={group_size}" + (f",exclude={exclude}" if exclude else "")
    return run_pipeline(fused(config), parse_pipeline(f"quantize-weights{{{options}}}")).program


def _compare(path: Path, program: Program, config: TinyConfig) -> None:
    """onnxruntime's logits (moec's session options; plugin nodes swapped for com.microsoft::MoE) against torch's."""
    session = onnxruntime_session(path)
    reference = TorchExecutable(program)
    for seq in (5, 11):
        ids = input_ids(config, 2, seq)
        (logits,) = session.run(None, {"input_ids": ids.numpy()})
        assert max_rel_err(torch.from_numpy(logits), reference(ids)) <= TOLERANCE


def _external_bytes(exported: OnnxExport) -> dict[str, tuple[int, int]]:
    """initializer name -> (ONNX data type, bytes in the data file)."""
    model = onnx.load(str(exported.path), load_external_data=False)
    return {
        tensor.name: (tensor.data_type, int({e.key: e.value for e in tensor.external_data}["length"]))
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
    }


def _check_compact(exported: OnnxExport, program: Program) -> None:
    """The file's float bytes are exactly the program's float weights (scales included): no quantized weight is
    also stored dequantized; the codes take their packed size."""
    initializers = _external_bytes(exported)
    weights = {node.name: node.meta["weight"] for node in program.weight_nodes() if node.users}
    float_bytes = sum(expr.nbytes for expr in weights.values() if expr.dtype.is_floating_point)
    code_bytes = sum(expr.nbytes for expr in weights.values() if not expr.dtype.is_floating_point)
    stored_float = sum(size for kind, size in initializers.values() if kind not in QUANTIZED_TYPES)
    stored_codes = sum(size for kind, size in initializers.values() if kind in QUANTIZED_TYPES)
    assert (stored_float, stored_codes) == (float_bytes, code_bytes)
    codes = [name for name in initializers if name.split(".")[0].endswith("_q")]
    assert codes and all(initializers[name][0] in QUANTIZED_TYPES for name in codes)


@pytest.mark.parametrize(
    "config,precision,group_size,moe", CASES, ids=[f"{c.id}-{p}-g{g}-{m}" for c, p, g, m in CASES]
)
def test_export_is_compact_and_matches_torch_backend(
    config: TinyConfig, precision: str, group_size: int, moe: str, tmp_path: Path
) -> None:
    program = quantized(config, precision, group_size)
    exported = export_onnx(program, tmp_path / "model.onnx", moe=moe)
    onnx.checker.check_model(str(exported.path), full_check=True)
    _compare(exported.path, program, config)
    _check_compact(exported, program)
    float_bytes = sum(node.meta["weight"].nbytes for node in fused(config).weight_nodes() if node.users)
    assert sum(size for _, size in _external_bytes(exported).values()) < 0.5 * float_bytes  # padding aside
    ops, layers = exported.op_types, config.layers
    linears_nbits = moe == "ort" and (group_size > 0 or (config.hidden & (config.hidden - 1)) == 0)
    assert ops.get("MatMulNBits", 0) == (4 * layers if linears_nbits else 0)  # q, k, v, o
    assert ops.get("QMoE", 0) == (layers if moe == "ort" else 0)
    assert ops.get("DequantizeLinear", 0) == (0 if linears_nbits else 4 * layers) + (2 * layers if moe == "ootb" else 0)
    assert "MoE" not in ops


def test_int4_dequantize_linear_reads_the_codes_as_signed_int4(tmp_path: Path) -> None:
    exported = export_onnx(quantized(SMALL, "int4", 16), tmp_path / "model.onnx", moe="ootb")
    model = onnx.load(str(exported.path), load_external_data=False)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    (dequantize, *_) = [node for node in model.graph.node if node.op_type == "DequantizeLinear"]
    codes, scales = (initializers[name] for name in dequantize.input)
    assert (codes.data_type, list(codes.dims)) == (onnx.TensorProto.INT4, [SMALL.hidden, SMALL.hidden])
    assert list(scales.dims) == [SMALL.hidden, SMALL.hidden // 16]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in dequantize.attribute} == {"axis": 1, "block_size": 16}


def test_xor_bytes_rewrite_makes_offset_binary_nibbles_twos_complement() -> None:
    q = torch.tensor([[-7, 7, 0, -1], [3, -3, 5, 1]], dtype=torch.int8)
    packed = pack_int4(q)
    experts = stack_weights([MemoryTensor("a", packed), MemoryTensor("b", packed)])
    signed = xor_bytes(experts, 0x88)
    assert signed.describe() == "stack(xor_bytes(memory(a), mask=136), xor_bytes(memory(b), mask=136), dim=0)"
    nibbles = signed.materialize()[0]
    low, high = (nibbles & 0xF).to(torch.int16), (nibbles >> 4).to(torch.int16)
    as_signed = torch.stack([low, high], dim=-1).reshape(2, 4)
    assert torch.equal(torch.where(as_signed > 7, as_signed - 16, as_signed).to(torch.int8), q)
    assert torch.equal(xor_bytes(MemoryTensor("q", q), 0x80).materialize(), (q.to(torch.int16) + 128).to(torch.uint8))


def test_plugin_mode_takes_quantized_linears_with_float_experts(tmp_path: Path) -> None:
    program = quantized(SMALL, "int4", 16, exclude="experts")
    exported = export_onnx(program, tmp_path / "model.onnx", moe="plugin")
    assert exported.op_types["DequantizeLinear"] == 4 * SMALL.layers and exported.op_types["MoE"] == SMALL.layers
    _compare(exported.path, program, SMALL)  # the plugin nodes swapped for com.microsoft::MoE


@pytest.mark.parametrize("precision,group_size", [("int8", 0), ("int4", 16), ("int8", 16)])
def test_plugin_mode_takes_quantized_experts_compact(precision: str, group_size: int, tmp_path: Path) -> None:
    """`trt.plugins::MoE(x, router, w13 codes, w2 codes, w13 scales, w2 scales)` with precision / group_size: the
    codes are initializers of the stored bytes, typed INT8 (int4: the nibble pairs), and the graph (plugin nodes swapped for
    onnxruntime, the codes dequantized there) computes the torch backend's logits."""
    program = quantized(SMALL, precision, group_size)
    exported = export_onnx(program, tmp_path / "model.onnx", moe="plugin")
    assert exported.op_types["MoE"] == SMALL.layers and "QMoE" not in exported.op_types
    model = onnx.load(str(exported.path), load_external_data=False)
    types = {tensor.name: tensor.data_type for tensor in model.graph.initializer}
    code_type = onnx.TensorProto.INT8
    for node in (n for n in model.graph.node if n.op_type == "MoE"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert len(node.input) == 6 and attrs["precision"] == precision.encode() and attrs["group_size"] == group_size
        assert types[node.input[2]] == types[node.input[3]] == code_type
        codes = next(t for t in model.graph.initializer if t.name == node.input[2])
        packing = 2 if precision == "int4" else 1  # one byte per stored code byte: nothing widened
        assert list(codes.dims)[-1] * packing == SMALL.hidden
        stored = _external_bytes(exported).get(codes.name)
        stored_length = stored[1] if stored else len(codes.raw_data)  # small initializers may stay inline
        assert stored_length == int(np.prod(codes.dims))
        assert types[node.input[4]] == types[node.input[5]] == onnx.TensorProto.FLOAT  # SMALL runs in float32
    _compare(exported.path, program, SMALL)


@pytest.mark.parametrize(
    "precision,group_size,moe,message",
    [
        ("int8", 16, "ort",
         "quantized_moe (moec.quantized_moe): moe='ort': onnxruntime's QMoE has no float kernel for block-wise 8-bit "
         "experts (it quantizes the activations to int8), so int8 group_size=16 would not compute weight-only int8; "
         "quantize int8 with group_size=0 or int4, or export with moe='ootb'"),
    ],
    ids=["ort-int8-grouped"],
)
def test_what_a_mode_cannot_take_is_one_error_before_anything_is_written(
    precision: str, group_size: int, moe: str, message: str, tmp_path: Path
) -> None:
    with pytest.raises(OnnxExportError) as error:
        export_onnx(quantized(SMALL, precision, group_size), tmp_path / "model.onnx", moe=moe)
    assert str(error.value) == message
    assert not (tmp_path / "model.onnx").exists()


PROMPTS = [input_ids(SMALL, 1, 7)[0].tolist(), input_ids(SMALL, 1, 3, seed=2)[0].tolist()]
STEPS = 8


@lru_cache(maxsize=None)
def cached_quantized() -> tuple[Program, list[list[int]]]:
    """An int4 decoder program and torch's greedy sequences from `PROMPTS`."""
    spec = "canonicalize,fuse-moe,quantize-weights{precision=int4,group_size=16},kv-cache{max_seq=32},dce"
    program = run_pipeline(traced(SMALL), parse_pipeline(spec)).program
    return program, generate(TorchExecutable(program), PROMPTS, STEPS)


@pytest.mark.parametrize("moe", ["ootb", "ort"])
def test_quantized_decoder_generates_torch_tokens(moe: str, tmp_path: Path) -> None:
    program, expected = cached_quantized()
    exported = export_onnx(program, tmp_path / "model.onnx", moe=moe)
    assert exported.op_types.get("QMoE", 0) == (SMALL.layers if moe == "ort" else 0)
    assert greedy_generate(OnnxDecoder(exported.path), PROMPTS, STEPS).sequences == expected


def test_tensorrt_builds_the_ootb_and_plugin_forms(tmp_path: Path) -> None:
    """TensorRT parses INT8/INT4 `DequantizeLinear` (per-axis and blocked, 2-d and 3-d) and builds; the MoE plugin
    takes the int4 codes (their bytes, typed INT8) and scales and builds too; the engines are not run here (no GPU)."""
    from backends.tensorrt.runtime import tensorrt_available, tensorrt_info

    if not tensorrt_available():
        pytest.skip("no TensorRT (tensorrt or tensorrt_rtx) importable")
    from backends.tensorrt.build import BuildOptions, build_engines

    targets = ("sm89",) if tensorrt_info().targets else ()
    program = quantized(SMALL, "int4", 16)
    options = BuildOptions(targets=targets, max_batch=2, max_seq=16)
    built = build_engines(program, tmp_path / "engines", options, progress=lambda line: None)
    assert (tmp_path / "engines" / "rank0.engine").stat().st_size == built.config["ranks"][0]["engines"][0]["bytes"]
    plugin = build_engines(program, tmp_path / "plugin", BuildOptions(moe_plugin=True, targets=targets, max_seq=16),
                           progress=lambda line: None)
    assert plugin.config["moe_lowering"] == "plugin"
    assert (tmp_path / "plugin" / "rank0.engine").stat().st_size == plugin.config["ranks"][0]["engines"][0]["bytes"]


def test_int8_per_channel_ootb_is_exact_in_a_default_onnxruntime_session(tmp_path: Path) -> None:
    """Per-channel weights export as one block per row, not per-axis: a plain session (as onnxruntime-genai opens
    it, without moec's options) computes them as written instead of fusing them into int8-activation MatMulNBits."""
    import onnxruntime

    program = quantized(SMALL, "int8", 0)
    exported = export_onnx(program, tmp_path / "model.onnx", moe="ootb")
    session = onnxruntime.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    ids = input_ids(SMALL, 2, 7)
    (logits,) = session.run(None, {"input_ids": ids.numpy()})
    assert max_rel_err(torch.from_numpy(logits), TorchExecutable(program)(ids)) <= TOLERANCE
