"""Probe, kept for the record: the bf16 fused MoE's grouped GEMMs fed by TMA (Hopper's tensor memory accelerator,
host tensor descriptors), against `triton_moe`'s pointer-loaded tiles, cuBLAS on each expert's rows, and the same
kernel on perfectly balanced routing. Measured on an H200 (seventh session, BENCHMARKS.md): not faster, so the
kernels live here and not in backends/.

The activations are gathered into expert order first (a TMA box is a rectangle of one tensor), the gate/up output is
written in that order, the down GEMM's epilogue scatters rows back to their slots; variants: 128- or 64-row blocks,
persistent programs, Triton's warp specialization on the K loop.

    PYTHONPATH=. python3 bench/moe_tma_probe.py [--tokens 256,1024,2048] [--variants A128,A128w] [--balanced]
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass

import torch

from backends.torch import triton_moe
from backends.torch.moe_tuning import next_pow2
from backends.torch.triton_support import HAVE_TRITON, grouped_tile_ids, interpreting, pdl_launch, tl, triton
from backends.torch.triton_support import wait_for_producers
from bench.moe_kernel import reference, time_calls

try:  # Triton >= 3.4 on the host
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - older Triton or none
    TensorDescriptor = None


@dataclass(frozen=True)
class TmaConfig:
    block_m: int
    gu_block_n: int
    gu_block_k: int
    gu_group_m: int
    gu_warps: int
    gu_stages: int
    dn_block_n: int
    dn_block_k: int
    dn_group_m: int
    dn_warps: int
    dn_stages: int
    persistent: bool = False
    ws: bool = False  # tl.range(warp_specialize=True) on the K loops


VARIANTS = {
    "A128": TmaConfig(128, 128, 64, 8, 8, 4, 256, 64, 8, 8, 4),
    "A128p": TmaConfig(128, 128, 64, 8, 8, 4, 256, 64, 8, 8, 4, persistent=True),
    "A128w": TmaConfig(128, 128, 64, 8, 8, 4, 256, 64, 8, 8, 4, ws=True),
    "A128s3": TmaConfig(128, 128, 64, 8, 8, 3, 256, 64, 8, 8, 3),
    "B64": TmaConfig(64, 128, 64, 8, 4, 5, 256, 64, 8, 4, 5),
    "D128k": TmaConfig(128, 64, 128, 8, 8, 3, 128, 128, 8, 8, 3),
}


if HAVE_TRITON:

    @triton.jit
    def _gather_rows_kernel(x_ptr, xs_ptr, sorted_slots_ptr, block_expert_ptr, num_slots, H, stride_xm,
                            TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
                            USE_PDL: tl.constexpr = False):
        wait_for_producers(USE_PDL)
        pid_m = tl.program_id(0)
        if tl.load(block_expert_ptr + pid_m) < 0:  # past the last expert's segment: never read
            return
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        slot = tl.load(sorted_slots_ptr + rows)
        ok = slot < num_slots
        token = tl.where(ok, slot // TOPK, 0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        v = tl.load(x_ptr + token[:, None] * stride_xm + cols[None, :], mask=ok[:, None] & (cols[None, :] < H),
                    other=0.0)
        tl.store(xs_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :], v, mask=cols[None, :] < H)

    @triton.jit
    def _gate_up_tma_kernel(xs_desc, w_desc, act_desc, block_expert_ptr, num_pid_m, N, K,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr, STAGES: tl.constexpr, NUM_PROGS: tl.constexpr,
                            DOT_F32: tl.constexpr, WS: tl.constexpr = False, USE_PDL: tl.constexpr = False):
        # w_desc: w13 as [E * 2N, K], boxes [BLOCK_N, BLOCK_K]; gate rows e*2N + n, up rows e*2N + N + n.
        wait_for_producers(USE_PDL)
        num_pid_n = N // BLOCK_N
        for tile in range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGS):
            pid_m, pid_n = grouped_tile_ids(tile, num_pid_m, num_pid_n, GROUP_M)
            expert = tl.load(block_expert_ptr + pid_m)
            if expert >= 0:
                row = pid_m * BLOCK_M
                gate_row = expert * 2 * N + pid_n * BLOCK_N
                acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for kk in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=STAGES, warp_specialize=WS):
                    a = xs_desc.load([row, kk * BLOCK_K])
                    g = w_desc.load([gate_row, kk * BLOCK_K])
                    u = w_desc.load([gate_row + N, kk * BLOCK_K])
                    if DOT_F32:
                        a = a.to(tl.float32)
                        g = g.to(tl.float32)
                        u = u.to(tl.float32)
                    acc_g = tl.dot(a, g.T, acc_g)
                    acc_u = tl.dot(a, u.T, acc_u)
                act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
                act_desc.store([row, pid_n * BLOCK_N], act.to(act_desc.dtype))

    @triton.jit
    def _down_tma_kernel(act_desc, w_desc, partial_ptr, sorted_slots_ptr, block_expert_ptr, topk_weights_ptr,
                         num_slots, num_pid_m, N, K, stride_pm,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, STAGES: tl.constexpr, NUM_PROGS: tl.constexpr,
                         DOT_F32: tl.constexpr, WS: tl.constexpr = False, USE_PDL: tl.constexpr = False):
        # w_desc: w2 as [E * N, K] (N = H, K = I), boxes [BLOCK_N, BLOCK_K]
        wait_for_producers(USE_PDL)
        num_pid_n = N // BLOCK_N
        for tile in range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGS):
            pid_m, pid_n = grouped_tile_ids(tile, num_pid_m, num_pid_n, GROUP_M)
            expert = tl.load(block_expert_ptr + pid_m)
            if expert >= 0:
                row = pid_m * BLOCK_M
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for kk in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=STAGES, warp_specialize=WS):
                    a = act_desc.load([row, kk * BLOCK_K])
                    b = w_desc.load([expert * N + pid_n * BLOCK_N, kk * BLOCK_K])
                    if DOT_F32:
                        a = a.to(tl.float32)
                        b = b.to(tl.float32)
                    acc = tl.dot(a, b.T, acc)
                slot = tl.load(sorted_slots_ptr + row + tl.arange(0, BLOCK_M))
                ok = slot < num_slots
                slot = tl.where(ok, slot, 0).to(tl.int64)
                rw = tl.load(topk_weights_ptr + slot, mask=ok, other=0.0).to(tl.float32)
                cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                tl.store(partial_ptr + slot[:, None] * stride_pm + cols[None, :],
                         (acc * rw[:, None]).to(partial_ptr.dtype.element_ty), mask=ok[:, None])


def _programs(x: torch.Tensor, tiles: int, persistent: bool) -> int:
    if not persistent:
        return tiles
    if not x.is_cuda:  # the interpreter: a few programs, each walking several tiles
        return min(tiles, 3)
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return min(tiles, torch.cuda.get_device_properties(index).multi_processor_count)


def gate_up_down_tma(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, sorted_slots: torch.Tensor,
                     block_expert: torch.Tensor, rw: torch.Tensor, partial: torch.Tensor, topk: int, cfg) -> None:
    """Steps 2-3 of `triton_moe.fused_moe` on TMA: writes `partial` [S, H] (routing weight applied, slot order).
    `cfg` is a `TmaConfig`; `sorted_slots` / `block_expert` come from `triton_moe._align_kernel` run
    with `cfg.block_m`."""
    num_slots = partial.shape[0]
    hidden = x.shape[1]
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    bm = cfg.block_m
    nb_max = block_expert.shape[0]
    rows = nb_max * bm
    pdl = pdl_launch(x)
    xs = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    block_h = 1024
    _gather_rows_kernel[(nb_max, triton.cdiv(hidden, block_h))](
        x, xs, sorted_slots, block_expert, num_slots, hidden, x.stride(0),
        TOPK=topk, BLOCK_M=bm, BLOCK_H=block_h, **pdl, num_warps=4)
    act = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
    xs_desc = TensorDescriptor.from_tensor(xs, [bm, cfg.gu_block_k])
    w13_desc = TensorDescriptor.from_tensor(w13.view(num_experts * two_i, hidden), [cfg.gu_block_n, cfg.gu_block_k])
    act_out_desc = TensorDescriptor.from_tensor(act, [bm, cfg.gu_block_n])
    tiles = nb_max * (inter // cfg.gu_block_n)
    progs = _programs(x, tiles, cfg.persistent)
    _gate_up_tma_kernel[(progs,)](
        xs_desc, w13_desc, act_out_desc, block_expert, nb_max, inter, hidden,
        BLOCK_M=bm, BLOCK_N=cfg.gu_block_n, BLOCK_K=cfg.gu_block_k, GROUP_M=cfg.gu_group_m, STAGES=cfg.gu_stages,
        NUM_PROGS=progs, DOT_F32=interpreting(), WS=getattr(cfg, 'ws', False), **pdl, num_warps=cfg.gu_warps)
    act_desc = TensorDescriptor.from_tensor(act, [bm, cfg.dn_block_k])
    w2_desc = TensorDescriptor.from_tensor(w2.view(num_experts * hidden, inter), [cfg.dn_block_n, cfg.dn_block_k])
    tiles = nb_max * (hidden // cfg.dn_block_n)
    progs = _programs(x, tiles, cfg.persistent)
    _down_tma_kernel[(progs,)](
        act_desc, w2_desc, partial, sorted_slots, block_expert, rw, num_slots, nb_max, hidden, inter,
        partial.stride(0),
        BLOCK_M=bm, BLOCK_N=cfg.dn_block_n, BLOCK_K=cfg.dn_block_k, GROUP_M=cfg.dn_group_m, STAGES=cfg.dn_stages,
        NUM_PROGS=progs, DOT_F32=interpreting(), WS=getattr(cfg, 'ws', False), **pdl, num_warps=cfg.dn_warps)


def moe_tma(x, ids2, rw2, w13, w2, cfg: TmaConfig) -> torch.Tensor:
    """The whole MoE with the TMA GEMMs between `triton_moe`'s routing and combine kernels."""
    t, h = x.shape
    topk = ids2.shape[1]
    num_experts = w13.shape[0]
    num_slots, bm = t * topk, cfg.block_m
    ids, rw = ids2.reshape(-1).contiguous(), rw2.reshape(-1).contiguous()
    nb_max = triton.cdiv(num_slots, bm) + min(num_slots, num_experts)
    sorted_slots = torch.empty(nb_max * bm, dtype=torch.int32, device=x.device)
    block_expert = torch.empty(nb_max, dtype=torch.int32, device=x.device)
    triton_moe._align_kernel[(1,)](
        ids, sorted_slots, block_expert, num_slots, nb_max, 0, E=num_experts, E_P=max(2, next_pow2(num_experts)),
        BLOCK_M=bm, CHUNK=min(1024, max(16, next_pow2(num_slots))), NB_CHUNK=min(1024, max(16, next_pow2(nb_max))),
        **pdl_launch(x), num_warps=4)
    partial = torch.empty((num_slots, h), dtype=x.dtype, device=x.device)
    gate_up_down_tma(x, w13, w2, sorted_slots, block_expert, rw, partial, topk, cfg)
    out = torch.empty_like(x)
    block_h = min(1024, next_pow2(h))
    triton_moe._combine_kernel[(t, triton.cdiv(h, block_h))](
        partial, out, ids, 0, num_experts, h, 0, partial.stride(0), out.stride(0), TOPK=topk, SPLIT_K=1,
        BLOCK_H=block_h, **pdl_launch(x), num_warps=4)
    return out


