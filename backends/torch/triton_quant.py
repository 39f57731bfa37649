"""Weight-only INT8/INT4 linears in Triton, and the dequantizing tile load the fused MoE kernels share.

``quantized_matmul(x [M, K], qweight, scales, precision, group_size)`` computes ``x @ dequantize(qweight, scales).T``
with the weight kept in its compact form (compiler/quantization.py's layout: int8 ``[N, K]``; int4 ``[N, K/2]`` two
offset-binary codes per byte, low nibble first; scales ``[N, groups]`` in the activation dtype). Each K tile of the
weight is read as codes (1 or 0.5 byte per element instead of 2), dequantized in registers to exactly the values the
CPU reference multiplies (``float32(code) * float32(scale)`` rounded to the activation dtype) and fed to the tensor
cores; the float weight never exists in memory.

Decode (M <= 16) is a stream over the weight bytes: narrow column tiles so that even a 1024-row projection spreads
over enough programs, deep pipelines to keep bytes in flight. Prefill is a tiled GEMM (the dequantization is a few
register ops per weight element, amortized over BLOCK_M rows). Launch parameters come from a small table keyed on M.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from backends.torch.triton_gemv_words import launch_gemv_words, words_unsupported_reason
from backends.torch.triton_support import HAVE_TRITON as _HAVE_TRITON
from backends.torch.triton_support import (codes_in_ptx, device_reason, interpreting, pdl_launch, tl, triton,
                                           wait_for_producers)

__all__ = ["QUANT_CODES", "linear", "quantized_matmul", "unsupported_reason"]

# The kernels' QUANT constexpr: 0 float weights, 1 int8, 2 int4 (packed along K), 3 e4m3 (the fused MoE only:
# triton_fp8.py's linears run on cuBLASLt).
QUANT_CODES = {None: 0, "int8": 1, "int4": 2, "fp8": 3}
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)
STORAGE = {"int8": torch.int8, "int4": torch.uint8}


def unsupported_reason(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, precision: str) -> str | None:
    """Why these operands cannot run on the Triton kernels (None when they can): the dispatch's one rule."""
    reason = device_reason(x, _HAVE_TRITON)
    if reason is not None:
        return reason
    if x.dtype not in ACTIVATION_DTYPES:
        return f"activation dtype {x.dtype} is not among {ACTIVATION_DTYPES}"
    if precision not in STORAGE or qweight.dtype != STORAGE[precision]:
        return f"{precision} weights stored as {qweight.dtype} are not a layout the kernels read"
    if scales.dtype != x.dtype:
        return f"scales are {scales.dtype}, the activations {x.dtype}"
    if precision == "int4" and scales.dim() == 2 and scales.shape[-1] * 16 > qweight.shape[-1]:
        return "int4 groups of 16 are narrower than the kernel's 32-wide K tiles (two 16-deep dots of nibbles)"
    return None


