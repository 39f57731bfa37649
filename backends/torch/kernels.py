"""Reference kernels of moec's canonical ops for the torch backend (CPU and CUDA).

These define what each op computes; every pass and every other backend is checked against them. They follow
Hugging Face's arithmetic (float32 router and normalization, casts at the same points) so that an untouched
graph reproduces Hugging Face's logits.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

import compiler.ops  # noqa: F401 - defines the op schemas these kernels implement
from compiler import fp8
from compiler.quantization import dequantize


@torch.library.impl("moec::attention", "CompositeExplicitAutograd")
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sliding_window: int = 0) -> torch.Tensor:
    seq_q, seq_k = q.shape[2], k.shape[2]
    query_pos = torch.arange(seq_k - seq_q, seq_k, device=q.device)[:, None]
    key_pos = torch.arange(seq_k, device=q.device)[None, :]
    allowed = key_pos <= query_pos
    if sliding_window > 0:
        allowed &= key_pos > query_pos - sliding_window
    groups = q.shape[1] // k.shape[1]
    batch, kv_heads = k.shape[0], k.shape[1]
    # Grouped-query attention without repeating k/v: fold each kv head's query group into the query rows.
    grouped_q = q.reshape(batch, kv_heads, groups * seq_q, q.shape[-1])
    scores = torch.matmul(grouped_q, k.transpose(-1, -2)) * scale
    scores = scores.view(batch, kv_heads, groups, seq_q, seq_k)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs.view(batch, kv_heads, groups * seq_q, seq_k), v)
    return out.view(batch, kv_heads * groups, seq_q, v.shape[-1]).transpose(1, 2).contiguous()


@torch.library.impl("moec::cached_attention", "CompositeExplicitAutograd")
def cached_attention(
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
) -> torch.Tensor:
    """The ground truth of `moec.cached_attention` (semantics in compiler/ops.py), on any device.

    It scores every filled cache slot and masks the invisible ones: simple rather than fast. Off the CPU it scores
    the whole cache instead and reads nothing back to the host, so a decode step that uses it can be captured in a
    CUDA graph. On CUDA the Triton kernels run unscaled float caches and e4m3 caches (any scales); a scaled cache of
    a float dtype stays here.
    """
    if _attention_on_triton(q, k, k_cache, cache_position, k_scale, v_scale):
        from backends.torch import triton_attention

        return triton_attention.cached_attention(q, k, v, k_cache, v_cache, cache_position, scale, sliding_window,
                                                 k_scale=k_scale, v_scale=v_scale)
    batch, kv_heads, seq, head_dim = k.shape
    max_seq = k_cache.shape[2]
    # slots[b, i]: the absolute position (and cache slot) of sequence b's i-th new token.
    slots = cache_position.to(torch.int64)[:, None] + torch.arange(seq, device=q.device)
    index = slots[:, None, :, None].expand(batch, kv_heads, seq, head_dim)
    _write_cache(k_cache, index, k, k_scale)
    _write_cache(v_cache, index, v, v_scale)
    # On the CPU nothing is captured, so read back how far the caches are filled and score only that prefix (a
    # decode step costs O(filled), not O(max_seq)). On a CUDA fallback the whole cache is scored with no host sync,
    # so the step stays capturable in a CUDA graph.
    visible = int(slots.max()) + 1 if q.device.type == "cpu" else max_seq
    keys, values = _read_cache(k_cache, visible, k_scale, q.dtype), _read_cache(v_cache, visible, v_scale, q.dtype)
    query_pos = slots[:, None, None, :, None]  # [B, 1, 1, S, 1] against key slots [visible]
    key_pos = torch.arange(visible, device=q.device)
    allowed = key_pos <= query_pos
    if sliding_window > 0:
        allowed &= key_pos > query_pos - sliding_window
    groups = q.shape[1] // kv_heads
    grouped_q = q.reshape(batch, kv_heads, groups * seq, q.shape[-1])
    scores = torch.matmul(grouped_q, keys.transpose(-1, -2)) * scale
    scores = scores.view(batch, kv_heads, groups, seq, visible).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    # Masked slots get probability exactly 0, but 0 * inf is NaN: slots past the last new token may hold anything
    # (a previous sequence's values), so they are zeroed before the product.
    written = key_pos[None, None, :, None] <= slots[:, -1, None, None, None]
    values = torch.where(written, values, torch.zeros((), dtype=values.dtype, device=values.device))
    out = torch.matmul(probs.view(batch, kv_heads, groups * seq, visible), values)
    return out.view(batch, kv_heads * groups, seq, v.shape[-1]).transpose(1, 2).contiguous()


def _attention_on_triton(q: torch.Tensor, k: torch.Tensor, k_cache: torch.Tensor, cache_position: torch.Tensor,
                         k_scale: float, v_scale: float) -> bool:
    """Whether a cached attention runs on the Triton kernels: CUDA operands that `unsupported_reason` accepts, with
    unscaled float caches or e4m3 caches (any scales)."""
    if not q.is_cuda or not ((k_scale == 1.0 and v_scale == 1.0) or k_cache.dtype == fp8.FP8_DTYPE):
        return False
    from backends.torch import triton_attention

    return triton_attention.unsupported_reason(q, k, k_cache, cache_position) is None


@torch.library.impl("moec::rope_cached_attention", "CompositeExplicitAutograd")
def rope_cached_attention(
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
) -> torch.Tensor:
    """`moec.rope_cached_attention`: exactly `rope` of q and of k, then `cached_attention` (bit-identical to the
    unfused ops on the CPU). On CUDA, where the unfused program would run both ropes and the attention on their Triton
    kernels, the Triton attention rotates q and k itself (decode: inside its kernel; prefill: the rope kernel, then
    the prefill); anywhere else the two ops run as they would unfused, each with its own dispatch."""
    if _attention_on_triton(q, k, k_cache, cache_position, k_scale, v_scale):
        from backends.torch import triton_norm

        if triton_norm.rope_unsupported_reason(q, cos, sin) is None and \
                triton_norm.rope_unsupported_reason(k, cos, sin) is None:
            from backends.torch import triton_attention

            return triton_attention.cached_attention(q, k, v, k_cache, v_cache, cache_position, scale, sliding_window,
                                                     k_scale=k_scale, v_scale=v_scale, rotary=(cos, sin))
    # Through the dispatcher: the decorated functions of this module are not callable by name.
    rotated_q, rotated_k = compiler.ops.rope(q, cos, sin), compiler.ops.rope(k, cos, sin)
    return compiler.ops.cached_attention(rotated_q, rotated_k, v, k_cache, v_cache, cache_position, scale,
                                         sliding_window, k_scale, v_scale)


def _write_cache(cache: torch.Tensor, index: torch.Tensor, new: torch.Tensor, scale: float) -> None:
    """Scatters `new` / `scale` into `cache` in its dtype (saturated to ±448 in an fp8 cache)."""
    if cache.dtype == fp8.FP8_DTYPE:
        # No scatter kernel takes float8 (on the CPU): the codes travel as their bytes.
        cache.view(torch.uint8).scatter_(2, index, fp8.quantize(new, scale).view(torch.uint8))
    elif scale != 1.0:
        cache.scatter_(2, index, (new.to(torch.float32) / scale).to(cache.dtype))
    else:
        cache.scatter_(2, index, new.to(cache.dtype))


def _read_cache(cache: torch.Tensor, visible: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The first `visible` slots of `cache` times `scale`, in `dtype`."""
    slots = cache[:, :, :visible]
    if cache.dtype == fp8.FP8_DTYPE or scale != 1.0:
        return fp8.dequantize(slots, scale).to(dtype)
    return slots.to(dtype)


