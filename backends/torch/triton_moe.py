"""Fused mixture-of-experts (Mixtral SwiGLU experts) in Triton.

Computes, for hidden states ``x`` [T, H], routing ``topk_ids``/``topk_weights``
[T, k] and expert weights ``w13`` [E, 2I, H] (rows ``0..I-1`` = gate ``w1``,
rows ``I..2I-1`` = up ``w3``) and ``w2`` [E, H, I]::

    out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t])),
    e = topk_ids[t, j]

(the layout of Hugging Face transformers 5 ``MixtralExperts.gate_up_proj`` /
``down_proj``).

Expert parallelism: ``w13``/``w2`` may hold only the ``E'`` experts
``[expert_offset, expert_offset + E')`` of the routed ones (an EP rank's block); ``topk_ids`` keep
the routed (global) ids.  Slots routed elsewhere are dropped by the routing kernel, so they are
never sorted, gathered or multiplied, and the combine kernel skips them: they contribute zero and
cost nothing.  ``expert_offset`` is a run-time argument, never specialized: one compiled
variant serves every rank, and nothing about the routing reaches the host, so EP ranks stay
CUDA-graph capturable.

Algorithm (four launches, no host synchronisation, CUDA-graph capturable):

1. ``_align_kernel`` (one program): every (token, j) pair is a *slot*
   ``s = t*k + j``.  The kernel histograms the slots per expert, rounds each
   expert's count up to a multiple of ``BLOCK_M`` and lays the slots out
   expert by expert in ``sorted_slots`` (a stable counting sort: a one-hot
   [CHUNK, E] matrix and its running sum give each slot its rank inside its
   expert).  Slots whose expert is not local (expert parallelism) match no
   column and are neither counted nor stored.  Padding positions hold the
   sentinel ``S = T*k``.  It also writes ``block_expert[b]``, the expert that
   owns row block ``b``, or -1 for blocks past the end.  All buffers are sized
   by the upper bound ``cdiv(S, BLOCK_M) + min(S, E)`` blocks, which depends on
   shapes only, so nothing about the routing ever reaches the host.
2. ``_gate_up_kernel``: a grouped GEMM over the row blocks.  Each program owns
   a [BLOCK_M, BLOCK_N] tile of one expert, gathers its rows of ``x`` through
   ``sorted_slots``, multiplies them by an interleaved weight tile (gate row
   ``n``, up row ``I + n``, ...) in one [BLOCK_M, 2*BLOCK_N] dot and applies
   SwiGLU to the de-interleaved halves in the epilogue, so the [S, 2I] gate/up
   product never touches memory; it stores ``a = silu(g) * u`` [S, I].
3. ``_down_kernel``: the same grouped GEMM for ``w2``, optionally split along
   K (decode: only ``k`` tokens, so the work is streaming 2*H*I weights; more
   programs keep more bytes in flight).  The routing weight is applied in the
   epilogue and each slot's partial row is written to ``partial[split, s]``
   without atomics.
4. ``_combine_kernel``: ``out[t] = sum_{split, j} partial[split, t*k + j]`` in
   fp32, a fixed summation order, so the result is deterministic; slots of
   non-local experts (never written) are masked out by their id.

Block sizes come from a small explicit table keyed on T (``TUNING_TABLE`` in
``moe_tuning.py``), not from run-time autotuning, so the first call compiles exactly one
variant per regime.  Weight-only int8 / int4 experts at small batches run steps 2-3 on
swapped-operand tiles instead (``triton_moe_swapped``, ``SWAPPED_TABLE``), and a handful of
slots on the CUDA-core decode path (``triton_moe_decode``, ``GEMV_TABLE``).
"""


import torch

from backends.torch.moe_tuning import GemvConfig, MoeConfig, SwappedConfig, clamp_gemv_config, get_config
from backends.torch.moe_tuning import get_gemv_config, get_swapped_config, next_pow2
from backends.torch.triton_moe_swapped import gate_up_down, swapped_reason
from backends.torch import triton_fp8
from backends.torch.triton_gemv_words import words_block_k, words_unsupported_reason
from backends.torch.triton_quant import QUANT_CODES, STORAGE, scale_weights
from compiler.fp8 import FP8_DTYPE

from backends.torch.triton_support import HAVE_TRITON as _HAVE_TRITON
from backends.torch.triton_support import (arrival_counters, codes_in_ptx, combine_in_kernel, device_reason,
                                           early_weights, grouped_tile_ids, interpreting, pdl_launch,
                                           sum_slot_partials, tl, triton, wait_for_producers)

__all__ = ["SUPPORTED_DTYPES", "fused_moe", "is_available", "route", "route_unsupported_reason", "unsupported_reason"]

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
# The expert weights' storage per precision: the weight-only codes, and e4m3 for FP8 (per-expert float32 scales).
EXPERT_STORAGE = {**STORAGE, "fp8": FP8_DTYPE}


def is_available() -> bool:
    """True when the kernels can run: Triton importable and CUDA present (or the interpreter on)."""
    if not _HAVE_TRITON:
        return False
    if interpreting():
        return True
    return torch.cuda.is_available()


