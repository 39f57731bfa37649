"""Generation on the CPU with and without the KV cache: the embedded `tiny`, greedy, one prompt.

    PYTHONPATH=. python bench/generate_cpu.py [--new-tokens 128] [--repeats 3]

With `kv-cache` (the default pipeline) a step runs one position per sequence; without it (`canonicalize,fuse-moe,
dce`) every step recomputes the whole sequence. Both must produce the same tokens (checked). Median of repeats.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    from compiler.api import DEFAULT_PIPELINE, compile

    prompt = "The list"
    rows, outputs = [], {}
    for label, passes in (("kv cache", DEFAULT_PIPELINE), ("no cache (recompute)", "canonicalize,fuse-moe,dce")):
        compiled = compile("tiny", passes=passes)
        ids = [compiled.tokenizer(prompt)["input_ids"]] * args.batch
        compiled.generate(ids, 4)  # warm-up: weights materialized, caches allocated
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            outputs[label] = compiled.generate(ids, args.new_tokens)
            times.append(time.perf_counter() - started)
        rows.append((label, passes, statistics.median(times)))
    same = outputs["kv cache"] == outputs["no cache (recompute)"]
    print(f"CPU: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.new_tokens} new tokens, batch {args.batch}, median of {args.repeats}; identical tokens: {same}\n")
    print("| pipeline | passes | seconds | ms per token | ratio to no cache |")
    print("|---|---|---|---|---|")
    baseline = rows[1][2]
    for label, passes, seconds in rows:
        print(f"| {label} | `{passes}` | {seconds:.2f} | {seconds / args.new_tokens * 1e3:.1f} | {seconds / baseline:.3f} |")
    if not same:
        raise SystemExit("cached and recomputed generation disagree")


if __name__ == "__main__":
    main()
