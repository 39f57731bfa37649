"""Benchmark: the fused MoE kernel on one expert-parallel rank's half vs the full kernel (one GPU).

Run on a CUDA machine from the repository root::

    PYTHONPATH=. python3 bench/moe_ep_kernel.py [--tokens 1,32]

Mixtral-8x7B expert shapes (H=4096, I=14336, E=8, k=2, bf16). For each T it times, replayed in a CUDA graph,
CUDA events per call, median over calls rotating among 8 input sets (fresh activations and routing each):

* full: all 8 experts on one GPU (what one rank does without sharding);
* EP half: experts 4..7 with ``expert_offset=4`` (one rank of ``moe_ep=2``): the slots routed to experts 0..3
  are dropped by the routing kernel;
* TP half: all 8 experts, intermediate slice [0, I/2) (one rank of ``moe_tp=2``), for the issue's
  "moe_ep=2 no slower than moe_tp=2" comparison at the kernel level (the collectives are not in it).

It also prints the mean experts hit per call (the weight bytes a call must stream), the bytes floor at the copy
bandwidth measured in the same run, and checks that the two EP halves sum to the full kernel.
"""

import argparse
import datetime
import statistics
import sys
from collections.abc import Callable

import torch

from backends.torch import triton_moe as tm

H, I, E, K = 4096, 14336, 8, 2
DTYPE = torch.bfloat16
SETS = 8


def time_calls(fns: list[Callable[[], object]], reps: int) -> float:
    """Median seconds per call (CUDA events around each), rotating through ``fns``."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends))


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, bytes read plus written (1 GiB each way)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / time_calls([lambda: dst.copy_(src)], reps=20)


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,32")
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, generator=gen, device="cuda") / H**0.5).to(DTYPE)
    w2 = (torch.randn(E, H, I, generator=gen, device="cuda") / I**0.5).to(DTYPE)
    half = I // 2
    w13_tp = torch.cat([w13[:, :half], w13[:, I : I + half]], dim=1).contiguous()
    w2_tp = w2[:, :, :half].contiguous()
    bandwidth = copy_bandwidth()
    expert_bytes = 3 * H * I * 2
    print(f"card: {torch.cuda.get_device_name()}; date: {datetime.date.today()}; torch {torch.__version__}; "
          f"triton {tm.triton.__version__}; copy bandwidth {bandwidth / 1e12:.3f} TB/s", flush=True)
    print("| T | variant | experts hit (mean) | graph us | bytes floor us | vs full |")
    print("|---|---|---|---|---|---|")
    for t in (int(v) for v in args.tokens.split(",")):
        sets = []
        for _ in range(SETS):
            x = torch.randn(t, H, generator=gen, device="cuda").to(DTYPE)
            logits = torch.randn(t, E, generator=gen, device="cuda")
            rw, ids = torch.topk(torch.softmax(logits, dim=-1), K, dim=-1)
            sets.append((x, ids, rw / rw.sum(dim=-1, keepdim=True)))
        full = [tm.fused_moe(*s, w13, w2).float() for s in sets]
        halves = [
            tm.fused_moe(*s, w13[:4], w2[:4]).float() + tm.fused_moe(*s, w13[4:], w2[4:], expert_offset=4).float()
            for s in sets
        ]
        err = max(((h - f).norm() / f.norm()).item() for h, f in zip(halves, full))
        variants = {
            # name: (one call per input set, the expert ids whose weights a call streams, share of each expert)
            "full (8 experts)": ([lambda s=s: tm.fused_moe(*s, w13, w2) for s in sets], lambda ids: ids, 1.0),
            "EP half (experts 4-7, offset 4)": (
                [lambda s=s: tm.fused_moe(*s, w13[4:], w2[4:], expert_offset=4) for s in sets],
                lambda ids: ids[ids >= 4],
                1.0,
            ),
            "TP half (I/2 of 8 experts)": (
                [lambda s=s: tm.fused_moe(*s, w13_tp, w2_tp) for s in sets], lambda ids: ids, 0.5
            ),
        }
        full_s = None
        for name, (fns, local, share) in variants.items():
            hit = statistics.mean(local(s[1]).unique().numel() for s in sets)
            seconds = time_calls([graphed(fn) for fn in fns], args.reps)
            full_s = seconds if full_s is None else full_s
            floor = hit * expert_bytes * share / bandwidth
            print(f"| {t} | {name} | {hit:.2f} | {seconds * 1e6:.1f} | {floor * 1e6:.1f} | {seconds / full_s:.3f} |",
                  flush=True)
        print(f"T={t}: EP halves (experts 0-3 + 4-7) vs full kernel, max rel err over the sets: {err:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
