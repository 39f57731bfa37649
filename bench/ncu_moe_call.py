"""One fused MoE call of int4 Mixtral-8x7B experts per token count, bracketed for Nsight Compute (the driver behind
the eighth session's occupancy and DRAM figures in BENCHMARKS.md). Each call is warmed up (compiled) first; only the
bracketed one is profiled:

    PYTHONPATH=. ncu --profile-from-start off --kernel-name regex:"swapped|words" --section SpeedOfLight \\
        --section WarpStateStats --section Occupancy --section SchedulerStats --section MemoryWorkloadAnalysis \\
        python3 bench/ncu_moe_call.py [--tokens 1,8] [--precision int4] [--group-size 0]

ncu locks the clocks to base by default, so its durations are longer than the CUDA-graph timings of
bench/swapped_tiles.py; read its percentages (occupancy, DRAM busy, issue slots) rather than its microseconds.
"""

from __future__ import annotations

import argparse
import math

import torch

from backends.torch import triton_moe as tm
from compiler.quantization import quantize

E, TOP_K, H, I = 8, 2, 4096, 14336


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--precision", default="int4", choices=("int8", "int4"))
    ap.add_argument("--group-size", type=int, default=0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("moec: error: bench/ncu_moe_call.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=gen) / math.sqrt(H)).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device="cuda", generator=gen) / math.sqrt(I)).to(torch.bfloat16)
    (c13, s13), (c2, s2) = quantize(w13, args.precision, args.group_size), quantize(w2, args.precision, args.group_size)
    del w13, w2
    kw = dict(precision=args.precision, w13_scales=s13, w2_scales=s2, group_size=args.group_size)
    for t in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(t, H, device="cuda", generator=gen).to(torch.bfloat16)
        rw, ids = torch.topk(torch.softmax(torch.randn(t, E, device="cuda", generator=gen), -1), TOP_K, -1)
        for _ in range(3):
            tm.fused_moe(x, ids, rw, c13, c2, **kw)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        tm.fused_moe(x, ids, rw, c13, c2, **kw)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
