"""End-to-end decode and prefill of a full-size Mixtral-8x7B (random bf16 weights) with KV caches: moec vs Hugging Face.

Run on an H200 from the repository root::

    PYTHONPATH=. python3 bench/generate.py [--layers 32] [--batches 1,8,32,64] [--contexts 128,1024,4096]

One Hugging Face `MixtralForCausalLM` is built on the GPU in bf16 with HF's own random init (93.4 GB at 32 layers);
moec compiles that in-memory model (`canonicalize,fuse-moe,kv-cache{max_seq=M},dce`), so both run on the very same
weight tensors (moec's materialized weights alias HF's parameters; the script prints how many bytes do).

* Decode: for each batch and context, the caches are filled with random values up to the context (a decode step's
  cost depends on how many slots it reads, not on what they hold, and a real prefill of 64 x 4096 tokens would cost
  more device time than the whole measurement), then one token per sequence is decoded at position = context,
  repeatedly: moec replays its CUDA graph of the decode step (`TorchExecutable.decode_graph_step`), HF runs its
  eager forward with its default dynamic cache (filled the same way, cropped back after each step; `grouped_mm`
  experts, `sdpa` attention). CUDA-event medians per step.
* Prefill: 2048 tokens of batch 1 from position 0, eager on both sides.
* Floors, from the copy bandwidth and bf16 GEMM rate measured in the same run: bytes floor of a decode step = the
  weights it must read (attention projections, router, the experts its tokens route to -- the expected number of
  distinct experts under uniform top-2 routing, E * (1 - (1 - k/E)^batch) --, lm_head) + the K/V bytes of the
  filled slots, over the copy bandwidth; FLOP floor of prefill = 2 * active parameters * tokens (+ causal attention
  4 * D * Hq * pairs per layer) over the GEMM rate.
* Checks: moec's decode after a prefill of n-1 tokens against its prefill of n tokens (the KV cache path against the
  cacheless one), and moec's prefill logits against HF's (bf16 with random init routes near-ties differently, see
  BENCHMARKS.md, so only argmax agreement is printed there).

`--model small --device cpu` runs the same code on a tiny Mixtral on the CPU (no CUDA graphs; a script check only).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import statistics
import time

import torch

SHAPES = {
    "full": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2),
    "small": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                  num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2),
}


def log(msg: str) -> None:
    print(msg, flush=True)


class Timer:
    """Median seconds of repeated calls: CUDA events on a GPU, the host clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn, repeats: int, warmup: int = 2, after=None) -> float:
        for _ in range(warmup):
            fn()
            if after is not None:
                after()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
            if after is not None:
                after()
        return statistics.median(times)


def build_hf(shapes: dict, layers: int, device: torch.device, max_positions: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**shapes, num_hidden_layers=layers, max_position_embeddings=max_positions,
                           rms_norm_eps=1e-5)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 1e6}
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: a float32 model would not fit the card
    try:
        with torch.device(device):
            model = MixtralForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    model.set_experts_implementation("grouped_mm")
    return model


