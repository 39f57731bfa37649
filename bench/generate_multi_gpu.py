"""Sharded Mixtral generation with KV caches over N GPUs (NCCL) or N CPU processes (gloo): decode, prefill, memory.

Run from the repository root; the script launches `torchrun --nproc-per-node N` itself, one process per rank::

    PYTHONPATH=. python3 -m bench.generate_multi_gpu --gpus 2            # tp=2, tp=2+moe_ep=2, pp=2
    PYTHONPATH=. python3 -m bench.generate_multi_gpu --gpus 4            # tp=4, moe_tp=2, moe_ep=2
    PYTHONPATH=. python3 -m bench.generate_multi_gpu --gpus 8            # tp=8; tp=8, moe_ep=8
    PYTHONPATH=. python3 -m bench.generate_multi_gpu --device cpu --small-only   # script check: gloo, 2 processes

NCCL runs with NVLink multicast off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1,
set for the ranks whatever the caller's environment says).

Two parts, each for every layout of `--layouts` (default: the issue's layouts for `--gpus`):

* Small float32 config (`SMALL`): every rank traces it; rank 0 also runs the unsharded program alone (one GPU / one
  process), the reference. Each layout's ranks compute the logits of a batch of prompts (`executable(ids)`) and
  greedy-generate `--small-new-tokens` tokens; rank 0 compares: logits max |a-e| / max |e| <= 1e-5 and tokens
  equal, else FAIL.
* Full Mixtral-8x7B shapes (`mixtral-8x7b` preset, `--layers` of its 32, random bf16 weights): the weights are lazy
  random leaves, one per expert and projection (`frontends/hf/source.random_weights`), so each rank materializes
  only its own slices and its GPU holds only its share (plus its kv heads' and layers' caches). Per layout:
  decode per token at batch 1 and 32 with the caches filled (random values) up to `--context` (a step costs
  what it reads, not what the slots hold), eager and, where the step can be captured with its collectives, replayed
  in a CUDA graph (a capture that fails is reported with its reason, not hidden); prefill of `--prefill` tokens at
  batch 1 from position 0 (eager); peak GPU memory per rank (`torch.cuda.max_memory_allocated`) and the rank's
  materialized weight bytes. Timing: CUDA events on each rank (host clock on the CPU), ranks barrier-aligned before
  each point, median of `--steps`; the slowest rank's median is reported (the ranks wait for each other in the
  collectives, so they agree to within noise). With `--baseline` (default on GPUs) the unsharded model first runs
  alone on GPU 0, in a process of its own before the ranks start: the single-GPU numbers the issue's ratios are
  taken against.

Results go to stdout and, as JSON lines, to `--out`. Every line carries card, date and the command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

# The layouts per world size.
LAYOUTS: dict[int, list[str]] = {
    2: ["shard{tp=2}", "shard{tp=2,moe_ep=2}", "shard{pp=2}"],
    4: ["shard{tp=4,moe_tp=2,moe_ep=2}"],
    8: ["shard{tp=8}", "shard{tp=8,moe_ep=8}"],
}
# Divisible by 8 everywhere (heads, kv heads, experts, intermediate, layers by 2), so every layout above applies.
SMALL = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
             rms_norm_eps=1e-5, tie_word_embeddings=False)
SMALL_TOLERANCE = 1e-5  # float32 logits, max |a-e| / max |e|
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _small_config() -> Any:
    from transformers import MixtralConfig

    config = MixtralConfig(**SMALL)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 1e6}
    return config


def _full_config(model: str, layers: int) -> Any:
    """Mixtral-8x7B's published shapes (bf16), or `SMALL`'s in bf16 (`--model small`: checks the measuring code on
    a CPU, where the full shapes do not fit); `layers` of them."""
    from frontends.hf.source import preset_config

    config = preset_config("mixtral-8x7b") if model == "mixtral-8x7b" else _small_config()
    config.num_hidden_layers = layers
    config.dtype = torch.bfloat16
    return config


_FUSED: dict[tuple[str, torch.dtype], Any] = {}  # by (part of the run, dtype): "small" (fp32 check), "full"


def _program(name: str, config: Any, spec: str | None, max_seq: int, dtype: torch.dtype) -> Any:
    """`canonicalize,fuse-moe` once per model (the trace is the slow part), then `<spec>,kv-cache,dce`."""
    from compiler.api import load
    from compiler.pass_manager import parse_pipeline, run_pipeline

    if (name, dtype) not in _FUSED:
        _FUSED[(name, dtype)] = run_pipeline(load(config, dtype=dtype), parse_pipeline("canonicalize,fuse-moe")).program
    shard = f"{spec}," if spec else ""
    return run_pipeline(_FUSED[(name, dtype)], parse_pipeline(f"{shard}kv-cache{{max_seq={max_seq}}},dce")).program


class Clock:
    """Median seconds of `fn` on this rank; `aligned` ranks barrier before each call (they hold collectives)."""

    def __init__(self, device: torch.device, aligned: bool) -> None:
        self.device, self.aligned = device, aligned

    def __call__(self, fn: Callable[[], object], repeats: int, warmup: int = 2,
                 before: Callable[[], object] | None = None) -> float:
        import torch.distributed as dist

        for _ in range(warmup):
            if before is not None:
                before()
            fn()
        times = []
        for _ in range(repeats):
            if before is not None:
                before()
            if self.aligned:
                dist.barrier()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
        return statistics.median(times)


def _each(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (all ranks call this together)."""
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return float((actual - expected).abs().max() / expected.abs().max())


