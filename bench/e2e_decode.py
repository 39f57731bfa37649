"""End-to-end: a full-width Mixtral slice compiled by moec and run by the torch backend on a GPU, against Hugging Face.

Runs on an H100/H200 with `PYTHONPATH=. python3 bench/e2e_decode.py [--layers 4]`. For batch 1, one position (the
decode step's shape, without a KV cache on either side) and a 128-token prefill, it times (CUDA events, median of
repeats) Hugging Face's default experts, Hugging Face's `grouped_mm` experts, and moec's compiled graph (default
pipeline; the `moe` op runs the Triton kernel), and checks moec's logits against Hugging Face's. The bytes floor is
the weights one step must read (for one token: attention + the 2 routed experts per layer + lm_head) over the
measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def time_ms(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), repeats=10)
    return 2 * src.numel() / (ms / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    from transformers import MixtralConfig, MixtralForCausalLM

    from compiler.api import compile

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=4096, rms_norm_eps=1e-5,
    )
    config.rope_parameters = {"rope_type": "default", "rope_theta": 1e6}
    with torch.device("cuda"):
        model = MixtralForCausalLM(config).to(torch.bfloat16).eval()
    started = time.perf_counter()
    # The stateless forward (no kv-cache): this measures whole-sequence steps and their per-shape CUDA graphs.
    compiled = compile(model, passes="canonicalize,fuse-moe,dce", device="cuda")
    compile_s = time.perf_counter() - started
    executable = compiled.executable()
    from backends.torch.runtime import TorchExecutable

    graphed = TorchExecutable(compiled.program, "cuda", cuda_graphs=True)
    bandwidth = copy_bandwidth()
    rows = []
    for seq in (1, 128):
        ids = torch.randint(0, config.vocab_size, (1, seq), device="cuda")
        with torch.no_grad():
            model.set_experts_implementation("eager")
            hf_eager_ms = time_ms(lambda: model(ids, use_cache=False).logits, repeats=10)
            model.set_experts_implementation("grouped_mm")
            hf_grouped_ms = time_ms(lambda: model(ids, use_cache=False).logits)
            expected = model(ids, use_cache=False).logits.float()
        actual = executable(ids).float()
        # bf16 with random init routes near-ties differently from HF (see bench/e2e_diagnose.py: HF bf16 itself is
        # as far from the float32 truth), so the accuracy check that matters is the float32 one in the tests.
        rel = float((actual - expected).abs().max() / expected.abs().max())
        same_argmax = float((actual.argmax(-1) == expected.argmax(-1)).float().mean())
        moec_ms = time_ms(lambda: executable(ids))
        graphed_out = graphed(ids).float()
        graph_rel = float((graphed_out - actual).abs().max() / actual.abs().max())
        moec_graph_ms = time_ms(lambda: graphed(ids))
        per_layer_attn = 2 * (4096 * 4096 * 2 + 4096 * 1024 * 2)
        experts_read = min(8, 2 * seq)  # distinct experts a step can touch
        weight_bytes = args.layers * (per_layer_attn + experts_read * 3 * 4096 * 14336 * 2 + 8 * 4096 * 2) + 32000 * 4096 * 2
        floor_ms = weight_bytes / bandwidth * 1e3
        rows.append((seq, hf_eager_ms, hf_grouped_ms, moec_ms, moec_graph_ms, floor_ms, rel, same_argmax, graph_rel))
    card = torch.cuda.get_device_name()
    header = (
        f"card {card}, torch {torch.__version__}, {args.layers} full-width Mixtral layers, bf16, batch 1, "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, moec compile {compile_s:.1f}s\n\n"
        "| seq | HF eager experts (ms) | HF grouped_mm (ms) | moec eager (ms) | moec CUDA graph (ms) | bytes floor (ms) | "
        "moec graph / grouped_mm | moec graph / floor | max rel err vs HF bf16 | argmax agreement | graph vs eager |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header] + [
        f"| {s} | {e:.2f} | {g:.2f} | {m:.2f} | {mg:.2f} | {f:.3f} | {mg / g:.2f} | {mg / f:.2f} | {r:.2e} | {a:.3f} | {gr:.1e} |"
        for s, e, g, m, mg, f, r, a, gr in rows
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