def median_us(fn, reps: int = 20) -> float:
    return statistics.median(time_calls([fn], reps=reps)) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="256,1024,2048,4096")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--balanced", action="store_true", help="every expert gets exactly T*k/E slots")
    args = ap.parse_args()
    if not torch.cuda.is_available() or TensorDescriptor is None:
        raise SystemExit("moec: error: bench/moe_tma_probe.py needs a CUDA GPU and Triton >= 3.4")
    num_experts, topk, hidden, inter = 8, 2, 4096, 14336
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=gen) / math.sqrt(hidden)).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda", generator=gen) / math.sqrt(inter)).bfloat16()
    for t in [int(a) for a in args.tokens.split(",")]:
        x = torch.randn(t, hidden, device="cuda", generator=gen).bfloat16()
        rw, ids = torch.topk(torch.softmax(torch.randn(t, num_experts, device="cuda", generator=gen), -1), topk, -1)
        if args.balanced:
            ids = (torch.arange(t * topk, device="cuda") % num_experts).reshape(t, topk)
        ref = reference(x, ids, rw, w13, w2)
        flop_floor = 2 * t * topk * 3 * hidden * inter / 795e12
        floor_us = max(flop_floor, num_experts * 3 * hidden * inter * 2 / 4.22e12) * 1e6
        base = median_us(lambda: triton_moe.fused_moe(x, ids, rw, w13, w2))
        counts = torch.bincount(ids.reshape(-1), minlength=num_experts).tolist()
        rows = [torch.randn(c, hidden, device="cuda", dtype=torch.bfloat16) for c in counts]

        def cublas_per_expert() -> None:
            for e in range(num_experts):
                torch.mm((rows[e] @ w13[e].T)[:, :inter], w2[e].T)

        print(f"T={t}{' balanced' if args.balanced else ''}: floor {floor_us:.0f} us (H200 795 TFLOP/s, 4.22 TB/s) | "
              f"triton_moe {base:.0f} ({base / floor_us:.2f}x) | cuBLAS per expert {median_us(cublas_per_expert):.0f}",
              flush=True)
        for name in args.variants.split(","):
            cfg = VARIANTS[name]
            try:
                out = moe_tma(x, ids, rw, w13, w2, cfg)
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                us = median_us(lambda: moe_tma(x, ids, rw, w13, w2, cfg))
                print(f"  {name}: {us:.0f} us ({us / floor_us:.2f}x), max err {err:.1e}", flush=True)
            except Exception as exc:  # a variant that does not compile (shared memory) is reported, not fatal
                print(f"  {name}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
