"""Swapped-operand tiles of weight-only experts and linears (backends/torch/triton_moe_swapped.py,
triton_quant._swapped_matmul_kernel) against the ordinary tensor-core tiles, at decode batch sizes, Mixtral-8x7B
shapes, on the GPU. Each cell: microseconds per call in a CUDA graph of several calls back to back (as in a
captured decode step), for the dispatch's choice ("default"; again with the weight codes converted by Triton's own
integer ops instead of inline PTX, MOEC_CODE_ASM=0), the tiles, and each candidate swapped config; floors
are the weight bytes the call must read (experts actually routed to) over the copy bandwidth measured in the run.

    PYTHONPATH=. python3 bench/swapped_tiles.py [--tokens 4,8,16,32,48,64] [--rows 2,8,16,32,64]
        [--schemes int4,int4g128,int8] [--tile-candidates] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os

import torch

from backends.torch import triton_moe as tm
from backends.torch import triton_quant as tq
from backends.torch.moe_tuning import SwappedConfig, get_config
from bench.decode_attention import graph_per_call
from bench.moe_kernel import log, measure_copy_bw
from compiler.quantization import quantize

E, TOP_K, H, I = 8, 2, 4096, 14336
MOE_CANDIDATES = {
    "16/32": SwappedConfig(16, 32, 128, 4, 4, 64, 128, 4, 4, 4),
    "16/64": SwappedConfig(16, 64, 128, 4, 4, 64, 128, 4, 4, 4),
    "16/64 dn128": SwappedConfig(16, 64, 128, 4, 4, 128, 128, 4, 4, 4),
    "16/64 k256": SwappedConfig(16, 64, 256, 4, 3, 64, 256, 2, 4, 3),
    "32/32": SwappedConfig(32, 32, 128, 4, 4, 64, 128, 4, 4, 4),
    # 8 warps: two warpgroups share a program's weight rows, half the registers per thread (the 4-warp programs'
    # registers held 2-3 of them per SM: Nsight Compute, BENCHMARKS.md eighth session)
    "16/64 8w": SwappedConfig(16, 64, 128, 8, 4, 128, 128, 4, 8, 4),
    "16/64 k256 8w": SwappedConfig(16, 64, 256, 8, 3, 128, 256, 2, 8, 3),
    "16/128 8w": SwappedConfig(16, 128, 128, 8, 4, 128, 128, 4, 8, 4),
    "16/128 k256 8w": SwappedConfig(16, 128, 256, 8, 3, 256, 256, 2, 8, 3),
    "32/64 8w": SwappedConfig(32, 64, 128, 8, 4, 128, 128, 4, 8, 4),
}
LINEAR_CANDIDATES = {
    "16x64": tq.LinearConfig(16, 64, 128, 4, 4),
    "16x64 k256": tq.LinearConfig(16, 64, 256, 4, 3),
    "32x64": tq.LinearConfig(32, 64, 128, 4, 4),
    "16x128 8w": tq.LinearConfig(16, 128, 128, 8, 4),
    "16x128 k256 8w": tq.LinearConfig(16, 128, 256, 8, 3),
    "32x128 8w": tq.LinearConfig(32, 128, 128, 8, 4),
}

# Ordinary tensor-core tiles (`_quantized_matmul_kernel`) for the same linears: block_m, block_n, block_k, warps,
# stages. At M <= 32 the table's 32-column tiles put qkv on 192 programs and o on 128 (about one per SM), each
# reading more activation bytes per stage than weight bytes: narrower and deeper tiles are the candidates. Caution:
# a graph of 4 calls on one weight reads an int8 qkv (25 MB) from L2 after the first call; in the tenth session the
# winners here (qkv 17.5 -> 14.6 us, o 12.5 -> 10.9 at M = 32) did not speed up the whole model's batch-32 step.
TILE_CANDIDATES = {
    "t16x16 k256": tq.LinearConfig(16, 16, 256, 4, 4),
    "t16x32 k512": tq.LinearConfig(16, 32, 512, 4, 3),
    "t16x64 k256": tq.LinearConfig(16, 64, 256, 4, 4),
    "t32x16 k256": tq.LinearConfig(32, 16, 256, 4, 4),
    "t32x32 k512": tq.LinearConfig(32, 32, 512, 4, 3),
    "t32x64 k256": tq.LinearConfig(32, 64, 256, 4, 3),
    "t32x32 k256 8w": tq.LinearConfig(32, 32, 256, 8, 4),
}


def scheme_of(name: str) -> tuple[str, int]:
    precision, _, group = name.partition("g")
    return precision, int(group or 0)


def per_call_us(fn) -> float:
    return graph_per_call([fn] * 4) * 1e6


def without_ptx(fn) -> float:
    """per_call_us with the codes converted by Triton's own integer ops (MOEC_CODE_ASM=0) instead of inline PTX."""
    before = os.environ.get("MOEC_CODE_ASM")
    os.environ["MOEC_CODE_ASM"] = "0"
    try:
        return per_call_us(fn)
    finally:
        if before is None:
            del os.environ["MOEC_CODE_ASM"]
        else:
            os.environ["MOEC_CODE_ASM"] = before


