"""Benchmark: Triton fused MoE vs Hugging Face Mixtral experts vs the card's floors.

Run on a CUDA machine from the repository root::

    PYTHONPATH=. python3 bench/moe_kernel.py [--markdown FILE] [--sweep] [--tokens 1,16,4096]

Mixtral-8x7B expert shapes (H=4096, I=14336, E=8, k=2, bf16).  For each T it

* checks ``fused_moe`` against an fp32 reference (a few T) and against HF's modules (one T);
* times, with CUDA events, the median over many calls rotating among several input sets (fresh
  activations and routing per set, so nothing but the weights repeats):
  ours captured in a CUDA graph and ours eager; HF's default experts implementation (what
  ``PreTrainedModel`` resolves ``experts_implementation=None`` to); HF ``grouped_mm``; HF ``eager``;
* computes floors from the copy bandwidth and bf16 GEMM rate measured in the same run:
  bytes floor = distinct experts hit (actual, averaged over the sets) * 3*H*I*2 B + x and out;
  FLOP floor = 2*T*k*3*H*I / GEMM rate.

``--sweep`` times a few candidate configs per T first and uses the fastest for the table (it also
prints the winners in the form of ``moe_tuning.TUNING_TABLE``).
"""

import argparse
import copy
import datetime
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import astuple

import torch

from backends.torch import triton_moe as tm
from backends.torch.moe_tuning import MoeConfig, get_config

H, I, E, K = 4096, 14336, 8, 2
DTYPE = torch.bfloat16
DEFAULT_TOKENS = [1, 2, 4, 8, 16, 64, 256, 1024, 4096, 16384]

C = MoeConfig
# Sweep candidates per regime (max T -> configs); fields as in MoeConfig:
# (block_m, gu_bn, gu_bk, gu_group, gu_warps, gu_stages, dn_bn, dn_bk, dn_split, dn_group, dn_warps, dn_stages)
PREFILL = [
    C(128, 128, 64, 8, 8, 3, 256, 64, 1, 8, 8, 3),
    C(128, 128, 64, 8, 8, 4, 256, 64, 1, 8, 8, 3),
    C(128, 128, 64, 16, 8, 3, 256, 64, 1, 16, 8, 3),
    C(128, 128, 64, 4, 8, 3, 256, 64, 1, 4, 8, 3),
    C(128, 128, 64, 8, 8, 3, 128, 64, 1, 8, 4, 4),
    C(128, 128, 64, 8, 8, 3, 256, 64, 1, 8, 8, 4),
    C(128, 64, 64, 8, 4, 4, 256, 64, 1, 8, 8, 3),
    C(128, 64, 64, 8, 8, 4, 256, 64, 1, 8, 8, 3),
    C(128, 128, 32, 8, 8, 5, 256, 64, 1, 8, 8, 3),
    C(128, 128, 64, 8, 8, 3, 128, 64, 1, 8, 8, 4),
]
# Second round (issue #15's middle regime, T = 256-2048): deeper K tiles, more stages, wider group walks. None beat
# the table on the H200 (BENCHMARKS.md); the BLOCK_K = 128 ones run out of shared memory.
MIDDLE = [
    C(128, 128, 128, 8, 8, 3, 256, 128, 1, 8, 8, 3),
    C(128, 128, 64, 8, 8, 5, 256, 64, 1, 8, 8, 5),
    C(128, 64, 128, 8, 4, 4, 256, 64, 1, 8, 8, 4),
    C(64, 128, 64, 8, 4, 5, 256, 64, 1, 8, 8, 4),
    C(128, 128, 64, 32, 8, 4, 256, 64, 1, 32, 8, 4),
]
CANDIDATES: list[tuple[int, list[MoeConfig]]] = [
    (1, [
        C(16, 64, 64, 8, 4, 6, 64, 64, 4, 8, 4, 6),
        C(16, 64, 64, 8, 4, 5, 64, 64, 8, 8, 4, 6),
        C(16, 32, 64, 8, 4, 6, 32, 64, 4, 8, 4, 6),
        C(16, 128, 64, 8, 4, 5, 128, 64, 8, 8, 4, 5),
        C(16, 64, 128, 8, 4, 4, 64, 128, 4, 8, 4, 4),
    ]),
    (16, [
        C(16, 64, 128, 8, 4, 4, 64, 128, 4, 8, 4, 4),
        C(16, 64, 256, 8, 4, 3, 64, 256, 2, 8, 4, 3),
        C(16, 64, 64, 8, 4, 6, 64, 64, 4, 8, 4, 6),
        C(16, 32, 256, 8, 4, 3, 64, 128, 8, 8, 4, 4),
    ]),
    (64, [
        C(16, 64, 128, 16, 4, 4, 64, 128, 2, 16, 4, 4),
        C(32, 64, 128, 16, 4, 4, 64, 128, 2, 16, 4, 4),
        C(32, 64, 64, 16, 4, 6, 64, 64, 2, 16, 4, 6),
        C(32, 64, 128, 16, 4, 4, 64, 128, 4, 16, 4, 4),
    ]),
    (256, [
        C(64, 64, 64, 16, 4, 4, 64, 64, 1, 16, 4, 4),
        C(64, 64, 64, 16, 4, 4, 64, 64, 2, 16, 4, 4),
        C(64, 64, 128, 16, 4, 4, 64, 128, 1, 16, 4, 4),
        C(64, 64, 64, 16, 4, 5, 64, 64, 1, 16, 4, 5),
        C(64, 64, 64, 64, 4, 4, 64, 64, 1, 64, 4, 4),
        C(64, 128, 64, 16, 4, 4, 128, 64, 1, 16, 4, 4),
    ]),
    (1024, PREFILL + MIDDLE + [C(64, 128, 64, 8, 4, 4, 128, 64, 1, 8, 4, 4)]),
    (1 << 62, PREFILL + MIDDLE),
]


