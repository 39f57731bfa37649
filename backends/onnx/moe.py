"""The canonical `moec.moe` op in three ONNX forms, picked by `export_onnx(..., moe=MODE)`.

before: moe(x[T,H], router[E,H], w13[E',2I,H], w2[E',H,I], top_k, normalization, "swiglu", expert_offset=o)
        (E' = E and o = 0 unless expert-parallel sharding gave this rank the expert block [o, o + E'))
after, by mode:
- `ootb` (standard ops only, no data-dependent shapes, so TensorRT can build it): the router is
  `MatMul → Cast(f32) → Softmax → TopK` over all E experts (+ `ReduceSum`/`Div` to renormalize); the top-k
  choices become a dense float32 routing matrix R[T,E'] by comparing the expert ids with `Range(o, o + E')`
  (`Equal`, `Mul`, `ReduceSum`: no scatter, no `NonZero`), i.e. columns [o, o + E') of the full routing matrix,
  so slots routed to other ranks' experts weigh 0 here; then EVERY local expert runs on every token as two
  batched `MatMul`s over the expert axis ([E',T,H]·[E',H,2I], [E',T,I]·[E',I,H]) and the outputs are summed
  weighted by Rᵀ. This costs E'/top_k times the routed FLOPs: it is the portable reference form, not a fast one
  (use `plugin` or `ort` for speed).
- `plugin`: one `trt.plugins::MoE` node per layer with `plugin_version="1"`, `plugin_namespace="moec"`,
  `top_k`, `normalization`, `activation`, `num_experts` (E, the router's rows), `num_local_experts` (E') and
  `expert_offset` (o) attributes and inputs (x, router, w13, w2) in moec's layouts; TensorRT's ONNX parser hands
  it to the plugin creator registered as `MoE` (namespace `moec`, `backends/tensorrt/plugin.py`).
- `ort`: onnxruntime's `com.microsoft::MoE` (CPU and CUDA). It takes router LOGITS as `router_probs` (it applies
  softmax + top-k itself; `normalize_routing_weights=1` renormalizes the top-k, i.e. our "renormalize"), fc1
  weights [E, 2I, H] in (out, in) order with gate/up rows interleaved (`swiglu_fusion=1`), fc2 [E, H, I].
  `activation_alpha=1, activation_beta=0` with no `swiglu_limit` make its SwiGLU exactly silu(gate)·up. The
  interleave is a lazy weight rewrite (`interleave_gate_up`) applied while the data file is streamed. Its experts
  are always all E of the router, so an expert-parallel `moe` is refused in this mode (use `ootb` or `plugin`).

`moec.quantized_moe` (`quantized.py`) reuses these pieces: `ootb` over `DequantizeLinear`ed experts, `ort` as
`com.microsoft::QMoE`, `plugin` as the plugin node with the codes and scales (`plugin_attrs` + precision,
group_size); `moe_refusal` is the one rule for what a mode cannot take (an expert block in `ort`,
FP8 experts in `ort`, block-wise int8 experts in `ort`); FP8 experts in `plugin` are `fp8.py`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import onnx_graphsurgeon as gs
import torch
import torch.fx

from backends.onnx.context import ConversionContext, OnnxExportError, dtype_of, value_of
from backends.onnx.converters import converter, node_arg
from compiler import ops
from compiler.ir import op_name
from compiler.weights import Rewrite, RewriteRule, Shape, WeightExpr, register_rewrite, stack_weights

MOE_MODES = ("ootb", "plugin", "ort")
PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_NAMESPACE = "moec"
PLUGIN_VERSION = "1"


# --- the interleave_gate_up weight rewrite ---------------------------------------------------------------------


def _interleave(tensor: torch.Tensor) -> torch.Tensor:
    """[..., 2I, H] with rows [gate | up] → rows [g0, u0, g1, u1, ...]."""
    *lead, rows, hidden = tensor.shape
    pairs = tensor.reshape(*lead, 2, rows // 2, hidden).transpose(-3, -2)
    return pairs.reshape(*lead, rows, hidden).contiguous()


def _infer_interleave(inputs: Sequence[WeightExpr], attrs: dict[str, Any]) -> tuple[Shape, torch.dtype]:
    (source,) = inputs
    if len(source.shape) < 2 or source.shape[-2] % 2:
        raise ValueError(f"interleave_gate_up needs [..., 2*intermediate, hidden], got {source.type_str}")
    return source.shape, source.dtype


register_rewrite("interleave_gate_up", RewriteRule(_infer_interleave, lambda xs, a: _interleave(xs[0])))


def interleave_gate_up(expr: WeightExpr) -> WeightExpr:
    """The lazy interleaved form of w13; a stack of experts stays a stack (each expert interleaved on its own), so
    the data file is written one expert at a time."""
    if isinstance(expr, Rewrite) and expr.kind == "stack" and dict(expr.attrs)["dim"] == 0 and len(expr.shape) == 3:
        return stack_weights([interleave_gate_up(part) for part in expr.inputs], 0)
    return Rewrite("interleave_gate_up", (expr,))


# --- shared pieces ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoeSite:
    """What every MoE lowering reads of a `moec.moe` or `moec.quantized_moe` node."""

    x: torch.fx.Node
    router: torch.fx.Node
    top_k: int
    normalization: str
    activation: str
    experts: int  # E: the experts routed over (the router's rows)
    local_experts: int  # E': the experts held here (w13's)
    offset: int  # o: the first held expert's id
    intermediate: int  # I: w13 has 2I rows (gate, then up)


def moe_site(node: torch.fx.Node) -> MoeSite:
    if node.target in (ops.quantized_moe, ops.fp8_moe):  # the same positions after the weights and their scales
        top_k, normalization, activation = node.args[6:9]
        offset = node_arg(node, 11, "expert_offset", 0)
    else:
        top_k, normalization, activation = node.args[4:7]
        offset = node_arg(node, 7, "expert_offset", 0)
    x, router, w13 = node.args[:3]
    experts_held, rows = value_of(w13).shape[:2]
    return MoeSite(
        x, router, int(top_k), str(normalization), str(activation), int(value_of(router).shape[0]),
        int(experts_held), int(offset), int(rows) // 2,
    )


def moe_refusal(node: torch.fx.Node, mode: str) -> str | None:
    """Why MoE mode `mode` cannot take the `moe` / `quantized_moe` / `fp8_moe` node `node` (None when it can). The one rule:
    the converters raise it, and `export.unexportable_reason` checks it before anything is written."""
    site = moe_site(node)
    where = f"{node.name} ({op_name(node)})"
    quantized = node.target == ops.quantized_moe
    if mode == "ort" and site.local_experts != site.experts:
        return (
            f"{where} is expert-parallel (experts [{site.offset}, {site.offset + site.local_experts}) of "
            f"{site.experts}): onnxruntime's com.microsoft::{'QMoE' if quantized else 'MoE'} runs all of the "
            "router's experts and cannot take an expert block; export it with moe='ootb' or moe='plugin'"
        )
    if node.target == ops.fp8_moe:
        if mode == "ort":
            return f"{where}: moe='ort' takes no FP8 experts (onnxruntime has no FP8 MoE kernel); use ootb or plugin"
        return None
    if not quantized:
        return None
    precision, group_size = node.args[9], int(node.args[10])
    if mode == "ort" and precision == "int8" and group_size:
        # Measured on onnxruntime 1.32: ~1e-2 relative error against the dequantized weights, where 4-bit blocks
        # and 8-bit per-channel experts compute them to ~1e-7.
        return (
            f"{where}: moe='ort': onnxruntime's QMoE has no float kernel for block-wise 8-bit experts (it quantizes "
            f"the activations to int8), so int8 group_size={group_size} would not compute weight-only int8; "
            "quantize int8 with group_size=0 or int4, or export with moe='ootb'"
        )
    return None


def refuse(node: torch.fx.Node, mode: str) -> None:
    reason = moe_refusal(node, mode)
    if reason is not None:
        raise OnnxExportError(reason)


def flatten_tokens(ctx: ConversionContext, x: torch.fx.Node) -> tuple[gs.Tensor, gs.Tensor | None]:
    """x as [T, H], and the shape to restore afterwards (None when x is already 2-d)."""
    tensor = ctx.tensor(x)
    if value_of(x).dim() == 2:
        return tensor, None
    shape = ctx.op("Shape", [tensor])
    return ctx.op("Reshape", [tensor, ctx.ints([-1, value_of(x).shape[-1]])]), shape


def _router_logits(ctx: ConversionContext, tokens: gs.Tensor, x: torch.fx.Node, router: torch.fx.Node) -> gs.Tensor:
    """float32 [T, E], like `F.linear(x, router).float()`."""
    router_dtype = dtype_of(router)
    if dtype_of(x) != router_dtype:
        tokens = ctx.cast(tokens, router_dtype)
    logits = ctx.op("MatMul", [tokens, ctx.op("Transpose", [ctx.tensor(router)], {"perm": [1, 0]})])
    return logits if router_dtype == torch.float32 else ctx.cast(logits, torch.float32)


# --- ootb ------------------------------------------------------------------------------------------------------


@converter("moec.moe", when=lambda ctx, node: ctx.options.moe == "ootb")
def moe_ootb(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    return emit_moe_ootb(ctx, moe_site(node), ctx.tensor(node.args[2]), ctx.tensor(node.args[3]))


def emit_moe_ootb(
    ctx: ConversionContext,
    site: MoeSite,
    w13: gs.Tensor,
    w2: gs.Tensor,
    quantize_input: Callable[[gs.Tensor], gs.Tensor] | None = None,
    quantize_intermediate: Callable[[gs.Tensor], gs.Tensor] | None = None,
) -> gs.Tensor:
    """The `ootb` form over float w13 [E',2I,H] and w2 [E',H,I] ONNX values (initializers, or dequantized ones).
    FP8 experts pass the fake quantization of their GEMM inputs (float32 Q/DQ): the tokens before gate/up, the
    SwiGLU intermediate before down; the experts then compute in float32 (the weights' dequantized dtype)."""
    dtype = dtype_of(site.x)
    local_experts, offset, intermediate = site.local_experts, site.offset, site.intermediate
    tokens, restore = flatten_tokens(ctx, site.x)

    probs = ctx.op("Softmax", [_router_logits(ctx, tokens, site.x, site.router)], {"axis": -1})
    top_k = ctx.ints([site.top_k])
    weights, chosen = ctx.op("TopK", [probs, top_k], {"axis": -1, "largest": 1, "sorted": 1}, outputs=2)
    if site.normalization == "renormalize":
        weights = ctx.op("Div", [weights, ctx.op("ReduceSum", [weights, ctx.ints([-1])], {"keepdims": 1})])
    # Dense routing R[T, E'] over the local experts: R[t, e] = weight of expert o + e in token t's top-k, else 0.
    local_ids = ctx.op("Range", [ctx.const(offset), ctx.const(offset + local_experts), ctx.const(1)])
    one_hot = ctx.op("Equal", [ctx.op("Unsqueeze", [chosen, ctx.ints([-1])]), local_ids])
    weighted = ctx.op("Mul", [ctx.cast(one_hot, torch.float32), ctx.op("Unsqueeze", [weights, ctx.ints([-1])])])
    routing = ctx.op("ReduceSum", [weighted, ctx.ints([1])], {"keepdims": 0})

    # All local experts on all tokens: [1,T,H] · [E',H,2I] → [E',T,2I].
    expert_tokens = tokens
    if quantize_input is not None:
        expert_tokens = quantize_input(tokens if dtype == torch.float32 else ctx.cast(tokens, torch.float32))
    w13_t = ctx.op("Transpose", [w13], {"perm": [0, 2, 1]})
    gate_up = ctx.op("MatMul", [ctx.op("Unsqueeze", [expert_tokens, ctx.ints([0])]), w13_t])
    gate, up = ctx.op("Split", [gate_up, ctx.ints([intermediate, intermediate])], {"axis": -1}, outputs=2)
    activated = ctx.op("Mul", [ctx.op("Mul", [gate, ctx.op("Sigmoid", [gate])]), up])
    if quantize_intermediate is not None:
        activated = quantize_intermediate(activated)
    down = ctx.op("MatMul", [activated, ctx.op("Transpose", [w2], {"perm": [0, 2, 1]})])  # [E',T,H]
    per_expert = ctx.op("Unsqueeze", [ctx.op("Transpose", [routing], {"perm": [1, 0]}), ctx.ints([-1])])  # [E',T,1]
    down32 = down if dtype == torch.float32 else ctx.cast(down, torch.float32)
    combined = ctx.op("ReduceSum", [ctx.op("Mul", [down32, per_expert]), ctx.ints([0])], {"keepdims": 0})
    out = combined if dtype == torch.float32 else ctx.cast(combined, dtype)
    return out if restore is None else ctx.op("Reshape", [out, restore])


# --- plugin ----------------------------------------------------------------------------------------------------


def plugin_attrs(site: MoeSite) -> dict[str, Any]:
    """The attributes of `trt.plugins::MoE` (backends/tensorrt/plugin.py) for one MoE site."""
    return {
        "plugin_version": PLUGIN_VERSION,
        "plugin_namespace": PLUGIN_NAMESPACE,
        "top_k": site.top_k,
        "normalization": site.normalization,
        "activation": site.activation,
        "num_experts": site.experts,
        "num_local_experts": site.local_experts,
        "expert_offset": site.offset,
    }


@converter("moec.moe", when=lambda ctx, node: ctx.options.moe == "plugin")
def moe_plugin(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    inputs = [ctx.tensor(arg) for arg in node.args[:4]]
    return ctx.op("MoE", inputs, plugin_attrs(moe_site(node)), domain=PLUGIN_DOMAIN)


# --- ort -------------------------------------------------------------------------------------------------------


def _interleaved_w13(ctx: ConversionContext, w13: torch.fx.Node) -> gs.Tensor:
    expr = ctx.weights.get(w13)
    if expr is not None:
        return ctx.initializer(f"{w13.name}.interleaved", interleave_gate_up(expr))
    # w13 computed at run time: interleave with Reshape/Transpose instead.
    experts, rows, hidden = value_of(w13).shape
    pairs = ctx.op("Reshape", [ctx.tensor(w13), ctx.ints([experts, 2, rows // 2, hidden])])
    pairs = ctx.op("Transpose", [pairs], {"perm": [0, 2, 1, 3]})
    return ctx.op("Reshape", [pairs, ctx.ints([experts, rows, hidden])])


def ort_router_input(ctx: ConversionContext, site: MoeSite, tokens: gs.Tensor) -> gs.Tensor:
    """The router LOGITS com.microsoft's MoE/QMoE take as `router_probs`, typed like the input."""
    logits = _router_logits(ctx, tokens, site.x, site.router)
    dtype = dtype_of(site.x)
    return logits if dtype == torch.float32 else ctx.cast(logits, dtype)


def ort_moe_attrs(site: MoeSite) -> dict[str, Any]:
    """The attributes com.microsoft's MoE and QMoE share: top-k, renormalization and silu(gate)·up (no limit)."""
    return {
        "k": site.top_k,
        "activation_type": "swiglu",
        "swiglu_fusion": 1,
        "activation_alpha": 1.0,
        "activation_beta": 0.0,
        "normalize_routing_weights": int(site.normalization == "renormalize"),
    }


@converter("moec.moe", when=lambda ctx, node: ctx.options.moe == "ort")
def moe_ort(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    refuse(node, "ort")
    site = moe_site(node)
    tokens, restore = flatten_tokens(ctx, site.x)
    w13, w2 = _interleaved_w13(ctx, node.args[2]), ctx.tensor(node.args[3])
    inputs = [tokens, ort_router_input(ctx, site, tokens), w13, None, w2]
    out = ctx.op("MoE", inputs, ort_moe_attrs(site), domain="com.microsoft")
    return out if restore is None else ctx.op("Reshape", [out, restore])
