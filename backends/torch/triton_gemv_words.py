"""One decode row against int8 / int4 codes read as 32-bit words (the CUDA-core GEMVs of linears and the fused MoE).

before (`triton_quant.gemv_load` / `gemv_products`): byte tiles, 16 code bytes per thread and row; every byte is
        widened on its own (extract, mask, OR under a float's exponent, subtract), and the activation row, loaded at
        stride 2 (int4) or in a layout of its own, reaches the tile's layout through shared memory with a barrier per
        tile: ~13 sm90 instructions per int4 byte, ~6 per int8 byte (bench/gemv_sass.py), 88 registers per thread
        (int4 gate/up GEMV: 5 programs per SM, DRAM 28% busy, the SMs 74%, under Nsight Compute; 2.6x / 1.27x the
        bytes floor).
after:  each thread holds WPT consecutive 32-bit words per row and K tile (WPT * 8 int4 or * 4 int8 codes: one 4, 8
        or 16-byte load), the warps side by side along K, BLOCK_K = codes per word * WPT * 32 * num_warps. The
        thread's words are split in registers and each meets a [W / WPT, 4] load of 32-bit (even, odd) activation
        pairs that lies in the split's very layout: no conversion, no barrier. A code byte becomes a float32 in one
        byte permute (PRMT) that sets it under a float's exponent bits; int4's two nibbles per byte are split by two
        masks per word first, and int4's offset of 8 is removed once per word and row (the products are of 128 + v
        and the word's partial sum starts at -136 * its eight activations), so no nibble needs a subtraction; int8
        keeps one exact subtraction per code (2^23 + c + 128 - (2^23 + 128)). ~6.5 instructions per int4 byte, ~4
        per int8 byte. One word per thread (4-byte loads) was no faster than the byte tiles: Nsight Compute put the
        memory pipeline 82% busy with DRAM at 28%; two or four words per thread are (BENCHMARKS.md, fifth session).

Numerics: float32 products and sums as in `triton_quant`; int4 partial sums are exact up to float32 rounding of
terms <= 143 * |x| (relative error ~1e-6 of a word's sum, far below the bf16 output's rounding). Which operands take
this path: `words_unsupported_reason` (others run the byte kernels); tables: `triton_quant.GEMV_TABLE`,
`moe_tuning.GEMV_TABLE` (`words` = WPT). The CPU interpreter runs the same arithmetic with shifts and masks instead
of PRMT (no inline assembly there), as compiled kernels do with `MOEC_CODE_ASM=0` (triton_support.codes_in_ptx).
"""

from __future__ import annotations

import torch

from backends.torch.triton_support import HAVE_TRITON as _HAVE_TRITON
from backends.torch.triton_support import (codes_in_ptx, combine_if_last, pdl_launch, routed_expert, tl, triton,
                                          wait_for_producers)

__all__ = ["codes_per_word", "words_block_k", "words_unsupported_reason", "word_views"]


def codes_per_word(quant: int) -> int:
    """Codes in one 32-bit word: 8 int4 nibbles (QUANT 2) or 4 int8 bytes (QUANT 1)."""
    return 8 if quant == 2 else 4


def words_block_k(quant: int, warps: int, words_per_thread: int) -> int:
    """The K tile of the word kernels: `words_per_thread` words per thread and row, the program's 32 * warps threads
    side by side along K."""
    if words_per_thread not in (1, 2, 4):
        raise ValueError(f"{words_per_thread} words per thread: 1, 2 or 4 (a 4, 8 or 16-byte load)")
    return codes_per_word(quant) * words_per_thread * 32 * warps


def words_unsupported_reason(x: torch.Tensor, codes: torch.Tensor, k: int, quant: int, group_size: int) -> str | None:
    """Why these operands cannot be read as words (None when they can): int8 / int4 codes whose rows are whole,
    4-byte aligned words, 16-bit activations whose rows are whole (even, odd) pairs, groups of whole words."""
    if quant not in (1, 2):
        return f"QUANT {quant} has no word layout"
    per_word = codes_per_word(quant)
    if k % per_word or (group_size and group_size % per_word):
        return f"K {k} / group {group_size} are not whole words of {per_word} codes"
    if x.dtype not in (torch.bfloat16, torch.float16) or x.stride(-1) != 1 or x.dim() != 2:
        return f"activations {x.dtype} {list(x.shape)} are not 16-bit rows contiguous along K"
    if x.stride(0) % 2 or x.storage_offset() % 2:
        return "activation rows do not start on a 32-bit pair"
    if codes.stride(-1) != 1 or any(s % 4 for s in codes.stride()[:-1]) or codes.storage_offset() % 4:
        return f"code strides {list(codes.stride())} are not whole 32-bit words"
    return None


