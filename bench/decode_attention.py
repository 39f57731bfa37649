"""Benchmark: moec's Triton `cached_attention` (decode and prefill) vs torch SDPA / naive torch and the card's floors.

Run on a CUDA machine from the repository root::

    PYTHONPATH=. python3 bench/decode_attention.py [--sweep] [--markdown FILE]

Mixtral-8x7B attention shapes: 32 query heads, 8 kv heads, head_dim 128, bf16.

* Decode (one query per sequence) at batch 1/8/32/64 and context 1024/4096, every cache filled to the context
  (pos = context - 1), plus one ragged batch (random lengths). Ours is the whole op: cache write, split-K decode,
  combine. Timed in CUDA graphs that each hold one call per input set, rotating among enough sets (>= 256 MB of
  caches) that nothing is served from L2; per-call time = median replay / calls. Ours eager: one call bracketed by
  CUDA events, median. Baselines on the same caches, in the same kind of graph: SDPA (`enable_gqa=True`; attention
  only, no cache write) and the naive torch reference (`backends/torch/kernels.attention`: matmul, float32
  softmax, matmul). KV-bytes floor = (K and V bytes of the filled slots + q + out + the step's k/v written) over the
  copy bandwidth measured in the same run.
* Prefill: 2048 tokens from position 0 (batch 1 and 4) and a 512-token chunk continuing a 1536-token prefix. Ours
  (write + flash prefill from the cache) vs SDPA (`is_causal=True` on the step's own k/v for position 0; an explicit
  boolean mask over the cache for the continuation), eager, median of CUDA-event timings. FLOP floor =
  4 * D * Hq * (visible (query, key) pairs) over the bf16 GEMM rate measured in the same run.

``--sweep`` times candidate decode and prefill configs first and prints the fastest per case.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import astuple

import torch
import torch.nn.functional as F

import backends.torch.kernels  # noqa: F401 - registers the reference kernels (the naive baseline)
from backends.torch import triton_attention as ta
from bench.moe_kernel import measure_copy_bw, measure_gemm_rate, time_calls

HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16
SCALE = D**-0.5
BATCHES = [1, 8, 32, 64]
CONTEXTS = [1024, 4096]

DC, PC = ta.DecodeConfig, ta.PrefillConfig
DECODE_CANDIDATES = [
    DC(bn, warps, stages, waves)
    for bn, warps, stages in ((32, 4, 3), (64, 4, 3), (64, 4, 4), (128, 4, 2))
    for waves in (1, 2, 4)
]
PREFILL_CANDIDATES = [PC(128, 64, 8, 3), PC(128, 128, 8, 3), PC(128, 64, 4, 3), PC(64, 64, 4, 3), PC(128, 64, 8, 4),
                      PC(128, 128, 8, 2)]


def log(msg: str) -> None:
    print(msg, flush=True)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def median_s(fns: list[Callable[[], object]], reps: int) -> float:
    return statistics.median(time_calls(fns, reps=reps))


def graph_per_call(fns: list[Callable[[], object]], replays: int = 20) -> float:
    """Seconds per call of one CUDA graph holding every fn once (back to back, as in a captured decode step)."""
    for fn in fns:  # compile and settle the allocator outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    per_replay = median_s([graph.replay], reps=replays)
    del graph
    return per_replay / len(fns)


class DecodeCase:
    """Input sets for one (batch, context): caches filled to `lengths`, the step's q/k/v, positions."""

    def __init__(self, batch: int, ctx: int, gen: torch.Generator, lengths: list[int] | None = None) -> None:
        self.batch, self.ctx = batch, ctx
        self.lengths = lengths if lengths is not None else [ctx] * batch
        cache_bytes = 2 * batch * HKV * ctx * D * 2
        n_sets = max(2, min(64, math.ceil((256 << 20) / cache_bytes)))
        self.sets = []
        for _ in range(n_sets):
            q = torch.randn(batch, 1, HQ, D, device="cuda", generator=gen).to(DTYPE).transpose(1, 2)
            k = torch.randn(batch, 1, HKV, D, device="cuda", generator=gen).to(DTYPE).transpose(1, 2)
            v = torch.randn(batch, 1, HKV, D, device="cuda", generator=gen).to(DTYPE).transpose(1, 2)
            kc = torch.randn(batch, HKV, ctx, D, device="cuda", generator=gen).to(DTYPE)
            vc = torch.randn(batch, HKV, ctx, D, device="cuda", generator=gen).to(DTYPE)
            pos = torch.tensor([n - 1 for n in self.lengths], dtype=torch.int64, device="cuda")
            self.sets.append((q, k, v, kc, vc, pos))
        filled = sum(self.lengths)
        self.bytes = 2 * filled * HKV * D * 2 + 2 * batch * HQ * D * 2 + 2 * 2 * batch * HKV * D * 2

    def ours(self, cfg: ta.DecodeConfig | None = None) -> list[Callable[[], object]]:
        return [lambda s=s: ta.cached_attention(*s, SCALE, decode_config=cfg) for s in self.sets]

    def sdpa(self) -> list[Callable[[], object]]:
        # Only valid for full caches (no mask): every slot is visible to the one query.
        return [lambda s=s: F.scaled_dot_product_attention(s[0], s[3], s[4], scale=SCALE, enable_gqa=True)
                for s in self.sets]

    def naive(self) -> list[Callable[[], object]]:
        return [lambda s=s: torch.ops.moec.attention(s[0], s[3], s[4], SCALE) for s in self.sets]

    def check(self) -> float:
        """Ours against a float32 reference over each sequence's filled slots (caches after the write)."""
        q, k, v, kc, vc, pos = self.sets[0]
        out = ta.cached_attention(q, k, v, kc, vc, pos, SCALE).float()
        worst = 0.0
        for b, n in enumerate(self.lengths[: min(8, self.batch)]):
            keys = kc[b, :, :n].float().repeat_interleave(HQ // HKV, 0)
            vals = vc[b, :, :n].float().repeat_interleave(HQ // HKV, 0)
            probs = torch.softmax(torch.einsum("hd,hnd->hn", q[b, :, 0].float(), keys) * SCALE, -1)
            ref = torch.einsum("hn,hnd->hd", probs, vals)
            worst = max(worst, rel_err(out[b, 0], ref))
        return worst


def decode_rows(args: argparse.Namespace, copy_bw: float, gen: torch.Generator) -> tuple[list[dict], dict]:
    rows, chosen = [], {}
    cases = [(b, c, None) for c in CONTEXTS for b in BATCHES]
    ragged_gen = torch.Generator().manual_seed(1)
    cases.append((32, 4096, torch.randint(1, 4097, (32,), generator=ragged_gen).tolist()))
    for batch, ctx, lengths in cases:
        case = DecodeCase(batch, ctx, gen, lengths)
        label = f"{batch} x {ctx}" + (" ragged" if lengths else "")
        err = case.check()
        if err > 1e-2:
            log(f"decode {label}: rel err vs fp32 {err:.2e} FAIL")
            sys.exit(1)
        cfg = ta.decode_config(batch, HKV, torch.device("cuda"))
        if args.sweep:
            best = (float("inf"), cfg)
            for cand in DECODE_CANDIDATES:
                try:
                    t = graph_per_call(case.ours(cand), replays=10)
                except Exception as exc:  # e.g. out of shared memory
                    log(f"  decode {label} {astuple(cand)} failed: {type(exc).__name__}: {str(exc)[:100]}")
                    continue
                splits = ta.decode_splits(batch, HKV, ctx, torch.device("cuda"), cand)
                log(f"  decode {label} {astuple(cand)} splits {splits}: {t * 1e6:8.2f} us "
                    f"({case.bytes / t / copy_bw:.2f} of copy bw)")
                if t < best[0]:
                    best = (t, cand)
            cfg = best[1]
        chosen[label] = cfg
        ours_graph = graph_per_call(case.ours(cfg))
        ours_eager = median_s(case.ours(cfg), reps=50)
        naive = graph_per_call(case.naive())
        sdpa = graph_per_call(case.sdpa()) if lengths is None else float("nan")
        floor = case.bytes / copy_bw
        splits = ta.decode_splits(batch, HKV, ctx, torch.device("cuda"), cfg)
        rows.append(dict(label=label, graph=ours_graph, eager=ours_eager, sdpa=sdpa, naive=naive, floor=floor,
                         bytes=case.bytes, err=err, splits=splits))
        log(f"decode {label}: ours graph {ours_graph * 1e6:.2f} us eager {ours_eager * 1e6:.2f} us, "
            f"SDPA {sdpa * 1e6:.2f} us, naive {naive * 1e6:.2f} us, floor {floor * 1e6:.2f} us "
            f"({floor / ours_graph:.2f} of copy bw), err {err:.1e}, splits {splits}")
        del case
        torch.cuda.empty_cache()
    return rows, chosen


def prefill_rows(args: argparse.Namespace, gemm_rate: float, gen: torch.Generator) -> tuple[list[dict], dict]:
    rows, chosen = [], {}
    for batch, seq, start in ((1, 2048, 0), (4, 2048, 0), (1, 512, 1536)):
        max_seq = start + seq
        q = torch.randn(batch, seq, HQ, D, device="cuda", generator=gen).to(DTYPE).transpose(1, 2)
        k = torch.randn(batch, seq, HKV, D, device="cuda", generator=gen).to(DTYPE).transpose(1, 2)
        v = torch.randn(batch, seq, HKV, D, device="cuda", generator=gen).to(DTYPE).transpose(1, 2)
        kc = torch.randn(batch, HKV, max_seq, D, device="cuda", generator=gen).to(DTYPE)
        vc = torch.randn(batch, HKV, max_seq, D, device="cuda", generator=gen).to(DTYPE)
        pos = torch.full((batch,), start, dtype=torch.int64, device="cuda")
        pairs = batch * (seq * start + seq * (seq + 1) // 2)  # visible (query, key) pairs
        floor = 4 * D * HQ * pairs / gemm_rate
        if start == 0:
            def sdpa() -> torch.Tensor:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)
        else:
            mask = torch.arange(max_seq, device="cuda")[None, :] <= start + torch.arange(seq, device="cuda")[:, None]

            def sdpa() -> torch.Tensor:
                return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=SCALE, enable_gqa=True)
        label = f"{batch} x {seq}" + (f" after {start}" if start else "")
        cfg = None
        if args.sweep:
            best = (float("inf"), None)
            for cand in PREFILL_CANDIDATES:
                try:
                    t = median_s([lambda c=cand: ta.cached_attention(q, k, v, kc, vc, pos, SCALE, prefill_config=c)],
                                 reps=20)
                except Exception as exc:
                    log(f"  prefill {label} {astuple(cand)} failed: {type(exc).__name__}: {str(exc)[:100]}")
                    continue
                log(f"  prefill {label} {astuple(cand)}: {t * 1e6:8.1f} us ({floor * gemm_rate / t / 1e12:.0f} TFLOP/s)")
                if t < best[0]:
                    best = (t, cand)
            cfg = best[1]
        chosen[label] = cfg or ta._prefill_config(seq, D)
        ours = median_s([lambda: ta.cached_attention(q, k, v, kc, vc, pos, SCALE, prefill_config=cfg)], reps=30)
        t_sdpa = median_s([sdpa], reps=30)
        out = ta.cached_attention(q, k, v, kc, vc, pos, SCALE, prefill_config=cfg)  # kc/vc now hold the step
        ref = sdpa().transpose(1, 2)
        err = rel_err(out, ref)
        if err > 1e-2:
            log(f"prefill {label}: rel err vs SDPA {err:.2e} FAIL")
            sys.exit(1)
        rows.append(dict(label=label, ours=ours, sdpa=t_sdpa, floor=floor, err=err))
        log(f"prefill {label}: ours {ours * 1e6:.1f} us, SDPA {t_sdpa * 1e6:.1f} us, FLOP floor {floor * 1e6:.1f} us, "
            f"err vs SDPA {err:.1e}")
        torch.cuda.empty_cache()
    return rows, chosen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", help="write the result tables to this file")
    ap.add_argument("--sweep", action="store_true", help="tune among candidate configs first")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        log("needs CUDA")
        return 2
    import triton

    dev_name = torch.cuda.get_device_name()
    copy_bw = measure_copy_bw()
    gemm_rate = measure_gemm_rate()
    log(f"device {dev_name}, torch {torch.__version__}, triton {triton.__version__}; copy bandwidth "
        f"{copy_bw / 1e12:.3f} TB/s (read+write), bf16 8192^3 GEMM {gemm_rate / 1e12:.0f} TFLOP/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    dec, dec_cfg = decode_rows(args, copy_bw, gen)
    pre, pre_cfg = prefill_rows(args, gemm_rate, gen)

    def us(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v * 1e6:,.1f}"

    lines = ["| batch x context | KV MB read | splits | ours graph (us) | ours eager (us) | SDPA graph (us) | "
             "naive torch graph (us) | KV-bytes floor (us) | ours / floor | fraction of copy bw | ours / SDPA | "
             "ours / naive | rel err vs fp32 |",
             "|" + "---|" * 13]
    for r in dec:
        lines.append(
            f"| {r['label']} | {r['bytes'] / 1e6:,.1f} | {r['splits']} | {us(r['graph'])} | {us(r['eager'])} | "
            f"{us(r['sdpa'])} | {us(r['naive'])} | {us(r['floor'])} | {r['graph'] / r['floor']:.2f} | "
            f"{r['floor'] / r['graph']:.2f} | {r['graph'] / r['sdpa']:.2f} | {r['graph'] / r['naive']:.3f} | "
            f"{r['err']:.1e} |")
    lines += ["", "| prefill (batch x tokens) | ours (us) | SDPA (us) | FLOP floor (us) | ours TFLOP/s | SDPA TFLOP/s | "
              "ours / SDPA | ours / FLOP floor | SDPA / FLOP floor | rel err vs SDPA |", "|" + "---|" * 10]
    for r in pre:
        rate = r["floor"] * gemm_rate / 1e12
        lines.append(
            f"| {r['label']} | {us(r['ours'])} | {us(r['sdpa'])} | {us(r['floor'])} | {rate / r['ours']:.0f} | "
            f"{rate / r['sdpa']:.0f} | {r['ours'] / r['sdpa']:.2f} | {r['ours'] / r['floor']:.2f} | "
            f"{r['sdpa'] / r['floor']:.2f} | {r['err']:.1e} |")
    info = (f"Card: {dev_name}; torch {torch.__version__}; triton {triton.__version__}; "
            f"date {datetime.date.today().isoformat()}\n"
            f"Measured copy bandwidth {copy_bw / 1e12:.3f} TB/s (read+write, 1 GiB D2D copy); "
            f"bf16 8192^3 GEMM {gemm_rate / 1e12:.0f} TFLOP/s (random data)")
    table = "\n".join(lines)
    log("\n" + info + "\n\n" + table)
    log("\nconfigs used:")
    for label, c in {**dec_cfg, **pre_cfg}.items():
        log(f"    {label}: {c}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(info + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
