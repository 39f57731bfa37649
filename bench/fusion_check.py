"""GPU numerics of the fusion pipelines and the CUDA kernels behind them, against a float32 truth.

`PYTHONPATH=. python3 bench/fusion_check.py [--layers 2]`: a full-width Mixtral-8x7B (few layers, HF random init) in
float32 is the truth; a bf16 copy runs in Hugging Face and in moec under each pipeline below. Prints each runner's max
relative error against the truth's logits (prefill of 128 tokens) and moec's decode-after-prefill against its own
prefill, so a kernel or pass bug shows as an error well above HF bf16's own.
"""

from __future__ import annotations

import argparse
import copy

import torch

PIPELINES = {
    "default": "",
    "fuse-qkv": ",fuse-qkv",
    "fuse-norm": ",fuse-norm",
    "fused": ",fuse-qkv,fuse-norm",
    "fuse-rope": ",fuse-rope",
    "fused-rope": ",fuse-qkv,fuse-norm,fuse-rope",
    "int8": ",fuse-qkv,fuse-norm,quantize-weights{precision=int8}",
}


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected).abs().max() / expected.abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    from transformers import MixtralConfig, MixtralForCausalLM

    from compiler.api import compile

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                           num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8,
                           num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096)
    with torch.device("cuda"):
        truth_model = MixtralForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.seq), device="cuda")
    with torch.no_grad():
        truth = truth_model(ids, use_cache=False).logits.float()
    model = copy.deepcopy(truth_model).to(torch.bfloat16)
    del truth_model
    with torch.no_grad():
        hf16 = model(ids, use_cache=False).logits
    print(f"HF bf16 vs fp32 truth: {rel(hf16, truth):.2e}", flush=True)
    for name, extra in PIPELINES.items():
        compiled = compile(model, passes=f"canonicalize,fuse-moe,kv-cache{{max_seq=256}}{extra},dce", device="cuda")
        executable = compiled.executable()
        zero = torch.zeros(1, dtype=torch.int64, device="cuda")
        full = executable.step(ids, zero, executable.allocate_caches(1)).float()
        caches = executable.allocate_caches(1)
        executable.step(ids[:, :-1], zero, caches)
        last = executable.step(ids[:, -1:], torch.full((1,), args.seq - 1, device="cuda"), caches)[:, -1].float()
        print(f"moec {name}: prefill vs truth {rel(full, truth):.2e} (argmax agree "
              f"{(full.argmax(-1) == truth.argmax(-1)).float().mean():.3f}); decode-after-prefill vs prefill "
              f"{rel(last, full[:, -1]):.2e}", flush=True)
        del executable, compiled, caches
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