def moe_rows(tokens: list[int], schemes: list[str], bw: float, gen: torch.Generator) -> list[str]:
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=gen) / math.sqrt(H)).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device="cuda", generator=gen) / math.sqrt(I)).to(torch.bfloat16)
    rows = []
    for scheme in schemes:
        precision, group = scheme_of(scheme)
        (c13, s13), (c2, s2) = quantize(w13, precision, group), quantize(w2, precision, group)
        expert_bytes = sum(t.numel() * t.element_size() for t in (c13, s13, c2, s2)) / E
        kw = dict(precision=precision, w13_scales=s13, w2_scales=s2, group_size=group)
        for t in tokens:
            x = torch.randn(t, H, device="cuda", generator=gen).to(torch.bfloat16)
            rw, ids = torch.topk(torch.softmax(torch.randn(t, E, device="cuda", generator=gen), -1), TOP_K, -1)
            floor = expert_bytes * torch.unique(ids).numel() / bw * 1e6

            def run(cfg, timer=per_call_us):
                return timer(lambda: tm.fused_moe(x, ids, rw, c13, c2, config=cfg, **kw))

            cells = [f"{run(None):.1f}", f"{run(None, without_ptx):.1f}",
                     f"{run(get_config(t, H, I, group, quantized=True)):.1f}"]
            cells += [f"{run(cfg):.1f}" if not (group and group % cfg.gu_block_k) else "-"
                      for cfg in MOE_CANDIDATES.values()]
            rows.append(f"| MoE | {scheme} | {t} | {floor:.1f} | " + " | ".join(cells) + " |")
            log(rows[-1])
        del c13, c2
    return rows


def linear_rows(rows_m: list[int], schemes: list[str], bw: float, gen: torch.Generator, tiles: bool) -> list[str]:
    rows = []
    for scheme in schemes:
        precision, group = scheme_of(scheme)
        for n, k, name in ((6144, 4096, "qkv"), (4096, 4096, "o")):
            q, s = quantize(torch.randn(n, k, device="cuda", generator=gen).to(torch.bfloat16) / 64, precision, group)
            floor = (q.numel() * q.element_size() + s.numel() * s.element_size()) / bw * 1e6
            for m in rows_m:
                x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)

                def run(timer=per_call_us, **kw):
                    return timer(lambda: tq.quantized_matmul(x, q, s, precision, group, **kw))

                cells = [f"{run():.1f}", f"{run(without_ptx):.1f}", f"{run(kernel='tiles'):.1f}"]
                cells += [f"{run(kernel='swapped', config=cfg):.1f}" if not (group and group % cfg.block_k) else "-"
                          for cfg in LINEAR_CANDIDATES.values()]
                if tiles:
                    cells += [f"{run(kernel='tiles', config=cfg):.1f}" for cfg in TILE_CANDIDATES.values()]
                rows.append(f"| {name} {n}x{k} | {scheme} | {m} | {floor:.1f} | " + " | ".join(cells) + " |")
                log(rows[-1])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="4,8,16,32,48,64", help="MoE tokens (empty: no MoE rows)")
    ap.add_argument("--rows", default="2,8,16,32,64", help="linear rows (empty: no linear rows)")
    ap.add_argument("--schemes", default="int4,int4g128,int8")
    ap.add_argument("--tile-candidates", action="store_true",
                    help="also time the ordinary tiles' TILE_CANDIDATES on the linears")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("moec: error: bench/swapped_tiles.py needs a CUDA GPU")
    schemes = args.schemes.split(",")
    gen = torch.Generator(device="cuda").manual_seed(0)
    bw = measure_copy_bw()
    head = (f"Card: {torch.cuda.get_device_name()}; torch {torch.__version__}; date {datetime.date.today()}; "
            f"copy {bw / 1e12:.3f} TB/s (this run); us per call, CUDA graph of 4 back to back")
    log(head)
    out = [head, ""]
    if args.tokens:
        out += ["| op | scheme | T | floor us | default | default, no PTX | tiles | " + " | ".join(MOE_CANDIDATES)
                + " |", "|---|---|---|---|---|---|---|" + "---|" * len(MOE_CANDIDATES)]
        out += moe_rows([int(t) for t in args.tokens.split(",")], schemes, bw, gen)
        out.append("")
    if args.rows:
        names = list(LINEAR_CANDIDATES) + (list(TILE_CANDIDATES) if args.tile_candidates else [])
        out += ["| op | scheme | M | floor us | default | default, no PTX | tiles | " + " | ".join(names)
                + " |", "|---|---|---|---|---|---|---|" + "---|" * len(names)]
        out += linear_rows([int(m) for m in args.rows.split(",")], schemes, bw, gen, args.tile_candidates)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
