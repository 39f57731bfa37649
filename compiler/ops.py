"""moec's canonical ops, registered under the `moec` torch.library namespace.

Each op has a schema and a fake (meta) kernel here, so shapes and dtypes propagate through torch.export and the
verifier without computing anything. Real kernels live in the backends (`backends/torch/kernels.py`).

Conventions (shared by every pass and backend):
- `attention(q[B,Hq,S,D], k[B,Hkv,S,D], v[B,Hkv,S,D]) -> [B,S,Hq,D]`: causal, grouped-query (Hq % Hkv == 0,
  no repeat_kv materialized), optional sliding window (0 = none; query i sees keys j with i - window < j <= i).
- `cached_attention(q[B,Hq,S,D], k[B,Hkv,S,D], v[B,Hkv,S,D], k_cache![B,Hkv,M,D], v_cache![B,Hkv,M,D],
  cache_position[B] i64, scale, sliding_window=0) -> [B,S,Hq,D]`: attention with a KV cache (the `kv-cache` pass
  emits it). Sequence b's S new tokens sit at absolute positions cache_position[b] + [0, S): the op writes their k/v
  into k_cache/v_cache[b, :, cache_position[b] : cache_position[b] + S] (in place: the caches are the only mutated
  operands in moec's IR), then query i attends cache slots j with j <= cache_position[b] + i (and, with a window,
  j > cache_position[b] + i - window). One op serves prefill (S > 1, cache_position 0 or a chunk's start) and decode
  (S == 1). The caller guarantees cache_position[b] + S <= M; slots past a sequence's last write are never read.
  The cache dtype may differ from q's (k/v are cast on write and read back in q's dtype). Optional trailing
  `k_scale=1.0, v_scale=1.0` (`quantize-fp8{kv_cache=true}` sets them, with float8_e4m3fn caches): the cache holds
  k / k_scale and v / v_scale (computed in float32; saturated to ±448 in an fp8 cache) and reads back
  cache * scale in q's dtype.
- `rope_cached_attention(q[B,Hq,S,D], k[B,Hkv,S,D], v, k_cache!, v_cache!, cache_position[B], cos[B,S,D],
  sin[B,S,D], scale, sliding_window=0, k_scale=1.0, v_scale=1.0) -> [B,S,Hq,D]`: exactly
  `cached_attention(rope(q, cos, sin), rope(k, cos, sin), v, k_cache, v_cache, cache_position, scale,
  sliding_window, k_scale, v_scale)` (the `fuse-rope` pass emits it), so a decode kernel can rotate q as it loads it
  and the step's k before it writes it into the cache. The cache operands keep `cached_attention`'s positions (3, 4,
  5). cos/sin may be [1,S,D] (shared by the batch).
- `rms_norm(x, weight, eps)`: Hugging Face semantics (normalize in float32, cast back, then multiply by weight).
- `add_rms_norm(x, residual, weight, eps) -> (sum, normed)`: a residual add and the RMSNorm of its sum (the
  `fuse-norm` pass emits it). x and residual have one shape and one dtype; sum = x + residual in that dtype, rounded
  as `aten.add` rounds it; normed = rms_norm(sum, weight, eps) with `rms_norm`'s semantics. Results are read through
  `getitem` (0: sum, 1: normed).
- `rope(x[B,H,S,D], cos[B,S,D], sin[B,S,D])`: x*cos + rotate_half(x)*sin.
- `linear(x, weight[out,in], bias?)`.
- `moe(x[T,H], router[E,H], w13[E',2I,H], w2[E',H,I], top_k, normalization, activation, expert_offset=0)`:
  Mixtral's sparse MoE block. Rows [0, I) of w13 are the gate projection (w1), rows [I, 2I) the up projection
  (w3). The router runs in float32 over all E experts. normalization "renormalize" = softmax over the top-k logits;
  "none" = top-k of the full softmax. w13/w2 hold the E' experts [expert_offset, expert_offset + E') (all of them
  unless expert-parallel sharding gave this rank a block); tokens routed to other experts contribute 0 here.
- `quantized_linear(x, qweight, scales, bias?, precision, group_size)`: `linear` with the weight
  dequantize(qweight, scales) (the `quantize-weights` pass emits it). precision "int8": qweight i8[out,in];
  "int4": u8[out,in/2], two offset-binary codes per byte, low nibble first. scales [out, groups] in x's dtype
  (groups = in/group_size; 1 per output channel when group_size = 0). Layout and arithmetic: compiler/quantization.py.
- `quantized_moe(x, router, w13_q, w13_scales, w2_q, w2_scales, top_k, normalization, activation, precision,
  group_size, expert_offset=0)`: `moe` with w13 = dequantize(w13_q [E',2I,H or H/2], w13_scales [E',2I,H/gs]) and
  w2 = dequantize(w2_q, w2_scales [E',H,I/gs]), both quantized along their input dim; the router stays float.
- `fp8_linear(x, weight, weight_scale, input_scale, bias?)` (the `quantize-fp8` pass emits it): what an FP8 GEMM
  with per-tensor scales computes. weight f8e4m3[out,in], weight_scale f32[] (one per tensor), input_scale a static
  float; x' = fp8(clamp(float32(x) / input_scale, ±448)) * input_scale, y = x' @ (float32(weight) * weight_scale)^T
  in float32 (+ bias), cast to x's dtype. Format and arithmetic: compiler/fp8.py.
- `fp8_moe(x, router, w13, w13_scales, w2, w2_scales, top_k, normalization, activation, w13_input_scale,
  w2_input_scale, expert_offset=0)`: `moe` with FP8 experts: w13 f8e4m3[E',2I,H] and w2 f8e4m3[E',H,I], one f32
  scale per expert each (w13_scales, w2_scales: f32[E']; an expert's w1 and w3 rows share one). The router stays
  float (`moe`'s routing). Per expert, in float32: its tokens quantized like `fp8_linear`'s input with
  w13_input_scale, gate/up from the dequantized w13, silu(gate) * up quantized with w2_input_scale, the dequantized
  w2, the routing weight; each expert's output is cast to x's dtype and summed as in `moe`.
"""

