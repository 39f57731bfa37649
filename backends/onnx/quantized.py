"""The weight-only quantized ops `moec.quantized_linear` and `moec.quantized_moe` in ONNX, their weights compact.

before: quantized_linear(x, w_q, w_scales, bias?, precision, group_size)
        quantized_moe(x, router, w13_q, w13_scales, w2_q, w2_scales, top_k, normalization, activation, precision,
                      group_size, expert_offset=o)
        (`compiler/quantization.py`'s layout: int8 i8[..., out, in]; int4 u8[..., out, in/2], codes offset binary
        q + 8, low nibble first; scales [..., out, groups] in the activation dtype, groups = 1 per channel)
after, by MoE mode (`export_onnx(..., moe=MODE)`):
- linears, `ootb` and `plugin` (standard ONNX, what TensorRT parses): `DequantizeLinear` then
  `MatMul(x, Transpose(W))`. int8 codes are the INT8 initializer as stored; int4 codes an INT4 initializer
  [out, in] whose bytes are w_q XOR 0x88 (each nibble q + 8 becomes two's complement q; ONNX packs INT4 low nibble
  first too), blocked along `in` (axis 1, `block_size` g, scales [out, in/g], opset 21+; per channel: one block of
  all `in`, scales [out, 1]; not per-axis, see below).
- linears, `ort`: `com.microsoft::MatMulNBits` (bits 4 or 8, block_size = group_size, or K per channel), B =
  w_q's bytes declared [N, K/block, block·bits/8]: int4 as stored (its default zero point is 8), int8 XOR 0x80
  (code + 128 as uint8; default zero point 128); scales [N, K/block] as stored. Per channel with K not a power of
  two >= 16 (MatMulNBits' block sizes) keeps the `DequantizeLinear` form.
- experts, `ootb`: `moe.py`'s `ootb` form over w13/w2 `DequantizeLinear`ed to [E',2I,H]/[E',H,I] (blocked along
  axis 2 with block_size = group_size, or `in` per channel: per-axis scales are 1-d only).
- experts, `ort`: `com.microsoft::QMoE` (expert_weight_bits 4 or 8, `block_size` = group_size when > 0) with
  `moe.py`'s routing attributes: fc1 = w13's codes and scales with gate/up rows interleaved (`swiglu_fusion=1`),
  fc2 = w2's; code bytes as for MatMulNBits; scales [E, N] per channel, [E, N, K/block] blocked.
- experts, `plugin`: `trt.plugins::MoE(x, router, w13_q, w2_q, w13_scales, w2_scales)` with the float plugin's
  attributes plus `precision` and `group_size`: the codes' bytes as stored, typed INT8 (int4: the nibble pairs'
  bytes, `int8_view`) and the scales, so
  the engine holds compact experts and the plugin runs moec's fused kernel on them (backends/tensorrt/plugin.py).
- block-wise int8 experts or an expert block in `ort`: refused (`moe.moe_refusal` says why).

The repacks (XOR, interleave) are lazy weight rewrites applied while the data file is streamed, one expert at a
time; a reshape or the INT4 view is only the initializer's declared type. Nothing is dequantized at export.

onnxruntime 1.32 (CPU) computes every form above in float32 to ~1e-7 of `backends/torch`. Its optimizer would fuse
a per-axis int8 `DequantizeLinear` + `MatMul` into `MatMulNBits` with `accuracy_level` 4 (int8 activations, ~5e-3),
which is why per-channel weights are exported as one block per row instead (and `export.session_options` also
turns the rewrite off for moec's own sessions). TensorRT-RTX 1.7 parses and builds the `ootb` form (INT8/INT4,
blocked, 2-d and 3-d `DequantizeLinear`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx
import onnx_graphsurgeon as gs
import torch
import torch.fx

from backends.onnx.canonical_ops import emit_linear
from backends.onnx.context import ConversionContext, OnnxExportError, value_of
from backends.onnx.converters import converter, node_arg
from backends.onnx.moe import (
    PLUGIN_DOMAIN, emit_moe_ootb, flatten_tokens, interleave_gate_up, moe_site, ort_moe_attrs, ort_router_input,
    plugin_attrs, refuse,
)
from compiler.ir import op_name
from compiler.quantization import MIN_GROUP_SIZE
from compiler.weights import Rewrite, RewriteRule, Shape, WeightExpr, concat_weights, register_rewrite, stack_weights

INT4_TO_SIGNED = 0x88  # per nibble: offset binary q + 8 -> two's complement q
INT8_TO_OFFSET = 0x80  # int8 q -> uint8 q + 128
MICROSOFT = "com.microsoft"


# --- the xor_bytes weight rewrite ------------------------------------------------------------------------------


def _infer_xor(inputs: Sequence[WeightExpr], attrs: dict[str, Any]) -> tuple[Shape, torch.dtype]:
    (source,) = inputs
    if source.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"xor_bytes takes int8 or uint8 codes, not {source.type_str}")
    return source.shape, torch.uint8


register_rewrite("xor_bytes", RewriteRule(_infer_xor, lambda xs, a: xs[0].view(torch.uint8) ^ a["mask"]))


def xor_bytes(expr: WeightExpr, mask: int) -> WeightExpr:
    """`expr`'s bytes XOR `mask`, as uint8; a stack or concatenation stays one (so it streams part by part)."""
    if isinstance(expr, Rewrite) and expr.kind in ("stack", "concat"):
        join = stack_weights if expr.kind == "stack" else concat_weights
        return join([xor_bytes(part, mask) for part in expr.inputs], dict(expr.attrs)["dim"])
    return Rewrite("xor_bytes", (expr,), (("mask", mask),))


