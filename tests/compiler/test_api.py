"""The Python API: `compile` returns a runnable model that keeps every intermediate graph; `load` traces without
reading weights, even for the full Mixtral-8x7B."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compiler.api import CompiledModel, compile, load
from compiler.errors import MoecError
from compiler.ir import Program
from compiler.weights import CheckpointTensor, MemoryTensor, RandomTensor
from tests.models import TINY_CONFIGS, hf_model, input_ids, max_rel_err

CONFIG = TINY_CONFIGS[0]


def test_compile_model_matches_hugging_face_and_keeps_its_graphs() -> None:
    model = hf_model(CONFIG)
    compiled = compile(model, passes=["fold-weights", "dce"])
    assert isinstance(compiled, CompiledModel)
    ids = input_ids(CONFIG, batch=2, seq=7)
    with torch.no_grad():
        expected = model(ids).logits
    assert max_rel_err(compiled(ids), expected) <= 1e-5

    assert isinstance(compiled.graph, Program) and compiled.graph is compiled.graph_after("dce")
    assert [record.spec for record in compiled.history] == ["fold-weights", "dce"]
    traced, folded = compiled.graph_after("trace"), compiled.graph_after("fold-weights")
    assert traced.op_counts()["aten.select.int"] == 2 * CONFIG.experts * CONFIG.layers
    assert folded.op_counts()["aten.select.int"] == 0
    with pytest.raises(MoecError) as error:
        compiled.graph_after("cse")
    assert str(error.value) == "pass 'cse' is not in this pipeline (passes run: fold-weights, dce)"


def test_compile_checkpoint_directory(tmp_path: Path) -> None:
    model = hf_model(CONFIG)
    model.save_pretrained(tmp_path, safe_serialization=True)
    compiled = compile(tmp_path, passes="fold-weights,dce,cse")
    leaves = [leaf for expr in compiled.graph.weights().values() for leaf in expr.leaves()]
    assert any(isinstance(leaf, CheckpointTensor) for leaf in leaves)
    ids = input_ids(CONFIG, batch=1, seq=6)
    with torch.no_grad():
        expected = model(ids).logits
    assert max_rel_err(compiled(ids), expected) <= 1e-5


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(MoecError, match="^unknown backend 'openvino'; available: torch, tensorrt$"):
        compile("tiny", backend="openvino")


def _mixtral_8x7b_parameters(config: object) -> int:
    """Parameter count from the config: embeddings, lm_head, final norm, and per layer attention, experts, router
    and two norms."""
    hidden, layers, experts = config.hidden_size, config.num_hidden_layers, config.num_local_experts
    head_dim = hidden // config.num_attention_heads
    attention = 2 * hidden * hidden + 2 * hidden * config.num_key_value_heads * head_dim
    expert_ffn = experts * 3 * hidden * config.intermediate_size
    per_layer = attention + expert_ffn + experts * hidden + 2 * hidden
    return 2 * config.vocab_size * hidden + hidden + layers * per_layer


@pytest.mark.slow
def test_mixtral_8x7b_traces_without_reading_a_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("tracing read a weight")

    monkeypatch.setattr(RandomTensor, "read", refuse)
    monkeypatch.setattr(CheckpointTensor, "read", refuse)
    program = load("mixtral-8x7b")
    assert program.op_counts()["moec.attention"] == 32

    weights = program.weights().values()
    leaves = [leaf for expr in weights for leaf in expr.leaves()]
    assert all(isinstance(leaf, (RandomTensor, MemoryTensor)) for leaf in leaves)
    parameters = [expr for expr in weights if all(isinstance(leaf, RandomTensor) for leaf in expr.leaves())]
    assert {expr.dtype for expr in parameters} == {torch.bfloat16}
    # Mixtral-8x7B-v0.1 has 46,702,792,704 parameters; the rest are the float32 rotary buffers.
    assert _mixtral_8x7b_parameters(program.config) == 46_702_792_704
    assert sum(expr.nbytes for expr in parameters) == 46_702_792_704 * 2
    buffers = [expr for expr in weights if all(isinstance(leaf, MemoryTensor) for leaf in expr.leaves())]
    assert program.weight_bytes() == 46_702_792_704 * 2 + sum(expr.nbytes for expr in buffers)
    assert all("rotary_emb" in expr.describe() for expr in buffers)