@torch.library.impl("moec::rms_norm", "CompositeExplicitAutograd")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda:  # one Triton launch instead of ~7 elementwise kernels; `unsupported_reason` says what stays here
        from backends.torch import triton_norm

        if triton_norm.unsupported_reason(x, None, weight) is None:
            return triton_norm.rms_norm(x, weight, eps)
    x32 = x.to(torch.float32)
    normalized = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normalized.to(x.dtype)


@torch.library.impl("moec::rope", "CompositeExplicitAutograd")
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:  # one Triton launch instead of ~6 elementwise kernels; the reason rule says what stays here
        from backends.torch import triton_norm

        if triton_norm.rope_unsupported_reason(x, cos, sin) is None:
            return triton_norm.rope(x, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@torch.library.impl("moec::linear", "CompositeExplicitAutograd")
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.is_cuda and x.numel() == x.shape[-1]:  # one decode row: the Triton GEMV streams the weight faster than cuBLAS
        from backends.torch import triton_quant

        if triton_quant.float_gemv_unsupported_reason(x, weight, bias) is None:
            return triton_quant.linear(x, weight, bias, kernel="gemv")
    return F.linear(x, weight, bias)


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, normalization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's router in float32: (top-k expert ids [T,k], their weights [T,k] float32)."""
    logits = F.linear(x, router_weight).float()
    if normalization == "renormalize":
        probs = torch.softmax(logits, dim=-1)
        weights, experts = torch.topk(probs, top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
    else:
        probs = torch.softmax(logits, dim=-1)
        weights, experts = torch.topk(probs, top_k, dim=-1)
    return experts, weights


def route_on_device(
    x: torch.Tensor, router_weight: torch.Tensor, top_k: int, normalization: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`route`, on CUDA in one Triton launch (instead of a GEMV, a cast, a softmax, a top-k and a division)."""
    if x.is_cuda:
        from backends.torch import triton_moe

        if triton_moe.route_unsupported_reason(x, router_weight) is None:
            return triton_moe.route(x, router_weight, top_k, normalization)
    return route(x, router_weight, top_k, normalization)


# Said (once per reason) when a CUDA `moe` cannot run on the fused kernel: the reference syncs with the host.
MOE_REFERENCE_ON_CUDA = "moec::moe runs the reference kernel on CUDA (a host sync per call; not CUDA-graph capturable)"


def moe_experts_reference(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    quantize_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
    quantize_intermediate: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sort (token, slot) pairs by expert and run each expert once on its own tokens, then scatter-add back.

    No dense all-experts compute and no per-token weight gathers: the cost is the routed tokens' GEMMs only.
    Slots routed to an expert id outside [0, E) of `w13` (another rank's experts, under expert parallelism) are
    skipped: they contribute 0 here. `w13`/`w2` may be any `[e]`-indexable stack (`DequantizedExperts`,
    `FP8Experts`); FP8 passes the fake quantization its GEMMs read: of the expert inputs and of the SwiGLU output.
    """
    tokens, top_k = experts.shape
    intermediate = w2.shape[-1]
    local_experts = w13.shape[0]
    flat_experts = experts.reshape(-1)
    # Elsewhere-routed slots get the id `local_experts`, so they sort after every local expert and are never run.
    in_range = (flat_experts >= 0) & (flat_experts < local_experts)
    flat_experts = torch.where(in_range, flat_experts, local_experts)
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=local_experts + 1)[:local_experts].tolist()
    token_of_slot = order // top_k
    sorted_inputs = x[token_of_slot]
    sorted_weights = weights.reshape(-1)[order]
    output = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        inputs = sorted_inputs[rows] if quantize_input is None else quantize_input(sorted_inputs[rows])
        gate_up = F.linear(inputs, w13[expert])
        activated = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
        if quantize_intermediate is not None:
            activated = quantize_intermediate(activated)
        expert_out = F.linear(activated, w2[expert]) * sorted_weights[rows, None]
        output.index_add_(0, token_of_slot[rows], expert_out.to(x.dtype))
        start += count
    return output


@torch.library.impl("moec::moe", "CompositeExplicitAutograd")
def moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    normalization: str,
    activation: str,
    expert_offset: int = 0,
) -> torch.Tensor:
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    experts, weights = route_on_device(flat, router_weight, top_k, normalization)
    # Under expert parallelism this rank holds experts [expert_offset, expert_offset + E') of the routed E: the fused
    # kernel takes the global ids and the offset, the reference local ids; both skip the slots routed elsewhere.
    if flat.is_cuda:  # CUDA runs the Triton kernel; `unsupported_reason` is the one rule for what stays here
        from backends.torch import triton_moe

        reason = triton_moe.unsupported_reason(flat, w13, w2)
        if reason is None:
            return triton_moe.fused_moe(flat, experts, weights, w13, w2, expert_offset=expert_offset).reshape(shape)
        warnings.warn(f"{MOE_REFERENCE_ON_CUDA}: {reason}", RuntimeWarning, stacklevel=2)
    return moe_experts_reference(flat, experts - expert_offset, weights, w13, w2).reshape(shape)


# --- weight-only quantized ops (CPU reference, any device) ------------------------------------------------------
# The ground truth of `moec.quantized_linear` / `moec.quantized_moe`: dequantize (compiler/quantization.py) and
# compute exactly as `linear` / `moe` do on the dequantized weights. Weights stay quantized in memory; each call
# dequantizes what it uses (a linear's weight, the experts that receive tokens) and drops it: simple, not fast.
# On CUDA the Triton kernels (triton_quant.py, triton_moe.py) read the codes and dequantize tile by tile in registers.

# Said (once per reason) when a CUDA quantized op cannot run on its Triton kernel: the reference dequantizes whole
# weights per call (and the moe one syncs with the host).
QUANTIZED_REFERENCE_ON_CUDA = "a quantized moec op runs its dequantizing reference kernel on CUDA (slow)"


@torch.library.impl("moec::quantized_linear", "CompositeExplicitAutograd")
def quantized_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    precision: str,
    group_size: int,
) -> torch.Tensor:
    if x.is_cuda:  # CUDA runs the Triton kernel on the codes; `unsupported_reason` is the one rule for what stays here
        from backends.torch import triton_quant

        reason = triton_quant.unsupported_reason(x, qweight, scales, precision)
        if reason is None:
            return triton_quant.quantized_matmul(x, qweight, scales, precision, group_size, bias)
        warnings.warn(f"{QUANTIZED_REFERENCE_ON_CUDA}: {reason}", RuntimeWarning, stacklevel=2)
    return F.linear(x, dequantize(qweight, scales, precision, group_size), bias)