def hf_cache_argument(model) -> str:
    """transformers renamed `past_key_values` to `cache` in forward (5.2x); use whichever this version takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def hf_filled_cache(model, batch: int, ctx: int, device: torch.device):
    from transformers import DynamicCache

    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache()
    for layer in range(cfg.num_hidden_layers):
        shape = (batch, cfg.num_key_value_heads, ctx, head_dim)
        cache.update(torch.randn(shape, device=device, dtype=torch.bfloat16),
                     torch.randn(shape, device=device, dtype=torch.bfloat16), layer)
    return cache


def floors(cfg, batch: int, ctx: int, copy_bw: float) -> tuple[float, float]:
    """(weight bytes, K/V bytes) one decode step of `batch` tokens at position ctx must read."""
    h, i, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    d = h // cfg.num_attention_heads
    attention = (2 * h * cfg.num_attention_heads * d + 2 * h * cfg.num_key_value_heads * d) * 2
    distinct = e * (1 - (1 - k / e) ** batch)
    per_layer = attention + e * h * 2 + distinct * 3 * h * i * 2
    weights = cfg.num_hidden_layers * per_layer + cfg.vocab_size * h * 2
    kv = cfg.num_hidden_layers * 2 * batch * cfg.num_key_value_heads * (ctx + 1) * d * 2
    return weights, kv


def prefill_flops(cfg, tokens: int) -> float:
    h, i, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts_per_tok
    d = h // cfg.num_attention_heads
    attention_params = 2 * h * cfg.num_attention_heads * d + 2 * h * cfg.num_key_value_heads * d
    active = cfg.num_hidden_layers * (attention_params + cfg.num_local_experts * h + k * 3 * h * i) + cfg.vocab_size * h
    pairs = tokens * (tokens + 1) // 2
    return 2 * active * tokens + cfg.num_hidden_layers * 4 * d * cfg.num_attention_heads * pairs


def profile_steps(executable, vocab: int, prefill: int, device: torch.device) -> None:
    """Per-kernel device time (torch profiler) of eager steps: where a step's time goes, kernel by kernel."""
    from torch.profiler import ProfilerActivity, profile

    caches = executable.allocate_caches(1)
    cases = [("decode batch 1 context 1024", torch.randint(0, vocab, (1, 1), device=device), 1024, 3),
             (f"prefill {prefill}", torch.randint(0, vocab, (1, prefill), device=device), 0, 2)]
    for label, ids, start, repeats in cases:
        position = torch.full((1,), start, dtype=torch.int64, device=device)
        for _ in range(2):
            executable.step(ids, position, caches)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                executable.step(ids, position, caches)
            torch.cuda.synchronize()
        rows = sorted(((e.device_time_total / repeats, e.count // repeats, e.key) for e in prof.key_averages()
                       if e.device_type.name == "CUDA"), reverse=True)
        log(f"== {label}: {sum(r[1] for r in rows)} kernels per step, device time "
            f"{sum(r[0] for r in rows) / 1e3:.3f} ms per step")
        for us, count, name in rows[:22]:
            log(f"{us / 1e3:8.3f} ms x{count:4d} {name[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="full")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--contexts", default="128,1024,4096")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps per point (moec)")
    ap.add_argument("--hf-steps", type=int, default=5, help="timed decode steps per point (Hugging Face)")
    ap.add_argument("--hf-max-batch", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--passes", default="",
                    help="passes added to the default pipeline before dce, e.g. ',fuse-qkv,fuse-norm' (leading comma)")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="only print the per-kernel device time of one eager decode step (batch 1, context 1024) "
                         "and of the prefill (torch profiler), then exit")
    args = ap.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.profile and not on_gpu:
        ap.error("--profile reads CUDA kernel times: it needs --device cuda")
    batches = [int(v) for v in args.batches.split(",")]
    contexts = [int(v) for v in args.contexts.split(",")]
    max_seq = max(max(contexts) + 16, args.prefill + 16)

    from compiler.api import compile

    timer = Timer(device)
    if on_gpu:
        from bench.moe_kernel import measure_copy_bw, measure_gemm_rate

        copy_bw, gemm_rate = measure_copy_bw(), measure_gemm_rate()
    else:
        copy_bw, gemm_rate = float("nan"), float("nan")
    started = time.perf_counter()
    model = build_hf(SHAPES[args.model], args.layers, device, max(max_seq, 4096))
    cfg = model.config
    log(f"HF model built in {time.perf_counter() - started:.1f}s; attention {cfg._attn_implementation}")
    started = time.perf_counter()
    passes = f"canonicalize,fuse-moe,kv-cache{{max_seq={max_seq}}}{args.passes},dce"
    compiled = compile(model, passes=passes, device=str(device), cuda_graphs=on_gpu)
    executable = compiled.executable()
    compile_s = time.perf_counter() - started
    hf_ptrs = {p.data_ptr() for p in model.parameters()}
    aliased = sum(t.numel() * t.element_size() for t in executable.weights.values() if t.data_ptr() in hf_ptrs)
    log(f"moec compiled + bound in {compile_s:.1f}s: {executable.materialized_bytes:,} bytes of weights, "
        f"{aliased:,} of them HF's own tensors (aliased)")
    if args.profile:
        profile_steps(executable, cfg.vocab_size, args.prefill, device)
        return
    cache_arg = hf_cache_argument(model)
    gen = torch.Generator(device=device).manual_seed(0)

    # Checks: cached decode vs cacheless prefill (moec), moec prefill vs HF prefill.
    n = min(args.prefill, 256)
    ids = torch.randint(0, cfg.vocab_size, (1, n), device=device, generator=gen)
    caches = executable.allocate_caches(1)
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    full = executable.step(ids, zero, executable.allocate_caches(1))[:, -1].float()
    executable.step(ids[:, :-1], zero, caches)
    stepped = executable.step(ids[:, -1:], torch.full((1,), n - 1, device=device), caches)[:, -1].float()
    cache_err = float((stepped - full).abs().max() / full.abs().max())
    with torch.no_grad():
        hf_logits = model(ids, use_cache=False).logits[:, -1].float()
    hf_err = float((full - hf_logits).abs().max() / hf_logits.abs().max())
    log(f"check: moec decode-after-prefill vs prefill max rel err {cache_err:.2e}; argmax moec == HF: "
        f"{bool(full.argmax() == hf_logits.argmax())} (rel err vs HF {hf_err:.2e})")
    del caches

    # Prefill.
    ids = torch.randint(0, cfg.vocab_size, (1, args.prefill), device=device, generator=gen)
    caches = executable.allocate_caches(1)
    ours_prefill = timer(lambda: executable.step(ids, zero, caches), repeats=5, warmup=1)
    del caches
    with torch.no_grad():
        hf_prefill = timer(lambda: model(ids, use_cache=True), repeats=5, warmup=1)
    flop_floor = prefill_flops(cfg, args.prefill) / gemm_rate
    log(f"prefill {args.prefill}: moec {ours_prefill * 1e3:.2f} ms, HF {hf_prefill * 1e3:.2f} ms, "
        f"FLOP floor {flop_floor * 1e3:.2f} ms")


    rows = []
    for batch in batches:
        ids = torch.randint(0, cfg.vocab_size, (batch, 1), device=device, generator=gen)
        hf_times: dict[int, float] = {}
        for ctx in contexts:
            if batch > args.hf_max_batch:
                break
            head_dim = cfg.hidden_size // cfg.num_attention_heads
            need = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * (ctx + 1) * head_dim * 2
            if on_gpu and torch.cuda.mem_get_info()[0] < need * 1.3 + (4 << 30):
                log(f"HF batch {batch} context {ctx}: skipped, its cache ({need / 1e9:.1f} GB) does not fit beside "
                    "the model")
                continue
            cache = hf_filled_cache(model, batch, ctx, device)
            position = torch.full((batch, 1), ctx, device=device)
            with torch.no_grad():
                hf_times[ctx] = timer(lambda: model(ids, position_ids=position, use_cache=True, **{cache_arg: cache}),
                                      repeats=args.hf_steps, after=lambda: cache.crop(-1))  # drop the new slot
            del cache
            log(f"HF batch {batch} context {ctx}: {hf_times[ctx] * 1e3:.2f} ms/step")
        caches = executable.allocate_caches(batch)
        for cache in caches:
            cache.normal_(generator=gen)
        for ctx in contexts:
            position = torch.full((batch,), ctx, dtype=torch.int64, device=device)
            if on_gpu:
                step = lambda: executable.decode_graph_step(ids, position, caches)  # noqa: E731
            else:
                step = lambda: executable.step(ids, position, caches)  # noqa: E731
            ours = timer(step, repeats=args.steps)
            weights, kv = floors(cfg, batch, ctx, copy_bw)
            floor = (weights + kv) / copy_bw
            hf = hf_times.get(ctx, float("nan"))
            rows.append(dict(batch=batch, ctx=ctx, ours=ours, hf=hf, floor=floor, weights=weights, kv=kv))
            log(f"moec batch {batch} context {ctx}: {ours * 1e3:.3f} ms/step (graph), HF {hf * 1e3:.2f} ms, "
                f"bytes floor {floor * 1e3:.3f} ms ({(weights + kv) / 1e9:.2f} GB)")
        if on_gpu:
            # The runtime keeps one captured graph (and, through it, these caches) per batch bucket; drop ours so the
            # next batch's caches fit. (No public API releases a bucket yet.)
            executable._decode_graphs.pop(caches[0].shape[0], None)
        del caches
        if on_gpu:
            torch.cuda.empty_cache()

    card = torch.cuda.get_device_name() if on_gpu else "cpu"
    import transformers

    info = (f"Card: {card}; torch {torch.__version__}; transformers {transformers.__version__}; "
            f"date {datetime.date.today().isoformat()}; pipeline `{passes}`; {args.layers} layers of Mixtral-8x7B "
            f"shapes ({args.model}), "
            "bf16 "
            f"random init, moec compile {compile_s:.1f}s\n"
            f"Measured copy bandwidth {copy_bw / 1e12:.3f} TB/s, bf16 8192^3 GEMM {gemm_rate / 1e12:.0f} TFLOP/s; "
            f"check: cached decode vs prefill rel err {cache_err:.1e}")
    lines = ["| batch | context | moec graph (ms/step) | HF eager, dynamic cache (ms/step) | HF / moec | "
             "bytes floor (ms) | moec / floor | weights GB | KV GB | tokens/s (moec) |", "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['ctx']} | {r['ours'] * 1e3:.3f} | {r['hf'] * 1e3:.2f} | {r['hf'] / r['ours']:.1f} | "
            f"{r['floor'] * 1e3:.3f} | {r['ours'] / r['floor']:.2f} | {r['weights'] / 1e9:.2f} | {r['kv'] / 1e9:.2f} | "
            f"{r['batch'] / r['ours']:,.0f} |")
    lines += ["", "| prefill tokens | moec eager (ms) | HF eager (ms) | moec / HF | FLOP floor (ms) | "
              "moec / FLOP floor |",
              "|---|---|---|---|---|---|",
              f"| {args.prefill} | {ours_prefill * 1e3:.2f} | {hf_prefill * 1e3:.2f} | "
              f"{ours_prefill / hf_prefill:.2f} | "
              f"{flop_floor * 1e3:.2f} | {ours_prefill / flop_floor:.2f} |"]
    text = info + "\n\n" + "\n".join(lines)
    log("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
