"""The Hugging Face frontend: traced programs reproduce Hugging Face's logits from every kind of source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from backends.torch.runtime import TorchExecutable
from compiler.api import load
from compiler.errors import CheckpointError, UnsupportedModelError
from compiler.weights import CheckpointTensor, MemoryTensor, RandomTensor
from tests.models import CONFIG_IDS, TINY_CONFIGS, TinyConfig, hf_model, hf_model_in, input_ids, max_rel_err, traced


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_logits_match_hugging_face(config: TinyConfig, dtype: torch.dtype, tolerance: float) -> None:
    model = hf_model_in(config, dtype)
    program = traced(config, dtype)
    assert program.op_counts()["moec.attention"] == config.layers
    executable = TorchExecutable(program)
    for seq in (5, 11):  # two sequence lengths (and batch 2) from one trace
        ids = input_ids(config, batch=2, seq=seq)
        with torch.no_grad():
            expected = model(ids).logits
        actual = executable(ids)
        assert actual.dtype == dtype and actual.shape == expected.shape
        assert max_rel_err(actual, expected) <= tolerance


def test_tracing_does_not_copy_or_read_weights() -> None:
    model = hf_model_in(TINY_CONFIGS[0], torch.float32)
    program = traced(TINY_CONFIGS[0])
    leaves = [leaf for expr in program.weights().values() for leaf in expr.leaves()]
    assert leaves and all(isinstance(leaf, MemoryTensor) for leaf in leaves)
    params = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    assert all(id(leaf.tensor) in params for leaf in leaves)
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            assert value.device.type == "meta"


def test_sharded_checkpoint_directory_matches_in_memory_model(tmp_path: Path) -> None:
    config = TINY_CONFIGS[2]
    model = hf_model(config)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the test needs a multi-shard checkpoint"
    program = load(tmp_path)
    leaves = [leaf for expr in program.weights().values() for leaf in expr.leaves()]
    assert {type(leaf) for leaf in leaves} >= {CheckpointTensor}
    ids = input_ids(config, batch=2, seq=9)
    with torch.no_grad():
        expected = model(ids).logits
    assert max_rel_err(TorchExecutable(program)(ids), expected) <= 1e-5


def test_config_gives_reproducible_random_weights() -> None:
    config = TINY_CONFIGS[0].hf_config()
    first, second, other = load(config, seed=3), load(config, seed=3), load(config, seed=4)
    assert all(isinstance(leaf, (RandomTensor, MemoryTensor)) for e in first.weights().values() for leaf in e.leaves())
    ids = input_ids(TINY_CONFIGS[0], 2, 6)
    a, b, c = TorchExecutable(first)(ids), TorchExecutable(second)(ids), TorchExecutable(other)(ids)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_printing_is_deterministic() -> None:
    config = TINY_CONFIGS[2].hf_config()
    assert load(config).format() == load(config).format()


def test_layers_beyond_two_are_stamped_with_their_own_weights() -> None:
    program = load(TINY_CONFIGS[2].hf_config())
    names = [expr.describe() for expr in program.weights().values()]
    for layer in range(3):
        assert sum(f"model.layers.{layer}.self_attn.q_proj.weight" in name for name in names) == 1


def test_non_mixtral_config_is_rejected() -> None:
    from transformers import LlamaConfig

    with pytest.raises(UnsupportedModelError, match="Mixtral models only; got model_type 'llama'"):
        load(LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64))


def test_unknown_source_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError) as error:
        load(str(tmp_path / "nowhere"))
    assert str(error.value) == (
        f"{str(tmp_path / 'nowhere')!r} is neither a checkpoint directory nor a built-in model "
        "(tiny, tiny-random, mixtral-8x7b)"
    )


def _saved(tmp_path: Path, config: TinyConfig = TINY_CONFIGS[0]) -> Path:
    hf_model(config).save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    return tmp_path


def test_missing_shard_is_named(tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    shard = sorted(directory.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint shard {shard.name} listed in model.safetensors.index.json"):
        load(directory)


def test_shape_disagreeing_with_config_is_named(tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 64
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"block_sparse_moe\.experts: cannot stack|config\.json implies"):
        load(directory)


def test_hidden_size_disagreement_names_the_tensor(tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["vocab_size"] = 100
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"tensor model.embed_tokens.weight has shape \[96, 32\] in the checkpoint but config.json implies \[100, 32\]"
    ):
        load(directory)