def log(msg: str) -> None:
    print(msg, flush=True)


def measure_copy_bw() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    n = 1 << 30  # 1 GiB each way, far beyond L2
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    times = time_calls([lambda: dst.copy_(src)], reps=30)
    return 2 * n / statistics.median(times)


def measure_gemm_rate() -> float:
    """bf16 8192^3 matmul rate on random data in FLOP/s."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=DTYPE)
    b = torch.randn(n, n, device="cuda", dtype=DTYPE)
    times = time_calls([lambda: torch.mm(a, b)], reps=30)
    return 2 * n**3 / statistics.median(times)


def time_calls(fns: list[Callable[[], object]], reps: int, warmup: int = 3) -> list[float]:
    """Seconds per call, each call bracketed by CUDA events; rotates through ``fns`` (one per input set)."""
    for i in range(warmup):
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]


def median_time(fns: list[Callable[[], object]], budget_s: float = 0.25, max_reps: int = 200) -> float:
    t0 = statistics.median(time_calls(fns, reps=3, warmup=1))
    reps = int(max(8, min(max_reps, budget_s / max(t0, 1e-6))))
    return statistics.median(time_calls(fns, reps=reps))


def routing(t: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax of random logits, top-2, renormalised (fp32 weights)."""
    logits = torch.randn(t, E, device="cuda", generator=gen)
    w, ids = torch.topk(torch.softmax(logits, dim=-1), K, dim=-1)
    return ids, w / w.sum(dim=-1, keepdim=True)


def reference(x: torch.Tensor, ids: torch.Tensor, rw: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in range(E):
        tok, j = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        gu = xf[tok] @ w13[e].float().t()
        y = (torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]) @ w2[e].float().t()
        out.index_add_(0, tok, y * rw[tok, j][:, None])
    return out


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).norm() / ref.norm()).item()