from __future__ import annotations

import torch

from compiler.fp8 import FP8_DTYPE, SCALE_DTYPE
from compiler.quantization import logical_shape

LIBRARY_NAME = "moec"

_library = torch.library.Library(LIBRARY_NAME, "DEF")
_library.define("attention(Tensor q, Tensor k, Tensor v, float scale, int sliding_window=0) -> Tensor")
_library.define(
    "cached_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_position,"
    " float scale, int sliding_window=0, float k_scale=1.0, float v_scale=1.0) -> Tensor"
)
_library.define(
    "rope_cached_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache,"
    " Tensor cache_position, Tensor cos, Tensor sin, float scale, int sliding_window=0, float k_scale=1.0,"
    " float v_scale=1.0) -> Tensor"
)
_library.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
_library.define("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor")
_library.define("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor")
_library.define(
    "moe(Tensor x, Tensor router_weight, Tensor w13, Tensor w2, int top_k, str normalization, str activation,"
    " int expert_offset=0) -> Tensor"
)
_library.define(
    "quantized_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, str precision, int group_size) -> Tensor"
)
_library.define(
    "quantized_moe(Tensor x, Tensor router_weight, Tensor w13_q, Tensor w13_scales, Tensor w2_q, Tensor w2_scales,"
    " int top_k, str normalization, str activation, str precision, int group_size, int expert_offset=0) -> Tensor"
)
_library.define("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)")
_library.define(
    "fp8_linear(Tensor x, Tensor weight, Tensor weight_scale, float input_scale, Tensor? bias=None) -> Tensor"
)
_library.define(
    "fp8_moe(Tensor x, Tensor router_weight, Tensor w13, Tensor w13_scales, Tensor w2, Tensor w2_scales, int top_k,"
    " str normalization, str activation, float w13_input_scale, float w2_input_scale, int expert_offset=0) -> Tensor"
)

