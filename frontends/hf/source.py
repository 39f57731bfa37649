"""Resolve what a user hands moec (a model, a config, a checkpoint directory or a preset name) into a Mixtral
config plus one lazy weight expression per Hugging Face parameter name.

Checkpoints come in two layouts and both are read: the original Mixtral one (`block_sparse_moe.experts.N.w1`,
what `save_pretrained` writes and the hub serves) and transformers 5's in-memory one (`mlp.experts.gate_up_proj`).
Expert tensors of the original layout become a lazy stack, so nothing is copied at compile time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compiler.errors import CheckpointError, UnsupportedModelError
from compiler.weights import (
    CheckpointTensor,
    MemoryTensor,
    RandomTensor,
    WeightExpr,
    concat_weights,
    stack_weights,
)

# Models shipped with moec as checkpoint directories (package data): real weights and a tokenizer.
EMBEDDED_MODELS_DIR = Path(__file__).parent / "models"
EMBEDDED_MODELS: dict[str, str] = {
    # 4 layers, 8 experts top-2, GQA, a 3072-token BPE, trained on Python's documentation (models/train_tiny.py);
    # the default of the README's first command.
    "tiny": "a 2.2M-parameter Mixtral trained on Python's documentation",
}

PRESETS: dict[str, dict[str, Any]] = {
    # A 1 MB model with reproducible random weights: structure tests that need no trained weights.
    "tiny-random": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        dtype="float32",
    ),
    # Mixtral-8x7B-v0.1's published config (dummy weights: trace and print only on CPU).
    "mixtral-8x7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        dtype="bfloat16",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """A Mixtral config and, for every Hugging Face parameter/buffer name, where its bytes come from."""

    config: Any  # transformers.MixtralConfig
    weights: Mapping[str, WeightExpr]
    description: str
    model: torch.nn.Module | None = None  # the user's in-memory model, when one was given
    directory: Path | None = None  # the checkpoint directory, when the source is one (its tokenizer lives there)


def source_names() -> list[str]:
    """Every name `resolve` takes besides paths: the embedded models, then the random-weight presets."""
    return [*EMBEDDED_MODELS, *PRESETS]


def preset_config(name: str) -> Any:
    from transformers import MixtralConfig

    options = dict(PRESETS[name])
    rope_theta = options.pop("rope_theta", None)
    config = MixtralConfig(**options)
    if rope_theta is not None:
        config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    return config


def check_mixtral_config(config: Any) -> None:
    from transformers import MixtralConfig

    if not isinstance(config, MixtralConfig):
        kind = getattr(config, "model_type", type(config).__name__)
        raise UnsupportedModelError(f"moec supports Mixtral models only; got model_type {kind!r}")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        raise UnsupportedModelError(f"rope_type {rope_type!r} is not supported (only 'default')")
    if config.hidden_act != "silu":
        raise UnsupportedModelError(f"hidden_act {config.hidden_act!r} is not supported (Mixtral uses 'silu')")


def model_dtype(config: Any) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype


def resolve(source: Any, seed: int = 0) -> ModelSource:
    """Turns any supported source into a `ModelSource`; raises a `MoecError` naming the problem otherwise."""
    from transformers import PretrainedConfig, PreTrainedModel

    if isinstance(source, PreTrainedModel):
        check_mixtral_config(source.config)
        if type(source).__name__ != "MixtralForCausalLM":
            raise UnsupportedModelError(f"expected a MixtralForCausalLM, got {type(source).__name__}")
        weights = {name: MemoryTensor(name, tensor) for name, tensor in _named_tensors(source).items()}
        return ModelSource(source.config, weights, f"in-memory {type(source).__name__}", model=source)
    if isinstance(source, PretrainedConfig):
        check_mixtral_config(source)
        return ModelSource(source, random_weights(source, seed), f"random weights (seed {seed})")
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text in EMBEDDED_MODELS:
            source = checkpoint_source(EMBEDDED_MODELS_DIR / text)
            return dataclasses.replace(source, description=f"embedded model {text}: {EMBEDDED_MODELS[text]}")
        if text in PRESETS:
            config = preset_config(text)
            return ModelSource(config, random_weights(config, seed), f"preset {text} with random weights (seed {seed})")
        path = Path(text)
        if path.is_dir():
            return checkpoint_source(path)
        raise UnsupportedModelError(
            f"{text!r} is neither a checkpoint directory nor a built-in model ({', '.join(source_names())})"
        )
    raise UnsupportedModelError(f"cannot compile a {type(source).__name__}; pass a model, a config or a path")


def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    return tensors


def expected_shapes(config: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every parameter and buffer of a `MixtralForCausalLM` for `config`, built on the meta device (no bytes)."""
    from transformers import MixtralForCausalLM

    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    return {name: (tuple(t.shape), t.dtype) for name, t in _named_tensors(model).items()}


