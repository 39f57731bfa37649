"""Benchmark: weight-only INT8/INT4 and FP8 kernels (fused MoE, linears) and the Triton bf16 GEMV, against each
precision's bytes and FLOP floors, on Mixtral-8x7B shapes.

Run on a CUDA machine from the repository root::

    PYTHONPATH=. python3 bench/quantized_kernels.py [--markdown FILE] [--tokens 1,8,32,256,1024,2048] [--sweep]

* MoE: H=4096, I=14336, E=8, k=2 experts in bf16, int8 (per channel), int4 (per channel) and int4 group 128, the
  `bench/moe_kernel.py` token counts. bytes floor = distinct experts hit * the precision's expert bytes (codes +
  scales) + activations, over the copy bandwidth measured in this run; FLOP floor = 2*T*k*3*H*I over the bf16 GEMM
  rate measured in this run (the quantized kernels multiply bf16 tiles: their FLOP floor is bf16's).
* Linears: the decode projections of one layer (fused qkv 6144x4096, o 4096x4096), an expert-sized 14336x4096 and
  the lm_head 32000x4096, at M = 1, 8, 32: cuBLAS bf16 (`F.linear`), the Triton kernel on bf16 weights, int8,
  int4, int4 g128.
* FP8 (`quantize-fp8`'s operands: e4m3 weights with per-tensor / per-expert scales, static activation scales): the
  fused MoE's QUANT 3 tiles and the linears' quantize + cuBLASLt FP8 GEMM; their FLOP floor is the bf16 rate / 2
  (the FP8 tensor cores' nominal ratio; this script does not measure an FP8 GEMM rate separately).
* Decode rows run on the CUDA-core GEMV kernels where `GEMV_TABLE`s say so (`kernel` column); `--sweep` times
  candidate GEMV configs against the tensor-core tiles at decode sizes, the measurement those tables come from.
* Timing: every call is captured with others in one CUDA graph (as a decode step runs them), rotating over enough
  weight copies that nothing is served from the 50 MB L2; the median of 20 replays, per call.
"""

from __future__ import annotations

import argparse
import datetime
import statistics

import torch
import torch.nn.functional as F

from backends.torch import triton_fp8 as tf
from backends.torch import triton_moe as tm
from backends.torch import triton_quant as tq
from backends.torch.moe_tuning import GemvConfig, get_config, get_gemv_config
from bench.decode_attention import graph_per_call
from bench.moe_kernel import log, measure_copy_bw, measure_gemm_rate
from compiler import fp8
from compiler.quantization import dequantize, quantize

H, I, E, K = 4096, 14336, 8, 2
SCHEMES = [("bf16", None, 0), ("int8", "int8", 0), ("int4", "int4", 0), ("int4 g128", "int4", 128), ("fp8", "fp8", 0)]
L2_BYTES = 60 << 20
# --sweep candidates: (gu_block_n, gu_block_k, gu_warps, dn_block_n, dn_block_k, dn_split_k, dn_warps[, prefetch,
# words])
MOE_GEMV_CANDIDATES = {
    None: [(16, 256, 4, 16, 256, 4, 4), (16, 256, 4, 16, 256, 4, 4, True), (8, 512, 4, 8, 512, 4, 4)],
    "int8": [(16, 256, 4, 16, 256, 4, 4), (8, 512, 4, 8, 512, 4, 4), (16, 256, 4, 16, 256, 4, 4, True)],
    "int4": [(16, 256, 4, 16, 256, 4, 4), (16, 256, 4, 16, 256, 4, 4, True)],
}
# word kernels (triton_gemv_words; their K tile follows from warps and words per thread): the last field is the
# words per thread and row
MOE_WORD_CANDIDATES = [(4, 256, 4, 8, 256, 2, 4, False, 1), (4, 256, 4, 8, 256, 2, 4, False, 2),
                       (4, 256, 4, 4, 256, 2, 4, False, 4), (8, 256, 4, 8, 256, 2, 4, False, 2),
                       (2, 256, 4, 4, 256, 2, 4, False, 4), (4, 256, 2, 8, 256, 4, 2, False, 2),
                       (8, 256, 2, 8, 256, 4, 2, False, 2), (4, 256, 2, 4, 256, 4, 2, False, 4)]
for _precision in ("int8", "int4"):
    MOE_GEMV_CANDIDATES[_precision] += MOE_WORD_CANDIDATES
