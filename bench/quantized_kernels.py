"""Benchmark: weight-only INT8/INT4 kernels (fused MoE, linears) and the Triton bf16 GEMV, against each precision's
bytes and FLOP floors, on Mixtral-8x7B shapes.

Run on a CUDA machine from the repository root::

    PYTHONPATH=. python3 bench/quantized_kernels.py [--markdown FILE] [--tokens 1,8,32,256,1024,2048]

* MoE: H=4096, I=14336, E=8, k=2 experts in bf16, int8 (per channel), int4 (per channel) and int4 group 128, the
  `bench/moe_kernel.py` token counts. bytes floor = distinct experts hit * the precision's expert bytes (codes +
  scales) + activations, over the copy bandwidth measured in this run; FLOP floor = 2*T*k*3*H*I over the bf16 GEMM
  rate measured in this run (the quantized kernels multiply bf16 tiles: their FLOP floor is bf16's).
* Linears: the decode projections of one layer (fused qkv 6144x4096, o 4096x4096), an expert-sized 14336x4096 and
  the lm_head 32000x4096, at M = 1, 8, 32: cuBLAS bf16 (`F.linear`), the Triton kernel on bf16 weights, int8,
  int4, int4 g128.
* Timing: every call is captured with others in one CUDA graph (as a decode step runs them), rotating over enough
  weight copies that nothing is served from the 50 MB L2; the median of 20 replays, per call.
"""

from __future__ import annotations

import argparse
import datetime
import statistics

import torch
import torch.nn.functional as F

from backends.torch import triton_moe as tm
from backends.torch import triton_quant as tq
from bench.decode_attention import graph_per_call
from bench.moe_kernel import log, measure_copy_bw, measure_gemm_rate
from compiler.quantization import dequantize, quantize

H, I, E, K = 4096, 14336, 8, 2
SCHEMES = [("bf16", None, 0), ("int8", "int8", 0), ("int4", "int4", 0), ("int4 g128", "int4", 128)]
L2_BYTES = 60 << 20


def weight_bytes(rows: int, cols: int, precision: str | None, group_size: int) -> int:
    if precision is None:
        return rows * cols * 2
    codes = rows * cols // (2 if precision == "int4" else 1)
    return codes + rows * (1 if group_size == 0 else cols // group_size) * 2


def moe_table(tokens: list[int], copy_bw: float, gemm_rate: float) -> list[str]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=gen) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda", generator=gen) / I**0.5).bfloat16()
    lines = ["| T | precision | moec (us) | bytes floor (us) | FLOP floor (us) | moec / max(floors) | "
             "rel err vs dequantized fp32 |", "|" + "---|" * 7]
    for label, precision, group_size in SCHEMES:
        if precision is None:
            experts = dict(w13=w13, w2=w2, kwargs={})
        else:
            q13, s13 = quantize(w13, precision, group_size)
            q2, s2 = quantize(w2, precision, group_size)
            experts = dict(w13=q13, w2=q2, kwargs=dict(precision=precision, w13_scales=s13, w2_scales=s2,
                                                       group_size=group_size))
        per_expert = weight_bytes(2 * I, H, precision, group_size) + weight_bytes(H, I, precision, group_size)
        for t in tokens:
            sets = []
            for _ in range(4):
                x = torch.randn(t, H, device="cuda", generator=gen).bfloat16()
                logits = torch.randn(t, E, device="cuda", generator=gen)
                rw, ids = torch.topk(torch.softmax(logits, -1), K, -1)
                sets.append((x, ids, rw / rw.sum(-1, keepdim=True)))
            calls = [lambda s=s: tm.fused_moe(s[0], s[1], s[2], experts["w13"], experts["w2"], **experts["kwargs"])
                     for s in sets]
            seconds = graph_per_call(calls)
            distinct = statistics.mean(float(torch.unique(s[1]).numel()) for s in sets)
            bytes_floor = (distinct * per_expert + 2 * t * H * 2) / copy_bw
            flop_floor = 2 * t * K * 3 * H * I / gemm_rate
            x, ids, rw = sets[0]
            out = calls[0]().float()
            if precision is None:
                d13, d2 = w13.float(), w2.float()
            else:
                d13 = dequantize(experts["w13"], experts["kwargs"]["w13_scales"], precision, group_size).float()
                d2 = dequantize(experts["w2"], experts["kwargs"]["w2_scales"], precision, group_size).float()
            ref = torch.zeros_like(out)
            for e in range(E):
                tok, j = torch.where(ids == e)
                if tok.numel():
                    gu = x[tok].float() @ d13[e].T
                    ref.index_add_(0, tok, (F.silu(gu[:, :I]) * gu[:, I:]) @ d2[e].T * rw[tok, j, None])
            err = float((out - ref).norm() / ref.norm())
            del d13, d2
            floor = max(bytes_floor, flop_floor)
            lines.append(f"| {t} | {label} | {seconds * 1e6:.1f} | {bytes_floor * 1e6:.1f} | {flop_floor * 1e6:.1f} | "
                         f"{seconds / floor:.2f} | {err:.1e} |")
            log(lines[-1])
        del experts
        torch.cuda.empty_cache()
    return lines