def _infer_int8_view(inputs: Sequence[WeightExpr], attrs: dict[str, Any]) -> tuple[Shape, torch.dtype]:
    (source,) = inputs
    if source.dtype not in (torch.int8, torch.uint8, torch.float8_e4m3fn):
        raise ValueError(f"int8_view takes int8, uint8 or float8_e4m3fn codes, not {source.type_str}")
    return source.shape, torch.int8


register_rewrite("int8_view", RewriteRule(_infer_int8_view, lambda xs, a: xs[0].view(torch.int8)))


def int8_view(expr: WeightExpr) -> WeightExpr:
    """`expr`'s bytes unchanged, typed int8 (the MoE plugin's code inputs); streams part by part like `xor_bytes`."""
    if isinstance(expr, Rewrite) and expr.kind in ("stack", "concat"):
        join = stack_weights if expr.kind == "stack" else concat_weights
        return join([int8_view(part) for part in expr.inputs], dict(expr.attrs)["dim"])
    return Rewrite("int8_view", (expr,), ())


# --- operands --------------------------------------------------------------------------------------------------


def weight_operand(ctx: ConversionContext, operand: torch.fx.Node, node: torch.fx.Node) -> WeightExpr:
    expr = ctx.weights.get(operand)
    if expr is None:
        raise OnnxExportError(
            f"{node.name} ({op_name(node)}): its operand %{operand.name} is computed at run time; quantized "
            "weights export only as program weights"
        )
    return expr


def _logical_shape(codes: WeightExpr, precision: str) -> tuple[int, ...]:
    """The float shape [..., out, in] that codes stand for."""
    return (*codes.shape[:-1], codes.shape[-1] * (2 if precision == "int4" else 1))


def _bits(precision: str) -> int:
    return 4 if precision == "int4" else 8


def _unsigned_codes(codes: WeightExpr, precision: str) -> WeightExpr:
    """The codes as com.microsoft's MatMulNBits/QMoE read them with their default zero points (8, 128)."""
    return codes if precision == "int4" else xor_bytes(codes, INT8_TO_OFFSET)