# around int8's table entry (4 words per thread, 2 warps, 80 registers), after its products lost their per-code
# subtraction (tenth session): the last field is the register cap
MOE_GEMV_CANDIDATES["int8"] += [(4, 256, 2, 4, 256, 4, 2, False, 4, 80), (4, 256, 2, 4, 256, 4, 2, False, 4, 96),
                                (4, 256, 2, 4, 256, 4, 2, False, 2, 80), (8, 256, 2, 4, 256, 4, 2, False, 4, 80),
                                (2, 256, 2, 4, 256, 4, 2, False, 4, 80), (4, 256, 2, 4, 256, 2, 2, False, 4, 80),
                                (4, 256, 2, 8, 256, 4, 2, False, 4, 80), (4, 256, 4, 4, 256, 4, 4, False, 4, 80)]
# (block_n, block_k, warps, stages[, words]): for the GEMV, stages 2 = the next K tile's loads in flight (PREFETCH)
LINEAR_GEMV_CANDIDATES = {
    None: [(8, 512, 4, 1), (8, 512, 4, 2), (8, 256, 4, 2)],
    "int8": [(16, 512, 8, 1), (16, 512, 8, 2), (8, 512, 4, 1)],
    "int4": [(8, 1024, 4, 2), (16, 1024, 8, 2)],
}
LINEAR_WORD_CANDIDATES = [(8, 512, 4, 1, 1), (8, 512, 4, 1, 2), (4, 512, 4, 1, 4), (8, 512, 2, 1, 2),
                          (4, 512, 2, 1, 4), (16, 512, 2, 1, 2)]
for _precision in ("int8", "int4"):
    LINEAR_GEMV_CANDIDATES[_precision] += LINEAR_WORD_CANDIDATES


def routed_inputs(t: int, count: int, gen: torch.Generator) -> list[tuple[torch.Tensor, ...]]:
    """`count` (x [T, H] bf16, top-k ids, renormalized weights) sets: the rotation a point's graph replays over."""
    sets = []
    for _ in range(count):
        x = torch.randn(t, H, device="cuda", generator=gen).bfloat16()
        rw, ids = torch.topk(torch.softmax(torch.randn(t, E, device="cuda", generator=gen), -1), K, -1)
        sets.append((x, ids, rw / rw.sum(-1, keepdim=True)))
    return sets