def linear_table(rows_list: list[int], copy_bw: float, gemm_rate: float) -> list[str]:
    shapes = [("qkv (fused)", 6144, 4096), ("o_proj", 4096, 4096), ("expert w1-sized", 14336, 4096),
              ("lm_head", 32000, 4096)]
    variants = [("cuBLAS bf16", None, 0, "cublas"), ("Triton bf16", None, 0, "triton"), ("int8", "int8", 0, "triton"),
                ("int4", "int4", 0, "triton"), ("int4 g128", "int4", 128, "triton")]
    lines = ["| shape | M | kernel | us | bytes floor (us) | moec / max(floors) |", "|" + "---|" * 6]
    gen = torch.Generator(device="cuda").manual_seed(1)
    for name, n, k in shapes:
        base = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).bfloat16()
        for label, precision, group_size, impl in variants:
            nbytes = weight_bytes(n, k, precision, group_size)
            copies = max(2, -(-L2_BYTES // nbytes) + 1)
            if precision is None:
                weights = [base.clone() for _ in range(copies)]
            else:
                q, s = quantize(base, precision, group_size)
                weights = [(q.clone(), s.clone()) for _ in range(copies)]
            for m in rows_list:
                x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
                if impl == "cublas":
                    calls = [lambda w=w: F.linear(x, w) for w in weights]
                elif precision is None:
                    calls = [lambda w=w: tq.linear(x, w) for w in weights]
                else:
                    calls = [lambda w=w: tq.quantized_matmul(x, w[0], w[1], precision, group_size) for w in weights]
                seconds = graph_per_call(calls * max(1, 8 // copies))
                bytes_floor = (nbytes + m * (n + k) * 2) / copy_bw
                flop_floor = 2 * m * n * k / gemm_rate
                lines.append(f"| {name} {n}x{k} | {m} | {label} | {seconds * 1e6:.1f} | {bytes_floor * 1e6:.1f} | "
                             f"{seconds / max(bytes_floor, flop_floor):.2f} |")
                log(lines[-1])
            del weights
        del base
        torch.cuda.empty_cache()
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,8,32,256,1024,2048")
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    copy_bw, gemm_rate = measure_copy_bw(), measure_gemm_rate()
    header = (f"Card: {torch.cuda.get_device_name()}; torch {torch.__version__}; date "
              f"{datetime.date.today().isoformat()}; copy {copy_bw / 1e12:.3f} TB/s, bf16 GEMM {gemm_rate / 1e12:.0f} "
              "TFLOP/s (measured in this run)")
    log(header)
    lines = [header, ""]
    lines += linear_table([int(v) for v in args.rows.split(",")], copy_bw, gemm_rate) + [""]
    if not args.skip_moe:
        lines += moe_table([int(v) for v in args.tokens.split(",")], copy_bw, gemm_rate)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
