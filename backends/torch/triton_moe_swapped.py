"""The fused MoE's two grouped GEMMs with swapped operands, for weight-only int8 / int4 experts at small batches
(`triton_moe.fused_moe` picks them from `moe_tuning.SWAPPED_TABLE`; routing and combine stay `triton_moe`'s).

At decode batches of a few to 64 tokens each expert sees a handful of rows, and the tensor-core tiles of
`triton_moe._gate_up_kernel` (`x [BM, BK] @ w [BK, BN]`) put the dequantized weights on the MMA's B side: on
Hopper that operand must sit in shared memory, so every code tile goes registers -> shared memory -> tensor cores,
and the 16-row activation tile is mostly padding. Here the product is transposed, `w [BN, BK] @ x^T [BK, BM]`:
the weights are the MMA's M side, an operand that may come straight from registers (codes dequantized in the
registers they were loaded into), and the few token rows are its N side (16 or 32 columns). Measured on an H200
at Mixtral shapes (bench/swapped_tiles.py, BENCHMARKS.md seventh session): int4 experts at T = 32 1.6x faster than
the tiles (351 vs 569 us); eighth session, with the codes converted in PTX (`ASM`, triton_support.codes_in_ptx) and 8
warps, 286.5 us.

Weights are read as stored (int8 codes, or bytes of int4 code pairs with k = 2j in the low nibble); int4 multiplies
the even-k codes by the even activation columns and the odd-k codes by the odd ones, as `triton_quant.codes_dot`.
Per-channel scales multiply the accumulator once; group scales multiply each K tile's partial sums (a K tile never
straddles a group). K must be a multiple of the K tiles; column tiles wrap around (loads in bounds) and the extra
rows are dropped at the store.
"""

from __future__ import annotations

import torch

from backends.torch.moe_tuning import SwappedConfig
from backends.torch.triton_support import HAVE_TRITON, codes_in_ptx, grouped_tile_ids, tl, triton, wait_for_producers

__all__ = ["gate_up_down", "swapped_reason"]


