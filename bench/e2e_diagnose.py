"""Diagnose bench/e2e_decode.py on a GPU: accuracy against a float32 truth, and where moec's step time goes.

`PYTHONPATH=. python3 bench/e2e_diagnose.py`: builds a 4-layer full-width Mixtral in float32 (the truth), copies it
to bf16, and reports each bf16 runner's error against the float32 logits at seq 128 (so bf16 routing flips are told
apart from kernel bugs), then profiles one moec decode-shaped step (batch 1, seq 1).
"""

from __future__ import annotations

import copy

import torch


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected).abs().max() / expected.abs().max())


def main() -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    from compiler.api import compile

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
    )
    with torch.device("cuda"):
        truth_model = MixtralForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 128), device="cuda")
    with torch.no_grad():
        truth = truth_model(ids, use_cache=False).logits.float()
    moec32 = compile(truth_model, device="cuda")
    print(f"moec fp32 (reference moe kernel on CUDA) vs HF fp32: {rel(moec32(ids), truth):.2e}")
    del moec32
    model = copy.deepcopy(truth_model).to(torch.bfloat16)
    del truth_model
    model.set_experts_implementation("grouped_mm")
    with torch.no_grad():
        hf16 = model(ids, use_cache=False).logits
    moec16 = compile(model, device="cuda")
    ours = moec16(ids)
    print(f"HF bf16 vs HF fp32: {rel(hf16, truth):.2e}; moec bf16 vs HF fp32: {rel(ours, truth):.2e}; "
          f"moec bf16 vs HF bf16: {rel(ours, hf16):.2e}")
    step = ids[:, :1]
    executable = moec16.executable()
    for _ in range(5):
        executable(step)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            executable(step)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=50))


if __name__ == "__main__":
    main()
