"""Tiny random Mixtral models shared by all tests: one place to add a config, every test sees it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch


@dataclass(frozen=True)
class TinyConfig:
    id: str
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    experts: int = 4
    top_k: int = 2
    sliding_window: int | None = None
    tie_embeddings: bool = False
    hidden: int = 32
    intermediate: int = 48
    vocab: int = 96

    def hf_config(self) -> Any:
        from transformers import MixtralConfig

        return MixtralConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            num_local_experts=self.experts,
            num_experts_per_tok=self.top_k,
            max_position_embeddings=128,
            sliding_window=self.sliding_window,
            tie_word_embeddings=self.tie_embeddings,
            rms_norm_eps=1e-5,
        )


# GQA and MHA, 4-8 experts, top-k 1-3, 1-3 layers, sliding window on and off, tied and untied embeddings.
TINY_CONFIGS = [
    TinyConfig("gqa-e4-k2-l2"),
    TinyConfig("mha-e8-k1-l1", heads=4, kv_heads=4, experts=8, top_k=1, layers=1),
    TinyConfig("gqa-e6-k3-l3-window", experts=6, top_k=3, layers=3, sliding_window=3),
    TinyConfig("mqa-e4-k2-l2-tied", heads=4, kv_heads=1, tie_embeddings=True),
    TinyConfig("mha-e8-k2-l3-window-tied", kv_heads=4, experts=8, layers=3, sliding_window=4, tie_embeddings=True),
    TinyConfig("gqa-h8-e5-k2-l2", heads=8, kv_heads=2, experts=5, hidden=64, intermediate=40),
]
CONFIG_IDS = [c.id for c in TINY_CONFIGS]


@lru_cache(maxsize=None)
def hf_model(config: TinyConfig, seed: int = 0) -> Any:
    """A float32 Hugging Face model with random weights (norm weights randomized too, so they matter)."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(config.hf_config()).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
    return model


def input_ids(config: TinyConfig, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1000 + seq)
    return torch.randint(0, config.vocab, (batch, seq), generator=generator)


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|, in float64."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max())


@lru_cache(maxsize=None)
def hf_model_in(config: TinyConfig, dtype: torch.dtype) -> Any:
    """`hf_model(config)` cast to `dtype` (a copy; the float32 original is shared by all tests)."""
    import copy

    return copy.deepcopy(hf_model(config)).to(dtype)


@lru_cache(maxsize=None)
def traced(config: TinyConfig, dtype: torch.dtype = torch.float32) -> Any:
    """The traced program of `hf_model_in(config, dtype)`, shared across tests: programs are immutable values
    (passes clone), so one trace per config serves the whole session."""
    from compiler.api import load

    return load(hf_model_in(config, dtype))