class DequantizedExperts:
    """Stacked quantized expert weights that `moe_experts_reference` indexes like a float [E, out, in] tensor:
    `experts[e]` dequantizes expert e alone, so only the experts that receive tokens are dequantized."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, precision: str, group_size: int) -> None:
        self.qweight, self.scales, self.precision, self.group_size = qweight, scales, precision, group_size
        packing = 2 if precision == "int4" else 1
        self.shape = torch.Size((*qweight.shape[:-1], qweight.shape[-1] * packing))

    def __getitem__(self, expert: int) -> torch.Tensor:
        return dequantize(self.qweight[expert], self.scales[expert], self.precision, self.group_size)


@torch.library.impl("moec::quantized_moe", "CompositeExplicitAutograd")
def quantized_moe(
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
) -> torch.Tensor:
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    experts, weights = route_on_device(flat, router_weight, top_k, normalization)
    if flat.is_cuda:  # the fused kernel reads the codes and dequantizes each weight tile in registers
        from backends.torch import triton_moe

        reason = triton_moe.unsupported_reason(flat, w13_q, w2_q, precision, (w13_scales, w2_scales))
        if reason is None:
            return triton_moe.fused_moe(
                flat, experts, weights, w13_q, w2_q, expert_offset=expert_offset, precision=precision,
                w13_scales=w13_scales, w2_scales=w2_scales, group_size=group_size,
            ).reshape(shape)
        warnings.warn(f"{QUANTIZED_REFERENCE_ON_CUDA}: {reason}", RuntimeWarning, stacklevel=2)
    w13 = DequantizedExperts(w13_q, w13_scales, precision, group_size)
    w2 = DequantizedExperts(w2_q, w2_scales, precision, group_size)
    # Expert parallelism as in `moe`: ids outside this rank's block [expert_offset, expert_offset + E') are skipped.
    return moe_experts_reference(flat, experts - expert_offset, weights, w13, w2).reshape(shape)  # type: ignore[arg-type]


# --- residual add + RMSNorm (`fuse-norm`) ---------------------------------------------------------------------
# The ground truth of `moec.add_rms_norm`: literally `aten.add`, then the `moec.rms_norm` kernel above (through its
# op: `torch.library.impl` leaves no Python function behind), so a fused program is bit-identical to the unfused one.


@torch.library.impl("moec::add_rms_norm", "CompositeExplicitAutograd")
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.is_cuda:  # CUDA runs the Triton kernel (one read of the residual stream); `unsupported_reason` decides
        from backends.torch import triton_norm

        if triton_norm.unsupported_reason(x, residual, weight) is None:
            return triton_norm.add_rms_norm(x, residual, weight, eps)
    total = torch.ops.aten.add.Tensor(x, residual)
    return total, compiler.ops.rms_norm(total, weight, eps)


# --- FP8 (`quantize-fp8`) -----------------------------------------------------------------------------------------
# The ground truth of `moec.fp8_linear` / `moec.fp8_moe`: exactly what an FP8 tensor-core GEMM with per-tensor scales
# computes, simulated in float32 (compiler/fp8.py): the activation quantized with its static scale (saturating),
# both operands dequantized, the product in float32, cast back. Any device. On CUDA (sm89+) they run on the FP8
# tensor cores instead (triton_fp8.py: cuBLASLt for linears; triton_moe.py's fused kernel, QUANT 3, for the
# experts); operands those cannot take run here, and say so once per reason (a RuntimeWarning).
FP8_REFERENCE_ON_CUDA = "a moec FP8 op runs its float32 reference on CUDA (slow)"


@torch.library.impl("moec::fp8_linear", "CompositeExplicitAutograd")
def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    if x.is_cuda:  # cuBLASLt's FP8 GEMM on the e4m3 codes; `linear_unsupported_reason` is the one rule
        from backends.torch import triton_fp8

        reason = triton_fp8.linear_unsupported_reason(x, weight, weight_scale, bias)
        if reason is None:
            return triton_fp8.linear(x, weight, weight_scale, input_scale, bias)
        warnings.warn(f"{FP8_REFERENCE_ON_CUDA}: {reason}", RuntimeWarning, stacklevel=2)
    out = F.linear(fp8.fake_quantize(x, input_scale), fp8.dequantize(weight, weight_scale))
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)


@torch.library.impl("moec::fp8_moe", "CompositeExplicitAutograd")
def fp8_moe(
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
) -> torch.Tensor:
    """FP8 experts: on CUDA (sm89+) the fused kernel's e4m3 tiles; elsewhere `fp8_experts_reference`."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    experts, weights = route_on_device(flat, router_weight, top_k, normalization)
    if flat.is_cuda:  # the fused kernel multiplies e4m3 codes on the tensor cores
        from backends.torch import triton_moe

        reason = triton_moe.unsupported_reason(flat, w13, w2, "fp8", (w13_scales, w2_scales))
        if reason is None:
            return triton_moe.fused_moe(
                flat, experts, weights, w13, w2, expert_offset=expert_offset, precision="fp8",
                w13_scales=w13_scales, w2_scales=w2_scales, w13_input_scale=w13_input_scale,
                w2_input_scale=w2_input_scale,
            ).reshape(shape)
        warnings.warn(f"{FP8_REFERENCE_ON_CUDA}: {reason}", RuntimeWarning, stacklevel=2)
    return fp8_experts_reference(flat, experts, weights, w13, w13_scales, w2, w2_scales, w13_input_scale,
                                 w2_input_scale, expert_offset).reshape(shape)


class FP8Experts:
    """Stacked e4m3 experts with one scale each, indexed like a float [E, out, in] tensor by
    `moe_experts_reference`: `experts[e]` dequantizes expert e alone (float32)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.codes, self.scales, self.shape = codes, scales, codes.shape

    def __getitem__(self, expert: int) -> torch.Tensor:
        return fp8.dequantize(self.codes[expert], self.scales[expert])


def fp8_experts_reference(
    flat: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w13_scales: torch.Tensor,
    w2: torch.Tensor, w2_scales: torch.Tensor, w13_input_scale: float, w2_input_scale: float, expert_offset: int = 0,
) -> torch.Tensor:
    """`fp8_moe`'s experts for routed tokens [T, H] (also the TensorRT plugin's CPU path): `moe_experts_reference`
    over the dequantized e4m3 experts, their inputs and SwiGLU output fake-quantized with the static scales."""
    return moe_experts_reference(
        flat, experts - expert_offset, weights, FP8Experts(w13, w13_scales), FP8Experts(w2, w2_scales),  # type: ignore[arg-type]
        quantize_input=lambda rows: fp8.fake_quantize(rows, w13_input_scale),
        quantize_intermediate=lambda activated: fp8.fake_quantize(activated, w2_input_scale),
    )

