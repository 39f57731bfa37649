"""Accuracy of the embedded `tiny` on its held-out text: perplexity per dtype (and per pipeline), top-1 agreement
with float32, and a unigram baseline — the yardstick later passes (quantization, sharding, fusions) report against.

    PYTHONPATH=. python bench/tiny_accuracy.py [--passes P ...] [--seq-len 256]

Runs on the CPU. Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections import Counter

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passes", nargs="*", default=["canonicalize,fuse-moe,kv-cache,dce"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--agreement-windows", type=int, default=32, help="windows of seq-len for top-1 agreement")
    args = parser.parse_args()
    from compiler.api import compile
    from frontends.hf.source import EMBEDDED_MODELS_DIR

    text = (EMBEDDED_MODELS_DIR / "tiny" / "eval.txt").read_text(encoding="utf-8")
    rows = []
    for passes in args.passes:
        reference = compile("tiny", passes=passes, dtype="float32")
        ids = reference.tokenizer(text, verbose=False)["input_ids"]
        counts = Counter(ids[1:])
        total = sum(counts.values())
        unigram = math.exp(-sum(c * math.log(c / total) for c in counts.values()) / total)
        windows = torch.tensor(ids[: args.agreement_windows * args.seq_len]).view(-1, args.seq_len)
        reference_top1 = reference(windows).argmax(-1)
        for dtype in ("float32", "bfloat16", "float16"):
            compiled = reference if dtype == "float32" else compile("tiny", passes=passes, dtype=dtype)
            started = time.perf_counter()
            scored = compiled.score(text, seq_len=args.seq_len)
            seconds = time.perf_counter() - started
            agreement = float((compiled(windows).float().argmax(-1) == reference_top1).float().mean())
            rows.append((passes, dtype, scored.tokens, scored.perplexity, agreement, seconds))
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"unigram perplexity (fitted on the evaluation text itself): {unigram:.1f}\n")
    print("| pipeline | dtype | tokens | perplexity | vs fp32 | top-1 agreement with fp32 | seconds |")
    print("|---|---|---|---|---|---|---|")
    base = {passes: ppl for passes, dtype, _, ppl, _, _ in rows if dtype == "float32"}
    for passes, dtype, tokens, ppl, agreement, seconds in rows:
        print(f"| `{passes}` | {dtype} | {tokens} | {ppl:.4f} | {ppl / base[passes] - 1:+.3%} | {agreement:.2%} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
