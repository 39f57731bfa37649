"""ONNX lowering of the FP8 ops (`quantize-fp8`): explicit Q/DQ, the weights stored as FP8 E4M3.

- `moec.fp8_linear(x, w f8[O,I], w_scale f32[], input_scale)`: the activation goes through `QuantizeLinear` to
  FLOAT8E4M3FN (saturating) and back with its static scale, the weight through `DequantizeLinear` with its
  per-tensor scale, then `MatMul` in float32 (+ bias) and a cast back to the activation dtype: the very computation of
  the torch backend's reference (`backends/torch/kernels.py`), and the Q/DQ pattern TensorRT fuses into FP8 GEMMs.
- `moec.fp8_moe`, `ootb`: the out-of-the-box MoE form over the experts dequantized with their per-expert scales
  (`DequantizeLinear` along axis 0), with the expert inputs and the SwiGLU intermediate fake-quantized by Q/DQ with
  their static scales.
- `moec.fp8_moe`, `plugin`: `trt.plugins::MoE(x, router, w13, w2, w13_scales, w2_scales)` with `precision="fp8"` and
  the two static input scales as float attributes; the e4m3 bytes travel typed INT8 (`quantized.int8_view`, as the
  int4 nibble pairs do) and the plugin runs moec's fused FP8 kernel on them. `ort` takes no FP8 experts (a clear
  error, `moe.moe_refusal`).

The FP8 bytes are written to the data file as they are (no conversion); FP8 KV caches are not exported (a clear
error in `export.unexportable_reason`).
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
import torch
import torch.fx

from backends.onnx.canonical_ops import emit_linear
from backends.onnx.context import ConversionContext, dtype_of, value_of
from backends.onnx.converters import converter, node_arg
from backends.onnx.moe import PLUGIN_DOMAIN, emit_moe_ootb, moe_site, plugin_attrs, refuse
from backends.onnx.quantized import int8_view, weight_operand


def _fp8_zero(ctx: ConversionContext, count: int | None = None) -> gs.Constant:
    """The FP8 zero point (it types Q/DQ's quantized side): a scalar, or `count` of them for per-axis scales."""
    dims, values = ([], [0.0]) if count is None else ([count], [0.0] * count)
    proto = onnx.helper.make_tensor(ctx.fresh("fp8_zero"), onnx.TensorProto.FLOAT8E4M3FN, dims, values)
    return gs.Constant(proto.name, gs.ir.tensor.LazyValues(proto))


def fake_quantize(ctx: ConversionContext, x: gs.Tensor, scale: float) -> gs.Tensor:
    """`compiler.fp8.fake_quantize` as Q/DQ: float32 in, float32 out (saturating round to E4M3 at `scale`)."""
    scale_tensor = ctx.const(float(scale), torch.float32)
    zero = _fp8_zero(ctx)
    quantized = ctx.op("QuantizeLinear", [x, scale_tensor, zero], {"saturate": 1})
    return ctx.op("DequantizeLinear", [quantized, scale_tensor, zero])


def dequantize(ctx: ConversionContext, weight: torch.fx.Node, scale: torch.fx.Node, axis: int | None) -> gs.Tensor:
    """An FP8 weight to float32 with its per-tensor (`axis` None) or per-expert (`axis` 0) scales."""
    if axis is None:
        return ctx.op("DequantizeLinear", [ctx.tensor(weight), ctx.tensor(scale), _fp8_zero(ctx)])
    zero = _fp8_zero(ctx, int(value_of(scale).shape[0]))
    return ctx.op("DequantizeLinear", [ctx.tensor(weight), ctx.tensor(scale), zero], {"axis": axis})


def _as_float32(ctx: ConversionContext, arg: torch.fx.Node) -> gs.Tensor:
    return ctx.cast_to(arg, torch.float32)


@converter("moec.fp8_linear")
def _fp8_linear(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    x, weight, weight_scale, input_scale = node.args[:4]
    bias = node_arg(node, 4, "bias", None)
    activation = fake_quantize(ctx, _as_float32(ctx, x), float(input_scale))
    out = emit_linear(ctx, activation, dequantize(ctx, weight, weight_scale, None),
                      _as_float32(ctx, bias) if bias is not None else None)
    dtype = dtype_of(x)
    return out if dtype == torch.float32 else ctx.cast(out, dtype)


@converter("moec.fp8_moe", when=lambda ctx, node: ctx.options.moe == "ootb")
def _fp8_moe_ootb(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    w13, w13_scales, w2, w2_scales = node.args[2:6]
    w13_input_scale, w2_input_scale = float(node.args[9]), float(node.args[10])
    return emit_moe_ootb(
        ctx, moe_site(node), dequantize(ctx, w13, w13_scales, 0), dequantize(ctx, w2, w2_scales, 0),
        quantize_input=lambda tokens: fake_quantize(ctx, tokens, w13_input_scale),
        quantize_intermediate=lambda activated: fake_quantize(ctx, activated, w2_input_scale),
    )


@converter("moec.fp8_moe", when=lambda ctx, node: ctx.options.moe == "plugin")
def _fp8_moe_plugin(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    refuse(node, "plugin")
    x, router, w13, w13_scales, w2, w2_scales = node.args[:6]
    codes = [ctx.initializer(f"{w.name}.bytes", int8_view(weight_operand(ctx, w, node))) for w in (w13, w2)]
    attrs = {**plugin_attrs(moe_site(node)), "precision": "fp8", "group_size": 0,
             "w13_input_scale": float(node.args[9]), "w2_input_scale": float(node.args[10])}
    inputs = [ctx.tensor(x), ctx.tensor(router), *codes, ctx.tensor(w13_scales), ctx.tensor(w2_scales)]
    return ctx.op("MoE", inputs, attrs, domain=PLUGIN_DOMAIN)