def unsupported_reason(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    precision: str | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> str | None:
    """Why these operands cannot run on the fused kernel (None when they can): the dispatch's one rule.

    `precision` None: float expert weights; "int8"/"int4": codes in compiler/quantization.py's layout with `scales`
    (w13's, w2's) in the activation dtype; "fp8": e4m3 experts with one float32 scale per expert (compiler/fp8.py)."""
    reason = device_reason(hidden_states, _HAVE_TRITON)
    if reason is not None:
        return reason
    if hidden_states.dtype not in SUPPORTED_DTYPES:
        return f"activation dtype {hidden_states.dtype} is not among {SUPPORTED_DTYPES}"
    if precision is None:
        if w13.dtype != hidden_states.dtype or w2.dtype != hidden_states.dtype:
            return f"expert weights w13 {w13.dtype} / w2 {w2.dtype} differ from the activations' {hidden_states.dtype}"
        return None
    if precision not in EXPERT_STORAGE:
        return f"no fused kernel for {precision} expert weights"
    storage = EXPERT_STORAGE[precision]
    if w13.dtype != storage or w2.dtype != storage:
        return f"{precision} expert weights stored as w13 {w13.dtype} / w2 {w2.dtype}, not {storage}"
    if precision == "fp8":
        if scales is None or any(s.dtype != torch.float32 or s.shape != w.shape[:1] for s, w in zip(scales, (w13, w2))):
            return "fp8 expert scales must be float32, one per expert"
        return triton_fp8.capability_reason(hidden_states.device)
    if scales is None or any(scale.dtype != hidden_states.dtype for scale in scales):
        return f"{precision} expert scales must be in the activations' dtype {hidden_states.dtype}"
    if precision == "int4" and scales[0].shape[-1] * 16 > w13.shape[-1]:
        return "int4 groups of 16 are narrower than the kernel's 32-wide K tiles (two 16-deep dots of nibbles)"
    return None


if _HAVE_TRITON:
    # Kernel parameters are typed the Triton way (tl.constexpr); the JIT reads these annotations at
    # run time, so the kernels carry no other annotations.

    from backends.torch.triton_fp8 import fp8_codes
    from backends.torch.triton_quant import codes_dot

    @triton.jit
    def _local_ids(topk_ids_ptr, offs, num_slots, expert_offset, E: tl.constexpr, E_P: tl.constexpr):
        # Local expert id of each slot, or E_P (matches no column) for slots past the end or routed to an
        # expert outside [expert_offset, expert_offset + E).  In int64: ids may arrive as int64.
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_slots, other=0).to(tl.int64) - expert_offset
        local = (offs < num_slots) & (ids >= 0) & (ids < E)
        return tl.where(local, ids, E_P).to(tl.int32)

    @triton.jit(do_not_specialize=["expert_offset"])
    def _align_kernel(
        topk_ids_ptr,  # [S] int32/int64, flattened topk_ids
        sorted_slots_ptr,  # [NB_MAX * BLOCK_M] int32 out
        block_expert_ptr,  # [NB_MAX] int32 out
        num_slots,  # S = T * k
        num_blocks_max,  # NB_MAX
        expert_offset,  # first local expert: ids are global, columns local
        E: tl.constexpr,  # local experts
        E_P: tl.constexpr,  # E rounded up to a power of two
        BLOCK_M: tl.constexpr,
        CHUNK: tl.constexpr,
        NB_CHUNK: tl.constexpr,
        USE_PDL: tl.constexpr = False,  # PDL launch (triton_support.pdl_launch)
    ):
        wait_for_producers(USE_PDL)
        experts = tl.arange(0, E_P)
        # Pass 1: per-expert histogram.  Slots past the end and slots of non-local experts become E_P,
        # which matches no column.
        counts = tl.zeros([E_P], dtype=tl.int32)
        for start in range(0, num_slots, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            ids = _local_ids(topk_ids_ptr, offs, num_slots, expert_offset, E, E_P)
            counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        seg_end = tl.cumsum(padded, axis=0)  # inclusive prefix sum: end of each expert's segment
        seg_start = seg_end - padded

        # Pass 2: stable scatter.  rank = running count of the slot's expert, so slots keep token order.
        running = seg_start
        for start in range(0, num_slots, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            ids = _local_ids(topk_ids_ptr, offs, num_slots, expert_offset, E, E_P)
            onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
            rank = tl.cumsum(onehot, axis=0) - 1 + running[None, :]
            dest = tl.sum(onehot * rank, axis=1)
            tl.store(sorted_slots_ptr + dest, offs, mask=ids < E)  # local slots only
            running += tl.sum(onehot, axis=0)

        # Padding tail of each expert's segment (< BLOCK_M positions, disjoint from the slots above,
        # so no ordering between the two stores is needed).
        j = tl.arange(0, BLOCK_M)
        pad_pos = (seg_start + counts)[:, None] + j[None, :]
        pad_mask = j[None, :] < (padded - counts)[:, None]
        pad_val = tl.zeros([E_P, BLOCK_M], dtype=tl.int32) + num_slots
        tl.store(sorted_slots_ptr + pad_pos, pad_val, mask=pad_mask)

        # Owner of each row block: number of segments ending at or before the block's first row.
        # Empty experts have zero-length segments and are skipped by the same count.
        for bstart in range(0, num_blocks_max, NB_CHUNK):
            b = bstart + tl.arange(0, NB_CHUNK)
            owner = tl.sum((seg_end[None, :] <= (b * BLOCK_M)[:, None]).to(tl.int32), axis=1)
            owner = tl.where(owner < E, owner, -1)
            tl.store(block_expert_ptr + b, owner, mask=b < num_blocks_max)

    @triton.jit
    def _gate_up_kernel(
        x_ptr,  # [T, H]
        w_ptr,  # [E, 2I, H] float, int8 codes, or [E, 2I, H/2] packed int4 codes
        s_ptr,  # [E, 2I, G] scales of quantized weights (unused for float weights)
        inter_ptr,  # [S, I] out: silu(gate) * up
        sorted_slots_ptr,
        block_expert_ptr,
        num_slots,
        num_pid_m,
        N,  # I
        K,  # H
        stride_xm,
        stride_xk,
        stride_we,
        stride_wn,
        stride_wk,
        stride_se,
        stride_sn,
        stride_im,
        a_scale,  # fp8: the scale of x's codes (unused otherwise)
        out_scale,  # fp8: the static scale the intermediate is quantized with for w2 (unused otherwise)
        TOPK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        EVEN_K: tl.constexpr,
        DOT_F32: tl.constexpr,  # interpreter only: see _dot_in_f32
        QUANT: tl.constexpr = 0,  # 0 float weights, 1 int8, 2 int4, 3 fp8 (triton_quant.QUANT_CODES)
        GROUP_SIZE: tl.constexpr = 1,  # K elements per scale, a multiple of BLOCK_K (unused with PER_ROW)
        PER_ROW: tl.constexpr = False,  # one scale per weight row
        EMULATE_FP8: tl.constexpr = False,  # interpreter only: see triton_fp8.fp8_codes
        USE_PDL: tl.constexpr = False,  # PDL launch (triton_support.pdl_launch)
        SCALE_WEIGHTS: tl.constexpr = False,  # grouped: scale the weight tile (triton_quant.scale_weights)
    ):
        wait_for_producers(USE_PDL)
        pid = tl.program_id(0)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        pid_m, pid_n = grouped_tile_ids(pid, num_pid_m, num_pid_n, GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:  # block past the last expert's segment (the grid is an upper bound)
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        slot = tl.load(sorted_slots_ptr + offs_m)
        row_ok = slot < num_slots
        token = tl.where(row_ok, slot // TOPK, 0).to(tl.int64)
        # One dot over an interleaved [BK, 2*BLOCK_N] weight tile: even columns are gate rows
        # (n), odd columns the matching up rows (I + n).  A single 2*BLOCK_N-wide MMA keeps the tensor
        # cores busier than two BLOCK_N-wide dots into two accumulators (measured: see NOTES).
        # Columns past N wrap around instead of being masked: loads stay in bounds and unmasked
        # (wide vector loads); the wrapped columns are dropped at the store.
        offs_c = tl.arange(0, 2 * BLOCK_N)
        w_row = (pid_n * BLOCK_N + offs_c // 2) % N + (offs_c % 2) * N
        offs_k = tl.arange(0, BLOCK_K)
        PACK: tl.constexpr = 2 if QUANT == 2 else 1  # int4: two K elements per byte
        offs_kw = tl.arange(0, BLOCK_K // PACK)
        a_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :] * stride_xk
        x_rows = x_ptr + token[:, None] * stride_xm
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + w_row[None, :] * stride_wn + offs_kw[:, None] * stride_wk
        # Quantized weights: one scale per (row, group); every K tile lies inside one group (BLOCK_K <= group),
        # so the scales multiply the tile's [BM, 2BN] partial sums (per-row scales: the accumulator, once).
        s_rows = s_ptr + expert.to(tl.int64) * stride_se + w_row[None, :] * stride_sn
        acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            if QUANT == 0 or QUANT == 3:  # float or e4m3 operands straight into the dot (fp8: x arrives as codes)
                if EVEN_K:
                    a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                    b = tl.load(w_ptrs)
                else:
                    k_left = K - kk * BLOCK_K
                    a = tl.load(a_ptrs, mask=row_ok[:, None] & (offs_k[None, :] < k_left), other=0.0)
                    b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
                if DOT_F32:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                # FP8 keeps Triton's sm90 default, the FP8 MMA's reduced-precision accumulation over all of K (1.1e-2
                # relative error vs 1.7e-3 without wgmma). Promoting to float32 after every K tile
                # (max_num_imprecise_acc=BLOCK_K) measured 4.1e-3 but 2.4x slower at T = 2048 (3879 vs 1588 us) and a
                # 138 ms prefill, slower than bf16's 110 (BENCHMARKS.md), so it is not taken.
                acc = tl.dot(a, b, acc)
            else:
                if PER_ROW:  # the dots accumulate straight into acc; the scales multiply it once, at the end
                    acc = codes_dot(x_rows + kk * BLOCK_K * stride_xk, row_ok[:, None], K - kk * BLOCK_K, stride_xk,
                                    w_ptrs, QUANT, BLOCK_K, not EVEN_K, DOT_F32, acc, s_rows, False)
                elif SCALE_WEIGHTS:  # group scales on the weight tile (triton_quant.scale_weights)
                    acc = codes_dot(x_rows + kk * BLOCK_K * stride_xk, row_ok[:, None], K - kk * BLOCK_K, stride_xk,
                                    w_ptrs, QUANT, BLOCK_K, not EVEN_K, DOT_F32, acc,
                                    tl.load(s_rows + kk * BLOCK_K // GROUP_SIZE), True)
                else:
                    part = codes_dot(x_rows + kk * BLOCK_K * stride_xk, row_ok[:, None], K - kk * BLOCK_K, stride_xk,
                                     w_ptrs, QUANT, BLOCK_K, not EVEN_K, DOT_F32,
                                     tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32), s_rows, False)
                    acc += part * tl.load(s_rows + kk * BLOCK_K // GROUP_SIZE).to(tl.float32)
            a_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K // PACK * stride_wk
        if QUANT == 1 or QUANT == 2:
            if PER_ROW:
                acc = acc * tl.load(s_rows).to(tl.float32)
        if QUANT == 3:  # per-tensor scales: x's and the expert's one (w1 and w3 share it)
            acc = acc * (a_scale * tl.load(s_ptr + expert.to(tl.int64) * stride_se))
        # SwiGLU epilogue in fp32: de-interleave (gate, up) pairs, silu(g) = g * sigmoid(g).
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
        act = gate / (1.0 + tl.exp(-gate)) * up
        if QUANT == 3:  # w2's input, quantized from float32 as the reference does: half the bytes of bf16 too
            act_out = fp8_codes(act, out_scale, EMULATE_FP8)
        else:
            act_out = act.to(inter_ptr.dtype.element_ty)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        out_ptrs = inter_ptr + slot.to(tl.int64)[:, None] * stride_im + offs_n[None, :]
        tl.store(out_ptrs, act_out, mask=row_ok[:, None] & (offs_n[None, :] < N))

    @triton.jit
    def _down_kernel(
        a_ptr,  # [S, I] intermediate
        w_ptr,  # [E, H, I] float, int8 codes, or [E, H, I/2] packed int4 codes
        s_ptr,  # [E, H, G] scales of quantized weights (unused for float weights)
        partial_ptr,  # [SPLIT_K, S, H] out
        sorted_slots_ptr,
        block_expert_ptr,
        topk_weights_ptr,  # [S] flattened
        num_slots,
        num_pid_m,
        N,  # H
        K,  # I
        k_per_split,  # multiple of BLOCK_K
        stride_am,
        stride_we,
        stride_wn,
        stride_wk,
        stride_se,
        stride_sn,
        stride_ps,  # partial: stride between splits
        stride_pm,
        a_scale,  # fp8: the scale of the intermediate's codes (unused otherwise)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        EVEN_K: tl.constexpr,  # K % BLOCK_K == 0 and every split is full
        DOT_F32: tl.constexpr,
        QUANT: tl.constexpr = 0,
        GROUP_SIZE: tl.constexpr = 1,
        PER_ROW: tl.constexpr = False,
        USE_PDL: tl.constexpr = False,  # PDL launch (triton_support.pdl_launch)
        SCALE_WEIGHTS: tl.constexpr = False,  # grouped: scale the weight tile (triton_quant.scale_weights)
    ):
        wait_for_producers(USE_PDL)
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        pid_m, pid_n = grouped_tile_ids(pid, num_pid_m, num_pid_n, GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        slot = tl.load(sorted_slots_ptr + offs_m)
        row_ok = slot < num_slots
        row = tl.where(row_ok, slot, 0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_n_ld = offs_n % N
        k0 = pid_k * k_per_split
        offs_k = k0 + tl.arange(0, BLOCK_K)
        PACK: tl.constexpr = 2 if QUANT == 2 else 1  # int4: two K elements per byte
        offs_kw = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
        a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :]
        a_rows = a_ptr + row[:, None] * stride_am + k0
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n_ld[None, :] * stride_wn + offs_kw[:, None] * stride_wk
        s_rows = s_ptr + expert.to(tl.int64) * stride_se + offs_n_ld[None, :] * stride_sn  # as in _gate_up_kernel
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_end = tl.minimum(k0 + k_per_split, K)
        for kk in range(0, tl.cdiv(k_end - k0, BLOCK_K)):
            k_left = k_end - k0 - kk * BLOCK_K
            if QUANT == 0 or QUANT == 3:
                if EVEN_K:
                    a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                    b = tl.load(w_ptrs)
                else:
                    kmask = tl.arange(0, BLOCK_K) < k_left
                    a = tl.load(a_ptrs, mask=row_ok[:, None] & kmask[None, :], other=0.0)
                    b = tl.load(w_ptrs, mask=kmask[:, None], other=0.0)
                if DOT_F32:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc)  # FP8: the sm90 default accumulation, as in _gate_up_kernel
            else:
                if PER_ROW:
                    acc = codes_dot(a_rows + kk * BLOCK_K, row_ok[:, None], k_left, 1, w_ptrs, QUANT, BLOCK_K,
                                    not EVEN_K, DOT_F32, acc, s_rows, False)
                elif SCALE_WEIGHTS:
                    acc = codes_dot(a_rows + kk * BLOCK_K, row_ok[:, None], k_left, 1, w_ptrs, QUANT, BLOCK_K,
                                    not EVEN_K, DOT_F32, acc,
                                    tl.load(s_rows + (k0 + kk * BLOCK_K) // GROUP_SIZE), True)
                else:
                    part = codes_dot(a_rows + kk * BLOCK_K, row_ok[:, None], k_left, 1, w_ptrs, QUANT, BLOCK_K,
                                     not EVEN_K, DOT_F32, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), s_rows,
                                     False)
                    acc += part * tl.load(s_rows + (k0 + kk * BLOCK_K) // GROUP_SIZE).to(tl.float32)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K // PACK * stride_wk
        if QUANT == 1 or QUANT == 2:
            if PER_ROW:
                acc = acc * tl.load(s_rows).to(tl.float32)
        if QUANT == 3:
            acc = acc * (a_scale * tl.load(s_ptr + expert.to(tl.int64) * stride_se))
        # Routing weight in the epilogue (linear, so applying it per K slice is exact).
        rw = tl.load(topk_weights_ptr + row, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * rw[:, None]
        out_ptrs = partial_ptr + pid_k * stride_ps + row[:, None] * stride_pm + offs_n[None, :]
        tl.store(out_ptrs, acc.to(partial_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))

    @triton.jit(do_not_specialize=["expert_offset"])
    def _combine_kernel(
        partial_ptr,  # [SPLIT_K, S, H]
        out_ptr,  # [T, H]
        topk_ids_ptr,  # [S]: slots of non-local experts were never written and are skipped
        expert_offset,
        E,  # local experts
        H,
        stride_ps,
        stride_pm,
        stride_om,
        TOPK: tl.constexpr,
        SPLIT_K: tl.constexpr,
        BLOCK_H: tl.constexpr,
        USE_PDL: tl.constexpr = False,  # PDL launch (triton_support.pdl_launch)
    ):
        wait_for_producers(USE_PDL)
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        acc = sum_slot_partials(partial_ptr, topk_ids_ptr, t, offs, expert_offset, E, H, stride_ps, stride_pm, TOPK,
                                SPLIT_K)
        tl.store(out_ptr + t * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=offs < H)


if _HAVE_TRITON:

    @triton.jit
    def _route_kernel(
        x_ptr,  # [T, H]
        router_ptr,  # [E, H]
        ids_ptr,  # [T, TOPK] int64 out
        weights_ptr,  # [T, TOPK] float32 out
        H,
        stride_xm,
        stride_re,
        E: tl.constexpr,
        E_P: tl.constexpr,
        TOPK: tl.constexpr,
        RENORMALIZE: tl.constexpr,
        BLOCK_H: tl.constexpr,
        ONE_TILE: tl.constexpr = False,  # H <= BLOCK_H: the router is read before the wait for x's producer
        USE_PDL: tl.constexpr = False,  # PDL launch (triton_support.pdl_launch)
    ):
        t = tl.program_id(0).to(tl.int64)
        experts = tl.arange(0, E_P)
        cols = tl.arange(0, BLOCK_H)
        logits = tl.zeros([E_P], dtype=tl.float32)
        if ONE_TILE:
            # The router's weights are no predecessor's output: under PDL this load is issued while the norm before
            # it still runs (the weights come from HBM: a decode step streams every layer's through L2 and evicts
            # them), and only x waits for the norm.
            w = tl.load(router_ptr + experts[:, None] * stride_re + cols[None, :],
                        mask=(experts[:, None] < E) & (cols[None, :] < H), other=0.0)
            wait_for_producers(USE_PDL)
            x = tl.load(x_ptr + t * stride_xm + cols, mask=cols < H, other=0.0).to(tl.float32)
            logits += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        else:
            wait_for_producers(USE_PDL)
            for start in range(0, H, BLOCK_H):
                c = start + cols
                x = tl.load(x_ptr + t * stride_xm + c, mask=c < H, other=0.0).to(tl.float32)
                w = tl.load(router_ptr + experts[:, None] * stride_re + c[None, :],
                            mask=(experts[:, None] < E) & (c[None, :] < H), other=0.0).to(tl.float32)
                logits += tl.sum(w * x[None, :], axis=1)
        # The router linear's output is rounded to the activation dtype (as `F.linear` rounds it), then read in fp32.
        logits = logits.to(x_ptr.dtype.element_ty).to(tl.float32)
        logits = tl.where(experts < E, logits, float("-inf"))
        probs = tl.exp(logits - tl.max(logits, axis=0))
        probs = probs / tl.sum(probs, axis=0)
        # Top-k by repeated argmax (ties to the lowest expert id); picked experts drop to -1.
        remaining = probs
        total = 0.0
        for j in tl.static_range(TOPK):
            best = tl.max(remaining, axis=0)
            idx = tl.min(tl.where(remaining == best, experts, E_P), axis=0)
            tl.store(ids_ptr + t * TOPK + j, idx.to(tl.int64))
            tl.store(weights_ptr + t * TOPK + j, best)
            total += best
            remaining = tl.where(experts == idx, -1.0, remaining)
        if RENORMALIZE:
            for j in tl.static_range(TOPK):
                w_j = tl.load(weights_ptr + t * TOPK + j)
                tl.store(weights_ptr + t * TOPK + j, w_j / total)


def route_unsupported_reason(x: torch.Tensor, router_weight: torch.Tensor) -> str | None:
    """Why the router cannot run on the Triton routing kernel (None when it can)."""
    reason = device_reason(x, _HAVE_TRITON)
    if reason is not None:
        return reason
    if x.dtype not in SUPPORTED_DTYPES or router_weight.dtype != x.dtype:
        return f"activation {x.dtype} / router {router_weight.dtype} are not one of {SUPPORTED_DTYPES}"
    if x.dim() != 2 or router_weight.dim() != 2 or router_weight.shape[1] != x.shape[1] or router_weight.shape[0] > 256:
        return f"x {list(x.shape)} / router {list(router_weight.shape)} are not [T, H] and [E <= 256, H]"
    return None


def route(
    x: torch.Tensor, router_weight: torch.Tensor, top_k: int, normalization: str,
    block_h: int | None = None, warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's router in one launch: (expert ids [T, k] int64, weights [T, k] float32), the semantics of the
    reference `backends.torch.kernels.route` (router logits rounded to the activation dtype, softmax in float32,
    top-k, renormalized over the k when `normalization` is "renormalize"). One program per token; no host sync."""
    if not _HAVE_TRITON:
        raise RuntimeError("route needs triton")
    reason = route_unsupported_reason(x, router_weight)
    if reason is not None:
        raise TypeError(reason)
    if normalization not in ("none", "renormalize"):
        raise ValueError(f"unknown normalization {normalization!r}")
    tokens, hidden = x.shape
    num_experts = router_weight.shape[0]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, {num_experts}]")
    x = x if x.stride(1) == 1 else x.contiguous()
    router_weight = router_weight.contiguous()
    ids = torch.empty((tokens, top_k), dtype=torch.int64, device=x.device)
    weights = torch.empty((tokens, top_k), dtype=torch.float32, device=x.device)
    if tokens:
        e_p = max(2, next_pow2(num_experts))
        # The whole [E, H] router in as few loads as fit in registers: a decode step's one program is latency-bound,
        # so each round trip to memory counts. Mixtral's [8, 4096] in one tile on 16 warps: 3.36 us per call in a
        # graph against 4.41 for two [8, 2048] tiles on 8 warps (bench/route_kernel.py, H200, 2026-12-03).
        block = block_h or max(16, min(next_pow2(hidden), 32768 // e_p))
        _route_kernel[(tokens,)](
            x, router_weight, ids, weights, hidden, x.stride(0), router_weight.stride(0),
            E=num_experts, E_P=e_p, TOPK=top_k, RENORMALIZE=normalization == "renormalize",
            BLOCK_H=block, ONE_TILE=hidden <= block, **pdl_launch(x),
            num_warps=warps or (16 if block * e_p >= 16384 else 4),
        )
    return ids, weights


def _dot_in_f32(dtype: torch.dtype) -> bool:
    # Triton's CPU interpreter (seen with 3.9.0) multiplies the raw bit patterns of bf16 dot
    # operands; upcasting to fp32 first gives the exact products the tensor cores give.  Compiled
    # kernels never take this path.
    return dtype == torch.bfloat16 and interpreting()


def _check_inputs(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    precision: str | None,
    scales: tuple[torch.Tensor, torch.Tensor] | None,
    group_size: int,
) -> None:
    if hidden_states.dim() != 2 or topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape:
        raise ValueError("expected hidden_states [T,H], topk_ids and topk_weights [T,k]")
    t, h = hidden_states.shape
    if topk_ids.shape[0] != t:
        raise ValueError("topk_ids must have one row per token")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("expected w13 [E,2I,H] and w2 [E,H,I]")
    if precision is None:
        if w13.dtype != hidden_states.dtype or w2.dtype != hidden_states.dtype:
            raise TypeError("w13 and w2 must have the dtype of hidden_states")
    else:
        if precision not in EXPERT_STORAGE:
            raise ValueError(f"unknown precision {precision!r}; the kernels read {', '.join(EXPERT_STORAGE)}")
        storage = EXPERT_STORAGE[precision]
        if w13.dtype != storage or w2.dtype != storage:
            raise TypeError(f"{precision} codes must be {storage}, got w13 {w13.dtype} / w2 {w2.dtype}")
        scale_dtype = torch.float32 if precision == "fp8" else hidden_states.dtype
        if scales is None or any(s is None or s.dtype != scale_dtype for s in scales):
            raise TypeError(f"w13_scales and w2_scales must be given, in {scale_dtype}")
    packing = 2 if precision == "int4" else 1  # int4 codes: two K elements per byte
    e, two_i, h13 = w13.shape
    if h13 * packing != h or two_i % 2 != 0 or w2.shape != (e, h, two_i // 2 // packing):
        raise ValueError(f"shape mismatch: x {tuple(hidden_states.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    if hidden_states.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"hidden_states must be bf16 or fp16, got {hidden_states.dtype}")
    if precision == "fp8":
        for name, scale in (("w13", scales[0]), ("w2", scales[1])):
            if tuple(scale.shape) != (e,):
                raise ValueError(f"fp8 {name} scales {tuple(scale.shape)} are not [{e}] (one per expert)")
    elif precision is not None:
        inter = two_i // 2
        for name, scale, rows, cols in (("w13", scales[0], two_i, h), ("w2", scales[1], h, inter)):
            groups = 1 if group_size == 0 else cols // group_size
            if group_size and cols % group_size or tuple(scale.shape) != (e, rows, groups):
                raise ValueError(f"{name} scales {tuple(scale.shape)} are not [{e}, {rows}, {groups}] "
                                 f"(group_size={group_size})")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("topk_ids must be int32 or int64")
    if topk_weights.dtype not in (torch.float32, hidden_states.dtype):
        raise TypeError("topk_weights must be float32 or the activation dtype")


def fused_moe(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    expert_offset: int = 0,
    config: MoeConfig | GemvConfig | SwappedConfig | None = None,
    out: torch.Tensor | None = None,
    precision: str | None = None,
    w13_scales: torch.Tensor | None = None,
    w2_scales: torch.Tensor | None = None,
    group_size: int = 0,
    w13_input_scale: float = 1.0,
    w2_input_scale: float = 1.0,
) -> torch.Tensor:
    """Mixtral expert computation; returns [T, H] in the dtype of ``hidden_states``.

    ``topk_ids`` [T, k] int32/int64, the routed (global) expert ids; ``topk_weights`` [T, k] float32 or
    the activation dtype; ``w13`` [E', 2I, H] (gate rows first, then up) and ``w2`` [E', H, I] hold experts
    ``[expert_offset, expert_offset + E')`` (all of them when ``expert_offset`` is 0 and E' is the routed
    count).  Slots routed to other experts contribute zero, at no cost (expert parallelism).
    ``config`` overrides the table entry (used by the benchmark's sweep; a ``GemvConfig`` forces the CUDA-core decode
    path, which `moe_tuning.GEMV_TABLE` otherwise picks for a handful of slots; a ``SwappedConfig`` forces the
    swapped-operand tiles of int8 / int4 experts, which `moe_tuning.SWAPPED_TABLE` picks at small batches, where the
    shapes allow: `triton_moe_swapped`); ``out`` [T, H] (contiguous,
    dtype of ``hidden_states``) receives the result instead of a fresh tensor.
    Weight-only quantized experts: `precision` "int8"/"int4" with `w13`/`w2` the codes
    (compiler/quantization.py's layout: int4 packs K in pairs, [E', 2I, H/2] and [E', H, I/2]) and their scales
    `w13_scales` [E', 2I, G1] / `w2_scales` [E', H, G2] (G = K / group_size, 1 when group_size is 0); every weight
    tile is read as codes and dequantized in registers, exactly as the CPU reference dequantizes.
    FP8 experts (`moec.fp8_moe`): `precision` "fp8", `w13`/`w2` e4m3 with float32 `w13_scales`/`w2_scales` [E'] and
    the static activation scales `w13_input_scale` (x) / `w2_input_scale` (the SwiGLU output): x is quantized once,
    both GEMMs multiply e4m3 codes on the tensor cores, and the intermediate is stored as e4m3.
    Allocations depend on shapes only and there is no host synchronisation, so the call can be
    captured in a CUDA graph.
    """
    if not _HAVE_TRITON:
        raise RuntimeError("fused_moe needs triton")
    scales = None if precision is None else (w13_scales, w2_scales)
    _check_inputs(hidden_states, topk_ids, topk_weights, w13, w2, precision, scales, group_size)
    if expert_offset < 0:
        raise ValueError(f"expert_offset must be >= 0, got {expert_offset}")
    if precision == "fp8" and not (w13_input_scale > 0 and w2_input_scale > 0):
        raise ValueError(f"fp8 input scales {w13_input_scale}, {w2_input_scale} must be positive")
    t, h = hidden_states.shape
    topk = topk_ids.shape[1]
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    quant = QUANT_CODES[precision]
    # Float weights pass w13/w2 again as (unread) scale pointers. The kernels index scales by (expert, row, group)
    # strides with unit group stride: a strided view of the (small) scales is made contiguous.
    s13 = w13_scales.contiguous() if precision is not None else w13
    s2 = w2_scales.contiguous() if precision is not None else w2
    dev = hidden_states.device
    if out is None:
        out = torch.empty((t, h), dtype=hidden_states.dtype, device=dev)
    elif out.shape != (t, h) or out.dtype != hidden_states.dtype or out.stride(1) != 1:
        raise ValueError("out must be [T, H] with unit column stride and the dtype of hidden_states")
    if t == 0:
        return out
    fp8 = precision == "fp8"
    num_slots = t * topk
    unit_k = w13.stride(2) == 1 and w2.stride(2) == 1  # the decode path reads k-contiguous rows
    if isinstance(config, GemvConfig):
        if fp8 or not unit_k:
            raise ValueError("the CUDA-core decode path takes float / int8 / int4 experts with k-contiguous rows")
        gemv = clamp_gemv_config(config, h, inter, group_size)
    else:
        gemv = get_gemv_config(num_slots, h, inter, group_size, precision) if config is None and unit_k else None
    if gemv is not None:
        return _fused_moe_gemv(hidden_states, topk_ids, topk_weights, w13, w2, s13, s2, out, expert_offset,
                               QUANT_CODES[precision], group_size, gemv)
    swapped = None  # weight-only experts at small batches: the swapped-operand tiles (triton_moe_swapped)
    if isinstance(config, SwappedConfig):
        if precision not in STORAGE or not unit_k:
            raise ValueError("the swapped tiles take int8 / int4 experts with k-contiguous rows")
        reason = swapped_reason(h, inter, group_size, config, precision)
        if reason is not None:
            raise ValueError(f"the swapped tiles cannot take these experts: {reason}")
        swapped = config
    elif config is None and precision in STORAGE and unit_k:
        # The first table row whose K tiles these shapes fit; none (tiny models off the K grid): the tiles.
        swapped = get_swapped_config(t, precision, group_size,
                                     lambda cfg: swapped_reason(h, inter, group_size, cfg, precision) is None)
    cfg = swapped or config or get_config(t, h, inter, group_size, quantized=precision in STORAGE, fp8=fp8)
    bm = cfg.block_m
    x = hidden_states if hidden_states.stride(1) == 1 else hidden_states.contiguous()
    if fp8:  # every token's codes once ([T, H] bytes), not once per column tile of the gate/up GEMM
        x = triton_fp8.quantize(x, w13_input_scale)
    ids = topk_ids.reshape(-1)
    ids = ids if ids.is_contiguous() else ids.contiguous()
    rw = topk_weights.reshape(-1)
    rw = rw if rw.is_contiguous() else rw.contiguous()

    # 1. routing: upper bound on row blocks = full blocks of all slots + one partial block per
    #    non-empty expert (at most min(S, E) of them).
    nb_max = triton.cdiv(num_slots, bm) + min(num_slots, num_experts)
    sorted_slots = torch.empty(nb_max * bm, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb_max, dtype=torch.int32, device=dev)
    chunk = min(1024, max(16, next_pow2(num_slots)))
    _align_kernel[(1,)](
        ids,
        sorted_slots,
        block_expert,
        num_slots,
        nb_max,
        expert_offset,
        E=num_experts,
        E_P=max(2, next_pow2(num_experts)),
        BLOCK_M=bm,
        CHUNK=chunk,
        NB_CHUNK=min(1024, max(16, next_pow2(nb_max))),
        **pdl_launch(x), num_warps=4,
    )

    if swapped is not None:  # 2-3 on swapped tiles
        partial = gate_up_down(x, w13, s13, w2, s2, sorted_slots, block_expert, rw, topk, quant, group_size, swapped,
                               pdl_launch(x), _dot_in_f32(hidden_states.dtype))
        split = partial.shape[0]
    else:
        # 2. gate/up GEMM + SwiGLU.
        inter_act = torch.empty((num_slots, inter), dtype=FP8_DTYPE if fp8 else hidden_states.dtype, device=dev)
        grid_gu = (nb_max * triton.cdiv(inter, cfg.gu_block_n),)
        _gate_up_kernel[grid_gu](
            x,
            w13,
            s13,
            inter_act,
            sorted_slots,
            block_expert,
            num_slots,
            nb_max,
            inter,
            h,
            x.stride(0),
            x.stride(1),
            w13.stride(0),
            w13.stride(1),
            w13.stride(2),
            s13.stride(0),
            s13.stride(1) if s13.dim() > 1 else 0,  # fp8: one scale per expert
            inter_act.stride(0),
            float(w13_input_scale),
            float(w2_input_scale),
            TOPK=topk,
            BLOCK_M=bm,
            BLOCK_N=cfg.gu_block_n,
            BLOCK_K=cfg.gu_block_k,
            GROUP_M=cfg.gu_group_m,
            EVEN_K=h % cfg.gu_block_k == 0,
            DOT_F32=_dot_in_f32(hidden_states.dtype) or (fp8 and interpreting()),
            QUANT=quant,
            GROUP_SIZE=group_size or h,
            PER_ROW=group_size == 0 and not fp8,
            EMULATE_FP8=fp8 and interpreting(),
            SCALE_WEIGHTS=scale_weights(group_size, bm, cfg.gu_block_k),
            **pdl_launch(x), num_warps=cfg.gu_warps,
            num_stages=cfg.gu_stages,
        )

        # 3. down GEMM (split-K for decode), routing weight applied.
        bk = cfg.dn_block_k
        k_per_split = triton.cdiv(triton.cdiv(inter, max(1, cfg.dn_split_k)), bk) * bk
        split = triton.cdiv(inter, k_per_split)
        # Split partial sums are kept in fp32 so splitting does not add rounding; unsplit rows are
        # rounded once, like any bf16 GEMM output.
        part_dtype = torch.float32 if split > 1 else hidden_states.dtype
        partial = torch.empty((split, num_slots, h), dtype=part_dtype, device=dev)
        grid_dn = (nb_max * triton.cdiv(h, cfg.dn_block_n), split)
        _down_kernel[grid_dn](
            inter_act,
            w2,
            s2,
            partial,
            sorted_slots,
            block_expert,
            rw,
            num_slots,
            nb_max,
            h,
            inter,
            k_per_split,
            inter_act.stride(0),
            w2.stride(0),
            w2.stride(1),
            w2.stride(2),
            s2.stride(0),
            s2.stride(1) if s2.dim() > 1 else 0,
            partial.stride(0),
            partial.stride(1),
            float(w2_input_scale),
            BLOCK_M=bm,
            BLOCK_N=cfg.dn_block_n,
            BLOCK_K=bk,
            GROUP_M=cfg.dn_group_m,
            EVEN_K=inter % k_per_split == 0 and k_per_split % bk == 0,
            DOT_F32=_dot_in_f32(hidden_states.dtype) or (fp8 and interpreting()),
            QUANT=quant,
            GROUP_SIZE=group_size or inter,
            PER_ROW=group_size == 0 and not fp8,
            SCALE_WEIGHTS=scale_weights(group_size, bm, bk),
            **pdl_launch(x), num_warps=cfg.dn_warps,
            num_stages=cfg.dn_stages,
        )

    # 4. combine the k contributions (and K slices) of each token.
    block_h = min(1024, next_pow2(h))
    _combine_kernel[(t, triton.cdiv(h, block_h))](
        partial,
        out,
        ids,
        expert_offset,
        num_experts,
        h,
        partial.stride(0),
        partial.stride(1),
        out.stride(0),
        TOPK=topk,
        SPLIT_K=split,
        BLOCK_H=block_h,
        **pdl_launch(x), num_warps=4,
    )
    return out


def _fused_moe_gemv(  # the kernels: triton_moe_decode.py
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    s13: torch.Tensor,
    s2: torch.Tensor,
    out: torch.Tensor,
    expert_offset: int,
    quant: int,
    group_size: int,
    cfg: GemvConfig,
) -> torch.Tensor:
    """`fused_moe` on the CUDA-core decode kernels: gate/up GEMVs + SwiGLU, split-K down GEMVs, the combine."""
    from backends.torch.triton_moe_decode import _down_gemv_kernel, _gate_up_gemv_kernel
    from backends.torch.triton_quant import tile_groups

    t, h = hidden_states.shape
    topk = topk_ids.shape[1]
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    num_slots = t * topk
    dev = hidden_states.device
    x = hidden_states if hidden_states.stride(1) == 1 else hidden_states.contiguous()
    ids = topk_ids.reshape(-1).contiguous()
    rw = topk_weights.reshape(-1).contiguous()
    inter_act = torch.empty((num_slots, inter), dtype=hidden_states.dtype, device=dev)
    if cfg.words and _moe_words_reason(x, inter_act, w13, w2, quant, group_size) is None:
        return _fused_moe_words(x, ids, rw, w13, w2, s13, s2, inter_act, out, expert_offset, quant, group_size, cfg)
    # Byte tiles: float experts, and codes or activations not laid out as whole 32-bit words.
    _gate_up_gemv_kernel[(num_slots, triton.cdiv(inter, cfg.gu_block_n))](
        x, w13, s13, inter_act, ids, expert_offset, inter, h,
        x.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1), inter_act.stride(0),
        E=num_experts, TOPK=topk, BLOCK_N=cfg.gu_block_n, BLOCK_K=cfg.gu_block_k, EVEN_K=h % cfg.gu_block_k == 0,
        QUANT=quant, GROUP_SIZE=group_size or h, PER_ROW=group_size == 0,
        GROUPS=tile_groups(cfg.gu_block_k, group_size), PREFETCH=cfg.prefetch, **pdl_launch(x),
        num_warps=cfg.gu_warps,
    )
    bk = cfg.dn_block_k
    k_per_split = triton.cdiv(triton.cdiv(inter, max(1, cfg.dn_split_k)), bk) * bk
    split = triton.cdiv(inter, k_per_split)
    partial = torch.empty((split, num_slots, h), dtype=torch.float32 if split > 1 else hidden_states.dtype, device=dev)
    n_tiles = triton.cdiv(h, cfg.dn_block_n)
    combine = _combine_operands(out, t * n_tiles, topk, split)
    _down_gemv_kernel[(num_slots, n_tiles, split)](
        inter_act, w2, s2, partial, ids, rw, expert_offset, h, inter, k_per_split,
        inter_act.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), partial.stride(0),
        partial.stride(1),
        E=num_experts, BLOCK_N=cfg.dn_block_n, BLOCK_K=bk, EVEN_K=inter % k_per_split == 0 and k_per_split % bk == 0,
        QUANT=quant, GROUP_SIZE=group_size or inter, PER_ROW=group_size == 0,
        GROUPS=tile_groups(bk, group_size), PREFETCH=cfg.prefetch, EARLY=early_weights(), **combine, **pdl_launch(x),
        num_warps=cfg.dn_warps,
    )
    return out if combine else _combine_slots(partial, out, ids, expert_offset, num_experts, topk)


def _combine_operands(out: torch.Tensor, counters: int, topk: int, split: int) -> dict:
    """Launch keywords that make a down GEMV's last program per (token, column tile) write `out` itself
    (`triton_support.combine_if_last`), or {} where the combine kernel does (`MOEC_COMBINE_IN_KERNEL=0`)."""
    if not combine_in_kernel("moe"):
        return {}
    return {"COMBINE": True, "TOPK": topk, "SPLIT_K": split, "out_ptr": out, "stride_om": out.stride(0),
            "counter_ptr": arrival_counters(out.device, counters)}


def _combine_slots(partial: torch.Tensor, out: torch.Tensor, ids: torch.Tensor, expert_offset: int,
                   num_experts: int, topk: int) -> torch.Tensor:
    """out[t] = the sum of token t's slots over the down GEMVs' K splits (`_combine_kernel`)."""
    split, _, h = partial.shape
    t = out.shape[0]
    block_h = min(1024, next_pow2(h))
    _combine_kernel[(t, triton.cdiv(h, block_h))](
        partial, out, ids, expert_offset, num_experts, h, partial.stride(0), partial.stride(1), out.stride(0),
        TOPK=topk, SPLIT_K=split, BLOCK_H=block_h, **pdl_launch(partial), num_warps=4,
    )
    return out


def _moe_words_reason(x: torch.Tensor, inter_act: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, quant: int,
                      group_size: int) -> str | None:
    """Why the experts cannot run on the word kernels (None when they can): both GEMVs' operands must be words."""
    return (words_unsupported_reason(x, w13, x.shape[1], quant, group_size)
            or words_unsupported_reason(inter_act, w2, inter_act.shape[1], quant, group_size))


def _register_cap(cfg: GemvConfig) -> dict[str, int]:
    return {"maxnreg": cfg.max_regs} if cfg.max_regs else {}


def _fused_moe_words(x: torch.Tensor, ids: torch.Tensor, rw: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     s13: torch.Tensor, s2: torch.Tensor, inter_act: torch.Tensor, out: torch.Tensor,
                     expert_offset: int, quant: int, group_size: int, cfg: GemvConfig) -> torch.Tensor:
    """`_fused_moe_gemv` on the word kernels (triton_gemv_words.py): gate/up + SwiGLU, split-K down, combine."""
    from backends.torch.triton_gemv_words import _down_words_kernel, _gate_up_words_kernel, word_views

    t, h = x.shape
    num_slots, inter = inter_act.shape
    num_experts = w13.shape[0]
    fp16 = x.dtype == torch.float16
    x_pairs, w13_words = word_views(x, w13)
    gu_k = words_block_k(quant, cfg.gu_warps, cfg.words)
    _gate_up_words_kernel[(num_slots, triton.cdiv(inter, cfg.gu_block_n))](
        x_pairs, w13_words, s13, inter_act, ids, expert_offset, inter, h,
        x_pairs.stride(0), w13_words.stride(0), w13_words.stride(1), s13.stride(0), s13.stride(1), inter_act.stride(0),
        E=num_experts, TOPK=num_slots // t, BLOCK_N=cfg.gu_block_n, BLOCK_K=gu_k, EVEN_K=h % gu_k == 0,
        QUANT=quant, GROUP_SIZE=group_size or h, PER_ROW=group_size == 0, FP16=fp16, ASM=codes_in_ptx(),
        WPT=cfg.words, **pdl_launch(x), **_register_cap(cfg), num_warps=cfg.gu_warps, num_stages=1,
    )
    dn_k = words_block_k(quant, cfg.dn_warps, cfg.words)
    k_per_split = triton.cdiv(triton.cdiv(inter, max(1, cfg.dn_split_k)), dn_k) * dn_k
    split = triton.cdiv(inter, k_per_split)
    partial = torch.empty((split, num_slots, h), dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    a_pairs, w2_words = word_views(inter_act, w2)
    n_tiles = triton.cdiv(h, cfg.dn_block_n)
    combine = _combine_operands(out, t * n_tiles, num_slots // t, split)
    _down_words_kernel[(num_slots, n_tiles, split)](
        a_pairs, w2_words, s2, partial, ids, rw, expert_offset, h, inter, k_per_split,
        a_pairs.stride(0), w2_words.stride(0), w2_words.stride(1), s2.stride(0), s2.stride(1), partial.stride(0),
        partial.stride(1),
        E=num_experts, BLOCK_N=cfg.dn_block_n, BLOCK_K=dn_k, EVEN_K=inter % k_per_split == 0, QUANT=quant,
        GROUP_SIZE=group_size or inter, PER_ROW=group_size == 0, FP16=fp16, ASM=codes_in_ptx(),
        WPT=cfg.words, EARLY=early_weights(), **combine, **pdl_launch(x), **_register_cap(cfg), num_warps=cfg.dn_warps,
        num_stages=1,
    )
    return out if combine else _combine_slots(partial, out, ids, expert_offset, num_experts, num_slots // t)