def fp8_experts(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """e4m3 codes and per-expert float32 scales, as `quantize-fp8` makes them (expert by expert)."""
    parts = [fp8.quantize_tensor(w[e]) for w in (w13, w2) for e in range(E)]
    q13, s13 = torch.stack([p[0] for p in parts[:E]]), torch.stack([p[1] for p in parts[:E]])
    q2, s2 = torch.stack([p[0] for p in parts[E:]]), torch.stack([p[1] for p in parts[E:]])
    return q13, s13, q2, s2


def weight_bytes(rows: int, cols: int, precision: str | None, group_size: int) -> int:
    if precision is None:
        return rows * cols * 2
    if precision == "fp8":
        return rows * cols
    codes = rows * cols // (2 if precision == "int4" else 1)
    return codes + rows * (1 if group_size == 0 else cols // group_size) * 2


def moe_table(tokens: list[int], copy_bw: float, gemm_rate: float, only: set[str] | None = None) -> list[str]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=gen) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda", generator=gen) / I**0.5).bfloat16()
    lines = ["| T | precision | kernel | moec (us) | bytes floor (us) | FLOP floor (us) | moec / max(floors) | "
             "rel err vs dequantized fp32 |", "|" + "---|" * 8]
    for label, precision, group_size in SCHEMES:
        if only and label not in only:
            continue
        if precision is None:
            experts = dict(w13=w13, w2=w2, kwargs={})
        elif precision == "fp8":
            q13, s13, q2, s2 = fp8_experts(w13, w2)
            # Static activation scales as `calibrate` would record them for these inputs (randn: amax ~ 5; the
            # SwiGLU output of these weights stays well inside 2.0).
            experts = dict(w13=q13, w2=q2, kwargs=dict(precision="fp8", w13_scales=s13, w2_scales=s2,
                                                       w13_input_scale=5.0 / 448, w2_input_scale=2.0 / 448))
        else:
            q13, s13 = quantize(w13, precision, group_size)
            q2, s2 = quantize(w2, precision, group_size)
            experts = dict(w13=q13, w2=q2, kwargs=dict(precision=precision, w13_scales=s13, w2_scales=s2,
                                                       group_size=group_size))
        per_expert = weight_bytes(2 * I, H, precision, group_size) + weight_bytes(H, I, precision, group_size)
        for t in tokens:
            sets = routed_inputs(t, 4, gen)
            calls = [lambda s=s: tm.fused_moe(s[0], s[1], s[2], experts["w13"], experts["w2"], **experts["kwargs"])
                     for s in sets]
            seconds = graph_per_call(calls)
            distinct = statistics.mean(float(torch.unique(s[1]).numel()) for s in sets)
            bytes_floor = (distinct * per_expert + 2 * t * H * 2) / copy_bw
            flop_floor = 2 * t * K * 3 * H * I / (gemm_rate * (2 if precision == "fp8" else 1))
            kernel = "gemv" if get_gemv_config(t * K, H, I, group_size, precision) else "tiles"
            x, ids, rw = sets[0]
            out = calls[0]().float()
            if precision is None:
                d13, d2 = w13.float(), w2.float()
            elif precision == "fp8":
                d13 = fp8.dequantize(experts["w13"], experts["kwargs"]["w13_scales"][:, None, None])
                d2 = fp8.dequantize(experts["w2"], experts["kwargs"]["w2_scales"][:, None, None])
            else:
                d13 = dequantize(experts["w13"], experts["kwargs"]["w13_scales"], precision, group_size).float()
                d2 = dequantize(experts["w2"], experts["kwargs"]["w2_scales"], precision, group_size).float()
            ref = torch.zeros_like(out)
            for e in range(E):
                tok, j = torch.where(ids == e)
                if tok.numel():
                    xe = x[tok].float()
                    if precision == "fp8":
                        xe = fp8.fake_quantize(xe, experts["kwargs"]["w13_input_scale"])
                    gu = xe @ d13[e].T
                    act = F.silu(gu[:, :I]) * gu[:, I:]
                    if precision == "fp8":
                        act = fp8.fake_quantize(act, experts["kwargs"]["w2_input_scale"])
                    ref.index_add_(0, tok, act @ d2[e].T * rw[tok, j, None])
            err = float((out - ref).norm() / ref.norm())
            del d13, d2
            floor = max(bytes_floor, flop_floor)
            lines.append(f"| {t} | {label} | {kernel} | {seconds * 1e6:.1f} | {bytes_floor * 1e6:.1f} | "
                         f"{flop_floor * 1e6:.1f} | "
                         f"{seconds / floor:.2f} | {err:.1e} |")
            log(lines[-1])
        del experts
        torch.cuda.empty_cache()
    return lines


def linear_table(rows_list: list[int], copy_bw: float, gemm_rate: float) -> list[str]:
    shapes = [("qkv (fused)", 6144, 4096), ("o_proj", 4096, 4096), ("expert w1-sized", 14336, 4096),
              ("lm_head", 32000, 4096)]
    variants = [("cuBLAS bf16", None, 0, "cublas"), ("Triton bf16", None, 0, "triton"), ("int8", "int8", 0, "triton"),
                ("int4", "int4", 0, "triton"), ("int4 g128", "int4", 128, "triton"), ("fp8 (cuBLASLt)", "fp8", 0, "fp8")]
    lines = ["| shape | M | kernel | us | bytes floor (us) | moec / max(floors) |", "|" + "---|" * 6]
    gen = torch.Generator(device="cuda").manual_seed(1)
    for name, n, k in shapes:
        base = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).bfloat16()
        for label, precision, group_size, impl in variants:
            nbytes = weight_bytes(n, k, precision, group_size)
            copies = max(2, -(-L2_BYTES // nbytes) + 1)
            if precision is None:
                weights = [base.clone() for _ in range(copies)]
            elif precision == "fp8":
                q, s = fp8.quantize_tensor(base)
                weights = [(q.clone(), s.clone()) for _ in range(copies)]
            else:
                q, s = quantize(base, precision, group_size)
                weights = [(q.clone(), s.clone()) for _ in range(copies)]
            for m in rows_list:
                x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
                if impl == "cublas":
                    calls = [lambda w=w: F.linear(x, w) for w in weights]
                elif precision is None:
                    calls = [lambda w=w: tq.linear(x, w) for w in weights]
                elif precision == "fp8":
                    calls = [lambda w=w: tf.linear(x, w[0], w[1], 5.0 / 448) for w in weights]
                else:
                    calls = [lambda w=w: tq.quantized_matmul(x, w[0], w[1], precision, group_size) for w in weights]
                seconds = graph_per_call(calls * max(1, 8 // copies))
                bytes_floor = (nbytes + m * (n + k) * 2) / copy_bw
                flop_floor = 2 * m * n * k / (gemm_rate * (2 if precision == "fp8" else 1))
                shown = label
                if impl == "triton" and precision is not None and tq.gemv_config(m, n, k, group_size, precision):
                    shown += " (GEMV)"
                lines.append(f"| {name} {n}x{k} | {m} | {shown} | {seconds * 1e6:.1f} | {bytes_floor * 1e6:.1f} | "
                             f"{seconds / max(bytes_floor, flop_floor):.2f} |")
                log(lines[-1])
            del weights
        del base
        torch.cuda.empty_cache()
    return lines


def gemv_sweep(copy_bw: float, only: set[str] | None = None) -> list[str]:
    """Decode sizes: the tensor-core tiles against each CUDA-core GEMV candidate (the tables' measurement); `only`
    restricts it to some schemes' labels."""
    lines = ["| op | precision | T or M | kernel | us | x bytes floor |", "|" + "---|" * 6]
    gen = torch.Generator(device="cuda").manual_seed(2)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=gen) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda", generator=gen) / I**0.5).bfloat16()
    for label, precision, group_size in SCHEMES[:4]:
        if only and label not in only:
            continue
        if precision is None:
            q13, q2, kwargs = w13, w2, {}
        else:
            q13, s13 = quantize(w13, precision, group_size)
            q2, s2 = quantize(w2, precision, group_size)
            kwargs = dict(precision=precision, w13_scales=s13, w2_scales=s2, group_size=group_size)
        per_expert = weight_bytes(2 * I, H, precision, group_size) + weight_bytes(H, I, precision, group_size)
        for t in (1, 2):
            sets = routed_inputs(t, 4, gen)
            floor = statistics.mean(float(torch.unique(st[1]).numel()) for st in sets) * per_expert / copy_bw
            tiles = get_config(t, H, I, group_size, quantized=precision is not None)
            configs = [("tiles", tiles)] + [(f"gemv {c}", GemvConfig(*c)) for c in MOE_GEMV_CANDIDATES[precision]]
            for name, cfg in configs:
                calls = [lambda st=st, cfg=cfg: tm.fused_moe(st[0], st[1], st[2], q13, q2, config=cfg, **kwargs)
                         for st in sets]
                seconds = graph_per_call(calls)
                lines.append(f"| moe | {label} | {t} | {name} | {seconds * 1e6:.1f} | {seconds / floor:.2f} |")
                log(lines[-1])
        del q13, q2
        torch.cuda.empty_cache()
    for name, n, k in [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("lm_head-sized", 32000, 4096)]:
        base = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).bfloat16()
        for label, precision, group_size in SCHEMES[:4]:
            if only and label not in only:
                continue
            if precision is None:
                q, sc = base, None
            else:
                q, sc = quantize(base, precision, group_size)
            nbytes = weight_bytes(n, k, precision, group_size)
            weights = [(q.clone(), None if sc is None else sc.clone()) for _ in range(max(2, -(-L2_BYTES // nbytes) + 1))]
            x = torch.randn(1, k, device="cuda", generator=gen).bfloat16()
            configs = [("tiles", None, "tiles")] + [(f"gemv {c}", tq.LinearConfig(1, *c), "gemv")
                                                    for c in LINEAR_GEMV_CANDIDATES[precision]]
            if precision is None:
                configs.insert(0, ("cuBLAS", None, "cublas"))
            for cname, cfg, kernel in configs:
                if kernel == "cublas":
                    calls = [lambda w=w: F.linear(x, w[0]) for w in weights]
                elif precision is None:
                    calls = [lambda w=w, cfg=cfg, kernel=kernel: tq.linear(x, w[0], config=cfg, kernel=kernel)
                             for w in weights]
                else:
                    calls = [lambda w=w, cfg=cfg, kernel=kernel: tq.quantized_matmul(
                        x, w[0], w[1], precision, group_size, config=cfg, kernel=kernel) for w in weights]
                seconds = graph_per_call(calls * max(1, 8 // len(weights)))
                lines.append(f"| {name} {n}x{k} | {label} | 1 | {cname} | {seconds * 1e6:.1f} | "
                             f"{seconds / (nbytes / copy_bw):.2f} |")
                log(lines[-1])
            del weights
        torch.cuda.empty_cache()
    return lines


def fp8_sweep() -> list[str]:
    """Prefill sizes: the FP8 MoE tiles (the bf16 table's regime, K tiles doubled) against variants, bf16 beside."""
    from dataclasses import replace

    lines = ["| T | variant | config | us |", "|---|---|---|---|"]
    gen = torch.Generator(device="cuda").manual_seed(3)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=gen) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda", generator=gen) / I**0.5).bfloat16()
    q13, s13, q2, s2 = fp8_experts(w13, w2)
    fp8_kwargs = dict(precision="fp8", w13_scales=s13, w2_scales=s2, w13_input_scale=5.0 / 448,
                      w2_input_scale=2.0 / 448)
    for t in (512, 2048):
        sets = routed_inputs(t, 2, gen)
        bf16 = get_config(t, H, I)
        table = get_config(t, H, I, fp8=True)
        variants = [("bf16 experts", bf16, None), ("fp8 table", table, fp8_kwargs),
                    ("fp8, bf16 tiles", bf16, fp8_kwargs),
                    ("fp8 BK128 2 stages", replace(table, gu_stages=2, dn_stages=2), fp8_kwargs),
                    ("fp8 BK128 4 warps", replace(table, gu_warps=4, dn_warps=4), fp8_kwargs),
                    ("fp8 BN64 BK128 4 stages", replace(table, gu_block_n=64, dn_block_n=128, gu_stages=4, dn_stages=4),
                     fp8_kwargs),
                    ("fp8 BM64", replace(table, block_m=64, gu_warps=4, dn_warps=4, gu_stages=4, dn_stages=4), fp8_kwargs)]
        for label, cfg, kwargs in variants:
            a13, a2 = (w13, w2) if kwargs is None else (q13, q2)
            calls = [lambda st=st, cfg=cfg, kwargs=kwargs, a13=a13, a2=a2: tm.fused_moe(
                st[0], st[1], st[2], a13, a2, config=cfg, **(kwargs or {})) for st in sets]
            try:
                seconds = graph_per_call(calls, replays=10)
            except Exception as error:  # a variant that does not fit (shared memory) is reported, not fatal
                lines.append(f"| {t} | {label} | {cfg} | failed: {type(error).__name__} |")
            else:
                lines.append(f"| {t} | {label} | {cfg} | {seconds * 1e6:.1f} |")
            log(lines[-1])
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,8,32,256,1024,2048")
    ap.add_argument("--rows", default="1,8,32,2048")
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--skip-linears", action="store_true")
    ap.add_argument("--moe-schemes", default=None, help="comma-separated scheme labels of the MoE table (bf16,fp8,...)")
    ap.add_argument("--sweep", action="store_true", help="only the GEMV-vs-tiles sweep at decode sizes")
    ap.add_argument("--fp8-sweep", action="store_true", help="only the FP8 MoE tile variants at prefill sizes")
    ap.add_argument("--sweep-only", default=None, help="comma-separated scheme labels for --sweep (bf16,int8,...)")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    copy_bw, gemm_rate = measure_copy_bw(), measure_gemm_rate()
    header = (f"Card: {torch.cuda.get_device_name()}; torch {torch.__version__}; date "
              f"{datetime.date.today().isoformat()}; copy {copy_bw / 1e12:.3f} TB/s, bf16 GEMM {gemm_rate / 1e12:.0f} "
              "TFLOP/s (measured in this run)")
    log(header)
    lines = [header, ""]
    if args.fp8_sweep:
        lines += fp8_sweep()
    elif args.sweep:
        lines += gemv_sweep(copy_bw, set(args.sweep_only.split(",")) if args.sweep_only else None)
    if args.sweep or args.fp8_sweep:
        if args.markdown:
            with open(args.markdown, "w") as handle:
                handle.write("\n".join(lines) + "\n")
        return
    if not args.skip_linears:
        lines += linear_table([int(v) for v in args.rows.split(",")], copy_bw, gemm_rate) + [""]
    if not args.skip_moe:
        lines += moe_table([int(v) for v in args.tokens.split(",")], copy_bw, gemm_rate,
                           set(args.moe_schemes.split(",")) if args.moe_schemes else None)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