def hf_modules(w13: torch.Tensor, w2: torch.Tensor) -> tuple[str, dict[str, torch.nn.Module]]:
    """HF MixtralExperts sharing our weights, one per experts implementation, and HF's default name."""
    import transformers
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.models.mixtral import modeling_mixtral as mm

    # What a model gets by default: PreTrainedModel resolves experts_implementation=None.
    tiny = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, num_local_experts=E, num_experts_per_tok=K)
    with torch.device("cuda"):
        model_cfg = MixtralForCausalLM(tiny).config
    default_impl = str(getattr(model_cfg, "_experts_implementation", None))
    if default_impl not in ("eager", "grouped_mm", "batched_mm"):
        log(f"could not read HF's default experts implementation ({default_impl!r}); assuming grouped_mm")
        default_impl = "grouped_mm"
    log(f"transformers {transformers.__version__}: default experts implementation = {default_impl!r}")
    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                        hidden_act="silu")
    mods: dict[str, torch.nn.Module] = {}
    for name in dict.fromkeys([default_impl, "grouped_mm", "eager"]):
        c = copy.deepcopy(cfg)
        c._experts_implementation = name
        with torch.device("meta"):
            mod = mm.MixtralExperts(c)
        if tuple(mod.gate_up_proj.shape) != tuple(w13.shape) or tuple(mod.down_proj.shape) != tuple(w2.shape):
            raise RuntimeError(f"unexpected HF layout {mod.gate_up_proj.shape} / {mod.down_proj.shape}")
        mod.gate_up_proj = torch.nn.Parameter(w13, requires_grad=False)
        mod.down_proj = torch.nn.Parameter(w2, requires_grad=False)
        mods[name] = mod.eval()
    return default_impl, mods