MOE_NORMALIZATIONS = ("none", "renormalize")
MOE_ACTIVATIONS = ("swiglu",)


@torch.library.register_fake("moec::attention")
def _attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sliding_window: int = 0):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "attention takes 4-d q, k, v")
    torch._check(k.shape == v.shape, lambda: f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "attention: query heads must be a multiple of kv heads")
    batch, heads, seq, head_dim = q.shape
    return q.new_empty((batch, seq, heads, v.shape[-1]))


@torch.library.register_fake("moec::cached_attention")
def _cached_attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_position: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
):
    torch._check(k.shape == v.shape, lambda: f"cached_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    torch._check(k_scale > 0 and v_scale > 0, lambda: f"cached_attention: scales {k_scale}, {v_scale} must be positive")
    torch._check(k_cache.shape == v_cache.shape, lambda: "cached_attention: k_cache and v_cache shapes differ")
    torch._check(k_cache.dim() == 4 and k_cache.shape[1] == k.shape[1] and k_cache.shape[3] == k.shape[3],
                 lambda: f"cached_attention: cache {tuple(k_cache.shape)} is not [batch, kv_heads, max_seq, head_dim]")
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "cached_attention: query heads must be a multiple of kv heads")
    torch._check(cache_position.dim() == 1, lambda: "cached_attention: cache_position must be [batch]")
    batch, heads, seq, head_dim = q.shape
    return q.new_empty((batch, seq, heads, v.shape[-1]))


@torch.library.register_fake("moec::rms_norm")
def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float):
    torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[-1], lambda: "rms_norm: weight must be [hidden]")
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.register_fake("moec::rope")
def _rope_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    torch._check(x.shape[-1] % 2 == 0, lambda: "rope: head dim must be even")
    dtype = torch.promote_types(x.dtype, cos.dtype)
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.register_fake("moec::linear")
def _linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    torch._check(weight.dim() == 2, lambda: "linear: weight must be [out, in]")
    torch._check(x.shape[-1] == weight.shape[1], lambda: f"linear: input {x.shape[-1]} != weight in {weight.shape[1]}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("moec::moe")
def _moe_fake(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    normalization: str,
    activation: str,
    expert_offset: int = 0,
):
    check_moe_signature(
        x.shape[-1], router_weight.shape, w13.shape, w2.shape, top_k, normalization, activation, expert_offset
    )
    return x.new_empty(x.shape)


def check_moe_signature(
    hidden: int,
    router_shape: tuple[int, ...] | torch.Size,
    w13_shape: tuple[int, ...] | torch.Size,
    w2_shape: tuple[int, ...] | torch.Size,
    top_k: int,
    normalization: str,
    activation: str,
    expert_offset: int = 0,
) -> None:
    """Raises ValueError naming the first inconsistency among the `moe` op's operands."""
    routed = router_shape[0]
    if tuple(router_shape) != (routed, hidden):
        raise ValueError(f"moe: router weight {list(router_shape)} is not [experts, hidden={hidden}]")
    experts = w13_shape[0] if len(w13_shape) == 3 else routed
    if not (0 <= expert_offset and expert_offset + experts <= routed):
        raise ValueError(f"moe: experts [{expert_offset}, {expert_offset + experts}) are not among the {routed} routed")
    if len(w13_shape) != 3 or w13_shape[0] != experts or w13_shape[2] != hidden or w13_shape[1] % 2:
        raise ValueError(f"moe: w13 {list(w13_shape)} is not [experts={experts}, 2*intermediate, hidden={hidden}]")
    intermediate = w13_shape[1] // 2
    if tuple(w2_shape) != (experts, hidden, intermediate):
        raise ValueError(f"moe: w2 {list(w2_shape)} is not [{experts}, {hidden}, {intermediate}]")
    if not 1 <= top_k <= routed:
        raise ValueError(f"moe: top_k={top_k} must be in [1, {routed}]")
    if normalization not in MOE_NORMALIZATIONS:
        raise ValueError(f"moe: normalization {normalization!r} is not one of {MOE_NORMALIZATIONS}")
    if activation not in MOE_ACTIVATIONS:
        raise ValueError(f"moe: activation {activation!r} is not one of {MOE_ACTIVATIONS}")


@torch.library.register_fake("moec::rope_cached_attention")
def _rope_cached_attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_position: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
):
    torch._check(
        cos.dim() == 3 and cos.shape == sin.shape and cos.shape[-1] == q.shape[-1],
        lambda: f"rope_cached_attention: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} are not [batch, seq, D]",
    )
    rotated_q, rotated_k = _rope_fake(q, cos, sin), _rope_fake(k, cos, sin)
    return _cached_attention_fake(
        rotated_q, rotated_k, v, k_cache, v_cache, cache_position, scale, sliding_window, k_scale, v_scale
    )


