"""RMSNorm, residual add + RMSNorm in one pass over the row, and the rotary embedding, in Triton (the CUDA kernels of
`moec.rms_norm`, `moec.add_rms_norm` and `moec.rope`).

Eagerly, torch runs RMSNorm as ~7 kernels (cast, square, mean, add eps, rsqrt, scale, cast, weight) and the residual
add as one more, each reading and writing the whole [tokens, hidden] activation. Here one program owns one row: it
reads x (and the residual), writes the sum once, and writes the normalized row, with the arithmetic of the CPU
reference (`backends/torch/kernels.py`): the sum rounded to the activation dtype as `aten.add` rounds it, the mean
of squares in float32, the normalized row rounded to the activation dtype before the weight multiplies it.
"""

from __future__ import annotations


import torch

from backends.torch.triton_support import HAVE_TRITON as _HAVE_TRITON
from backends.torch.triton_support import device_reason, pdl_launch, tl, triton, wait_for_producers

__all__ = ["add_rms_norm", "rms_norm", "rope", "rope_unsupported_reason", "rotary_operands", "unsupported_reason"]

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HIDDEN = 65536  # one row per program, held in registers


def unsupported_reason(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> str | None:
    """Why these operands cannot run on the Triton kernel (None when they can): the dispatch's one rule."""
    reason = device_reason(x, _HAVE_TRITON)
    if reason is not None:
        return reason
    if x.dtype not in ACTIVATION_DTYPES or weight.dtype != x.dtype:
        return f"activation {x.dtype} / weight {weight.dtype}: the kernel takes one of {ACTIVATION_DTYPES} for both"
    if residual is not None and (residual.dtype != x.dtype or residual.shape != x.shape):
        return f"residual {residual.dtype}{list(residual.shape)} does not match x {x.dtype}{list(x.shape)}"
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1] or x.shape[-1] > MAX_HIDDEN:
        return f"weight {list(weight.shape)} is not one scale per feature of x {list(x.shape)} (at most {MAX_HIDDEN})"
    return None