def profile_breakdown(fn: Callable[[], object], t: int) -> None:
    """Per-kernel device time of one call (median-free: 5 calls averaged by the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" and ev.count:
            dev_us = getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0.0)
            log(f"  profile T={t}: {ev.key[:40]:40s} x{ev.count:3d} avg {dev_us:9.1f} us")


def sweep_candidates(t: int) -> list[MoeConfig]:
    for max_t, cands in CANDIDATES:
        if t <= max_t:
            return cands
    return CANDIDATES[-1][1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", help="write the result table to this file")
    ap.add_argument("--sweep", action="store_true", help="tune among candidate configs per T first")
    ap.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)))
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baselines")
    ap.add_argument("--profile", default="", help="comma-separated T: print a per-kernel time breakdown")
    args = ap.parse_args()
    tokens = [int(v) for v in args.tokens.split(",")]

    if not torch.cuda.is_available():
        log("needs CUDA")
        return 2
    dev_name = torch.cuda.get_device_name()
    import triton

    log(f"device {dev_name}, torch {torch.__version__}, triton {triton.__version__}")
    copy_bw = measure_copy_bw()
    gemm_rate = measure_gemm_rate()
    log(f"measured copy bandwidth {copy_bw / 1e12:.3f} TB/s (read+write), bf16 8192^3 GEMM {gemm_rate / 1e12:.0f} TFLOP/s")

    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=gen) / math.sqrt(H)).to(DTYPE)
    w2 = (torch.randn(E, H, I, device="cuda", generator=gen) / math.sqrt(I)).to(DTYPE)
    expert_bytes = 3 * H * I * 2

    # Correctness against fp32 at full shapes.
    for t in (1, 7, 16, 333, 4096):
        x = torch.randn(t, H, device="cuda", generator=gen).to(DTYPE)
        ids, rw = routing(t, gen)
        out = torch.full((t, H), float("nan"), dtype=DTYPE, device="cuda")
        tm.fused_moe(x, ids, rw, w13, w2, out=out)
        err = rel_err(out, reference(x, ids, rw, w13, w2))
        ok = err < 1.5e-2 and not torch.isnan(out).any().item()
        log(f"check T={t}: rel err vs fp32 {err:.2e} {'ok' if ok else 'FAIL'}")
        if not ok:
            return 1

    default_impl, hf = ("", {}) if args.no_hf else hf_modules(w13, w2)
    if hf:
        t = 64
        x = torch.randn(t, H, device="cuda", generator=gen).to(DTYPE)
        ids, rw = routing(t, gen)
        ours = tm.fused_moe(x, ids, rw, w13, w2)
        ref = reference(x, ids, rw, w13, w2)
        for name, mod in hf.items():
            with torch.no_grad():
                y = mod(x, ids, rw.to(DTYPE))
            log(f"HF {name} vs fp32 {rel_err(y, ref):.2e}; ours vs HF {name} {rel_err(ours, y.float()):.2e}")

    rows: list[dict[str, object]] = []
    chosen: dict[int, MoeConfig] = {}
    for t in tokens:
        n_sets = 8 if t <= 1024 else 3
        sets = []
        distinct = []
        for _ in range(n_sets):
            x = torch.randn(t, H, device="cuda", generator=gen).to(DTYPE)
            ids, rw = routing(t, gen)
            sets.append((x, ids, rw))
            distinct.append(int(torch.unique(ids).numel()))
        n_distinct = statistics.mean(distinct)

        cfg = get_config(t, H, I)
        if args.sweep:
            best = (float("inf"), cfg)
            for cand in sweep_candidates(t):
                try:
                    fns = [lambda s=s, c=cand: tm.fused_moe(*s, w13, w2, config=c) for s in sets]
                    tt = median_time(fns, budget_s=0.1, max_reps=50)
                except Exception as exc:  # e.g. out of shared memory for a config
                    log(f"  T={t} {astuple(cand)} failed: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                log(f"  T={t} {astuple(cand)} {tt * 1e6:9.1f} us")
                if tt < best[0]:
                    best = (tt, cand)
            cfg = best[1]
        chosen[t] = cfg

        # Ours, eager and CUDA graph (one graph per input set: captured buffers are fixed).
        eager = [lambda s=s: tm.fused_moe(*s, w13, w2, config=cfg) for s in sets]
        t_eager = median_time(eager)
        graphs = []
        for s in sets:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                tm.fused_moe(*s, w13, w2, config=cfg)
            graphs.append(g)
        t_graph = median_time([g.replay for g in graphs])
        del graphs

        hf_t: dict[str, float] = {}
        for name, mod in hf.items():
            sets_hf = [(x, ids, rw.to(DTYPE)) for x, ids, rw in sets]
            with torch.no_grad():
                hf_t[name] = median_time([lambda s=s, m=mod: m(*s) for s in sets_hf], budget_s=0.3)
        torch.cuda.empty_cache()

        if str(t) in args.profile.split(","):
            profile_breakdown(lambda: tm.fused_moe(*sets[0], w13, w2, config=cfg), t)

        bytes_floor = (n_distinct * expert_bytes + 2 * t * H * 2) / copy_bw
        flop_floor = 2 * t * K * 3 * H * I / gemm_rate
        row = dict(T=t, distinct=n_distinct, graph=t_graph, eager=t_eager, bytes_floor=bytes_floor,
                   flop_floor=flop_floor, **{f"hf_{k}": v for k, v in hf_t.items()})
        rows.append(row)
        hf_msg = " ".join(f"HF-{k} {v * 1e6:.1f}" for k, v in hf_t.items())
        log(f"T={t}: ours graph {t_graph * 1e6:.1f} us, eager {t_eager * 1e6:.1f} us, {hf_msg}, "
            f"floors bytes {bytes_floor * 1e6:.1f} flop {flop_floor * 1e6:.1f}")

    # Table.
    def us(v: float) -> str:
        return f"{v * 1e6:,.1f}"

    hf_names = list(hf)
    head = ["T", "experts hit", "ours graph (us)", "ours eager (us)"]
    head += [f"HF {n}{' (default)' if n == default_impl else ''} (us)" for n in hf_names]
    head += ["bytes floor (us)", "FLOP floor (us)", "ours/bytes floor", "ours/FLOP floor"]
    head += [f"ours/HF {n}" for n in hf_names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["T"]), f"{r['distinct']:.2f}", us(r["graph"]), us(r["eager"])]
        cells += [us(r[f"hf_{n}"]) for n in hf_names]
        cells += [us(r["bytes_floor"]), us(r["flop_floor"]), f"{r['graph'] / r['bytes_floor']:.2f}",
                  f"{r['graph'] / r['flop_floor']:.2f}"]
        cells += [f"{r['eager'] / r[f'hf_{n}']:.3f}" for n in hf_names]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    info = (f"Card: {dev_name}; torch {torch.__version__}; triton {triton.__version__}; "
            f"date {datetime.date.today().isoformat()}\n"
            f"Measured copy bandwidth {copy_bw / 1e12:.3f} TB/s (read+write, 1 GiB D2D copy); "
            f"bf16 8192^3 GEMM {gemm_rate / 1e12:.0f} TFLOP/s (random data)\n"
            f"Ratios to floors use ours in a CUDA graph; ratios to HF use ours eager (HF runs eager).")
    log("\n" + info + "\n\n" + table)
    log("\nconfigs used (T -> MoeConfig fields):")
    for t, c in chosen.items():
        log(f"    {t}: {astuple(c)}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(info + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
