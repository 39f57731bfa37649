"""Reference kernels of moec's canonical ops for the torch backend (CPU and CUDA).

These define what each op computes; every pass and every other backend is checked against them. They follow
Hugging Face's arithmetic (float32 router and normalization, casts at the same points) so that an untouched
graph reproduces Hugging Face's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import compiler.ops  # noqa: F401 - defines the op schemas these kernels implement


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


@torch.library.impl("moec::rms_norm", "CompositeExplicitAutograd")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    normalized = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normalized.to(x.dtype)


@torch.library.impl("moec::rope", "CompositeExplicitAutograd")
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@torch.library.impl("moec::linear", "CompositeExplicitAutograd")
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
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


def moe_experts_reference(
    x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Sort (token, slot) pairs by expert and run each expert once on its own tokens, then scatter-add back.

    No dense all-experts compute and no per-token weight gathers: the cost is the routed tokens' GEMMs only.
    Slots routed to an expert id outside [0, E) of `w13` (another rank's experts, under expert parallelism) are
    skipped: they contribute 0 here.
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
        gate_up = F.linear(sorted_inputs[rows], w13[expert])
        activated = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
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
    experts, weights = route(flat, router_weight, top_k, normalization)
    if expert_offset or w13.shape[0] != router_weight.shape[0]:
        # Expert parallelism: this rank holds experts [expert_offset, expert_offset + E') of the routed E.
        return moe_experts_reference(flat, experts - expert_offset, weights, w13, w2).reshape(shape)
    if flat.is_cuda and flat.dtype in (torch.float16, torch.bfloat16):
        from backends.torch import triton_moe

        if triton_moe.is_available():
            return triton_moe.fused_moe(flat, experts, weights, w13, w2).reshape(shape)
    return moe_experts_reference(flat, experts, weights, w13, w2).reshape(shape)
