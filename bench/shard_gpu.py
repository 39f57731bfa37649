"""Sharded vs single-device logits and latency, on 2 GPUs with NCCL (or 2 CPU processes with gloo).

    PYTHONPATH=. python -m bench.shard_gpu                      # launches torchrun --nproc-per-node 2 itself
    PYTHONPATH=. python -m bench.shard_gpu --device cpu --model tiny-test

Every rank traces the model itself (random weights from a fixed seed, so all ranks and the reference agree);
rank 0 also runs the unsharded program on its own device alone: the single-device reference. For each dtype and
each `shard` layout, the ranks run the sharded program; the last stage's rank 0 compares its logits with the
reference (max |a-e| / max |e|, and the fraction of positions whose argmax agrees); in bfloat16 it also compares
both with the single-device float32 logits, and passes when sharding adds no more than bfloat16 rounding does
(`TOLERANCE`). Latency: median of
`--repeats` forward calls of batch x seq tokens, after warm-up, synchronized, for the reference and each layout.
Results go to stdout and, as JSON lines, to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

MODELS: dict[str, dict[str, Any]] = {
    # Divisible by 2 everywhere; 2 kv heads so tp=2 splits kv heads; 8 experts so moe_ep=2 gives 4 per rank.
    "small": dict(vocab_size=8192, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2),
    "tiny-test": dict(vocab_size=96, hidden_size=32, intermediate_size=36, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
}
# float32: sharded vs single-device logits, max |a-e| / max |e|. bfloat16: the sharded logits' error against the
# single-device float32 logits may exceed the single-device bfloat16 logits' own error by at most this factor
# (random-weight logits are nearly flat, so bfloat16 rounding alone moves them by ~30%; see BENCHMARKS_shard.md).
TOLERANCE = {"float32": 1e-5, "bfloat16": 1.25}


def _config(name: str) -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(**MODELS[name], max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)


def _timed(fn: Any, repeats: int, device: torch.device, all_ranks: bool) -> float:
    """Median seconds of `fn`; `all_ranks` when every rank runs it (then they start each repeat together)."""
    import torch.distributed as dist

    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if all_ranks:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max())


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from backends.torch.distributed import DistributedExecutable, init_distributed, launch_environment, rank_device
    from backends.torch.runtime import TorchExecutable
    from compiler.api import load
    from compiler.pass_manager import parse_pipeline, run_pipeline

    env = launch_environment()
    assert env is not None, "run under torchrun"
    device = rank_device(args.device, env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(device)
    out = open(args.out, "a") if env.rank == 0 and args.out else None
    config = _config(args.model)
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    float32_reference = None
    if env.rank == 0:
        float32_program = run_pipeline(load(config), parse_pipeline("canonicalize,fuse-moe,dce")).program
        float32_reference = TorchExecutable(float32_program, device)(ids).double()
        del float32_program
    for dtype in args.dtypes:
        started = time.perf_counter()
        fused = run_pipeline(load(config, dtype=getattr(torch, dtype)), parse_pipeline("canonicalize,fuse-moe,dce")).program
        trace_s = time.perf_counter() - started
        reference = reference_s = None
        if env.rank == 0:
            single = TorchExecutable(fused, device)
            reference = single(ids).float()
            reference_s = _timed(lambda: single(ids), args.repeats, device, all_ranks=False)
            del single
        for case in args.cases:
            program = run_pipeline(fused, parse_pipeline(f"{case},dce")).program
            executable = DistributedExecutable(program, device)
            logits = executable(ids)
            seconds = _timed(lambda: executable(ids), args.repeats, device, all_ranks=True)
            record: dict[str, Any] = {"rank": env.rank, "case": case, "dtype": dtype, "bytes": executable.materialized_bytes}
            if logits is not None and env.rank == executable.logits_rank:
                gathered = logits.float()
                if env.rank != 0:
                    dist.send(gathered.contiguous(), 0)
            if env.rank == 0:
                if executable.logits_rank != 0:
                    gathered = torch.empty_like(reference)
                    dist.recv(gathered, executable.logits_rank)
                err = _rel_err(gathered, reference)
                agree = float((gathered.argmax(-1) == reference.argmax(-1)).float().mean())
                sharded_vs_fp32, single_vs_fp32 = _rel_err(gathered, float32_reference), _rel_err(reference, float32_reference)
                if dtype == "float32":
                    verdict = "PASS" if err <= TOLERANCE[dtype] else "FAIL"
                else:
                    verdict = "PASS" if sharded_vs_fp32 <= TOLERANCE[dtype] * single_vs_fp32 else "FAIL"
                record.update(
                    card=card, model=args.model, batch=args.batch, seq=args.seq, trace_s=round(trace_s, 1),
                    max_rel_err=err, argmax_agree=agree, verdict=verdict,
                    sharded_vs_fp32=sharded_vs_fp32, single_vs_fp32=single_vs_fp32,
                    single_ms=round(reference_s * 1e3, 3), sharded_ms=round(seconds * 1e3, 3),
                    ratio=round(seconds / reference_s, 3), single_bytes=fused.weight_bytes(),
                )
                print(json.dumps(record), flush=True)
                if out:
                    out.write(json.dumps(record) + "\n")
                    out.flush()
            del executable
            dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help="internal: run as one torchrun rank")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--cases", nargs="+", default=["shard{tp=2}", "shard{tp=2,moe_ep=2}"])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(TOLERANCE), default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=os.environ.get("OUT", ".") + "/shard_gpu.jsonl")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "bench.shard_gpu", "--worker",
        "--device", args.device, "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
        "--repeats", str(args.repeats), "--out", args.out, "--cases", *args.cases, "--dtypes", *args.dtypes,
    ]
    print("$ " + " ".join(command), flush=True)
    sys.exit(subprocess.call(command))


if __name__ == "__main__":
    main()
