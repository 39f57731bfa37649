"""Where a decode step of the full Mixtral-8x7B goes, per op category, for several pipelines (fusions, quantization).

Run on an H200 from the repository root::

    PYTHONPATH=. python3 bench/decode_profile.py [--pipelines default,fused,int8,int4-g128] [--markdown FILE]

The model is the `mixtral-8x7b` preset (random weights) with its stored tensors drawn directly on the GPU (a CUDA
generator per tensor, seeded by name; the CPU preset draws the same way on the host, which would take minutes for
93 GB), so quantizing pipelines materialize only their codes and scales: the float source of one stored tensor
exists on the GPU only while its codes are computed. Pipelines (each compiled and bound in turn, then freed):

* `default`: moec's default pipeline, `canonicalize,fuse-moe,kv-cache{max_seq},dce`.
* `fused`: the default plus `fuse-qkv,fuse-norm` (q/k/v as one projection; residual add + RMSNorm as one op).
* `fused-rope`: `fused` plus `fuse-rope` (q/k rope inside the decode attention kernel: no rope launches).
* `int8`, `int4`, `int4-g128`: `fused` plus `quantize-weights{precision,group_size}` (lm_head stays bf16).
* `fp8`, `fp8-kv`: `fused` with `calibrate,quantize-fp8` (and FP8 KV caches) in the recipe's order; calibrate records
  synthetic ranges here (`synthetic_calibration`: random weights, no text).

For each: GPU memory of the bound weights; one eager decode step (batch 1, context 1024) under the torch profiler,
kernel time per category and kernels per layer; CUDA-graph decode steps at batch 1, 8, 32 (context 1024) against
the bytes floor (weights read + K/V read, over the copy bandwidth measured in this run), timed two ways: steps
enqueued back to back (as `generate` runs them: the next step is launched before the host reads a token, so the
host's ~0.17 ms graph launch overlaps the GPU's work) and one synchronized step at a time (start event, inputs
copied, graph launched, end event, sync: the host's launch is then on the clock); an eager 2048-token prefill
against the FLOP floor (bf16 GEMM rate measured in this run). `--timeline` charges each replayed step's time to its
kernels (`graph_timeline`). `--pdl-off-too` times every decode batch a second time with programmatic dependent
launch off (`MOEC_PDL=0`, backends/torch/triton_support.py); `--combine-variants 0,attention,moe` once more per
value of `MOEC_COMBINE_IN_KERNEL` (0: the attention splits and the MoE slots summed by separate combine kernels,
not by the last program to arrive; `attention` / `moe`: only that one in the kernel); `--env-variant NAME=VALUE`
(repeatable) once more with that variable set, e.g. `MOEC_EARLY_WEIGHTS=0` (the MoE down GEMVs wait before reading
their expert id and first weight tile).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import os
import statistics
import zlib

import torch

PIPELINES = {
    "default": "",
    "fused": ",fuse-qkv,fuse-norm",
    "fused-rope": ",fuse-qkv,fuse-norm,fuse-rope",
    "int8": ",fuse-qkv,fuse-norm,quantize-weights{precision=int8}",
    "int4": ",fuse-qkv,fuse-norm,quantize-weights{precision=int4}",
    "int4-g128": ",fuse-qkv,fuse-norm,quantize-weights{precision=int4,group_size=128}",
    # FP8 as the recipe's `--qformat fp8` orders it; `calibrate` is synthetic here (see synthetic_calibration).
    "fp8": ",fuse-qkv,calibrate,quantize-fp8,fuse-norm",
    "fp8-kv": ",fuse-qkv,calibrate,quantize-fp8{kv_cache=true},fuse-norm",
}
CATEGORIES = [  # first match wins: attention's `_decode_combine_kernel` before the MoE's `_combine_kernel`
    ("attention", ("_decode_kernel", "_decode_combine_kernel", "_write_kernel", "_prefill_kernel")),
    ("moe experts", ("_gate_up_kernel", "_down_kernel", "_align_kernel", "_combine_kernel", "_gate_up_gemv_kernel",
                     "_down_gemv_kernel", "_gate_up_words_kernel", "_down_words_kernel")),
    ("router", ("_route_kernel",)),
    ("linears", ("gemv", "gemm", "cutlass", "xmma", "nvjet", "_quantized_matmul_kernel", "cublas", "sm90_xmma",
                 "_gemv_kernel")),
    ("fp8 activation quantize", ("_quantize_kernel",)),
    ("norms", ("_rms_norm_kernel",)),
    ("rope", ("_rope_kernel",)),
]


def log(msg: str) -> None:
    print(msg, flush=True)


def draw_presets_on_gpu() -> None:
    """RandomTensor leaves draw on the GPU (bench only: the numbers differ from the CPU preset's, the shapes don't)."""
    from compiler.weights import RandomTensor

    def read(self, index=None):
        if self.init == "ones":
            data = torch.ones(self.shape, dtype=self.dtype, device="cuda")
        else:
            generator = torch.Generator(device="cuda").manual_seed(self.seed ^ zlib.crc32(self.name.encode()))
            data = (torch.randn(self.shape, generator=generator, device="cuda") * self.std).to(self.dtype)
        return data if index is None else data[index]

    RandomTensor.read = read


def synthetic_calibration(amax: float = 16.0) -> None:
    """Random weights come with no tokenizer and no text worth calibrating on: here `calibrate` records the same range
    for every activation instead of running the model (bench only; the FP8 kernels' speed does not depend on the
    scales, and the FP8 accuracy is measured on the trained `tiny`, bench/quant_accuracy.py)."""
    from compiler import calibration
    from compiler.ir import Calibration
    from passes import calibrate

    def run(self, program):
        ranges = {calibrate.module_path(node): {role: amax for role in calibration.ROLES[node.target]}
                  for node in program.graph.nodes if node.target in calibration.ROLES}
        result = program.clone()
        result.calibration = Calibration(f"synthetic (bench): amax {amax} for every activation", ranges)
        return calibrate.PassResult(result, True, {"ops": len(ranges)})

    calibrate.Calibrate.requires = lambda self, program: None
    calibrate.Calibrate.run = run


def step_bytes(cfg, batch: int, ctx: int, pipeline: str) -> tuple[float, float]:
    """(weight bytes, K/V bytes) a decode step must read at the pipeline's precision: quantized projections and
    experts count their codes and scales (bench/generate.py's floors() at bf16), the router and lm_head stay bf16."""
    from bench.generate import floors

    h, i, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    _, kv = floors(cfg, batch, ctx, 1.0)
    d = h // cfg.num_attention_heads
    per_element = {"int8": 1 + 2 / h, "int4": 0.5 + 2 / h, "int4-g128": 0.5 + 2 / 128, "fp8": 1.0,
                   "fp8-kv": 1.0}.get(pipeline, 2.0)
    if pipeline == "fp8-kv":
        kv /= 2  # e4m3 caches: one byte per element
    attention = (2 * h * cfg.num_attention_heads * d + 2 * h * cfg.num_key_value_heads * d) * per_element
    distinct = e * (1 - (1 - k / e) ** batch)
    per_layer = attention + e * h * 2 + distinct * 3 * h * i * per_element
    return cfg.num_hidden_layers * per_layer + cfg.vocab_size * h * 2, kv


def fill_caches(caches, gen: torch.Generator) -> None:
    """Random K/V contents (no random kernel writes float8: e4m3 caches take a cast copy)."""
    for cache in caches:
        if cache.dtype == torch.float8_e4m3fn:
            cache.copy_(torch.randn(cache.shape, generator=gen, device=cache.device, dtype=torch.bfloat16))
        else:
            cache.normal_(generator=gen)


def category(name: str) -> str:
    for label, needles in CATEGORIES:
        if any(needle in name for needle in needles):
            return label
    return "other (elementwise, copies, embedding)"


def profile_step(executable, caches, ids, position, layers: int) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        executable.step(ids, position, caches)
    torch.cuda.synchronize()
    repeats = 3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            executable.step(ids, position, caches)
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    names: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for event in prof.key_averages():
        if event.device_type.name != "CUDA" or event.device_time_total <= 0:
            continue
        label = category(event.key)
        totals[label][0] += event.device_time_total / repeats
        totals[label][1] += event.count / repeats
        names[label][event.key[:60]] += event.count // repeats
    lines = ["| category | device ms / step | kernels / step | kernels / layer | top kernels |", "|" + "---|" * 5]
    for label, (us, count) in sorted(totals.items(), key=lambda item: -item[1][0]):
        top = ", ".join(f"{n} x{c}" for n, c in names[label].most_common(3))
        lines.append(f"| {label} | {us / 1e3:.3f} | {count:.0f} | {count / layers:.1f} | {top} |")
    total_us = sum(v[0] for v in totals.values())
    total_count = sum(v[1] for v in totals.values())
    lines.append(f"| total | {total_us / 1e3:.3f} | {total_count:.0f} | {total_count / layers:.1f} | |")
    return lines


def graph_timeline(executable, caches, ids, position, layers: int, replays: int = 5) -> list[str]:
    """Where the wall time of a replayed CUDA-graph decode step goes. Under PDL a kernel starts while its predecessor
    still runs and waits on the device, so kernel durations overlap and do not add up; instead each kernel is charged
    the time from its predecessor's end to its own end (the stream is serial: these add up to the step). Per kernel
    name: the charged time per step and per layer, and the kernel's own duration."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        executable.decode_graph_step(ids, position, caches)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            executable.decode_graph_step(ids, position, caches)
            torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA" and e.device_resource_id >= 0
                      and e.time_range.elapsed_us() > 0), key=lambda e: e.time_range.start)
    if not kernels:
        return ["(the profiler recorded no kernels of the replayed graph)"]
    charged: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    previous_end = None
    for event in kernels:
        start, end = event.time_range.start, event.time_range.end
        if previous_end is None or start - previous_end > 200:  # a replay's first kernel (replays are synced apart)
            previous_end = start
        entry = charged[event.name[:70]]
        entry[0] += max(0.0, end - previous_end)
        entry[1] += end - start
        entry[2] += 1
        previous_end = max(previous_end, end)
    total = sum(v[0] for v in charged.values()) / replays
    lines = [f"Replayed graph, batch {ids.shape[0]}: {total / 1e3:.3f} ms of kernel-charged time per step "
             f"({len(kernels) / replays:.0f} kernels)", "",
             "| kernel | category | charged us / step | us / layer | own duration us / call | calls / step |",
             "|" + "---|" * 6]
    for name, (charge, own, count) in sorted(charged.items(), key=lambda item: -item[1][0]):
        lines.append(f"| `{name}` | {category(name)} | {charge / replays:.1f} | {charge / replays / layers:.2f} | "
                     f"{own / count:.2f} | {count / replays:.0f} |")
    return lines


def back_to_back(executable, caches, ids, position, steps: int) -> tuple[float, float, float]:
    """(device seconds per step with `steps` steps enqueued back to back, host seconds per `decode_graph_step` call,
    host seconds per bare `replay()`): how much of a synchronized step is the host's. The synchronized timer
    charges a step the host time of its input copies and graph launch; a loop that keeps the next token on the
    device (or a busy GPU) hides it."""
    import time

    for _ in range(3):
        executable.decode_graph_step(ids, position, caches)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    host_started = time.perf_counter()
    for _ in range(steps):
        executable.decode_graph_step(ids, position, caches)
    host = (time.perf_counter() - host_started) / steps
    end.record()
    torch.cuda.synchronize()
    graph = executable._decode_graphs[caches[0].shape[0]].graph
    torch.cuda._sleep(int(50e6))  # keep the GPU busy so the replays below never wait on it
    replay_started = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    replay = (time.perf_counter() - replay_started) / steps
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / steps, host, replay


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipelines", default="default,fused,int8,int4-g128")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--pdl-off-too", action="store_true",
                    help="also time each decode batch with programmatic dependent launch off (MOEC_PDL=0)")
    ap.add_argument("--combine-variants", default="",
                    help="also time each decode batch under these MOEC_COMBINE_IN_KERNEL values (comma-separated)")
    ap.add_argument("--env-variant", action="append", default=[], metavar="NAME=VALUE",
                    help="also time each decode batch with this environment variable set (repeatable), e.g. "
                         "MOEC_EARLY_WEIGHTS=0")
    ap.add_argument("--timeline", action="store_true",
                    help="charge each decode batch's replayed-graph wall time to its kernels (graph_timeline)")
    ap.add_argument("--profile-prefill", action="store_true",
                    help="profile one eager prefill of --prefill tokens per pipeline instead of a decode step")
    args = ap.parse_args()
    # (label, environment) of each timing of a decode batch; the main rows run as the caller set the environment
    variants = [("", {})]
    if args.pdl_off_too:
        variants.append(("PDL off", {"MOEC_PDL": "0"}))
    for value in filter(None, args.combine_variants.split(",")):
        variants.append((f"MOEC_COMBINE_IN_KERNEL={value}", {"MOEC_COMBINE_IN_KERNEL": value}))
    for assignment in args.env_variant:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise SystemExit(f"moec: error: --env-variant {assignment!r} is not NAME=VALUE")
        variants.append((assignment, {key: value}))

    from bench.generate import Timer, prefill_flops
    from bench.moe_kernel import measure_copy_bw, measure_gemm_rate
    from compiler.api import compile
    from frontends.hf.source import preset_config

    draw_presets_on_gpu()
    synthetic_calibration()
    copy_bw, gemm_rate = measure_copy_bw(), measure_gemm_rate()
    config = preset_config("mixtral-8x7b")
    config.num_hidden_layers = args.layers
    max_seq = max(args.context, args.prefill) + 16
    timer = Timer(torch.device("cuda"))
    batches = [int(b) for b in args.batches.split(",")]
    report = [f"Card: {torch.cuda.get_device_name()}; torch {torch.__version__}; date "
              f"{datetime.date.today().isoformat()}; {args.layers} layers of Mixtral-8x7B (random, drawn on the GPU); "
              f"copy {copy_bw / 1e12:.3f} TB/s, bf16 GEMM {gemm_rate / 1e12:.0f} TFLOP/s (measured in this run)", ""]
    summary = ["| pipeline | weights GB (GPU) | " + " | ".join(f"decode b{b} ms (x floor): back to back; synchronized"
                                                            for b in batches)
               + f" | prefill {args.prefill} ms (x FLOP floor) |", "|" + "---|" * (3 + len(batches))]
    for name in args.pipelines.split(","):
        passes = f"canonicalize,fuse-moe,kv-cache{{max_seq={max_seq}}}{PIPELINES[name]},dce"
        gc.collect()  # the previous pipeline's program may sit in a reference cycle: free it before the baseline
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        compiled = compile(config, passes=passes, device="cuda", cuda_graphs=True)
        executable = compiled.executable()
        torch.cuda.synchronize()
        weights_gb = (torch.cuda.memory_allocated() - base) / 1e9
        log(f"== {name}: {passes}; weights {weights_gb:.2f} GB on the GPU "
            f"({executable.materialized_bytes / 1e9:.2f} GB materialized)")
        gen = torch.Generator(device="cuda").manual_seed(0)
        caches = executable.allocate_caches(1)
        fill_caches(caches, gen)
        ids = torch.randint(0, config.vocab_size, (1, 1), device="cuda", generator=gen)
        position = torch.full((1,), args.context, dtype=torch.int64, device="cuda")
        if args.profile_prefill:
            report += [f"### {name}: `{passes}`", "", f"Eager prefill of {args.prefill} tokens, batch 1:", ""]
            prefill_ids = torch.randint(0, config.vocab_size, (1, args.prefill), device="cuda", generator=gen)
            report += profile_step(executable, caches, prefill_ids, torch.zeros_like(position), args.layers) + [""]
        else:
            report += [f"### {name}: `{passes}`", "", f"Eager decode step, batch 1, context {args.context}:", ""]
            report += profile_step(executable, caches, ids, position, args.layers) + [""]
        log("\n".join(report[-12:]))
        del caches
        cells = {label: [] for label, _ in variants}
        for batch in batches:
            caches = executable.allocate_caches(batch)
            fill_caches(caches, gen)
            ids = torch.randint(0, config.vocab_size, (batch, 1), device="cuda", generator=gen)
            position = torch.full((batch,), args.context, dtype=torch.int64, device="cuda")
            weights, kv = step_bytes(config, batch, args.context, name)
            floor = (weights + kv) / copy_bw
            for label, env in variants:
                saved = {key: os.environ.get(key) for key in env}
                os.environ.update(env)  # read at every launch: the graph is captured again under this environment
                executable._decode_graphs.pop(batch, None)
                tag = f" ({label})" if label else ""
                seconds = timer(lambda: executable.decode_graph_step(ids, position, caches), repeats=args.steps)
                queued, host_s, replay_s = back_to_back(executable, caches, ids, position, args.steps)
                report += [f"Batch {batch}{tag}: synchronized step "
                           f"{seconds * 1e3:.3f} ms; {args.steps} steps back to back {queued * 1e3:.3f} ms each; "
                           f"host {host_s * 1e6:.0f} us per decode_graph_step, {replay_s * 1e6:.0f} us per bare graph "
                           "replay", ""]
                log(report[-2])
                if args.timeline and not label:
                    try:
                        report += graph_timeline(executable, caches, ids, position, args.layers) + [""]
                    except Exception as exc:  # a profiler that cannot see graph kernels: say so, keep the run
                        report += [f"(timeline failed: {type(exc).__name__}: {exc})", ""]
                    log("\n".join(report[-40:]))
                cells[label].append(
                    f"{queued * 1e3:.3f} ({queued / floor:.2f}); synced {seconds * 1e3:.3f} ({seconds / floor:.2f})")
                log(f"{name} decode batch {batch}{tag}: {seconds * 1e3:.3f} ms/step, floor {floor * 1e3:.3f} ms")
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
            executable._decode_graphs.pop(batch, None)
            del caches
            torch.cuda.empty_cache()
        prefill_cell = "-"
        if args.prefill > 0:
            caches = executable.allocate_caches(1)
            ids = torch.randint(0, config.vocab_size, (1, args.prefill), device="cuda", generator=gen)
            zero = torch.zeros(1, dtype=torch.int64, device="cuda")
            prefill = timer(lambda: executable.step(ids, zero, caches), repeats=5, warmup=1)
            flop_floor = prefill_flops(config, args.prefill) / gemm_rate
            log(f"{name} prefill {args.prefill}: {prefill * 1e3:.2f} ms, FLOP floor {flop_floor * 1e3:.2f} ms")
            prefill_cell = f"{prefill * 1e3:.2f} ({prefill / flop_floor:.2f})"
            del caches
        summary.append(f"| {name} | {weights_gb:.2f} | " + " | ".join(cells[""]) + f" | {prefill_cell} |")
        for label, _ in variants[1:]:
            summary.append(f"| {name}, {label} | | " + " | ".join(cells[label]) + " | |")
        del executable, compiled
        torch.cuda.empty_cache()
        text = "\n".join(report[:2] + summary + [""] + report[2:])
        if args.markdown:  # after every pipeline: a run cut short keeps what it measured
            with open(args.markdown, "w") as handle:
                handle.write(text + "\n")
    log("\n" + text)


if __name__ == "__main__":
    main()