def word_views(x: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as int32 (even, odd) pairs, codes as int32 words): the same bytes, as the word kernels read them."""
    return x.view(torch.int32), codes.view(torch.int32)


if _HAVE_TRITON:

    @triton.jit
    def _byte_floats(words, AT_BYTE2: tl.constexpr, ASM: tl.constexpr, AT_BYTE1: tl.constexpr = False):
        """The four bytes b_i of each uint32 word as float32: 2^23 + b_i (the bits 0x4B0000bb), or, AT_BYTE2,
        128 + b_i for b_i < 128 (the bits 0x43bb0000: b_i under the mantissa's top of 128), or, AT_BYTE1,
        2^15 + b_i (the bits 0x4700bb00: 2^15 is the smallest power of two whose mantissa step is 1 there). One PRMT
        each on GPU."""
        if ASM:
            if AT_BYTE1:
                f0, f1, f2, f3 = tl.inline_asm_elementwise(
                    asm="{ .reg .b32 m; mov.b32 m, 0x47000000; prmt.b32 $0, $4, m, 0x7604; "
                        "prmt.b32 $1, $4, m, 0x7614; prmt.b32 $2, $4, m, 0x7624; prmt.b32 $3, $4, m, 0x7634; }",
                    constraints="=r,=r,=r,=r,r", args=[words],
                    dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
            elif AT_BYTE2:
                f0, f1, f2, f3 = tl.inline_asm_elementwise(
                    asm="{ .reg .b32 m; mov.b32 m, 0x43000000; prmt.b32 $0, $4, m, 0x7044; "
                        "prmt.b32 $1, $4, m, 0x7144; prmt.b32 $2, $4, m, 0x7244; prmt.b32 $3, $4, m, 0x7344; }",
                    constraints="=r,=r,=r,=r,r", args=[words],
                    dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
            else:
                f0, f1, f2, f3 = tl.inline_asm_elementwise(
                    asm="{ .reg .b32 m; mov.b32 m, 0x4B000000; prmt.b32 $0, $4, m, 0x7440; "
                        "prmt.b32 $1, $4, m, 0x7441; prmt.b32 $2, $4, m, 0x7442; prmt.b32 $3, $4, m, 0x7443; }",
                    constraints="=r,=r,=r,=r,r", args=[words],
                    dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
        else:
            if AT_BYTE1:
                f0 = (((words & 0xFF) << 8) | 0x47000000).to(tl.float32, bitcast=True)
                f1 = ((words & 0xFF00) | 0x47000000).to(tl.float32, bitcast=True)
                f2 = (((words >> 8) & 0xFF00) | 0x47000000).to(tl.float32, bitcast=True)
                f3 = (((words >> 16) & 0xFF00) | 0x47000000).to(tl.float32, bitcast=True)
            elif AT_BYTE2:
                f0 = (((words & 0xFF) << 16) | 0x43000000).to(tl.float32, bitcast=True)
                f1 = (((words & 0xFF00) << 8) | 0x43000000).to(tl.float32, bitcast=True)
                f2 = ((words & 0xFF0000) | 0x43000000).to(tl.float32, bitcast=True)
                f3 = (((words >> 8) & 0xFF0000) | 0x43000000).to(tl.float32, bitcast=True)
            else:
                f0 = ((words & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True)
                f1 = (((words >> 8) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True)
                f2 = (((words >> 16) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True)
                f3 = ((words >> 24) | 0x4B000000).to(tl.float32, bitcast=True)
        return f0, f1, f2, f3

    @triton.jit
    def _pair_floats(pairs, FP16: tl.constexpr):
        """uint32 (even, odd) pairs of 16-bit activations as two float32 tensors."""
        if FP16:
            even = (pairs & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            odd = (pairs >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        else:  # a bf16 is the top half of its float32
            even = (pairs << 16).to(tl.float32, bitcast=True)
            odd = (pairs & 0xFFFF0000).to(tl.float32, bitcast=True)
        return even, odd

    @triton.jit
    def _word_activations(x_pairs, w_idx, k_left, PER_WORD: tl.constexpr, FP16: tl.constexpr, MASKED: tl.constexpr):
        """The activations of each word of the tile, float32 [W] each, k = PER_WORD * w + j for j < PER_WORD (int8:
        the last four are zeros, unused): one [W, PER_WORD / 2] load of pairs, split in registers."""
        PAIRS: tl.constexpr = PER_WORD // 2
        ptrs = x_pairs + w_idx[:, None] * PAIRS + tl.arange(0, PAIRS)[None, :]
        if MASKED:
            raw = tl.load(ptrs, mask=(w_idx * PER_WORD < k_left)[:, None], other=0)
        else:
            raw = tl.load(ptrs)
        raw = raw.to(tl.uint32, bitcast=True)
        if PER_WORD == 8:
            first, second = tl.split(tl.reshape(raw, (raw.shape[0], 2, 2)))  # pairs (0, 2) and (1, 3)
            p0, p2 = tl.split(first)
            p1, p3 = tl.split(second)
            x0, x1 = _pair_floats(p0, FP16)
            x2, x3 = _pair_floats(p1, FP16)
            x4, x5 = _pair_floats(p2, FP16)
            x6, x7 = _pair_floats(p3, FP16)
        else:
            p0, p1 = tl.split(raw)
            x0, x1 = _pair_floats(p0, FP16)
            x2, x3 = _pair_floats(p1, FP16)
            x4 = tl.zeros_like(x0)
            x5 = x4
            x6 = x4
            x7 = x4
        return x0, x1, x2, x3, x4, x5, x6, x7

    @triton.jit
    def _word_products(words, x0, x1, x2, x3, x4, x5, x6, x7, QUANT: tl.constexpr, ASM: tl.constexpr):
        """sum over each word's codes of code * x, float32 [BN, W] (codes unscaled)."""
        if QUANT == 2:
            low = words & 0x0F0F0F0F  # the nibbles of k = 8w + 0, 2, 4, 6 (low nibble first)
            high = (words >> 4) & 0x0F0F0F0F  # k = 8w + 1, 3, 5, 7
            l0, l1, l2, l3 = _byte_floats(low, True, ASM)
            h0, h1, h2, h3 = _byte_floats(high, True, ASM)
            part = -136.0 * (x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7)  # (128 + v) - 136 = v - 8 = the code
            part = tl.fma(l0, x0[None, :], part[None, :])
            part = tl.fma(h0, x1[None, :], part)
            part = tl.fma(l1, x2[None, :], part)
            part = tl.fma(h1, x3[None, :], part)
            part = tl.fma(l2, x4[None, :], part)
            part = tl.fma(h2, x5[None, :], part)
            part = tl.fma(l3, x6[None, :], part)
            part = tl.fma(h3, x7[None, :], part)
        else:
            # 2^15 + 128 + c for c + 128 in [0, 255]: as for int4, the offset comes off once per word, through the
            # activations' sum, not per code (one FMA per code, no subtraction). The terms are up to 2^15 / |c| times
            # the products, so float32 keeps ~15 of the products' bits (2^23 + b would keep ~7: hence not that).
            b0, b1, b2, b3 = _byte_floats(words ^ 0x80808080, False, ASM, True)
            part = -32896.0 * (x0 + x1 + x2 + x3)
            part = tl.fma(b0, x0[None, :], part[None, :])
            part = tl.fma(b1, x1[None, :], part)
            part = tl.fma(b2, x2[None, :], part)
            part = tl.fma(b3, x3[None, :], part)
        return part

    @triton.jit
    def _word_term(acc, words, w_idx, x_pairs, left, s_rows, k_tile, QUANT: tl.constexpr, GROUP_SIZE: tl.constexpr,
                   SCALED: tl.constexpr, FP16: tl.constexpr, MASKED: tl.constexpr, ASM: tl.constexpr):
        """`acc` plus one word column per row: `words` [BN, WG] (uint32) at tile-relative word indices `w_idx` [WG]."""
        PER_WORD: tl.constexpr = 8 if QUANT == 2 else 4
        x0, x1, x2, x3, x4, x5, x6, x7 = _word_activations(x_pairs, w_idx, left, PER_WORD, FP16, MASKED)
        part = _word_products(words, x0, x1, x2, x3, x4, x5, x6, x7, QUANT, ASM)
        if SCALED:
            group = (k_tile + w_idx * PER_WORD) // GROUP_SIZE
            if MASKED:
                scales = tl.load(s_rows[:, None] + group[None, :], mask=(w_idx * PER_WORD < left)[None, :], other=0.0)
            else:
                scales = tl.load(s_rows[:, None] + group[None, :])
            acc = tl.fma(part, scales.to(tl.float32), acc)
        else:
            acc += part
        return acc

    @triton.jit
    def words_load(w_ptrs, left, QUANT: tl.constexpr, MASKED: tl.constexpr, WPT: tl.constexpr,
                   BLOCK_K: tl.constexpr):
        """One K tile's code words [BN, W] as uint32 (`left` codes remain from the tile's first k)."""
        PER_WORD: tl.constexpr = 8 if QUANT == 2 else 4
        w_idx = word_index(BLOCK_K // PER_WORD, WPT)
        if MASKED:
            words = tl.load(w_ptrs, mask=(w_idx * PER_WORD < left)[None, :], other=0)
        else:
            words = tl.load(w_ptrs)
        return words.to(tl.uint32, bitcast=True)

    @triton.jit
    def words_tile(acc, words, x_tile, left, s_rows, k_tile, QUANT: tl.constexpr, GROUP_SIZE: tl.constexpr,
                   SCALED: tl.constexpr, FP16: tl.constexpr, MASKED: tl.constexpr, ASM: tl.constexpr,
                   WPT: tl.constexpr, BLOCK_K: tl.constexpr):
        """`acc` plus one K tile: `words` (`words_load`'s) against the activation pairs at `x_tile`. A thread's WPT
        words of a row are split in registers; word p of each group then meets its own [WG, 4] activation load,
        which lies in the split's layout (four pairs per thread), so nothing is converted."""
        PER_WORD: tl.constexpr = 8 if QUANT == 2 else 4
        W: tl.constexpr = BLOCK_K // PER_WORD
        group_idx = tl.arange(0, W // WPT) * WPT  # the first word of each thread's group
        if WPT == 1:
            acc = _word_term(acc, words, group_idx, x_tile, left, s_rows, k_tile, QUANT, GROUP_SIZE, SCALED, FP16,
                             MASKED, ASM)
        elif WPT == 2:
            w0, w1 = tl.split(tl.reshape(words, (words.shape[0], W // 2, 2)))
            acc = _word_term(acc, w0, group_idx, x_tile, left, s_rows, k_tile, QUANT, GROUP_SIZE, SCALED, FP16,
                             MASKED, ASM)
            acc = _word_term(acc, w1, group_idx + 1, x_tile, left, s_rows, k_tile, QUANT, GROUP_SIZE, SCALED,
                             FP16, MASKED, ASM)
        else:
            first, second = tl.split(tl.reshape(words, (words.shape[0], W // 4, 2, 2)))  # words (0, 2), (1, 3)
            w0, w2 = tl.split(first)
            w1, w3 = tl.split(second)
            acc = _word_term(acc, w0, group_idx, x_tile, left, s_rows, k_tile, QUANT, GROUP_SIZE, SCALED, FP16,
                             MASKED, ASM)
            acc = _word_term(acc, w1, group_idx + 1, x_tile, left, s_rows, k_tile, QUANT, GROUP_SIZE, SCALED,
                             FP16, MASKED, ASM)
            acc = _word_term(acc, w2, group_idx + 2, x_tile, left, s_rows, k_tile, QUANT, GROUP_SIZE, SCALED,
                             FP16, MASKED, ASM)
            acc = _word_term(acc, w3, group_idx + 3, x_tile, left, s_rows, k_tile, QUANT, GROUP_SIZE, SCALED,
                             FP16, MASKED, ASM)
        return acc

    @triton.jit
    def words_accumulate(
        acc,  # [BN, W / WPT] float32 elementwise accumulator
        x_pairs,  # int32 pairs of the one activation row, at k_first
        w_ptrs,  # [BN, W] int32 word pointers at k_first (`word_index`)
        s_rows,  # [BN] pointers at each row's first scale (unused unless SCALED)
        k_first,  # the span's first k (scale groups count from 0 at k = 0)
        k_len,
        QUANT: tl.constexpr,
        GROUP_SIZE: tl.constexpr,
        SCALED: tl.constexpr,  # group scales multiply each word's products (else per-row scales come later)
        FP16: tl.constexpr,
        MASKED: tl.constexpr,
        ASM: tl.constexpr,
        WPT: tl.constexpr,  # consecutive words per thread and row: one 4 / 8 / 16-byte load each
        BLOCK_K: tl.constexpr,
    ):
        """`acc` plus the products of one activation row with the weight words of k in [k_first, k_first + k_len),
        tile by tile (`words_load`, `words_tile`); no tiles when k_len <= 0."""
        PER_WORD: tl.constexpr = 8 if QUANT == 2 else 4
        for kk in range(0, tl.cdiv(k_len, BLOCK_K)):
            rel = kk * BLOCK_K
            words = words_load(w_ptrs + rel // PER_WORD, k_len - rel, QUANT, MASKED, WPT, BLOCK_K)
            acc = words_tile(acc, words, x_pairs + rel // 2, k_len - rel, s_rows, k_first + rel, QUANT, GROUP_SIZE,
                             SCALED, FP16, MASKED, ASM, WPT, BLOCK_K)
        return acc

    @triton.jit
    def word_index(W: tl.constexpr, WPT: tl.constexpr):
        """[W] word indices claimed contiguous only in runs of WPT: WPT words per thread and row, the warps side by
        side along K (claimed contiguous throughout, the loads would widen to 4 words and the rows' activations
        would need a shared-memory conversion)."""
        return tl.max_contiguous(tl.multiple_of(tl.arange(0, W), WPT), WPT)

    @triton.jit
    def _gemv_words_kernel(
        x_pairs,  # [K/2] int32: the one activation row
        w_words,  # [N, K/PER_WORD] int32
        s_ptr,  # [N, G]
        bias_ptr,
        out_ptr,  # [1, N]
        N,
        K,
        stride_wn,  # in words
        stride_sn,
        GROUP_SIZE: tl.constexpr,
        QUANT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        PER_ROW: tl.constexpr,
        FP16: tl.constexpr,
        ASM: tl.constexpr,
        WPT: tl.constexpr,
        USE_PDL: tl.constexpr = False,  # PDL launch (triton_support.pdl_launch)
    ):
        """`triton_quant._gemv_kernel` on words; as there, the first K tile's weights are loaded before the wait for
        the activation's producer (under PDL, while it still runs)."""
        pid_n = tl.program_id(0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ld = offs_n % N  # wrap: loads stay unmasked, wrapped columns are not stored
        PER_WORD: tl.constexpr = 8 if QUANT == 2 else 4
        w_idx = word_index(BLOCK_K // PER_WORD, WPT)
        w_ptrs = w_words + n_ld.to(tl.int64)[:, None] * stride_wn + w_idx[None, :]
        s_rows = s_ptr + n_ld.to(tl.int64) * stride_sn
        acc = tl.zeros((w_ptrs.shape[0], BLOCK_K // PER_WORD // WPT), dtype=tl.float32)
        first = words_load(w_ptrs, K, QUANT, not EVEN_K, WPT, BLOCK_K)
        wait_for_producers(USE_PDL)
        acc = words_tile(acc, first, x_pairs, K, s_rows, 0, QUANT, GROUP_SIZE, not PER_ROW, FP16, not EVEN_K, ASM,
                         WPT, BLOCK_K)
        acc = words_accumulate(acc, x_pairs + BLOCK_K // 2, w_ptrs + BLOCK_K // PER_WORD, s_rows, BLOCK_K,
                               K - BLOCK_K, QUANT, GROUP_SIZE, not PER_ROW, FP16, not EVEN_K, ASM, WPT, BLOCK_K)
        out = tl.sum(acc, axis=1)
        if PER_ROW:
            out = out * tl.load(s_rows).to(tl.float32)
        if HAS_BIAS:
            out += tl.load(bias_ptr + n_ld).to(tl.float32)
        tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)

    @triton.jit(do_not_specialize=["expert_offset"])
    def _gate_up_words_kernel(
        x_pairs,  # [T, H/2] int32
        w_words,  # [E, 2I, H/PER_WORD] int32
        s_ptr,  # [E, 2I, G]
        inter_ptr,  # [S, I] out
        topk_ids_ptr,  # [S] routed (global) expert ids
        expert_offset,
        N,  # I
        K,  # H
        stride_xm,  # in pairs
        stride_we,  # in words
        stride_wn,
        stride_se,
        stride_sn,
        stride_im,
        E: tl.constexpr,
        TOPK: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        QUANT: tl.constexpr,
        GROUP_SIZE: tl.constexpr,
        PER_ROW: tl.constexpr,
        FP16: tl.constexpr,
        ASM: tl.constexpr,
        WPT: tl.constexpr,
        USE_PDL: tl.constexpr = False,
    ):
        """`triton_moe_decode._gate_up_gemv_kernel` on words: the gate rows and the up rows of a column tile are one
        [2 * BLOCK_N, W] tile (twice the loads in flight per thread), split after the reduction."""
        wait_for_producers(USE_PDL)
        slot = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(topk_ids_ptr + slot).to(tl.int64) - expert_offset
        if (expert < 0) | (expert >= E):  # routed to another rank's experts
            return
        token = (slot // TOPK).to(tl.int64)
        r = tl.arange(0, 2 * BLOCK_N)
        col = (pid_n * BLOCK_N + r % BLOCK_N) % N  # wrap: loads stay unmasked, wrapped columns are not stored
        rows = (col + (r >= BLOCK_N).to(tl.int32) * N).to(tl.int64)  # gate rows, then the up rows N further
        PER_WORD: tl.constexpr = 8 if QUANT == 2 else 4
        w_idx = word_index(BLOCK_K // PER_WORD, WPT)
        w_ptrs = w_words + expert * stride_we + rows[:, None] * stride_wn + w_idx[None, :]
        s_rows = s_ptr + expert * stride_se + rows * stride_sn
        acc = tl.zeros((w_ptrs.shape[0], BLOCK_K // PER_WORD // WPT), dtype=tl.float32)
        acc = words_accumulate(acc, x_pairs + token * stride_xm, w_ptrs, s_rows, 0, K, QUANT, GROUP_SIZE,
                               not PER_ROW, FP16, not EVEN_K, ASM, WPT, BLOCK_K)
        out = tl.sum(acc, axis=1)
        if PER_ROW:
            out = out * tl.load(s_rows).to(tl.float32)
        gate, up = tl.split(tl.permute(tl.reshape(out, (2, BLOCK_N)), (1, 0)))
        act = gate / (1.0 + tl.exp(-gate)) * up
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(inter_ptr + slot.to(tl.int64) * stride_im + offs_n, act.to(inter_ptr.dtype.element_ty),
                 mask=offs_n < N)

    @triton.jit(do_not_specialize=["expert_offset"])
    def _down_words_kernel(
        a_pairs,  # [S, I/2] int32 intermediate
        w_words,  # [E, H, I/PER_WORD] int32
        s_ptr,  # [E, H, G]
        partial_ptr,  # [SPLIT_K, S, H] out
        topk_ids_ptr,
        topk_weights_ptr,  # [S]
        expert_offset,
        N,  # H
        K,  # I
        k_per_split,  # multiple of BLOCK_K
        stride_am,  # in pairs
        stride_we,  # in words
        stride_wn,
        stride_se,
        stride_sn,
        stride_ps,
        stride_pm,
        E: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        QUANT: tl.constexpr,
        GROUP_SIZE: tl.constexpr,
        PER_ROW: tl.constexpr,
        FP16: tl.constexpr,
        ASM: tl.constexpr,
        WPT: tl.constexpr,
        COMBINE: tl.constexpr = False,  # the last program per (token, column tile) writes out (combine_if_last)
        TOPK: tl.constexpr = 1,  # COMBINE: slots per token
        SPLIT_K: tl.constexpr = 1,  # COMBINE: K slices
        out_ptr=None,  # COMBINE: [T, H] out
        stride_om=0,
        counter_ptr=None,  # COMBINE: [T, column tiles] int32 zeroed counters (triton_support.arrival_counters)
        EARLY: tl.constexpr = False,  # triton_support.early_weights
        USE_PDL: tl.constexpr = False,
    ):
        """`triton_moe_decode._down_gemv_kernel` on words; as there, the expert id and the first K tile's words are
        read before the PDL wait (EARLY)."""
        slot = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        if not EARLY:
            wait_for_producers(USE_PDL)
        expert = routed_expert(topk_ids_ptr, slot) - expert_offset
        if (expert < 0) | (expert >= E):  # another rank's expert: nothing to write, but counted in
            if EARLY:
                wait_for_producers(USE_PDL)
            if COMBINE:
                combine_if_last(counter_ptr, partial_ptr, out_ptr, topk_ids_ptr, slot, pid_n,
                                pid_n * BLOCK_N + tl.arange(0, BLOCK_N), expert_offset, E, N, stride_ps, stride_pm,
                                stride_om, TOPK, SPLIT_K)
            return
        k0 = pid_k * k_per_split
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ld = offs_n % N
        PER_WORD: tl.constexpr = 8 if QUANT == 2 else 4
        w_idx = word_index(BLOCK_K // PER_WORD, WPT)
        w_ptrs = w_words + expert * stride_we + n_ld.to(tl.int64)[:, None] * stride_wn + k0 // PER_WORD
        w_ptrs += w_idx[None, :]
        s_rows = s_ptr + expert * stride_se + n_ld.to(tl.int64) * stride_sn
        a_row = a_pairs + slot.to(tl.int64) * stride_am + k0 // 2
        acc = tl.zeros((w_ptrs.shape[0], BLOCK_K // PER_WORD // WPT), dtype=tl.float32)
        k_end = tl.minimum(k0 + k_per_split, K)
        first = words_load(w_ptrs, k_end - k0, QUANT, not EVEN_K, WPT, BLOCK_K)
        if EARLY:
            wait_for_producers(USE_PDL)
        acc = words_tile(acc, first, a_row, k_end - k0, s_rows, k0, QUANT, GROUP_SIZE, not PER_ROW, FP16, not EVEN_K,
                         ASM, WPT, BLOCK_K)
        acc = words_accumulate(acc, a_row + BLOCK_K // 2, w_ptrs + BLOCK_K // PER_WORD, s_rows, k0 + BLOCK_K,
                               k_end - k0 - BLOCK_K, QUANT, GROUP_SIZE, not PER_ROW, FP16, not EVEN_K, ASM, WPT,
                               BLOCK_K)
        out = tl.sum(acc, axis=1)
        if PER_ROW:
            out = out * tl.load(s_rows).to(tl.float32)
        out = out * tl.load(topk_weights_ptr + slot).to(tl.float32)
        tl.store(partial_ptr + pid_k * stride_ps + slot.to(tl.int64) * stride_pm + offs_n,
                 out.to(partial_ptr.dtype.element_ty), mask=offs_n < N)
        if COMBINE:
            combine_if_last(counter_ptr, partial_ptr, out_ptr, topk_ids_ptr, slot, pid_n, offs_n, expert_offset, E,
                            N, stride_ps, stride_pm, stride_om, TOPK, SPLIT_K)


def launch_gemv_words(x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                      out: torch.Tensor, quant: int, group_size: int, block_n: int, warps: int,
                      words_per_thread: int) -> None:
    """One activation row [1, K] against [N, K / (2 if int4)] codes on `_gemv_words_kernel` (callers check
    `words_unsupported_reason` first)."""
    k = x2.shape[1]
    n = out.shape[1]
    block_k = words_block_k(quant, warps, words_per_thread)
    x_pairs, words = word_views(x2, codes)
    _gemv_words_kernel[(triton.cdiv(n, block_n),)](
        x_pairs, words, scales, bias if bias is not None else scales, out, n, k, words.stride(0), scales.stride(0),
        GROUP_SIZE=group_size or k, QUANT=quant, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, PER_ROW=group_size == 0, FP16=x2.dtype == torch.float16, ASM=codes_in_ptx(),
        WPT=words_per_thread, **pdl_launch(x2), num_warps=warps, num_stages=1,
    )
