"""The fused MoE's decode path on the CUDA cores (`triton_moe.fused_moe` launches these for a handful of slots).

before: a decode step's few (token, expert) slots padded into 16-row tensor-core tiles of `_gate_up_kernel` /
        `_down_kernel`, every weight tile converted into a dot-operand layout through shared memory
after:  one program per (slot, column tile[, K slice]): the slot's expert codes stream straight into registers
        (`triton_quant.gemv_load` / `gemv_products`), are widened there and multiplied by the slot's one activation
        row, with elementwise float32 accumulators reduced once after the K loop (optionally with the next K tile's
        loads in flight: `GemvConfig.prefetch`); the gate/up kernel applies SwiGLU in its epilogue, the down kernel
        the routing weight, and `triton_moe._combine_kernel` sums each token's slots.

No alignment launch: each program reads its slot's expert id itself and returns for another rank's expert (expert
parallelism). The grid's first axis is the slot, so the programs of one column tile run together and slots that
share an expert read its tile from L2. Which precisions and slot counts take this path: `moe_tuning.GEMV_TABLE`;
int8 / int4 table entries with `words` run the same structure on 32-bit code words (`triton_gemv_words.py`).
"""

from backends.torch.triton_support import HAVE_TRITON as _HAVE_TRITON
from backends.torch.triton_support import combine_if_last, routed_expert, tl, triton, wait_for_producers