def swapped_reason(hidden: int, inter: int, group_size: int, cfg: SwappedConfig,
                   precision: str = "int8") -> str | None:
    """Why these shapes of `precision` experts cannot take `cfg`'s swapped tiles, or None. Every dot dimension is at
    least 16 (int4 dots are half a K tile deep)."""
    pack = 2 if precision == "int4" else 1
    if min(cfg.block_m, 2 * cfg.gu_block_n, cfg.dn_block_n, cfg.gu_block_k // pack, cfg.dn_block_k // pack) < 16:
        return "a dot dimension of these tiles is under 16"
    for name, k, bk in (("H", hidden, cfg.gu_block_k), ("I", inter, cfg.dn_block_k)):
        if k % bk:
            return f"{name}={k} is not a multiple of the K tile {bk}"
        if group_size and group_size % bk:
            return f"group size {group_size} is not a multiple of the K tile {bk}"
    return None


if HAVE_TRITON:
    from backends.torch.triton_quant import swapped_k_loop

    @triton.jit
    def _gate_up_swapped_kernel(
        x_ptr,  # [T, H]
        w_ptr,  # [E, 2I, H] int8 codes or [E, 2I, H/2] int4 code pairs
        s_ptr,  # [E, 2I, G] scales
        inter_ptr,  # [S, I] out: silu(gate) * up
        sorted_slots_ptr,
        block_expert_ptr,
        num_slots,
        num_pid_m,
        N,  # I
        K,  # H
        stride_xm,
        stride_we,
        stride_wn,
        stride_se,
        stride_sn,
        stride_im,
        TOPK: tl.constexpr,
        BLOCK_M: tl.constexpr,  # token rows per block: the MMA's N side
        BLOCK_N: tl.constexpr,  # columns of I per program: 2 * BLOCK_N weight rows (gate and up interleaved)
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        QUANT: tl.constexpr,  # 1 int8, 2 int4 (triton_quant.QUANT_CODES)
        GROUP_SIZE: tl.constexpr,  # K elements per scale (unused with PER_ROW)
        PER_ROW: tl.constexpr,
        DOT_F32: tl.constexpr,  # interpreter only (triton_moe._dot_in_f32)
        USE_PDL: tl.constexpr = False,  # PDL launch (triton_support.pdl_launch)
        ASM: tl.constexpr = False,  # codes to floats in PTX (triton_support.codes_in_ptx)
    ):
        wait_for_producers(USE_PDL)
        pid_m, pid_n = grouped_tile_ids(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:  # past the last expert's segment (the grid is an upper bound)
            return
        slot = tl.load(sorted_slots_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = slot < num_slots
        token = tl.where(row_ok, slot // TOPK, 0).to(tl.int64)
        # Weight rows interleaved: even rows gate (n), odd rows the matching up row (I + n), so one dot gives both
        # and the epilogue pairs them up; rows past N wrap around (dropped at the store).
        offs_c = tl.arange(0, 2 * BLOCK_N)
        w_row = (pid_n * BLOCK_N + offs_c // 2) % N + (offs_c % 2) * N
        PACK: tl.constexpr = 2 if QUANT == 2 else 1
        w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + w_row[:, None] * stride_wn
                  + tl.arange(0, BLOCK_K // PACK)[None, :])
        s_rows = s_ptr + expert.to(tl.int64) * stride_se + w_row * stride_sn
        acc = swapped_k_loop(w_ptrs, x_ptr + token[:, None] * stride_xm, row_ok, s_rows, 0, K // BLOCK_K,
                             tl.zeros([2 * BLOCK_N, BLOCK_M], dtype=tl.float32), QUANT, BLOCK_K, BLOCK_M,
                             GROUP_SIZE, PER_ROW, DOT_F32, ASM)
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_N, 2, BLOCK_M)), (0, 2, 1)))
        act = gate / (1.0 + tl.exp(-gate)) * up  # [BN, BM], SwiGLU in fp32
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(inter_ptr + slot.to(tl.int64)[None, :] * stride_im + offs_n[:, None],
                 act.to(inter_ptr.dtype.element_ty), mask=row_ok[None, :] & (offs_n[:, None] < N))

    @triton.jit
    def _down_swapped_kernel(
        a_ptr,  # [S, I] intermediate
        w_ptr,  # [E, H, I] int8 codes or [E, H, I/2] int4 code pairs
        s_ptr,  # [E, H, G] scales
        partial_ptr,  # [SPLIT_K, S, H] out
        sorted_slots_ptr,
        block_expert_ptr,
        topk_weights_ptr,  # [S]
        num_slots,
        num_pid_m,
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
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        QUANT: tl.constexpr,
        GROUP_SIZE: tl.constexpr,
        PER_ROW: tl.constexpr,
        DOT_F32: tl.constexpr,
        USE_PDL: tl.constexpr = False,
        ASM: tl.constexpr = False,
    ):
        wait_for_producers(USE_PDL)
        pid_k = tl.program_id(1)
        pid_m, pid_n = grouped_tile_ids(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        slot = tl.load(sorted_slots_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = slot < num_slots
        row = tl.where(row_ok, slot, 0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = pid_k * k_per_split
        PACK: tl.constexpr = 2 if QUANT == 2 else 1
        w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + (offs_n % N)[:, None] * stride_wn
                  + (k0 // PACK + tl.arange(0, BLOCK_K // PACK))[None, :])
        s_rows = s_ptr + expert.to(tl.int64) * stride_se + (offs_n % N) * stride_sn
        num_k_tiles = (tl.minimum(k0 + k_per_split, K) - k0) // BLOCK_K
        acc = swapped_k_loop(w_ptrs, a_ptr + row[:, None] * stride_am + k0, row_ok, s_rows, k0, num_k_tiles,
                             tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), QUANT, BLOCK_K, BLOCK_M,
                             GROUP_SIZE, PER_ROW, DOT_F32, ASM)
        rw = tl.load(topk_weights_ptr + row, mask=row_ok, other=0.0).to(tl.float32)  # routing weight, per slot
        tl.store(partial_ptr + pid_k * stride_ps + row[None, :] * stride_pm + offs_n[:, None],
                 (acc * rw[None, :]).to(partial_ptr.dtype.element_ty), mask=row_ok[None, :] & (offs_n[:, None] < N))


def gate_up_down(x: torch.Tensor, w13: torch.Tensor, s13: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
                 sorted_slots: torch.Tensor, block_expert: torch.Tensor, rw: torch.Tensor, topk: int, quant: int,
                 group_size: int, cfg: SwappedConfig, pdl: dict[str, bool], dot_f32: bool) -> torch.Tensor:
    """Steps 2-3 of `triton_moe.fused_moe` on swapped tiles: returns the routing-weighted partial sums
    [SPLIT_K, S, H] (float32 when split) for `triton_moe._combine_kernel`. `sorted_slots` / `block_expert` come
    from `triton_moe._align_kernel` run with `cfg.block_m`."""
    num_slots = rw.shape[0]
    hidden = x.shape[1]
    inter = w13.shape[1] // 2
    nb_max = block_expert.shape[0]
    per_row = group_size == 0
    act = torch.empty((num_slots, inter), dtype=x.dtype, device=x.device)
    _gate_up_swapped_kernel[(nb_max * triton.cdiv(inter, cfg.gu_block_n),)](
        x, w13, s13, act, sorted_slots, block_expert, num_slots, nb_max, inter, hidden, x.stride(0),
        w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1), act.stride(0),
        TOPK=topk, BLOCK_M=cfg.block_m, BLOCK_N=cfg.gu_block_n, BLOCK_K=cfg.gu_block_k, GROUP_M=cfg.group_m,
        QUANT=quant, GROUP_SIZE=group_size or hidden, PER_ROW=per_row, DOT_F32=dot_f32, ASM=codes_in_ptx(),
        **pdl, num_warps=cfg.gu_warps, num_stages=cfg.gu_stages)
    bk = cfg.dn_block_k
    k_per_split = triton.cdiv(triton.cdiv(inter, max(1, cfg.dn_split_k)), bk) * bk
    split = triton.cdiv(inter, k_per_split)
    partial = torch.empty((split, num_slots, hidden), dtype=torch.float32 if split > 1 else x.dtype,
                          device=x.device)
    _down_swapped_kernel[(nb_max * triton.cdiv(hidden, cfg.dn_block_n), split)](
        act, w2, s2, partial, sorted_slots, block_expert, rw, num_slots, nb_max, hidden, inter, k_per_split,
        act.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), partial.stride(0), partial.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.dn_block_n, BLOCK_K=bk, GROUP_M=cfg.group_m, QUANT=quant,
        GROUP_SIZE=group_size or inter, PER_ROW=per_row, DOT_F32=dot_f32, ASM=codes_in_ptx(),
        **pdl, num_warps=cfg.dn_warps, num_stages=cfg.dn_stages)
    return partial