def named_arguments(target: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict[str, object]:
    """An op call's arguments by their schema names, defaults filled in (whether given positionally or by keyword)."""
    values: dict[str, object] = {}
    for index, argument in enumerate(target._schema.arguments):
        if index < len(args):
            values[argument.name] = args[index]
        elif argument.name in kwargs:
            values[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            values[argument.name] = argument.default_value
    return values


attention = torch.ops.moec.attention.default
cached_attention = torch.ops.moec.cached_attention.default
rope_cached_attention = torch.ops.moec.rope_cached_attention.default
CACHED_ATTENTIONS = (cached_attention, rope_cached_attention)  # the ops that read (and write) KV caches
rms_norm = torch.ops.moec.rms_norm.default
rope = torch.ops.moec.rope.default
linear = torch.ops.moec.linear.default
moe = torch.ops.moec.moe.default



@torch.library.register_fake("moec::quantized_linear")
def _quantized_linear_fake(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    precision: str,
    group_size: int,
):
    out_features, in_features = check_quantized_operand(
        "quantized_linear: weight", qweight, scales, x.dtype, precision, group_size, dims=2
    )
    torch._check(
        x.shape[-1] == in_features, lambda: f"quantized_linear: input {x.shape[-1]} != weight in {in_features}"
    )
    torch._check(bias is None or tuple(bias.shape) == (out_features,), lambda: "quantized_linear: bias must be [out]")
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("moec::quantized_moe")
def _quantized_moe_fake(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w13_q: torch.Tensor,
    w13_scales: torch.Tensor,
    w2_q: torch.Tensor,
    w2_scales: torch.Tensor,
    top_k: int,
    normalization: str,
    activation: str,
    precision: str,
    group_size: int,
    expert_offset: int = 0,
):
    w13 = check_quantized_operand("quantized_moe: w13", w13_q, w13_scales, x.dtype, precision, group_size, dims=3)
    w2 = check_quantized_operand("quantized_moe: w2", w2_q, w2_scales, x.dtype, precision, group_size, dims=3)
    check_moe_signature(x.shape[-1], router_weight.shape, w13, w2, top_k, normalization, activation, expert_offset)
    return x.new_empty(x.shape)


def check_quantized_operand(
    what: str,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    activation_dtype: torch.dtype,
    precision: str,
    group_size: int,
    dims: int,
) -> tuple[int, ...]:
    """The float shape a quantized (qweight, scales) operand stands for; ValueError naming what disagrees."""
    if qweight.dim() != dims:
        raise ValueError(f"{what} is {qweight.dim()}-d, expected {dims}-d")
    if scales.dtype != activation_dtype:
        raise ValueError(f"{what} scales are {scales.dtype}, not the activation dtype {activation_dtype}")
    return logical_shape(tuple(qweight.shape), qweight.dtype, tuple(scales.shape), precision, group_size, what)


quantized_linear = torch.ops.moec.quantized_linear.default
quantized_moe = torch.ops.moec.quantized_moe.default


@torch.library.register_fake("moec::add_rms_norm")
def _add_rms_norm_fake(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    torch._check(
        x.shape == residual.shape,
        lambda: f"add_rms_norm: x {tuple(x.shape)} and residual {tuple(residual.shape)} differ (no broadcasting)",
    )
    torch._check(
        x.dtype == residual.dtype, lambda: f"add_rms_norm: x is {x.dtype} but residual is {residual.dtype}"
    )
    return x.new_empty(x.shape), _rms_norm_fake(x, weight, eps)


add_rms_norm = torch.ops.moec.add_rms_norm.default


def _check_fp8_operand(what: str, weight: torch.Tensor, scales: torch.Tensor, dims: int) -> None:
    """An fp8 weight of `dims` dims with one float32 scale per tensor (dims 2) or per expert (dims 3)."""
    torch._check(weight.dim() == dims, lambda: f"{what} is {weight.dim()}-d, expected {dims}-d")
    torch._check(weight.dtype == FP8_DTYPE, lambda: f"{what} is {weight.dtype}, not {FP8_DTYPE}")
    expected = () if dims == 2 else (weight.shape[0],)
    torch._check(
        scales.dtype == SCALE_DTYPE and tuple(scales.shape) == expected,
        lambda: f"{what} scales are {scales.dtype}{list(scales.shape)}, not {SCALE_DTYPE}{list(expected)}",
    )


@torch.library.register_fake("moec::fp8_linear")
def _fp8_linear_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: float,
    bias: torch.Tensor | None = None,
):
    _check_fp8_operand("fp8_linear: weight", weight, weight_scale, dims=2)
    torch._check(input_scale > 0, lambda: f"fp8_linear: input_scale {input_scale} must be positive")
    torch._check(
        x.shape[-1] == weight.shape[1], lambda: f"fp8_linear: input {x.shape[-1]} != weight in {weight.shape[1]}"
    )
    torch._check(bias is None or tuple(bias.shape) == (weight.shape[0],), lambda: "fp8_linear: bias must be [out]")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("moec::fp8_moe")
def _fp8_moe_fake(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w13: torch.Tensor,
    w13_scales: torch.Tensor,
    w2: torch.Tensor,
    w2_scales: torch.Tensor,
    top_k: int,
    normalization: str,
    activation: str,
    w13_input_scale: float,
    w2_input_scale: float,
    expert_offset: int = 0,
):
    _check_fp8_operand("fp8_moe: w13", w13, w13_scales, dims=3)
    _check_fp8_operand("fp8_moe: w2", w2, w2_scales, dims=3)
    torch._check(
        w13_input_scale > 0 and w2_input_scale > 0,
        lambda: f"fp8_moe: input scales {w13_input_scale}, {w2_input_scale} must be positive",
    )
    check_moe_signature(
        x.shape[-1], router_weight.shape, w13.shape, w2.shape, top_k, normalization, activation, expert_offset
    )
    return x.new_empty(x.shape)


fp8_linear = torch.ops.moec.fp8_linear.default
fp8_moe = torch.ops.moec.fp8_moe.default
WEIGHT_ONLY_OPS = (quantized_linear, quantized_moe)
FP8_OPS = (fp8_linear, fp8_moe)
QUANTIZED_OPS = (*WEIGHT_ONLY_OPS, *FP8_OPS)  # every op whose weights are quantized

CANONICAL_OPS = (
    attention, cached_attention, rope_cached_attention, rms_norm, rope, linear, moe, quantized_linear, quantized_moe,
    add_rms_norm, fp8_linear, fp8_moe,
)