class Reporter:
    """Rank 0 prints each record and appends it, as a JSON line, to the output file."""

    def __init__(self, rank: int, path: str, common: dict[str, Any]) -> None:
        self.rank, self.path, self.common = rank, path, common

    def __call__(self, **record: Any) -> None:
        if self.rank != 0:
            return
        line = json.dumps({**record, **self.common})
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as handle:
                handle.write(line + "\n")


def small_check(args: argparse.Namespace, rank: int, device: torch.device, report: Reporter) -> None:
    """Float32 logits and greedy tokens of every layout against one device's."""
    import torch.distributed as dist

    from backends.torch.distributed import DistributedExecutable
    from backends.torch.runtime import TorchExecutable
    from compiler.generation import generate

    config = _small_config()
    max_seq = args.small_prompt + args.small_new_tokens + 8
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, config.vocab_size, (2, args.small_prompt), generator=generator)
    reference_logits = reference_tokens = None
    if rank == 0:
        single = TorchExecutable(_program("small", config, None, max_seq, torch.float32), device)
        reference_logits = single(ids).float().cpu()
        reference_tokens = generate(single, ids, args.small_new_tokens).tolist()
        del single
    for spec in args.layouts:
        executable = DistributedExecutable(_program("small", config, spec, max_seq, torch.float32), device)
        logits = executable(ids, broadcast=True)
        tokens = executable.generate(ids, args.small_new_tokens).tolist()
        if rank == 0:
            err = _rel_err(logits, reference_logits)
            same = tokens == reference_tokens
            verdict = "PASS" if err <= SMALL_TOLERANCE and same else "FAIL"
            report(part="small-fp32", layout=spec, logits_max_rel_err=err, tolerance=SMALL_TOLERANCE,
                   tokens_equal=same, new_tokens=args.small_new_tokens, prompt=list(ids.shape), verdict=verdict)
        del executable
        dist.barrier()


