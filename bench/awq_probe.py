"""Would activation-aware scaling (AWQ) help int4 on the embedded `tiny`? A measurement, not a moec pass.

Issue #13 asks for `quantize-weights{algorithm=awq}` only if it measurably helps int4 accuracy. This script answers
that on the trained `tiny` with Hugging Face's model in float32 on the CPU, before anything is built:

* RTN: every q/k/v/o projection and expert matrix rounded to int4 with one scale per output channel
  (`compiler.quantization.quantize`, what `quantize-weights{precision=int4}` stores; on `tiny` group 128 is the
  same thing, the rows being 128 wide), router, norms, embedding and lm_head left float.
* AWQ: before rounding, per input channel j each matrix W is scaled to W * s_j and its input divided by s_j, folded
  exactly into float weights upstream (the input norm's weight for q/k/v, the post-attention norm's weight for the
  experts' w1/w3 with the router multiplied back, v's rows for o, each expert's w3 rows for its w2), where
  s = mean|x|^alpha over calibration activations (`tiny/calibration.txt`), alpha per layer and matrix group chosen
  from 0, 0.1, ..., 1 to minimize that group's output error on the calibration activations.

Perplexity on the whole held-out `tiny/eval.txt` (windows of 256 tokens, each token scored once), and top-1
agreement with float32 over the first 8192 positions.

    PYTHONPATH=. python bench/awq_probe.py [--calibration-windows 16] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from compiler.quantization import dequantize, quantize
from frontends.hf.source import EMBEDDED_MODELS_DIR

ALPHAS = [round(0.1 * i, 1) for i in range(11)]


def rtn(weight: torch.Tensor) -> torch.Tensor:
    """int4 with one scale per output row, dequantized (what the reference kernels multiply)."""
    codes, scales = quantize(weight, "int4", 0)
    return dequantize(codes, scales, "int4", 0).to(weight.dtype)


def best_scales(x: torch.Tensor, weights: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """s = mean|x|^alpha (normalized), alpha minimizing sum_W ||x W^T - (x / s) rtn(W s)^T||^2, and that alpha."""
    mean_abs = x.abs().mean(0).clamp_min(1e-8)
    reference = [x @ w.T for w in weights]
    best = None
    for alpha in ALPHAS:
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        error = sum(((x / s) @ rtn(w * s).T - ref).pow(2).sum().item() for w, ref in zip(weights, reference))
        if best is None or error < best[0]:
            best = (error, s, alpha)
    return best[1], best[2]


@torch.no_grad()
def layer_activations(model, windows: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per layer: the input norm's output, o_proj's input, the post-attention norm's output (rows = tokens)."""
    captured = [dict() for _ in model.model.layers]
    hooks = []
    for index, layer in enumerate(model.model.layers):
        def keep(name, index=index):
            def hook(module, args, output=None):
                value = output if output is not None else args[0]
                captured[index].setdefault(name, []).append(value.reshape(-1, value.shape[-1]).clone())
            return hook
        hooks.append(layer.input_layernorm.register_forward_hook(keep("ln1")))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(keep("attn")))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(keep("ln2")))
    for window in windows:
        model(window[None])
    for hook in hooks:
        hook.remove()
    return [{name: torch.cat(parts) for name, parts in layer.items()} for layer in captured]


