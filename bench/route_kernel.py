"""Benchmark: the router kernel (`triton_moe.route`: logits, softmax, top-k in one program per token) per launch
configuration, at decode sizes, on Mixtral-8x7B's router (H 4096, E 8, k 2).

Run on a CUDA machine from the repository root::

    PYTHONPATH=. python3 bench/route_kernel.py [--tokens 1,8,32]

A decode step launches the router once per layer, between the norm and the experts, and nothing else can run
while it does: its one program per token is latency-bound, so the time that counts is a call's in a CUDA graph
of dependent launches (each waits for the one before, PDL on), the median of 20 replays, per call. Inputs rotate
over 32 router copies (2 MB, as a step's 32 layers).
"""

from __future__ import annotations

import argparse

import torch

from backends.torch import triton_moe as tm
from bench.decode_attention import graph_per_call

H, E, TOPK = 4096, 8, 2
# (BLOCK_H, warps): None = the shipped default
CANDIDATES = [(None, None), (2048, 8), (4096, 8), (4096, 16), (1024, 4), (1024, 8), (512, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,8,32")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    routers = [torch.randn(E, H, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(32)]
    print(f"Card: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print("| T | BLOCK_H, warps | us per call |")
    print("|---|---|---|")
    for t in [int(v) for v in args.tokens.split(",")]:
        x = torch.randn(t, H, device="cuda", generator=gen).to(torch.bfloat16)
        reference = tm.route(x, routers[0], TOPK, "renormalize")
        for block_h, warps in CANDIDATES:
            ids, weights = tm.route(x, routers[0], TOPK, "renormalize", block_h, warps)
            if not (torch.equal(ids, reference[0]) and torch.allclose(weights, reference[1])):
                print(f"| {t} | {block_h}, {warps} | differs from the default |")
                continue
            calls = [lambda r=r: tm.route(x, r, TOPK, "renormalize", block_h, warps) for r in routers]
            seconds = graph_per_call(calls)
            label = "default" if block_h is None else f"{block_h}, {warps}"
            print(f"| {t} | {label} | {seconds * 1e6:.2f} |", flush=True)


if __name__ == "__main__":
    main()