if _HAVE_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        residual_ptr,  # unread without HAS_RESIDUAL
        weight_ptr,
        sum_ptr,  # out: x + residual (unwritten without HAS_RESIDUAL)
        out_ptr,  # out: the normalized row
        n_cols,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
        USE_PDL: tl.constexpr = False,  # PDL launch (triton_support.pdl_launch)
    ):
        wait_for_producers(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + row * n_cols + cols, mask=mask, other=0.0)
            # Rounded to the activation dtype, as the separate add's output is, before the norm reads it.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * n_cols + cols, x, mask=mask)
        x32 = x.to(tl.float32)
        mean_square = tl.sum(x32 * x32, axis=0) / n_cols
        normalized = (x32 * (1.0 / tl.sqrt(mean_square + eps))).to(x_ptr.dtype.element_ty)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
        y = (w.to(tl.float32) * normalized.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * n_cols + cols, y, mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    if not _HAVE_TRITON:
        raise RuntimeError("the Triton norm kernels need triton")
    reason = unsupported_reason(x, residual, weight)
    if reason is not None:
        raise TypeError(reason)
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden).contiguous()
    r2 = residual.reshape(-1, hidden).contiguous() if residual is not None else x2
    out = torch.empty_like(x2)
    total = torch.empty_like(x2) if residual is not None else out
    rows = x2.shape[0]
    if rows:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows,)](
            x2, r2, weight.contiguous(), total, out, hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, **pdl_launch(x), num_warps=min(16, max(1, block // 256)),
        )
    return total.view(x.shape), out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`moec.rms_norm` on one kernel launch."""
    return _launch(x, None, weight, eps)[1]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`moec.add_rms_norm`: (x + residual, rms_norm(x + residual)) on one kernel launch."""
    return _launch(x, residual, weight, eps)


# --- rotary position embedding ---------------------------------------------------------------------------------
# `moec.rope(x [B,H,S,D], cos [B,S,D], sin [B,S,D])` = x*cos + rotate_half(x)*sin. Eagerly that is ~6 kernels (two
# slices, a negation, a concatenation, two products, a sum) over a transposed, non-contiguous view of the projection;
# here one program rotates one (b, s) row of all H heads, reading x through its strides. The arithmetic rounds where
# the reference's separate ops round: each product, then the sum, in x's dtype.


def rope_unsupported_reason(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    reason = device_reason(x, _HAVE_TRITON)
    if reason is not None:
        return reason
    if x.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return f"x {list(x.shape)} / cos {list(cos.shape)} / sin {list(sin.shape)} are not [B,H,S,D] and [B,S,D]"
    if x.dtype not in ACTIVATION_DTYPES or cos.dtype != x.dtype or sin.dtype != x.dtype:
        return f"x {x.dtype} / cos {cos.dtype} / sin {sin.dtype}: the kernel takes one dtype for all three"
    batch, _, seq, dim = x.shape
    if dim % 2 or tuple(cos.shape) not in ((batch, seq, dim), (1, seq, dim)):
        return f"cos {list(cos.shape)} does not broadcast to one row per (batch, position) of x {list(x.shape)}"
    return None


def rotary_operands(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """cos and sin with unit stride along D and one layout (the kernels index both with one set of strides), and
    their batch stride (0 for [1,S,D] rows that every sequence shares)."""
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    if sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, cos.stride(0) if cos.shape[0] > 1 else 0


if _HAVE_TRITON:

    @triton.jit
    def rope_rotate(x, rotated, cos, sin):
        """x*cos + rotated*sin (rotated = rotate_half(x) in float32, sign applied), rounded where the reference's
        separate ops round: each product, then the sum, in x's dtype. The rope kernel and the fused rope of the
        decode attention kernel (triton_attention_kernels.py) both compute it here, so their results agree bit for
        bit."""
        dtype = x.dtype
        return ((x.to(tl.float32) * cos.to(tl.float32)).to(dtype).to(tl.float32)
                + (rotated * sin.to(tl.float32)).to(dtype).to(tl.float32)).to(dtype)

    @triton.jit
    def _rope_kernel(
        x_ptr, cos_ptr, sin_ptr, out_ptr, S, H,
        stride_xb, stride_xh, stride_xs,
        stride_cb, stride_cs,
        stride_ob, stride_oh, stride_os,
        HALF: tl.constexpr, BLOCK_H: tl.constexpr,
        USE_PDL: tl.constexpr = False,  # PDL launch (triton_support.pdl_launch)
    ):
        wait_for_producers(USE_PDL)
        pid = tl.program_id(0)
        b = (pid // S).to(tl.int64)
        s = (pid % S).to(tl.int64)
        heads = tl.arange(0, BLOCK_H)[:, None]
        cols = tl.arange(0, HALF)[None, :]
        mask = heads < H
        x_row = x_ptr + b * stride_xb + s * stride_xs + heads * stride_xh
        x1 = tl.load(x_row + cols, mask=mask, other=0.0)
        x2 = tl.load(x_row + HALF + cols, mask=mask, other=0.0)
        c_row = b * stride_cb + s * stride_cs
        c1 = tl.load(cos_ptr + c_row + cols)
        c2 = tl.load(cos_ptr + c_row + HALF + cols)
        s1 = tl.load(sin_ptr + c_row + cols)
        s2 = tl.load(sin_ptr + c_row + HALF + cols)
        # rotate_half(x) = [-x2, x1]: first half x1*c1 + (-x2)*s1, second half x2*c2 + x1*s2.
        first = rope_rotate(x1, -(x2.to(tl.float32)), c1, s1)
        second = rope_rotate(x2, x1.to(tl.float32), c2, s2)
        o_row = out_ptr + b * stride_ob + s * stride_os + heads * stride_oh
        tl.store(o_row + cols, first, mask=mask)
        tl.store(o_row + HALF + cols, second, mask=mask)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`moec.rope` on one launch; the result is laid out like x (a transposed view stays a transposed layout)."""
    if not _HAVE_TRITON:
        raise RuntimeError("the Triton rope kernel needs triton")
    reason = rope_unsupported_reason(x, cos, sin)
    if reason is not None:
        raise TypeError(reason)
    batch, heads, seq, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin, cos_batch_stride = rotary_operands(cos, sin)
    out = torch.empty_like(x)
    if out.stride(-1) != 1:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        _rope_kernel[(batch * seq,)](
            x, cos, sin, out, seq, heads,
            x.stride(0), x.stride(1), x.stride(2),
            cos_batch_stride, cos.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            HALF=dim // 2, BLOCK_H=triton.next_power_of_2(heads), **pdl_launch(x), num_warps=4,
        )
    return out