if _HAVE_TRITON:
    from backends.torch.triton_quant import (gemv_accumulate, gemv_code_index, gemv_group_scales, gemv_lead,
                                             gemv_load, gemv_load_codes, gemv_load_x, gemv_products, gemv_reduce,
                                             gemv_rows)

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
        GROUPS: tl.constexpr = 1,  # scale groups per K tile (triton_quant.tile_groups)
        PREFETCH: tl.constexpr = False,  # issue the next K tile's loads before multiplying this one
        USE_PDL: tl.constexpr = False,  # PDL launch (triton_support.pdl_launch)
    ):
        wait_for_producers(USE_PDL)
        slot = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(topk_ids_ptr + slot).to(tl.int64) - expert_offset
        if (expert < 0) | (expert >= E):  # routed to another rank's experts
            return
        token = (slot // TOPK).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ld = offs_n % N  # wrap: loads stay unmasked, wrapped columns are not stored
        PACK: tl.constexpr = 2 if QUANT == 2 else 1
        code_idx = gemv_code_index(BLOCK_K, PACK, GROUPS)
        k_idx = code_idx * PACK
        gate_ptrs = w_ptr + expert * stride_we + gemv_rows(n_ld.to(tl.int64) * stride_wn, GROUPS)
        gate_ptrs += gemv_lead(code_idx, GROUPS)
        up_ptrs = gate_ptrs + N * stride_wn
        x_row = x_ptr + token * stride_xm
        gate_scales = s_ptr + expert * stride_se + n_ld.to(tl.int64) * stride_sn
        up_scales = gate_scales + N * stride_sn
        # Elementwise accumulators, reduced over k once after the loop (triton_quant.gemv_products).
        gate_acc = tl.zeros(gate_ptrs.shape, dtype=tl.float32)
        up_acc = tl.zeros(gate_ptrs.shape, dtype=tl.float32)
        SCALED: tl.constexpr = QUANT != 0 and not PER_ROW
        num_tiles = tl.cdiv(K, BLOCK_K)
        if PREFETCH:  # tile kk + 1's loads go out before tile kk is multiplied (triton_quant._gemv_kernel)
            gate_codes, x_a, x_b = gemv_load(x_row, K, gate_ptrs, k_idx, QUANT, not EVEN_K, GROUPS)
            up_codes, x_a, x_b = gemv_load(x_row, K, up_ptrs, k_idx, QUANT, not EVEN_K, GROUPS)
            if SCALED:
                gate_sc = gemv_group_scales(gate_scales, 0, K, GROUP_SIZE, GROUPS, not EVEN_K)
                up_sc = gemv_group_scales(up_scales, 0, K, GROUP_SIZE, GROUPS, not EVEN_K)
            for kk in range(0, num_tiles):
                k_next = tl.minimum(kk + 1, num_tiles - 1) * BLOCK_K
                next_gate, next_a, next_b = gemv_load(x_row + k_next, K - k_next, gate_ptrs + k_next // PACK, k_idx,
                                                      QUANT, not EVEN_K, GROUPS)
                next_up, next_a, next_b = gemv_load(x_row + k_next, K - k_next, up_ptrs + k_next // PACK, k_idx,
                                                    QUANT, not EVEN_K, GROUPS)
                if SCALED:
                    next_gate_sc = gemv_group_scales(gate_scales, k_next, K - k_next, GROUP_SIZE, GROUPS, not EVEN_K)
                    next_up_sc = gemv_group_scales(up_scales, k_next, K - k_next, GROUP_SIZE, GROUPS, not EVEN_K)
                    gate_acc += gemv_products(gate_codes, x_a, x_b, QUANT) * gate_sc
                    up_acc += gemv_products(up_codes, x_a, x_b, QUANT) * up_sc
                    gate_sc, up_sc = next_gate_sc, next_up_sc
                else:
                    gate_acc += gemv_products(gate_codes, x_a, x_b, QUANT)
                    up_acc += gemv_products(up_codes, x_a, x_b, QUANT)
                gate_codes, up_codes, x_a, x_b = next_gate, next_up, next_a, next_b
        else:
            for kk in range(0, num_tiles):
                k0 = kk * BLOCK_K
                gate_codes, x_a, x_b = gemv_load(x_row + k0, K - k0, gate_ptrs, k_idx, QUANT, not EVEN_K, GROUPS)
                up_codes, x_a, x_b = gemv_load(x_row + k0, K - k0, up_ptrs, k_idx, QUANT, not EVEN_K, GROUPS)
                if SCALED:
                    gate_acc += gemv_products(gate_codes, x_a, x_b, QUANT) * gemv_group_scales(
                        gate_scales, k0, K - k0, GROUP_SIZE, GROUPS, not EVEN_K)
                    up_acc += gemv_products(up_codes, x_a, x_b, QUANT) * gemv_group_scales(
                        up_scales, k0, K - k0, GROUP_SIZE, GROUPS, not EVEN_K)
                else:
                    gate_acc += gemv_products(gate_codes, x_a, x_b, QUANT)
                    up_acc += gemv_products(up_codes, x_a, x_b, QUANT)
                gate_ptrs += BLOCK_K // PACK
                up_ptrs += BLOCK_K // PACK
        gate = gemv_reduce(gate_acc, GROUPS)
        up = gemv_reduce(up_acc, GROUPS)
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
        GROUPS: tl.constexpr = 1,  # scale groups per K tile (triton_quant.tile_groups)
        PREFETCH: tl.constexpr = False,  # issue the next K tile's loads before multiplying this one
        COMBINE: tl.constexpr = False,  # the last program per (token, column tile) writes out (combine_if_last)
        TOPK: tl.constexpr = 1,  # COMBINE: slots per token
        SPLIT_K: tl.constexpr = 1,  # COMBINE: K slices
        out_ptr=None,  # COMBINE: [T, H] out
        stride_om=0,
        counter_ptr=None,  # COMBINE: [T, column tiles] int32 zeroed counters (triton_support.arrival_counters)
        EARLY: tl.constexpr = False,  # expert id and first K tile before the PDL wait (triton_support.early_weights)
        USE_PDL: tl.constexpr = False,  # PDL launch (triton_support.pdl_launch)
    ):
        slot = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        # EARLY: read before the PDL wait (`routed_expert`): the router's ids are not the predecessor's output.
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
        PACK: tl.constexpr = 2 if QUANT == 2 else 1
        code_idx = gemv_code_index(BLOCK_K, PACK, GROUPS)
        k_idx = code_idx * PACK
        w_ptrs = w_ptr + expert * stride_we + gemv_rows(n_ld.to(tl.int64) * stride_wn, GROUPS) + k0 // PACK
        w_ptrs += gemv_lead(code_idx, GROUPS)
        a_row = a_ptr + slot.to(tl.int64) * stride_am + k0
        s_rows = s_ptr + expert * stride_se + n_ld.to(tl.int64) * stride_sn
        acc = tl.zeros(w_ptrs.shape, dtype=tl.float32)
        k_end = tl.minimum(k0 + k_per_split, K)
        SCALED: tl.constexpr = QUANT != 0 and not PER_ROW
        if PREFETCH or not EARLY:
            if EARLY:
                wait_for_producers(USE_PDL)
            acc = gemv_accumulate(acc, a_row, w_ptrs, k_idx, s_rows, k0, k_end - k0, QUANT, GROUP_SIZE, GROUPS,
                                  SCALED, PREFETCH, not EVEN_K, BLOCK_K)
        else:  # the first K tile's weights are in flight while the gate/up kernel finishes (`_gemv_kernel`)
            first = gemv_load_codes(k_end - k0, w_ptrs, k_idx, QUANT, not EVEN_K, GROUPS)
            wait_for_producers(USE_PDL)
            x_a, x_b = gemv_load_x(a_row, k_end - k0, k_idx, QUANT, not EVEN_K, GROUPS)
            if SCALED:
                acc += gemv_products(first, x_a, x_b, QUANT) * gemv_group_scales(s_rows, k0, k_end - k0, GROUP_SIZE,
                                                                                 GROUPS, not EVEN_K)
            else:
                acc += gemv_products(first, x_a, x_b, QUANT)
            acc = gemv_accumulate(acc, a_row + BLOCK_K, w_ptrs + BLOCK_K // PACK, k_idx, s_rows, k0 + BLOCK_K,
                                  k_end - k0 - BLOCK_K, QUANT, GROUP_SIZE, GROUPS, SCALED, False, not EVEN_K, BLOCK_K)
        out = gemv_reduce(acc, GROUPS)
        if QUANT != 0:
            if PER_ROW:
                out = out * tl.load(s_rows).to(tl.float32)
        out = out * tl.load(topk_weights_ptr + slot).to(tl.float32)
        tl.store(partial_ptr + pid_k * stride_ps + slot.to(tl.int64) * stride_pm + offs_n,
                 out.to(partial_ptr.dtype.element_ty), mask=offs_n < N)
        if COMBINE:
            combine_if_last(counter_ptr, partial_ptr, out_ptr, topk_ids_ptr, slot, pid_n, offs_n, expert_offset, E,
                            N, stride_ps, stride_pm, stride_om, TOPK, SPLIT_K)