def _decode_point(executable: Any, batch: int, context: int, steps: int, clock: Clock, device: torch.device,
                  vocab: int, graphs: bool) -> dict[str, Any]:
    """Per-token decode milliseconds of one batch at `context` (eager, and CUDA-graph where it captures); its caches
    (and the graph holding them) are dropped on return."""
    generator = torch.Generator(device=device).manual_seed(batch)
    caches = executable.allocate_caches(batch)
    for cache in caches:
        cache.normal_(generator=generator)
    ids = torch.randint(0, vocab, (batch, 1), device=device, generator=generator)
    position = torch.full((batch,), context, dtype=torch.int64, device=device)
    result: dict[str, Any] = {f"decode_b{batch}_eager_ms": clock(lambda: executable.step(ids, position, caches), steps)
                              * 1e3}
    if graphs:
        try:
            seconds = clock(lambda: executable.decode_graph_step(ids, position, caches), steps)
            result[f"decode_b{batch}_graph_ms"] = seconds * 1e3
        except Exception as error:  # noqa: BLE001 - the reason is the result: which op breaks the capture
            result[f"decode_b{batch}_graph_ms"] = None
            result[f"decode_b{batch}_graph_error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        executable._decode_graphs.pop(batch, None)  # it holds the caches (no public API releases a bucket)
    return result


def _decode_points(executable: Any, batches: list[int], context: int, steps: int, clock: Clock,
                   device: torch.device, vocab: int, graphs: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for batch in batches:
        results.update(_decode_point(executable, batch, context, steps, clock, device, vocab, graphs))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _prefill_ms(executable: Any, tokens: int, steps: int, clock: Clock, device: torch.device, vocab: int) -> float:
    """Milliseconds of one batch-1 step of `tokens` tokens from position 0 (eager)."""
    generator = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, vocab, (1, tokens), device=device, generator=generator)
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    caches = executable.allocate_caches(1)
    return clock(lambda: executable.step(ids, zero, caches), max(1, steps // 4), warmup=1) * 1e3


def _full_shape(args: argparse.Namespace) -> tuple[Any, int, list[int], dict[str, Any]]:
    config = _full_config(args.model, args.layers)
    max_seq = max(args.context + 16, args.prefill + 16)
    shape = dict(model=args.model, layers=args.layers, context=args.context, prefill_tokens=args.prefill,
                 steps=args.steps)
    return config, max_seq, [int(b) for b in args.batches.split(",")], shape


def single_full_model(args: argparse.Namespace, device: torch.device, report: Reporter) -> None:
    """The baseline: the unsharded bf16 model alone on one device, in a process of its own (before the ranks)."""
    from backends.torch.runtime import TorchExecutable

    config, max_seq, batches, shape = _full_shape(args)
    on_gpu = device.type == "cuda"
    started = time.perf_counter()
    single = TorchExecutable(_program("full", config, None, max_seq, torch.bfloat16), device)
    build_s = time.perf_counter() - started
    clock = Clock(device, aligned=False)
    points = _decode_points(single, batches, args.context, args.steps, clock, device, config.vocab_size, on_gpu)
    prefill_ms = _prefill_ms(single, args.prefill, args.steps, clock, device, config.vocab_size)
    peak = torch.cuda.max_memory_allocated(device) if on_gpu else None
    report(part="full-bf16", layout="single", ranks=1, **shape, **points, prefill_ms=prefill_ms,
           peak_gpu_bytes_per_rank=[peak], weight_bytes_per_rank=[single.materialized_bytes], build_s=round(build_s, 1))


def full_model(args: argparse.Namespace, device: torch.device, report: Reporter) -> None:
    """Decode and prefill of Mixtral-8x7B shapes (bf16) for every layout; called on every rank."""
    import torch.distributed as dist

    from backends.torch.distributed import DistributedExecutable

    config, max_seq, batches, shape = _full_shape(args)
    on_gpu = device.type == "cuda"
    for spec in args.layouts:
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        executable = DistributedExecutable(_program("full", config, spec, max_seq, torch.bfloat16), device)
        build_s = time.perf_counter() - started
        clock = Clock(device, aligned=True)
        rank_executable = executable._executable  # this rank's TorchExecutable: steps with explicit caches
        points = _decode_points(rank_executable, batches, args.context, args.steps, clock, device, config.vocab_size,
                                on_gpu)
        points["prefill_ms"] = _prefill_ms(rank_executable, args.prefill, args.steps, clock, device, config.vocab_size)
        # One gather of everything, so every rank makes the same collective calls whatever its results.
        ranks = _each(dict(points=points, build_s=build_s, weight_bytes=executable.materialized_bytes,
                           peak=torch.cuda.max_memory_allocated(device) if on_gpu else None))
        merged: dict[str, Any] = {}
        for key in points:
            values = [r["points"].get(key) for r in ranks]
            if key.endswith("_error"):
                merged[key] = sorted({v for v in values if v})
            else:  # the slowest rank's median; None where any rank has no number (its capture failed)
                merged[key] = None if any(v is None for v in values) else max(values)
        report(part="full-bf16", layout=spec, ranks=dist.get_world_size(), **shape, **merged,
               peak_gpu_bytes_per_rank=[r["peak"] for r in ranks],
               weight_bytes_per_rank=[r["weight_bytes"] for r in ranks],
               build_s=round(max(r["build_s"] for r in ranks), 1))
        del executable, rank_executable
        dist.barrier()


def _common(device: torch.device, world: int, backend: str, command: str) -> dict[str, Any]:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return dict(card=card, world=world, backend=backend, torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), command=command)


def single(args: argparse.Namespace) -> None:
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    single_full_model(args, device, Reporter(0, args.out, _common(device, 1, "none", args.command)))


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from backends.torch.distributed import init_distributed, launch_environment, rank_device

    env = launch_environment()
    if env is None:
        raise SystemExit("--worker runs under torchrun (the script launches it itself)")
    device = rank_device(args.device, env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(device)
    report = Reporter(env.rank, args.out, _common(device, env.world_size, dist.get_backend(), args.command))
    small_check(args, env.rank, device, report)
    if not args.small_only:
        full_model(args, device, report)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help="internal: run as one torchrun rank")
    parser.add_argument("--single", action="store_true", help="internal: run the one-device baseline")
    parser.add_argument("--command", default="", help="internal: the launching command line, for the records")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--gpus", type=int, default=2, help="ranks (processes); on the CPU, too")
    parser.add_argument("--layouts", nargs="+", default=None, help="shard specs (default: the issue's for --gpus)")
    parser.add_argument("--small-only", action="store_true", help="only the small float32 equality check")
    parser.add_argument("--small-prompt", type=int, default=12)
    parser.add_argument("--small-new-tokens", type=int, default=8)
    parser.add_argument("--model", choices=["mixtral-8x7b", "small"], default="mixtral-8x7b",
                        help="shapes of the bf16 decode/prefill part (small: a CPU check of the measuring code)")
    parser.add_argument("--layers", type=int, default=32, help="layers of the full model (Mixtral-8x7B has 32)")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per point")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                        help="rank 0 first measures the unsharded model alone (default: on GPUs)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "generate_multi_gpu.jsonl"))
    args = parser.parse_args()
    if args.layouts is None:
        if args.gpus not in LAYOUTS:
            parser.error(f"no default layouts for --gpus {args.gpus}; give --layouts")
        args.layouts = LAYOUTS[args.gpus]
    if args.baseline is None:
        args.baseline = args.device == "cuda"
    if args.worker:
        worker(args)
        return
    if args.single:
        single(args)
        return
    command = " ".join(["python3 -m bench.generate_multi_gpu", *sys.argv[1:]])
    if args.device == "cuda" and torch.cuda.device_count() < args.gpus:
        parser.error(f"--gpus {args.gpus} needs {args.gpus} GPUs; this machine has {torch.cuda.device_count()}")
    options = [
        "--command", command, "--device", args.device, "--gpus", str(args.gpus), "--layouts", *args.layouts,
        "--small-prompt", str(args.small_prompt), "--small-new-tokens", str(args.small_new_tokens),
        "--model", args.model, "--layers", str(args.layers), "--batches", args.batches, "--context", str(args.context),
        "--prefill", str(args.prefill), "--steps", str(args.steps), "--out", args.out,
    ] + (["--small-only"] if args.small_only else [])
    environment = {**os.environ, **MULTICAST_OFF}
    # torchrun would set 1 thread per rank: random weights are drawn on the CPU, so give each rank its share.
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.gpus)))
    runs = []
    if args.baseline and not args.small_only:
        runs.append([sys.executable, "-m", "bench.generate_multi_gpu", "--single", *options])
    runs.append([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.gpus), "-m",
                 "bench.generate_multi_gpu", "--worker", *options])
    for run in runs:
        print("$ " + " ".join(run), flush=True)
        code = subprocess.call(run, env=environment)
        if code:
            sys.exit(code)


if __name__ == "__main__":
    main()
