"""The one-token MoE word kernels (triton_gemv_words `_gate_up_words_kernel` / `_down_words_kernel`) under a register
cap per thread (`GemvConfig.max_regs`, Triton's `maxnreg`), Mixtral-8x7B experts, on the GPU.

Uncapped they take ~100 registers per thread, which holds 10 of their two-warp programs per SM (31% occupancy in
Nsight Compute, BENCHMARKS.md eighth session); a cap trades registers for programs in flight. Each cell: us per
call in a CUDA graph of 4 calls back to back, and whether the output is bit-identical to the uncapped kernel's.

    PYTHONPATH=. python3 bench/gemv_registers.py [--caps 0,48,64,80,96] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import datetime
import math
from dataclasses import replace

import torch

from backends.torch import triton_moe as tm
from backends.torch.moe_tuning import get_gemv_config
from bench.decode_attention import graph_per_call
from bench.moe_kernel import log
from compiler.quantization import quantize

E, TOP_K, H, I = 8, 2, 4096, 14336
SCHEMES = (("int4", 0), ("int4", 128), ("int8", 0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caps", default="0,48,64,80,96", help="register caps (0: none)")
    ap.add_argument("--tokens", default="1,2")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("moec: error: bench/gemv_registers.py needs a CUDA GPU")
    caps = [int(c) for c in args.caps.split(",")]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=gen) / math.sqrt(H)).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device="cuda", generator=gen) / math.sqrt(I)).to(torch.bfloat16)
    out = [f"Card: {torch.cuda.get_device_name()}; torch {torch.__version__}; date {datetime.date.today()}; us per "
           "call, CUDA graph of 4 back to back (bit-identical to the uncapped output: =)", "",
           "| scheme | T | table config | " + " | ".join(f"cap {c}" if c else "no cap" for c in caps) + " |",
           "|---|---|---|" + "---|" * len(caps)]
    log(out[0])
    for precision, group in SCHEMES:
        (c13, s13), (c2, s2) = quantize(w13, precision, group), quantize(w2, precision, group)
        kw = dict(precision=precision, w13_scales=s13, w2_scales=s2, group_size=group)
        for t in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(t, H, device="cuda", generator=gen).to(torch.bfloat16)
            rw, ids = torch.topk(torch.softmax(torch.randn(t, E, device="cuda", generator=gen), -1), TOP_K, -1)
            table = get_gemv_config(t * TOP_K, H, I, group, precision)
            uncapped = tm.fused_moe(x, ids, rw, c13, c2, config=replace(table, max_regs=0), **kw)
            cells = []
            for cap in caps:
                cfg = replace(table, max_regs=cap)
                same = torch.equal(tm.fused_moe(x, ids, rw, c13, c2, config=cfg, **kw), uncapped)
                us = graph_per_call([lambda: tm.fused_moe(x, ids, rw, c13, c2, config=cfg, **kw)] * 4) * 1e6
                cells.append(f"{us:.1f}{' =' if same else ' (differs)'}")
            out.append(f"| {precision}{f' g{group}' if group else ''} | {t} | words={table.words}, "
                       f"max_regs={table.max_regs} | " + " | ".join(cells) + " |")
            log(out[-1])
        del c13, c2
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