def dequantize_linear(
    ctx: ConversionContext,
    node: torch.fx.Node,
    qweight: torch.fx.Node,
    scales: torch.fx.Node,
    precision: str,
    group_size: int,
) -> gs.Tensor:
    """`DequantizeLinear` of a compact weight [..., out, in] to the scales' dtype: per-axis for a 2-d weight
    quantized per channel, blocked along `in` otherwise."""
    codes_expr = weight_operand(ctx, qweight, node)
    shape = _logical_shape(codes_expr, precision)
    if precision == "int4":
        signed = xor_bytes(codes_expr, INT4_TO_SIGNED)
        codes = ctx.initializer(f"{qweight.name}.int4", signed, onnx.TensorProto.INT4, shape)
    else:
        codes = ctx.tensor(qweight)
    # Always blocked along `in` (one block of all of `in` per channel), never per-axis: onnxruntime's optimizer
    # rewrites per-axis int8 DequantizeLinear + MatMul into MatMulNBits with int8 activations (~5e-3 off), which
    # moec's own sessions could switch off but onnxruntime-genai and other users' sessions cannot; blocked DQ is
    # computed as written everywhere (and TensorRT-RTX 1.7 builds it).
    scale = ctx.tensor(scales)
    attrs = {"axis": len(shape) - 1, "block_size": group_size or shape[-1]}
    return ctx.op("DequantizeLinear", [codes, scale], attrs)


# --- quantized_linear ------------------------------------------------------------------------------------------


def _linear_operands(node: torch.fx.Node) -> tuple[Any, ...]:
    x, qweight, scales = node.args[:3]
    bias = node_arg(node, 3, "bias", None)
    return x, qweight, scales, bias, str(node_arg(node, 4, "precision")), int(node_arg(node, 5, "group_size"))


def matmul_nbits_block(node: torch.fx.Node) -> int | None:
    """MatMulNBits' block size for a `quantized_linear` (None when it has none: a per-channel K that is not a power
    of two >= 16)."""
    _, qweight, _, _, precision, group_size = _linear_operands(node)
    in_features = value_of(qweight).shape[-1] * (2 if precision == "int4" else 1)
    block = group_size or int(in_features)
    return block if block >= MIN_GROUP_SIZE and not block & (block - 1) else None


def _uses_matmul_nbits(ctx: ConversionContext, node: torch.fx.Node) -> bool:
    return ctx.options.moe == "ort" and matmul_nbits_block(node) is not None


