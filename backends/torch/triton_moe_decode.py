"""The fused MoE's decode path on the CUDA cores (`triton_moe.fused_moe` launches these for a handful of slots).

before: a decode step's few (token, expert) slots padded into 16-row tensor-core tiles of `_gate_up_kernel` /
        `_down_kernel`, every weight tile converted into a dot-operand layout through shared memory
after:  one program per (slot, column tile[, K slice]): the slot's expert codes stream straight into registers
        (`triton_quant.codes_gemv`), are widened there and multiplied by the slot's one activation row, with
        elementwise float32 accumulators reduced once after the K loop; the gate/up kernel applies SwiGLU in its
        epilogue, the down kernel the routing weight, and `triton_moe._combine_kernel` sums each token's slots.

No alignment launch: each program reads its slot's expert id itself and returns for another rank's expert (expert
parallelism). The grid's first axis is the slot, so the programs of one column tile run together and slots that
share an expert read its tile from L2. Which precisions and slot counts take this path: `moe_tuning.GEMV_TABLE`.
"""

from backends.torch.triton_support import HAVE_TRITON as _HAVE_TRITON
from backends.torch.triton_support import tl, triton

if _HAVE_TRITON:
    from backends.torch.triton_quant import codes_gemv

    @triton.jit(do_not_specialize=["expert_offset"])
    def _gate_up_gemv_kernel(
        x_ptr,  # [T, H]
        w_ptr,  # [E, 2I, H] float / int8 or [E, 2I, H/2] int4 codes, k contiguous
        s_ptr,  # [E, 2I, G] scales (unused for float weights)
        inter_ptr,  # [S, I] out
        topk_ids_ptr,  # [S] routed (global) expert ids
        expert_offset,
        N,  # I
        K,  # H
        stride_xm,
        stride_we,
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
    ):
        slot = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(topk_ids_ptr + slot).to(tl.int64) - expert_offset
        if (expert < 0) | (expert >= E):  # routed to another rank's experts
            return
        token = (slot // TOPK).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ld = offs_n % N  # wrap: loads stay unmasked, wrapped columns are not stored
        PACK: tl.constexpr = 2 if QUANT == 2 else 1
        offs_kw = tl.arange(0, BLOCK_K // PACK)
        gate_ptrs = w_ptr + expert * stride_we + n_ld.to(tl.int64)[:, None] * stride_wn + offs_kw[None, :]
        up_ptrs = gate_ptrs + N * stride_wn
        x_row = x_ptr + token * stride_xm
        gate_scales = s_ptr + expert * stride_se + n_ld.to(tl.int64) * stride_sn
        up_scales = gate_scales + N * stride_sn
        # Elementwise accumulators, reduced over k once after the loop (triton_quant.codes_gemv).
        gate_acc = tl.zeros([BLOCK_N, BLOCK_K // PACK], dtype=tl.float32)
        up_acc = tl.zeros([BLOCK_N, BLOCK_K // PACK], dtype=tl.float32)
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            k0 = kk * BLOCK_K
            part_gate = codes_gemv(x_row + k0, K - k0, gate_ptrs, QUANT, BLOCK_K, not EVEN_K)
            part_up = codes_gemv(x_row + k0, K - k0, up_ptrs, QUANT, BLOCK_K, not EVEN_K)
            if QUANT == 0 or PER_ROW:
                gate_acc += part_gate
                up_acc += part_up
            else:
                gate_acc += part_gate * tl.load(gate_scales + k0 // GROUP_SIZE).to(tl.float32)[:, None]
                up_acc += part_up * tl.load(up_scales + k0 // GROUP_SIZE).to(tl.float32)[:, None]
            gate_ptrs += BLOCK_K // PACK
            up_ptrs += BLOCK_K // PACK
        gate = tl.sum(gate_acc, axis=1)
        up = tl.sum(up_acc, axis=1)
        if QUANT != 0:
            if PER_ROW:
                gate = gate * tl.load(gate_scales).to(tl.float32)
                up = up * tl.load(up_scales).to(tl.float32)
        act = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(inter_ptr + slot.to(tl.int64) * stride_im + offs_n, act.to(inter_ptr.dtype.element_ty),
                 mask=offs_n < N)

    @triton.jit(do_not_specialize=["expert_offset"])
    def _down_gemv_kernel(
        a_ptr,  # [S, I] intermediate
        w_ptr,  # [E, H, I] float / int8 or [E, H, I/2] int4 codes, k contiguous
        s_ptr,  # [E, H, G]
        partial_ptr,  # [SPLIT_K, S, H] out
        topk_ids_ptr,
        topk_weights_ptr,  # [S]
        expert_offset,
        N,  # H
        K,  # I
        k_per_split,  # multiple of BLOCK_K
        stride_am,
        stride_we,
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
    ):
        slot = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        expert = tl.load(topk_ids_ptr + slot).to(tl.int64) - expert_offset
        if (expert < 0) | (expert >= E):
            return
        k0 = pid_k * k_per_split
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ld = offs_n % N
        PACK: tl.constexpr = 2 if QUANT == 2 else 1
        offs_kw = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
        w_ptrs = w_ptr + expert * stride_we + n_ld.to(tl.int64)[:, None] * stride_wn + offs_kw[None, :]
        a_row = a_ptr + slot.to(tl.int64) * stride_am + k0
        s_rows = s_ptr + expert * stride_se + n_ld.to(tl.int64) * stride_sn
        acc = tl.zeros([BLOCK_N, BLOCK_K // PACK], dtype=tl.float32)
        k_end = tl.minimum(k0 + k_per_split, K)
        for kk in range(0, tl.cdiv(k_end - k0, BLOCK_K)):
            part = codes_gemv(a_row + kk * BLOCK_K, k_end - k0 - kk * BLOCK_K, w_ptrs, QUANT, BLOCK_K, not EVEN_K)
            if QUANT == 0 or PER_ROW:
                acc += part
            else:
                acc += part * tl.load(s_rows + (k0 + kk * BLOCK_K) // GROUP_SIZE).to(tl.float32)[:, None]
            w_ptrs += BLOCK_K // PACK
        out = tl.sum(acc, axis=1)
        if QUANT != 0:
            if PER_ROW:
                out = out * tl.load(s_rows).to(tl.float32)
        out = out * tl.load(topk_weights_ptr + slot).to(tl.float32)
        tl.store(partial_ptr + pid_k * stride_ps + slot.to(tl.int64) * stride_pm + offs_n,
                 out.to(partial_ptr.dtype.element_ty), mask=offs_n < N)