@torch.no_grad()
def awq(model, windows: torch.Tensor, log: list[str]) -> None:
    """Fold activation-aware scales into the float weights, layer by layer (activations of the model as scaled so
    far), then leave the rounding to `quantize_all`."""
    config = model.config
    head_dim = config.head_dim if getattr(config, "head_dim", None) else config.hidden_size // config.num_attention_heads
    groups = config.num_attention_heads // config.num_key_value_heads
    for index, layer in enumerate(model.model.layers):
        acts = layer_activations(model, windows)[index]
        attn, moe = layer.self_attn, layer.mlp
        # o_proj: its input channel (h, d) is head h's average of v rows (h // groups, d): one scale per kv head row.
        x = acts["attn"]
        kv_mean = x.abs().mean(0).view(config.num_key_value_heads, groups, head_dim).mean(1)
        s_o, alpha_o = best_scales(x, [attn.o_proj.weight])
        if alpha_o:
            t = kv_mean.clamp_min(1e-8).pow(alpha_o)
            t = t / (t.max() * t.min()).sqrt()
            s_o = t[:, None, :].expand(-1, groups, -1).reshape(-1)
            attn.v_proj.weight.div_(t.reshape(-1)[:, None])
            attn.o_proj.weight.mul_(s_o[None, :])
        # q/k/v: the input norm's output.
        x = acts["ln1"]
        s, alpha_qkv = best_scales(x, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        layer.input_layernorm.weight.div_(s)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.weight.mul_(s[None, :])
        # experts' w1/w3: the post-attention norm's output for all tokens; the router reads it too (kept exact).
        x = acts["ln2"]
        gate_up, down = moe.experts.gate_up_proj, moe.experts.down_proj  # [E, 2I, H], [E, H, I]
        s, alpha_13 = best_scales(x, list(gate_up))
        layer.post_attention_layernorm.weight.div_(s)
        gate_up.mul_(s[None, None, :])
        moe.gate.weight.mul_(s[None, :])
        # each expert's w2: its SwiGLU output over the tokens routed to it.
        x = x / s
        logits = x @ moe.gate.weight.T
        top = torch.topk(torch.softmax(logits, -1), config.num_experts_per_tok, -1).indices
        inter = gate_up.shape[1] // 2
        alphas_2 = []
        for e in range(gate_up.shape[0]):
            routed = x[(top == e).any(-1)]
            if routed.shape[0] < 8:
                alphas_2.append(None)
                continue
            h = F.silu(routed @ gate_up[e, :inter].T) * (routed @ gate_up[e, inter:].T)
            u, alpha = best_scales(h, [down[e]])
            alphas_2.append(alpha)
            gate_up[e, inter:].div_(u[:, None])
            down[e].mul_(u[None, :])
        log.append(f"layer {index}: alpha o {alpha_o}, qkv {alpha_qkv}, w13 {alpha_13}, w2 {alphas_2}")


@torch.no_grad()
def quantize_all(model) -> None:
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
            proj.weight.copy_(rtn(proj.weight))
        experts = layer.mlp.experts
        for e in range(experts.gate_up_proj.shape[0]):
            experts.gate_up_proj[e].copy_(rtn(experts.gate_up_proj[e]))
            experts.down_proj[e].copy_(rtn(experts.down_proj[e]))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, agreement_positions: int) -> tuple[float, torch.Tensor]:
    nll, count, top1 = 0.0, 0, []
    for window in windows:
        logits = model(window[None]).logits[0]
        nll += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
        count += window.numel() - 1
        top1.append(logits.argmax(-1))
    return float(torch.exp(torch.tensor(nll / count))), torch.cat(top1)[:agreement_positions]


def main() -> None:
    from tokenizers import Tokenizer
    from transformers import MixtralForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calibration-windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--agreement-positions", type=int, default=8192)
    args = ap.parse_args()
    torch.manual_seed(0)
    root = EMBEDDED_MODELS_DIR / "tiny"
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    encode = lambda path: tokenizer.encode(path.read_text(encoding="utf-8")).ids  # noqa: E731
    eval_ids, calib_ids = encode(root / "eval.txt"), encode(root / "calibration.txt")
    n = args.seq_len
    eval_windows = torch.tensor(eval_ids[: len(eval_ids) // n * n]).view(-1, n)
    calib_windows = torch.tensor(calib_ids[: args.calibration_windows * n]).view(-1, n)
    model = MixtralForCausalLM.from_pretrained(str(root), torch_dtype=torch.float32).eval()
    base_ppl, base_top1 = evaluate(model, eval_windows, args.agreement_positions)
    rows = [("float32", base_ppl, 1.0)]
    rtn_model = copy.deepcopy(model)
    quantize_all(rtn_model)
    ppl, top1 = evaluate(rtn_model, eval_windows, args.agreement_positions)
    rows.append(("int4 per channel, RTN", ppl, (top1 == base_top1).float().mean().item()))
    log: list[str] = []
    awq_model = copy.deepcopy(model)
    awq(awq_model, calib_windows, log)
    folded_ppl, _ = evaluate(awq_model, eval_windows, args.agreement_positions)  # float: the folding is exact
    quantize_all(awq_model)
    ppl, top1 = evaluate(awq_model, eval_windows, args.agreement_positions)
    rows.append(("int4 per channel, AWQ scales", ppl, (top1 == base_top1).float().mean().item()))
    print(f"tokens scored: {eval_windows.numel() - eval_windows.shape[0]}; calibration tokens: {calib_windows.numel()}")
    print(f"AWQ-folded float model before rounding: perplexity {folded_ppl:.4f} (float32 {base_ppl:.4f})")
    print("\n".join(log))
    print("\n| weights | perplexity | vs float32 | top-1 agreement |\n|---|---|---|---|")
    for label, value, agreement in rows:
        print(f"| {label} | {value:.4f} | {100 * (value / base_ppl - 1):+.2f}% | {100 * agreement:.2f}% |")


if __name__ == "__main__":
    main()