def computed_buffers(config: Any) -> dict[str, WeightExpr]:
    """Buffers that no checkpoint stores (rotary inverse frequencies), computed from the config on the CPU."""
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    rotary = MixtralRotaryEmbedding(config)
    return {
        f"model.rotary_emb.{name}": MemoryTensor(f"model.rotary_emb.{name}", buffer)
        for name, buffer in rotary.named_buffers()
    }


def random_weights(config: Any, seed: int) -> dict[str, WeightExpr]:
    """Dummy weights like trtllm-build without --model_dir: normal(0, initializer_range), norms at one."""
    buffers = computed_buffers(config)
    weights: dict[str, WeightExpr] = {}
    for name, (shape, _) in expected_shapes(config).items():
        if name in buffers:
            weights[name] = buffers[name]
            continue
        dtype, std = model_dtype(config), config.initializer_range
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            # One tensor per expert, named as in a Mixtral checkpoint: materializing a rank's experts (or streaming
            # them to a file) then costs one expert at a time, not the whole [E, 2I, H] stack.
            prefix = name.rsplit(".mlp.experts.", 1)[0] + ".block_sparse_moe.experts"
            experts, rows, cols = shape
            if name.endswith("gate_up_proj"):
                parts = [
                    concat_weights(
                        [RandomTensor(f"{prefix}.{e}.{w}.weight", (rows // 2, cols), dtype, seed, "normal", std) for w in ("w1", "w3")], 0
                    )
                    for e in range(experts)
                ]
            else:
                parts = [RandomTensor(f"{prefix}.{e}.w2.weight", (rows, cols), dtype, seed, "normal", std) for e in range(experts)]
            weights[name] = stack_weights(parts, 0)
            continue
        init = "ones" if name.endswith("norm.weight") else "normal"
        weights[name] = RandomTensor(name, shape, dtype, seed, init, std)
    if config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights


def checkpoint_source(directory: Path) -> ModelSource:
    from transformers import AutoConfig

    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json")
    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as error:
        raise UnsupportedModelError(f"cannot read {config_path}: {error}") from error
    check_mixtral_config(config)
    stored = read_checkpoint_index(directory)
    weights = map_checkpoint(config, stored)
    return ModelSource(config, weights, f"checkpoint {directory}", directory=directory)


def read_checkpoint_index(directory: Path) -> dict[str, CheckpointTensor]:
    """Every tensor in the directory's safetensors files, from their headers only."""
    from safetensors import safe_open

    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{directory} has no *.safetensors files")
    missing = [name for name in files if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint shard {missing[0]} listed in {index_path.name} is missing from {directory}")
    stored: dict[str, CheckpointTensor] = {}
    for name in files:
        path = directory / name
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                view = handle.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{name}: tensor {key} has unsupported dtype {view.get_dtype()}")
                stored[key] = CheckpointTensor(str(path), key, tuple(view.get_shape()), dtype)
    return stored


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "F8_E4M3": torch.float8_e4m3fn,
}


def map_checkpoint(config: Any, stored: Mapping[str, CheckpointTensor]) -> dict[str, WeightExpr]:
    """Maps stored tensors onto the model's parameter names and checks every shape against config.json."""
    expected = expected_shapes(config)
    buffers = computed_buffers(config)
    weights: dict[str, WeightExpr] = {}

    def take(key: str) -> CheckpointTensor:
        if key not in stored:
            raise CheckpointError(f"checkpoint has no tensor {key}")
        return stored[key]

    for name, (shape, _) in expected.items():
        if name in buffers:
            weights[name] = buffers[name]
            continue
        if name in stored:
            expr: WeightExpr = stored[name]
        elif name == "lm_head.weight" and config.tie_word_embeddings:
            expr = take("model.embed_tokens.weight")
        elif name.endswith(".mlp.gate.weight"):
            expr = take(name.replace(".mlp.gate.", ".block_sparse_moe.gate."))
        elif name.endswith(".mlp.experts.gate_up_proj") or name.endswith(".mlp.experts.down_proj"):
            prefix = name.rsplit(".mlp.experts.", 1)[0] + ".block_sparse_moe.experts"
            experts = range(config.num_local_experts)
            if name.endswith("gate_up_proj"):
                parts = [
                    concat_weights([take(f"{prefix}.{e}.w1.weight"), take(f"{prefix}.{e}.w3.weight")], 0)
                    for e in experts
                ]
            else:
                parts = [take(f"{prefix}.{e}.w2.weight") for e in experts]
            try:
                expr = stack_weights(parts, 0)
                expr.shape  # noqa: B018 - infers the type now, so a mismatch surfaces here with its name
            except ValueError as error:
                raise CheckpointError(f"{prefix}: {error}") from error
        else:
            expr = take(name)
        if tuple(expr.shape) != shape:
            raise CheckpointError(
                f"tensor {name} has shape {list(expr.shape)} in the checkpoint but config.json implies {list(shape)}"
            )
        weights[name] = expr
    return weights