def float_gemv_unsupported_reason(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why one row of a float `moec.linear` cannot run on the GEMV kernel (None when it can); cuBLAS takes the rest."""
    reason = device_reason(x, _HAVE_TRITON)
    if reason is not None:
        return reason
    if x.dtype not in ACTIVATION_DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return f"x {x.dtype} / weight {weight.dtype} are not one 16-bit float dtype"
    if weight.dim() != 2 or weight.stride(1) != 1 or weight.shape[1] != x.shape[-1]:
        return f"weight {list(weight.shape)} is not a k-contiguous [N, K] matrix for x {list(x.shape)}"
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0] or bias.stride(0) != 1):
        return f"bias {list(bias.shape)} (strides {list(bias.stride())}) is not a contiguous [N]"
    if gemv_config(1, weight.shape[0], weight.shape[1], 0, None) is None:
        return "no GEMV entry for float weights of this width"
    return None


if _HAVE_TRITON:

    # Codes to 16-bit floats in PTX, two codes per instruction: Triton's own integer ops on 8 / 16-bit elements
    # extract and repack every element (the swapped tiles' whole sm90 loop, bench/gemv_sass.py: 7.4 -> 5.3
    # instructions per int4 code byte, 7.5 -> 4.7 per int8 code; MoE T = 8 int4 304 -> 266 us, BENCHMARKS.md eighth
    # session). `$N` holds the codes of two of a thread's elements (Triton's pairing; the op is elementwise), the
    # bytes [b0, b1]; PRMT spreads them into the two 16-bit lanes [b0, 0, b1, 0] that LOP3 masks and ORs into float
    # bits. The tensor-core tiles keep Triton's ops: int8 tiles measured slower with these (T = 8 368.9 vs 327.0 us,
    # the eighth session's first swapped_tiles run).
    def _int4_pair_to_float_ptx(bits: str, one: str, bias: str, fma: str) -> str:
        # lane = BITS | nibble is BASE + v; BASE + v - (BASE + 8) is the code (exact: small integers).
        return ("{ .reg .b32 w, d, s, one, bias; cvt.u32.u16 w, $2; prmt.b32 d, w, 0, 0x4140; shr.u32 s, d, 4; "
                f"lop3.b32 d, d, 0x000F000F, {bits}, 0xEA; lop3.b32 s, s, 0x000F000F, {bits}, 0xEA; "
                f"mov.b32 one, {one}; mov.b32 bias, {bias}; {fma} $0, d, one, bias; {fma} $1, s, one, bias; }}")

    INT4_PAIR_TO_BF16_PTX = tl.constexpr(
        _int4_pair_to_float_ptx("0x43004300", "0x3F803F80", "0xC308C308", "fma.rn.bf16x2"))  # 128 + v - 136
    INT4_PAIR_TO_FP16_PTX = tl.constexpr(
        _int4_pair_to_float_ptx("0x64006400", "0x3C003C00", "0xE408E408", "fma.rn.f16x2"))  # 1024 + v - 1032
    # int8 c in bf16 (no 8-bit mantissa at ulp 1): 128 + (c & 0x7F) (bits 0x4300 | low 7) plus -(128 + (c & 0x80)),
    # the sign bit landing on the exponent's lowest bit (0xC300 is -128, 0xC380 -256): c exactly, two's complement.
    INT8_PAIR_TO_BF16_PTX = tl.constexpr(
        "{ .reg .b32 w, d, v, b, one; cvt.u32.u16 w, $1; prmt.b32 d, w, 0, 0x4140; "
        "lop3.b32 v, d, 0x007F007F, 0x43004300, 0xEA; lop3.b32 b, d, 0x00800080, 0xC300C300, 0xEA; "
        "mov.b32 one, 0x3F803F80; fma.rn.bf16x2 $0, v, one, b; }")
    # fp16 has ulp 1 up to 2048: 1024 + (c ^ 0x80), that is 1024 + c + 128, minus 1152 (0xE480).
    INT8_PAIR_TO_FP16_PTX = tl.constexpr(
        "{ .reg .b32 w, d, v, b, one; cvt.u32.u16 w, $1; prmt.b32 d, w, 0, 0x4140; "
        "lop3.b32 v, d, 0x00800080, 0x64006400, 0xBE; mov.b32 b, 0xE480E480; "
        "mov.b32 one, 0x3C003C00; fma.rn.f16x2 $0, v, one, b; }")

    @triton.jit
    def int4_codes(packed, act: tl.constexpr, ASM: tl.constexpr = False):
        """Bytes of int4 code pairs (k = 2j low nibble, 2j+1 high) -> (even-k codes, odd-k codes) as exact integers
        in the float dtype `act` (bfloat16 / float16), in two integer ops and a subtraction each (ASM: in PTX on
        two bytes at a time, `_int4_pair_to_float_ptx`)."""
        if ASM:
            if act == tl.bfloat16:
                low, high = tl.inline_asm_elementwise(asm=INT4_PAIR_TO_BF16_PTX, constraints="=r,=r,h",
                                                      args=[packed], dtype=(tl.bfloat16, tl.bfloat16),
                                                      is_pure=True, pack=2)
            else:
                tl.static_assert(act == tl.float16, "int4 codes convert to bfloat16 or float16")
                low, high = tl.inline_asm_elementwise(asm=INT4_PAIR_TO_FP16_PTX, constraints="=r,=r,h",
                                                      args=[packed], dtype=(tl.float16, tl.float16),
                                                      is_pure=True, pack=2)
            return low, high
        # Nibble v (code + 8, in [0, 15]) to a float with no arithmetic: the bits of BASE + v, where BASE is the
        # power of two whose unit in the last place is 1 (bf16 128 = 0x4300, fp16 1024 = 0x6400).
        nibbles = packed.to(tl.uint16)
        if act == tl.bfloat16:
            BITS: tl.constexpr = 0x4300
            BASE: tl.constexpr = 136.0
        else:
            BITS: tl.constexpr = 0x6400
            BASE: tl.constexpr = 1032.0
        # (BASE + v) - (BASE + 8) is the code itself, exactly (small integers), so dots chain into one accumulator.
        low = ((nibbles & 0xF) | BITS).to(act, bitcast=True) - BASE
        high = ((nibbles >> 4) | BITS).to(act, bitcast=True) - BASE
        return low, high

    @triton.jit
    def int8_codes(codes, act: tl.constexpr, ASM: tl.constexpr = False):
        """int8 codes -> the same integers in the float dtype `act` (exact: |c| <= 128); ASM: in PTX, two at a
        time (INT8_PAIR_TO_BF16_PTX / INT8_PAIR_TO_FP16_PTX)."""
        if not ASM:
            out = codes.to(act)
        elif act == tl.bfloat16:
            out = tl.inline_asm_elementwise(asm=INT8_PAIR_TO_BF16_PTX, constraints="=r,h", args=[codes],
                                            dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            tl.static_assert(act == tl.float16, "int8 codes convert to bfloat16 or float16")
            out = tl.inline_asm_elementwise(asm=INT8_PAIR_TO_FP16_PTX, constraints="=r,h", args=[codes],
                                            dtype=tl.float16, is_pure=True, pack=2)
        return out

    @triton.jit
    def swapped_codes_dot(w_ptrs, x_rows, row_ok, QUANT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                          DOT_F32: tl.constexpr, ASM: tl.constexpr, acc):
        """acc [R, BM] + w [R, BK] @ x [BM, BK]^T for one K tile: `w_ptrs` [R, BK / PACK] at the tile's int8 codes or
        int4 code pairs, `x_rows` [BM, 1] at the tile's first k of each token row."""
        act = x_rows.dtype.element_ty
        x = tl.load(x_rows + tl.arange(0, BLOCK_K)[None, :], mask=row_ok[:, None], other=0.0)
        if QUANT == 2:
            low, high = int4_codes(tl.load(w_ptrs), act, ASM)
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
            x_even = tl.trans(x_even)
            x_odd = tl.trans(x_odd)
            if DOT_F32:
                low, high = low.to(tl.float32), high.to(tl.float32)
                x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
            acc = tl.dot(high, x_odd, tl.dot(low, x_even, acc))
        else:
            w = int8_codes(tl.load(w_ptrs), act, ASM)
            x_t = tl.trans(x)
            if DOT_F32:
                w, x_t = w.to(tl.float32), x_t.to(tl.float32)
            acc = tl.dot(w, x_t, acc)
        return acc

    @triton.jit
    def swapped_k_loop(w_ptrs, x_rows, row_ok, s_rows, k0, num_k_tiles, acc, QUANT: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_SIZE: tl.constexpr,
                       PER_ROW: tl.constexpr, DOT_F32: tl.constexpr, ASM: tl.constexpr):
        """acc + w @ x^T over `num_k_tiles` K tiles from k0 (the swapped-operand tiles of `triton_moe_swapped` and
        `_swapped_matmul_kernel`): per-channel scales (PER_ROW) multiply the result once, group scales each K tile's
        partial sums, `s_rows` [R] pointing at each weight row's scales."""
        PACK: tl.constexpr = 2 if QUANT == 2 else 1
        for kk in range(0, num_k_tiles):
            k = k0 + kk * BLOCK_K
            if PER_ROW:
                acc = swapped_codes_dot(w_ptrs, x_rows + kk * BLOCK_K, row_ok, QUANT, BLOCK_K, BLOCK_M, DOT_F32, ASM,
                                        acc)
            else:
                part = swapped_codes_dot(w_ptrs, x_rows + kk * BLOCK_K, row_ok, QUANT, BLOCK_K, BLOCK_M, DOT_F32, ASM,
                                         tl.zeros(acc.shape, dtype=tl.float32))
                acc += part * tl.load(s_rows + k // GROUP_SIZE).to(tl.float32)[:, None]
            w_ptrs += BLOCK_K // PACK
        if PER_ROW:
            acc = acc * tl.load(s_rows).to(tl.float32)[:, None]
        return acc

    @triton.jit
    def codes_dot(
        x_rows,  # [BM, 1] pointers at the tile's first k of each activation row
        row_ok,  # [BM, 1]
        k_left,  # K elements left from the tile's first k (a ragged last tile when < BLOCK_K)
        stride_xk,
        w_ptrs,  # [BK, BN] int8 codes, or [BK/2, BN] bytes of int4 code pairs (k = 2j low nibble, 2j+1 high)
        QUANT: tl.constexpr,  # 1 int8, 2 int4
        BLOCK_K: tl.constexpr,
        MASKED: tl.constexpr,  # the tile may be ragged
        DOT_F32: tl.constexpr,
        acc,  # [BM, BN] float32: the result is acc + the tile's sum
        w_scale,  # [1, BN] scales of the tile's group in the activation dtype (read only when SCALED)
        SCALED: tl.constexpr,  # the codes times w_scale, rounded to the activation dtype, are the dot's operand
    ):
        """acc + the sum over the tile's k of x[m, k] * w[k, n], in float32 [BM, BN], the dots accumulating straight
        into acc (the MMA's own accumulator: no per-tile arithmetic on the [BM, BN] partial sums). w is the integer
        code itself (|code| <= 127 is exact in bf16/fp16), the caller then applying per-channel scales to acc once;
        or, SCALED, the code times its group's scale rounded to the activation dtype, the very weight the CPU
        reference multiplies. int4 nibbles become exact codes in two integer ops and a subtraction and are never
        interleaved: the low nibbles (even k) multiply the even activation columns and the high nibbles the odd ones,
        two dots of BK/2 (interleaving them back into k order for one dot measured the same or slower). Only
        float16/bfloat16 activations (the float32 interpreter path upcasts after the bit trick)."""
        act = x_rows.dtype.element_ty
        if QUANT == 1:
            kk = tl.arange(0, BLOCK_K)
            if MASKED:
                a = tl.load(x_rows + kk[None, :] * stride_xk, mask=row_ok & (kk[None, :] < k_left), other=0.0)
                codes = tl.load(w_ptrs, mask=kk[:, None] < k_left, other=0)
            else:
                a = tl.load(x_rows + kk[None, :] * stride_xk, mask=row_ok, other=0.0)
                codes = tl.load(w_ptrs)
            b = codes.to(act)
            if SCALED:
                b = b * w_scale
            if DOT_F32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            part = tl.dot(a, b, acc)
        else:
            # Activations loaded contiguously and split into even / odd k in registers (a small [BM, BK] tile).
            kk = tl.arange(0, BLOCK_K)
            if MASKED:
                a = tl.load(x_rows + kk[None, :] * stride_xk, mask=row_ok & (kk[None, :] < k_left), other=0.0)
                j = tl.arange(0, BLOCK_K // 2)
                packed = tl.load(w_ptrs, mask=2 * j[:, None] < k_left, other=0x88)
            else:
                a = tl.load(x_rows + kk[None, :] * stride_xk, mask=row_ok, other=0.0)
                packed = tl.load(w_ptrs)
            low, high = int4_codes(packed, act)
            if SCALED:
                low = low * w_scale
                high = high * w_scale
            a_even, a_odd = tl.split(tl.reshape(a, (a.shape[0], BLOCK_K // 2, 2)))
            if DOT_F32:
                a_even, a_odd = a_even.to(tl.float32), a_odd.to(tl.float32)
                low, high = low.to(tl.float32), high.to(tl.float32)
            part = tl.dot(a_odd, high, tl.dot(a_even, low, acc))
        return part

    @triton.jit
    def gemv_load(
        x_row,  # pointer at the tile's first k of the one activation row
        k_left,  # K elements left from the tile's first k
        w_ptrs,  # [BN, ...] float or int8 weights, or bytes of int4 code pairs; k contiguous
        k_idx,  # [...] tile-relative k of each column of w_ptrs (int4: of its low nibble): `gemv_code_index` * PACK
        QUANT: tl.constexpr,  # 0 float, 1 int8, 2 int4
        MASKED: tl.constexpr,  # the tile may be ragged
        GROUPS: tl.constexpr,  # the tile's shape: [BN, BK/PACK] (1) or [BN, GROUPS, BK/GROUPS/PACK]
    ):
        """One GEMV tile's loads, issued and not yet used: (weights or codes as stored, x at k_idx, x at k_idx + 1
        for int4 (else x again)), x shaped [1, ...] against the tile. Apart from `gemv_products` so that a kernel
        can issue the next tile's loads before it multiplies this one. x is loaded in the rank of `k_idx` and only
        then given its leading axis: loaded as a [1, ...] tensor it got a layout of its own and a shared-memory
        conversion per tile (int8 / int4 GEMVs 15-28% slower, measured)."""
        codes = gemv_load_codes(k_left, w_ptrs, k_idx, QUANT, MASKED, GROUPS)
        x_a, x_b = gemv_load_x(x_row, k_left, k_idx, QUANT, MASKED, GROUPS)
        return codes, x_a, x_b

    @triton.jit
    def gemv_load_codes(k_left, w_ptrs, k_idx, QUANT: tl.constexpr, MASKED: tl.constexpr, GROUPS: tl.constexpr):
        """`gemv_load`'s weight (or code) tile alone."""
        if MASKED:
            if QUANT == 2:
                codes = tl.load(w_ptrs, mask=gemv_lead(k_idx < k_left, GROUPS), other=0x88)
            else:
                codes = tl.load(w_ptrs, mask=gemv_lead(k_idx < k_left, GROUPS), other=0)
        else:
            codes = tl.load(w_ptrs)
        return codes

    @triton.jit
    def gemv_load_x(x_row, k_left, k_idx, QUANT: tl.constexpr, MASKED: tl.constexpr, GROUPS: tl.constexpr):
        """`gemv_load`'s activations alone: (x at k_idx, x at k_idx + 1 for int4, else x again), shaped [1, ...]."""
        if MASKED:
            x_a = tl.load(x_row + k_idx, mask=k_idx < k_left, other=0.0)
        else:
            x_a = tl.load(x_row + k_idx)
        if QUANT == 2:
            if MASKED:
                x_b = tl.load(x_row + k_idx + 1, mask=k_idx + 1 < k_left, other=0.0)
            else:
                x_b = tl.load(x_row + k_idx + 1)
        else:
            x_b = x_a
        return gemv_lead(x_a, GROUPS), gemv_lead(x_b, GROUPS)

    @triton.jit
    def gemv_products(codes, x_a, x_b, QUANT: tl.constexpr):
        """Products x[k] * w[n, k] of one activation row with a weight tile (`gemv_load`'s), float32 in the tile's
        shape (int4: the even and odd k of a byte already added), on the CUDA cores. The caller accumulates these
        tiles elementwise and reduces over k once, after its K loop: a reduction per tile would cross warps (shared
        memory and a barrier) on every step. The weight tile goes from memory straight into registers, no
        shared-memory round trip into a dot-operand layout (what bounds the tensor-core path with only a row or two
        to multiply). Quantized codes stay unscaled. int4: a nibble v becomes the float32 2^23 + v by OR-ing it into
        the exponent bits of 2^23 (no int-to-float conversion), and one subtraction of 2^23 + 8 leaves the signed
        code."""
        if QUANT == 2:
            bits = codes.to(tl.int32)
            low = ((bits & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            high = ((bits >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            prod = low * x_a.to(tl.float32) + high * x_b.to(tl.float32)
        else:
            if QUANT == 1:  # the same exponent trick: the byte of code c, XOR 0x80, is c + 128 in [0, 255]
                bits = (codes.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x80) | 0x4B000000
                wf = bits.to(tl.float32, bitcast=True) - 8388736.0
            else:
                wf = codes.to(tl.float32)
            prod = wf * x_a.to(tl.float32)
        return prod

    # A GEMV tile is [BLOCK_N, BLOCK_K / PACK] code elements, or, when scale groups are narrower than the K tile,
    # [BLOCK_N, GROUPS, BLOCK_K / GROUPS / PACK]: one scale per (row, group) then multiplies a whole trailing row
    # of products (a broadcast, no per-element scale gather), and the K tile is not capped at the group size (a
    # 128-wide group would leave 64 bytes per row and step in flight). The helpers below shape both cases.

    @triton.jit
    def gemv_code_index(BLOCK_K: tl.constexpr, PACK: tl.constexpr, GROUPS: tl.constexpr):
        """Tile-relative index of each code element (a byte of int4 pairs): [BK/PACK] or [GROUPS, BK/GROUPS/PACK]
        (group g's elements at g * BK/GROUPS/PACK + j), contiguous along the last axis so that the weight loads
        vectorize (an index derived as k // PACK would not be provably contiguous). Its k is PACK times it."""
        if GROUPS == 1:
            idx = tl.arange(0, BLOCK_K // PACK)
        else:
            WIDTH: tl.constexpr = BLOCK_K // GROUPS // PACK
            idx = tl.arange(0, GROUPS)[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :]
        return idx

    @triton.jit
    def gemv_lead(v, GROUPS: tl.constexpr):
        """A per-column tensor ([BK/PACK] or [GROUPS, ...]) given the tile's leading row axis: [1, ...]."""
        if GROUPS == 1:
            lead = v[None, :]
        else:
            lead = v[None, :, :]
        return lead

    @triton.jit
    def gemv_rows(v, GROUPS: tl.constexpr):
        """A per-row vector [BN] shaped against a tile: [BN, 1] or [BN, 1, 1]."""
        if GROUPS == 1:
            rows = v[:, None]
        else:
            rows = v[:, None, None]
        return rows

    @triton.jit
    def gemv_group_scales(s_rows, k0, k_left, GROUP_SIZE: tl.constexpr, GROUPS: tl.constexpr, MASKED: tl.constexpr):
        """float32 scales of the tile starting at k0, shaped to multiply its products: [BN, 1] (the tile inside one
        group) or [BN, GROUPS, 1]. `s_rows` [BN] points at each row's first scale."""
        if GROUPS == 1:
            scales = tl.load(s_rows + k0 // GROUP_SIZE).to(tl.float32)[:, None]
        else:
            g = tl.arange(0, GROUPS)
            ptrs = s_rows[:, None] + (k0 // GROUP_SIZE + g)[None, :]
            if MASKED:  # groups past K: their products are 0, their scales are not read
                scales = tl.load(ptrs, mask=(g * GROUP_SIZE < k_left)[None, :], other=0.0).to(tl.float32)[:, :, None]
            else:
                scales = tl.load(ptrs).to(tl.float32)[:, :, None]
        return scales

    @triton.jit
    def gemv_reduce(acc, GROUPS: tl.constexpr):
        """The elementwise accumulator summed over k: [BN]."""
        if GROUPS == 1:
            out = tl.sum(acc, axis=1)
        else:
            out = tl.sum(tl.sum(acc, axis=2), axis=1)
        return out

    @triton.jit
    def gemv_accumulate(
        acc,  # the elementwise float32 accumulator, in the tile's shape
        x_row,  # pointer at x[k_first] of the one activation row
        w_ptrs,  # the weight tile's pointers at k_first
        k_idx,  # `gemv_code_index` * PACK
        s_rows,  # [BN] pointers at each row's first scale (unused unless SCALED)
        k_first,  # the span's first k (its scales' group index is counted from here)
        k_len,  # the span's length: ceil(k_len / BLOCK_K) tiles
        QUANT: tl.constexpr,
        GROUP_SIZE: tl.constexpr,
        GROUPS: tl.constexpr,
        SCALED: tl.constexpr,  # group scales multiply each tile's products (else per-row scales come later)
        PREFETCH: tl.constexpr,  # issue tile kk + 1's loads before tile kk is multiplied: two tiles in flight
        MASKED: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """`acc` plus the products of one activation row with the weight columns [k_first, k_first + k_len), tile by
        tile (`gemv_load` / `gemv_products`): the K loop of the GEMV kernels (`_gemv_kernel`, the MoE down GEMV)."""
        PACK: tl.constexpr = 2 if QUANT == 2 else 1
        num_tiles = tl.cdiv(k_len, BLOCK_K)
        if PREFETCH:
            codes, x_a, x_b = gemv_load(x_row, k_len, w_ptrs, k_idx, QUANT, MASKED, GROUPS)
            if SCALED:
                scales = gemv_group_scales(s_rows, k_first, k_len, GROUP_SIZE, GROUPS, MASKED)
            for kk in range(0, num_tiles):
                rel_next = tl.minimum(kk + 1, num_tiles - 1) * BLOCK_K  # the last step reloads its own tile (cached)
                left = k_len - rel_next
                next_codes, next_a, next_b = gemv_load(x_row + rel_next, left, w_ptrs + rel_next // PACK, k_idx, QUANT,
                                                       MASKED, GROUPS)
                if SCALED:
                    next_scales = gemv_group_scales(s_rows, k_first + rel_next, left, GROUP_SIZE, GROUPS, MASKED)
                    acc += gemv_products(codes, x_a, x_b, QUANT) * scales
                    scales = next_scales
                else:
                    acc += gemv_products(codes, x_a, x_b, QUANT)
                codes, x_a, x_b = next_codes, next_a, next_b
        else:
            for kk in range(0, num_tiles):
                rel = kk * BLOCK_K
                codes, x_a, x_b = gemv_load(x_row + rel, k_len - rel, w_ptrs + rel // PACK, k_idx, QUANT, MASKED,
                                            GROUPS)
                if SCALED:
                    acc += gemv_products(codes, x_a, x_b, QUANT) * gemv_group_scales(
                        s_rows, k_first + rel, k_len - rel, GROUP_SIZE, GROUPS, MASKED)
                else:
                    acc += gemv_products(codes, x_a, x_b, QUANT)
        return acc

    @triton.jit
    def _gemv_kernel(
        x_ptr,  # [1, K]
        w_ptr,  # [N, K] float or int8, or [N, K/2] uint8
        s_ptr,  # [N, G]
        bias_ptr,
        out_ptr,  # [1, N]
        N,
        K,
        stride_wn,
        stride_sn,
        GROUP_SIZE: tl.constexpr,
        QUANT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        PER_ROW: tl.constexpr = False,
        GROUPS: tl.constexpr = 1,  # scale groups per K tile (> 1: groups narrower than BLOCK_K)
        PREFETCH: tl.constexpr = False,  # issue the next K tile's loads before multiplying this one
        USE_PDL: tl.constexpr = False,  # PDL launch (triton_support.pdl_launch)
    ):
        """`_quantized_matmul_kernel` for one decode row: `gemv_accumulate` on the CUDA cores, no tensor cores.
        Without PREFETCH the first K tile's weights are loaded before the wait for the activation's producer: they are
        no predecessor's output, so under PDL the load is in flight while the norm or attention before it runs."""
        pid_n = tl.program_id(0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_n_ld = offs_n % N
        PACK: tl.constexpr = 2 if QUANT == 2 else 1
        code_idx = gemv_code_index(BLOCK_K, PACK, GROUPS)
        k_idx = code_idx * PACK
        w_ptrs = w_ptr + gemv_rows(offs_n_ld.to(tl.int64) * stride_wn, GROUPS) + gemv_lead(code_idx, GROUPS)
        s_rows = s_ptr + offs_n_ld.to(tl.int64) * stride_sn
        acc = tl.zeros(w_ptrs.shape, dtype=tl.float32)
        SCALED: tl.constexpr = QUANT != 0 and not PER_ROW
        if PREFETCH:
            wait_for_producers(USE_PDL)
            acc = gemv_accumulate(acc, x_ptr, w_ptrs, k_idx, s_rows, 0, K, QUANT, GROUP_SIZE, GROUPS, SCALED, True,
                                  not EVEN_K, BLOCK_K)
        else:
            first = gemv_load_codes(K, w_ptrs, k_idx, QUANT, not EVEN_K, GROUPS)
            wait_for_producers(USE_PDL)
            x_a, x_b = gemv_load_x(x_ptr, K, k_idx, QUANT, not EVEN_K, GROUPS)
            if SCALED:
                acc += gemv_products(first, x_a, x_b, QUANT) * gemv_group_scales(s_rows, 0, K, GROUP_SIZE, GROUPS,
                                                                                 not EVEN_K)
            else:
                acc += gemv_products(first, x_a, x_b, QUANT)
            acc = gemv_accumulate(acc, x_ptr + BLOCK_K, w_ptrs + BLOCK_K // PACK, k_idx, s_rows, BLOCK_K, K - BLOCK_K,
                                  QUANT, GROUP_SIZE, GROUPS, SCALED, False, not EVEN_K, BLOCK_K)
        out = gemv_reduce(acc, GROUPS)
        if QUANT != 0:
            if PER_ROW:
                out = out * tl.load(s_rows).to(tl.float32)
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n_ld).to(tl.float32)
        tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)

    @triton.jit
    def _quantized_matmul_kernel(
        x_ptr,  # [M, K]
        w_ptr,  # [N, K] float or int8, or [N, K/2] uint8
        s_ptr,  # [N, G]
        bias_ptr,  # [N] or a dummy
        out_ptr,  # [M, N]
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_sn,
        stride_om,
        GROUP_SIZE: tl.constexpr,  # a multiple of BLOCK_K: every K tile lies inside one group (unused: PER_ROW)
        QUANT: tl.constexpr,  # 0 float weights, 1 int8, 2 int4
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        DOT_F32: tl.constexpr,
        PER_ROW: tl.constexpr = False,  # one scale per output channel: applied once, in the epilogue
        USE_PDL: tl.constexpr = False,  # PDL launch (triton_support.pdl_launch)
        SCALE_WEIGHTS: tl.constexpr = False,  # grouped: scale the weight tile (see `scale_weights`)
    ):
        wait_for_producers(USE_PDL)
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_n_ld = offs_n % N  # wrap instead of masking: loads stay unmasked; wrapped columns are not stored
        row_ok = offs_m < M
        offs_k = tl.arange(0, BLOCK_K)
        PACK: tl.constexpr = 2 if QUANT == 2 else 1
        offs_kw = tl.arange(0, BLOCK_K // PACK)
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        w_ptrs = w_ptr + offs_n_ld.to(tl.int64)[None, :] * stride_wn + offs_kw[:, None]
        s_cols = s_ptr + offs_n_ld.to(tl.int64)[None, :] * stride_sn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            k0 = kk * BLOCK_K
            if QUANT == 0:
                if EVEN_K:
                    a = tl.load(x_rows + k0 + offs_k[None, :], mask=row_ok[:, None], other=0.0)
                    b = tl.load(w_ptrs)
                else:
                    a = tl.load(x_rows + k0 + offs_k[None, :], mask=row_ok[:, None] & (offs_k[None, :] < K - k0),
                                other=0.0)
                    b = tl.load(w_ptrs, mask=offs_k[:, None] < K - k0, other=0.0)
                if DOT_F32:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc)
            else:
                if PER_ROW:  # the dots accumulate straight into acc; the scales multiply it once, at the end
                    acc = codes_dot(x_rows + k0, row_ok[:, None], K - k0, 1, w_ptrs, QUANT, BLOCK_K, not EVEN_K,
                                    DOT_F32, acc, s_cols, False)
                elif SCALE_WEIGHTS:  # group scales on the [BK, BN] weights: fewer than BM x BN partial sums
                    acc = codes_dot(x_rows + k0, row_ok[:, None], K - k0, 1, w_ptrs, QUANT, BLOCK_K, not EVEN_K,
                                    DOT_F32, acc, tl.load(s_cols + k0 // GROUP_SIZE), True)
                else:
                    part = codes_dot(x_rows + k0, row_ok[:, None], K - k0, 1, w_ptrs, QUANT, BLOCK_K, not EVEN_K,
                                     DOT_F32, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), s_cols, False)
                    acc += part * tl.load(s_cols + k0 // GROUP_SIZE).to(tl.float32)
            w_ptrs += BLOCK_K // PACK
        if QUANT != 0:
            if PER_ROW:
                acc = acc * tl.load(s_cols).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n_ld).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))

    @triton.jit
    def _swapped_matmul_kernel(
        x_ptr,  # [M, K]
        w_ptr,  # [N, K] int8, or [N, K/2] uint8 int4 code pairs
        s_ptr,  # [N, G]
        bias_ptr,  # [N] or a dummy
        out_ptr,  # [M, N]
        M,
        N,
        K,  # a multiple of BLOCK_K
        stride_xm,
        stride_wn,
        stride_sn,
        stride_om,
        GROUP_SIZE: tl.constexpr,  # a multiple of BLOCK_K (unused: PER_ROW)
        QUANT: tl.constexpr,  # 1 int8, 2 int4
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,  # activation rows: the MMA's N side
        BLOCK_N: tl.constexpr,  # weight rows (output columns): the MMA's M side
        BLOCK_K: tl.constexpr,
        DOT_F32: tl.constexpr,
        PER_ROW: tl.constexpr = False,
        USE_PDL: tl.constexpr = False,  # PDL launch (triton_support.pdl_launch)
        ASM: tl.constexpr = False,  # codes to floats in PTX (triton_support.codes_in_ptx)
    ):
        # out^T tile [BN, BM] = w [BN, K] @ x [BM, K]^T: the dequantized codes are the MMA's register operand (see
        # triton_moe_swapped, whose expert tiles this is the dense case of).
        wait_for_producers(USE_PDL)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < M
        w_rows = (offs_n % N).to(tl.int64)  # wrap instead of masking; wrapped columns are not stored
        PACK: tl.constexpr = 2 if QUANT == 2 else 1
        acc = swapped_k_loop(w_ptr + w_rows[:, None] * stride_wn + tl.arange(0, BLOCK_K // PACK)[None, :],
                             x_ptr + tl.where(row_ok, offs_m, 0).to(tl.int64)[:, None] * stride_xm, row_ok,
                             s_ptr + w_rows * stride_sn, 0, K // BLOCK_K,
                             tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), QUANT, BLOCK_K, BLOCK_M, GROUP_SIZE,
                             PER_ROW, DOT_F32, ASM)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + w_rows).to(tl.float32)[:, None]
        out_ptrs = out_ptr + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[None, :] & (offs_n[:, None] < N))


@dataclass(frozen=True)
class LinearConfig:
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    words: int = 0  # > 0: the GEMV on 32-bit code words, this many per thread and row (triton_gemv_words; its K
    # tile follows from warps and words; block_k is the byte kernel's, for operands that are not whole words)


# (max M, config). Decode rows stream the weight: 32-column tiles put even a [1024, 4096] projection on 32 programs
# per 1024 columns and the [32000, 4096] lm_head on 1000; 256-wide K tiles with 4 stages keep ~32 KB in flight per SM.
# Prefill rows are tensor-core tiles.
LINEAR_TABLE: list[tuple[int, LinearConfig]] = [
    (16, LinearConfig(16, 32, 256, 4, 4)),
    (32, LinearConfig(32, 32, 256, 4, 4)),
    (64, LinearConfig(64, 32, 128, 4, 4)),
    (256, LinearConfig(64, 128, 64, 4, 4)),
    (1 << 62, LinearConfig(128, 128, 64, 8, 3)),
]


# One decode row on the CUDA cores (`_gemv_kernel`) instead of the tensor-core tiles above: (precision, grouped) ->
# (max N, config) for M = 1; wider outputs, and M > 1, stay on the tiles. For the GEMV, `stages` 2 means the next K
# tile's loads are issued before this one is multiplied (PREFETCH; Triton's own pipeliner does not apply: the loads
# feed no dot); `words` > 0 runs triton_gemv_words instead. Measured with bench/quantized_kernels.py --sweep on the
# H200 (BENCHMARKS.md, fourth and fifth sessions): M = 1,
# qkv 6144x4096 / o 4096x4096 / lm_head 32000x4096, in a CUDA graph with PDL.
GEMV_TABLE: dict[tuple[str | None, bool], tuple[int, LinearConfig]] = {
    (None, False): (1 << 30, LinearConfig(1, 8, 512, 4, 1)),  # bf16: 14.0 / 11.3 / 63.4 us vs cuBLAS 17.9 / 12.7 / 64.3
    # int8 / int4 on 32-bit words (triton_gemv_words; fifth session; per decode step 32 * (qkv + o) + lm_head):
    # int8, 2 per thread: 9.7 / 7.2 / 35.0 us vs the byte GEMV 8.9 / 8.7 and the lm_head's tiles 38.1;
    # int4, 4 per thread: 7.8 / 5.3 / 24.0 vs the byte GEMV 10.2 / 7.4 / 42.6;
    # int4 g128, 2 per thread: 7.2 / 6.8 / 28.6 vs 13.2 / 9.0 / 56.2. Grouped int8 was not swept on words.
    # tenth session (int8 products without a per-code subtraction, same sweep): 4 words per thread and 4-row
    # programs, qkv / o / lm_head-sized 8.2 / 6.2 / 33.2 us vs 8.7 / 6.9 / 33.7 with 2 words on 8 rows (tiles 38.1)
    ("int8", False): (1 << 30, LinearConfig(1, 4, 512, 4, 1, words=4)),
    ("int8", True): (16384, LinearConfig(1, 16, 512, 8, 2)),  # 8.9 / 8.8 us vs tiles 12.3 / 9.3 (lm_head: tiles)
    ("int4", False): (1 << 30, LinearConfig(1, 4, 512, 2, 1, words=4)),
    ("int4", True): (1 << 30, LinearConfig(1, 8, 512, 4, 1, words=2)),
}


# Weight-only rows above the GEMV's one and up to a few dozen: the swapped-operand tiles (`_swapped_matmul_kernel`;
# block_m activation rows, block_n weight rows per program). (precision, grouped) -> [(max M, config or None for
# the ordinary tiles)]. Measured on an H200 (bench/swapped_tiles.py, BENCHMARKS.md seventh session), qkv 6144x4096 /
# o 4096x4096 at M = 32: int4 19.3 / 18.7 us vs the tiles' 38.9 / 22.4, g128 19.6 / 19.2 vs 42.0 / 26.7; at M = 8
# the tiles win per qkv + o pair (int4 25.7 us vs 27.1 for the best swapped pair, whose qkv alone is faster: 13.6 vs
# 15.3), and int8 is faster on the tiles at both (M = 32, qkv: 17.4 vs 18.5). Eighth session, codes converted in PTX
# (triton_support.codes_in_ptx): int4 per channel on 16-row, 256-deep tiles at M = 32 17.1 / 11.6 us against the
# 32x64 tiles' 17.6 / 17.1, at M = 8 11.6 / 11.3 against the ordinary tiles' 15.3 / 10.4 (g128 groups cannot take
# 256-deep K tiles; at M = 8 their best swapped pair, 28.2 us, ties the tiles' 27.9).
# Each row: (max M, the configs to try in order, the first whose K tiles K fits; None: the ordinary tiles). A K that
# is a multiple of 128 but not of 256 takes what the row falls back to: the seventh session's choice there.
_INT4_SWAPPED_LINEAR = LinearConfig(32, 64, 128, 4, 4)
_INT4_SWAPPED_LINEAR_K256 = LinearConfig(16, 64, 256, 4, 3)
SWAPPED_LINEAR_TABLE: dict[tuple[str, bool], list[tuple[int, tuple[LinearConfig | None, ...]]]] = {
    ("int4", False): [(16, (_INT4_SWAPPED_LINEAR_K256, None)), (32, (_INT4_SWAPPED_LINEAR_K256, _INT4_SWAPPED_LINEAR)),
                      (64, (_INT4_SWAPPED_LINEAR,))],
    ("int4", True): [(16, (None,)), (64, (_INT4_SWAPPED_LINEAR,))],
}


def swapped_linear_reason(k: int, group_size: int, cfg: LinearConfig, precision: str = "int8") -> str | None:
    """Why `cfg`'s swapped tiles cannot take K = `k` features of `precision` codes in groups of `group_size`, or
    None. Every dot dimension is at least 16 (int4 dots are half a K tile deep)."""
    if min(cfg.block_m, cfg.block_n, cfg.block_k // (2 if precision == "int4" else 1)) < 16:
        return f"tiles {cfg.block_m}x{cfg.block_n}x{cfg.block_k} have a dot dimension under 16"
    if k % cfg.block_k:
        return f"K={k} is not a multiple of the K tile {cfg.block_k}"
    if group_size and group_size % cfg.block_k:
        return f"group size {group_size} is not a multiple of the K tile {cfg.block_k}"
    return None


def swapped_linear_config(m: int, k: int, group_size: int, precision: str,
                          fitting: bool = True) -> LinearConfig | None:
    """The swapped tiles' config for M rows of this precision: in the first of the table's rows at or above M, the
    first config whose K tiles K fits; None where that is the ordinary tiles or none fits. Not `fitting`: the row's
    first swapped config even where K does not fit it (its reason is then the error)."""
    for max_m, options in SWAPPED_LINEAR_TABLE.get((precision, group_size > 0), []):
        if m <= max_m:
            for cfg in options:
                if cfg is None:
                    if fitting:
                        return None  # the row's choice here: the ordinary tiles
                elif swapped_linear_reason(k, group_size, cfg, precision) is None:
                    return cfg
            return None if fitting else next((cfg for cfg in options if cfg is not None), None)
    return None


def gemv_config(m: int, n: int, k: int, group_size: int, precision: str | None) -> LinearConfig | None:
    """The CUDA-core config for M rows of this precision, or None where the tensor-core tiles are used. A K tile
    wider than a group holds whole groups (`tile_groups`); one narrower lies inside one."""
    entry = GEMV_TABLE.get((precision, group_size > 0))
    if m != 1 or entry is None or n > entry[0]:
        return None
    cfg = entry[1]
    block_k = min(cfg.block_k, max(32, _next_pow2(k)))
    if group_size and block_k > group_size and block_k % group_size:
        block_k = group_size
    return replace(cfg, block_n=min(cfg.block_n, max(8, _next_pow2(n))), block_k=block_k)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def linear_config(m: int, n: int, k: int, group_size: int, precision: str | None = None) -> LinearConfig:
    cfg = next(entry for max_m, entry in LINEAR_TABLE if m <= max_m)
    block_k = min(cfg.block_k, max(32, _next_pow2(k)))
    if precision == "int4" and m > 16:  # the nibble planes and both activation halves live in registers
        block_k = min(block_k, 128)
    if group_size:  # every K tile lies inside one group: one scale per column and tile
        block_k = min(block_k, group_size)
    return LinearConfig(cfg.block_m, min(cfg.block_n, max(16, _next_pow2(n))), block_k, cfg.warps, cfg.stages)


def quantized_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    precision: str,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: LinearConfig | None = None,
    kernel: str | None = None,
) -> torch.Tensor:
    """``x [..., K] @ dequantize(qweight, scales).T (+ bias)`` -> [..., N] in x's dtype; the weight stays compact.

    `kernel` None lets the tables choose (`GEMV_TABLE` for one decode row, `SWAPPED_LINEAR_TABLE` for a few
    dozen, else `LINEAR_TABLE`; a `config` without `kernel` is the tiles' or the GEMV's); "gemv" / "swapped" / "tiles"
    forces one (with `config`, the benchmark's sweep). No host synchronisation and shape-only allocations:
    capturable in a CUDA graph."""
    if not _HAVE_TRITON:
        raise RuntimeError("quantized_matmul needs triton")
    reason = unsupported_reason(x, qweight, scales, precision)
    if reason is not None:
        raise TypeError(reason)
    lead, k = x.shape[:-1], x.shape[-1]
    n = qweight.shape[0]
    packing = 2 if precision == "int4" else 1
    if qweight.dim() != 2 or qweight.shape[1] * packing != k:
        raise ValueError(f"{precision} weight {list(qweight.shape)} does not fit inputs of {k} features")
    if group_size and k % group_size:
        raise ValueError(f"group_size={group_size} does not divide the input features {k}")
    groups = 1 if group_size == 0 else k // group_size
    if tuple(scales.shape) != (n, groups):
        raise ValueError(f"scales {list(scales.shape)} are not [{n}, {groups}]")
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    w = qweight if qweight.stride(1) == 1 else qweight.contiguous()
    s = scales if scales.stride(1) == 1 else scales.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    if kernel not in (None, "gemv", "tiles", "swapped"):
        raise ValueError(f"kernel {kernel!r} is not 'gemv', 'tiles' or 'swapped'")
    gemv = gemv_config(m, n, k, group_size, precision) if kernel is None else None
    if kernel == "gemv" or gemv is not None:
        if config is None and gemv is None:
            raise ValueError(f"no GEMV config for {m} rows of {precision}: pass one")
        _launch_gemv(x2, w, s, bias, out, QUANT_CODES[precision], group_size, config or gemv)
        return out.reshape(*lead, n)
    swapped = swapped_linear_config(m, k, group_size, precision) if kernel is None and config is None else None
    if kernel == "swapped":
        swapped = config or swapped_linear_config(m, k, group_size, precision, fitting=False)
        reason = "no swapped config for these rows: pass one" if swapped is None else swapped_linear_reason(
            k, group_size, swapped, precision)
        if reason is not None:
            raise ValueError(f"the swapped tiles cannot take {m} rows of {precision} {list(qweight.shape)}: {reason}")
    if swapped is not None:
        _swapped_matmul_kernel[(triton.cdiv(n, swapped.block_n), triton.cdiv(m, swapped.block_m))](
            x2, w, s, bias if bias is not None else s, out, m, n, k, x2.stride(0), w.stride(0), s.stride(0),
            out.stride(0), GROUP_SIZE=group_size or k, QUANT=QUANT_CODES[precision], HAS_BIAS=bias is not None,
            BLOCK_M=swapped.block_m, BLOCK_N=swapped.block_n, BLOCK_K=swapped.block_k,
            DOT_F32=x.dtype == torch.bfloat16 and interpreting(), PER_ROW=group_size == 0, ASM=codes_in_ptx(),
            **pdl_launch(x), num_warps=swapped.warps, num_stages=swapped.stages)
        return out.reshape(*lead, n)
    cfg = config if config is not None else linear_config(m, n, k, group_size, precision)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))
    _quantized_matmul_kernel[grid](
        x2,
        w,
        s,
        bias if bias is not None else s,
        out,
        m,
        n,
        k,
        x2.stride(0),
        w.stride(0),
        s.stride(0),
        out.stride(0),
        GROUP_SIZE=group_size or k,
        PER_ROW=group_size == 0,
        QUANT=QUANT_CODES[precision],
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        EVEN_K=k % cfg.block_k == 0,
        DOT_F32=x.dtype == torch.bfloat16 and interpreting(),
        SCALE_WEIGHTS=scale_weights(group_size, cfg.block_m, cfg.block_k),
        **pdl_launch(x), num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
    return out.reshape(*lead, n)


def _launch_gemv(x2: torch.Tensor, w: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                 quant: int, group_size: int, cfg: LinearConfig) -> None:
    m, k = x2.shape
    n = out.shape[1]
    if m != 1:
        raise ValueError(f"the GEMV kernel takes one row, not {m}")
    if cfg.words and words_unsupported_reason(x2, w, k, quant, group_size) is None:
        launch_gemv_words(x2, w, s, bias, out, quant, group_size, cfg.block_n, cfg.warps, cfg.words)
        return
    # Byte tiles: float weights, and codes or activations not laid out as whole 32-bit words.
    block_k = cfg.block_k
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x2, w, s, bias if bias is not None else s, out, n, k, w.stride(0), s.stride(0),
        GROUP_SIZE=group_size or k, QUANT=quant, HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        PER_ROW=group_size == 0, GROUPS=tile_groups(block_k, group_size), PREFETCH=cfg.stages >= 2,
        **pdl_launch(x2), num_warps=cfg.warps, num_stages=1,
    )


def scale_weights(group_size: int, block_m: int, block_k: int) -> bool:
    """Whether a grouped tile kernel scales its [BK, BN] weight tile (codes times their group's scale, rounded to the
    activation dtype, as the CPU reference does) or its [BM, BN] partial sums (codes unscaled, `acc += part *
    scale` per K tile): the weights when the tile has at least as many rows as K. Measured on the int4 g128 experts
    (H200, 2026-12-03, BENCHMARKS.md): weights scaled at T = 256 / 2048 (64 / 128-row tiles, BK 64) 1252 / 5021 us
    against 1728 / 8745; partial sums scaled at T = 8 / 32 (16 / 32 rows, BK 128) 355 / 541 us against 547 / 769."""
    return group_size > 0 and block_m >= block_k


def tile_groups(block_k: int, group_size: int) -> int:
    """Scale groups per K tile of the GEMV kernels: 1 for per-channel scales or a tile inside one group, else
    BLOCK_K / group_size (both powers of two: the tile then holds whole groups)."""
    if not group_size or block_k <= group_size:
        return 1
    if block_k % group_size:
        raise ValueError(f"a {block_k}-wide K tile does not hold whole groups of {group_size}")
    return block_k // group_size


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: LinearConfig | None = None, kernel: str | None = None) -> torch.Tensor:
    """``x [..., K] @ weight [N, K].T (+ bias)`` with float weights on the same kernels (QUANT 0): the tensor-core
    tiles, or with `kernel="gemv"` the CUDA-core GEMV of one row, which `moec.linear` runs on CUDA for a decode row
    (it streams a bf16 weight faster than cuBLAS does at M = 1, BENCHMARKS.md)."""
    if not _HAVE_TRITON:
        raise RuntimeError("linear needs triton")
    if x.dtype not in ACTIVATION_DTYPES or weight.dtype != x.dtype or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise TypeError(f"x {x.dtype}{list(x.shape)} and weight {weight.dtype}{list(weight.shape)} do not fit")
    lead, k = x.shape[:-1], x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    if kernel == "gemv":
        _launch_gemv(x2, w, w, bias, out, 0, 0, config or gemv_config(m, n, k, 0, None) or LinearConfig(1, 8, 512, 4, 1))
        return out.reshape(*lead, n)
    cfg = config if config is not None else linear_config(m, n, k, 0)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))
    _quantized_matmul_kernel[grid](
        x2, w, w, bias if bias is not None else w, out, m, n, k,
        x2.stride(0), w.stride(0), 0, out.stride(0),
        GROUP_SIZE=k, QUANT=0, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
        DOT_F32=x.dtype == torch.bfloat16 and interpreting(), **pdl_launch(x), num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
    return out.reshape(*lead, n)