@converter("moec.quantized_linear", when=_uses_matmul_nbits)
def _quantized_linear_nbits(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    x, qweight, scales, bias, precision, _ = _linear_operands(node)
    codes = weight_operand(ctx, qweight, node)
    weight_operand(ctx, scales, node)
    out_features, in_features = _logical_shape(codes, precision)
    block = matmul_nbits_block(node)
    assert block is not None
    bits = _bits(precision)
    blobs = (out_features, in_features // block, block * bits // 8)
    packed = ctx.initializer(f"{qweight.name}.blocks", _unsigned_codes(codes, precision), onnx.TensorProto.UINT8, blobs)
    attrs = {"K": in_features, "N": out_features, "bits": bits, "block_size": block}
    result = ctx.op("MatMulNBits", [ctx.tensor(x), packed, ctx.tensor(scales)], attrs, domain=MICROSOFT)
    return result if bias is None else ctx.op("Add", [result, ctx.tensor(bias)])


@converter("moec.quantized_linear", when=lambda ctx, node: not _uses_matmul_nbits(ctx, node))
def _quantized_linear_dequantized(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    x, qweight, scales, bias, precision, group_size = _linear_operands(node)
    weight = dequantize_linear(ctx, node, qweight, scales, precision, group_size)
    return emit_linear(ctx, ctx.tensor(x), weight, ctx.tensor(bias) if bias is not None else None)


# --- quantized_moe ---------------------------------------------------------------------------------------------


def _moe_operands(node: torch.fx.Node) -> tuple[Any, ...]:
    w13_q, w13_scales, w2_q, w2_scales = node.args[2:6]
    return w13_q, w13_scales, w2_q, w2_scales, str(node.args[9]), int(node.args[10])


@converter("moec.quantized_moe", when=lambda ctx, node: ctx.options.moe == "ootb")
def _quantized_moe_ootb(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    w13_q, w13_scales, w2_q, w2_scales, precision, group_size = _moe_operands(node)
    w13 = dequantize_linear(ctx, node, w13_q, w13_scales, precision, group_size)
    w2 = dequantize_linear(ctx, node, w2_q, w2_scales, precision, group_size)
    return emit_moe_ootb(ctx, moe_site(node), w13, w2)


@converter("moec.quantized_moe", when=lambda ctx, node: ctx.options.moe == "plugin")
def _quantized_moe_plugin(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    """`trt.plugins::MoE(x, router, w13 codes, w2 codes, w13 scales, w2 scales)` with `precision` / `group_size`
    attributes: the codes stay compact in the engine (INT8; int4 nibble pairs as their bytes, typed INT8) and the
    plugin runs moec's fused kernel on them."""
    refuse(node, "plugin")
    w13_q, w13_scales, w2_q, w2_scales, precision, group_size = _moe_operands(node)
    x, router = node.args[:2]

    def codes(operand: torch.fx.Node) -> gs.Tensor:
        if precision == "int8":
            return ctx.tensor(operand)
        # int4 nibble pairs travel as INT8 bytes: backends/tensorrt/plugin.py says why.
        return ctx.initializer(f"{operand.name}.bytes", int8_view(weight_operand(ctx, operand, node)))

    inputs = [ctx.tensor(x), ctx.tensor(router), codes(w13_q), codes(w2_q), ctx.tensor(w13_scales), ctx.tensor(w2_scales)]
    attrs = {**plugin_attrs(moe_site(node)), "precision": precision, "group_size": group_size}
    return ctx.op("MoE", inputs, attrs, domain=PLUGIN_DOMAIN)


@converter("moec.quantized_moe", when=lambda ctx, node: ctx.options.moe == "ort")
def _quantized_moe_ort(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    refuse(node, "ort")
    site = moe_site(node)
    w13_q, w13_scales, w2_q, w2_scales, precision, group_size = _moe_operands(node)
    codes13, scales13 = weight_operand(ctx, w13_q, node), weight_operand(ctx, w13_scales, node)
    codes2, scales2 = weight_operand(ctx, w2_q, node), weight_operand(ctx, w2_scales, node)
    fc1 = ctx.initializer(f"{w13_q.name}.qmoe", _unsigned_codes(interleave_gate_up(codes13), precision))
    fc2 = ctx.initializer(f"{w2_q.name}.qmoe", _unsigned_codes(codes2, precision))
    fc1_scales_expr = interleave_gate_up(scales13)
    if group_size:
        fc1_scales = ctx.initializer(f"{w13_scales.name}.qmoe", fc1_scales_expr)
        fc2_scales = ctx.tensor(w2_scales)
    else:  # one scale per output channel: [E, N, 1] declared [E, N]
        fc1_scales = ctx.initializer(f"{w13_scales.name}.qmoe", fc1_scales_expr, dims=fc1_scales_expr.shape[:2])
        fc2_scales = ctx.initializer(f"{w2_scales.name}.qmoe", scales2, dims=scales2.shape[:2])
    attrs = {**ort_moe_attrs(site), "expert_weight_bits": _bits(precision)}
    if group_size:
        attrs["block_size"] = group_size
    tokens, restore = flatten_tokens(ctx, site.x)
    inputs = [tokens, ort_router_input(ctx, site, tokens), fc1, fc1_scales, None, fc2, fc2_scales]
    out = ctx.op("QMoE", inputs, attrs, domain=MICROSOFT)
    return out if restore is None else ctx.op("Reshape", [out, restore])
