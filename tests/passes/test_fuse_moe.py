"""`fuse-moe`: one moe op per layer, numerics against Hugging Face, normalization modes, explain, idempotence."""

from __future__ import annotations

import copy

import pytest
import torch

from backends.torch.runtime import TorchExecutable
from compiler.cli import main
from compiler.errors import MoecError
from compiler.pass_manager import parse_pipeline, run_pipeline
from compiler.weights import MemoryTensor, Rewrite
from tests.models import CONFIG_IDS, TINY_CONFIGS, TinyConfig, hf_model, hf_model_in, input_ids, max_rel_err
from tests.passes.test_canonicalize import compiled, traced


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=CONFIG_IDS)
def test_one_moe_per_layer_matches_hugging_face(config: TinyConfig) -> None:
    program = compiled(config, "canonicalize,fuse-moe,dce")
    counts = program.op_counts()
    assert counts["moec.moe"] == config.layers
    assert counts["moec.attention"] == config.layers
    assert counts["moec.rms_norm"] == 2 * config.layers + 1
    for router_op in ("aten.topk", "aten.softmax.int", "aten.eq.Scalar", "aten.silu", "aten.split.Tensor"):
        assert counts[router_op] == 0, router_op
    moes = [n for n in program.graph.nodes if n.name.startswith("moe")]
    for node in moes:
        assert node.args[4:] == (config.top_k, "renormalize", "swiglu")
        w13, w2 = node.args[2].meta["weight"], node.args[3].meta["weight"]
        assert w13.shape == (config.experts, 2 * config.intermediate, config.hidden)
        assert w2.shape == (config.experts, config.hidden, config.intermediate)
        # The stacked weights are the model's own [E, 2I, H] / [E, H, I] parameters: no copy, no re-stack.
        assert isinstance(w13, MemoryTensor) and isinstance(w2, MemoryTensor)
    ids = input_ids(config, 2, 10)
    with torch.no_grad():
        expected = hf_model(config)(ids).logits
    assert max_rel_err(TorchExecutable(program)(ids), expected) <= 1e-5


def test_fusion_after_fold_weights_recovers_the_stacked_parameter() -> None:
    program = compiled(TINY_CONFIGS[0], "fold-weights,canonicalize,fuse-moe,dce")
    for node in (n for n in program.graph.nodes if n.name.startswith("moe")):
        assert isinstance(node.args[2].meta["weight"], MemoryTensor)


def test_checkpoint_experts_are_stacked_lazily(tmp_path) -> None:
    from compiler.api import load

    config = TINY_CONFIGS[0]
    hf_model(config).save_pretrained(tmp_path, safe_serialization=True)
    result = run_pipeline(load(tmp_path), parse_pipeline("canonicalize,fuse-moe,dce"))
    node = next(n for n in result.program.graph.nodes if n.name.startswith("moe"))
    w13 = node.args[2].meta["weight"]
    assert isinstance(w13, Rewrite) and w13.kind == "stack" and len(w13.inputs) == config.experts
    assert [leaf.key for leaf in w13.inputs[1].leaves()] == [
        "model.layers.0.block_sparse_moe.experts.1.w1.weight",
        "model.layers.0.block_sparse_moe.experts.1.w3.weight",
    ]
    ids = input_ids(config, 2, 7)
    with torch.no_grad():
        expected = hf_model(config)(ids).logits
    assert max_rel_err(TorchExecutable(result.program)(ids), expected) <= 1e-5


def test_bf16_fusion_matches_hugging_face() -> None:
    config = TINY_CONFIGS[2]
    program = compiled(config, "canonicalize,fuse-moe,dce", torch.bfloat16)
    model = hf_model_in(config, torch.bfloat16)
    ids = input_ids(config, 2, 8)
    with torch.no_grad():
        expected = model(ids).logits
    assert max_rel_err(TorchExecutable(program)(ids), expected) <= 2e-2


def test_fusing_again_changes_nothing() -> None:
    fused = compiled(TINY_CONFIGS[0], "canonicalize,fuse-moe")
    result = run_pipeline(fused, parse_pipeline("fuse-moe"))
    assert result.history[0].changed is False
    assert result.history[0].stats["fused"] == 0
    assert result.program.format() == fused.format()


def test_explicit_normalization_that_contradicts_the_graph_is_an_error() -> None:
    canonical = compiled(TINY_CONFIGS[0], "canonicalize")
    with pytest.raises(
        MoecError,
        match=r"fuse-moe\{normalization=none\} contradicts layers\.0, whose router computes 'renormalize'; "
        r"pass force=true",
    ):
        run_pipeline(canonical, parse_pipeline("fuse-moe{normalization=none}"))


class _NoRenormalizeRouter(torch.nn.Module):
    """Reference for Mixtral's normalization mode 0: top-k of the full softmax, weights not renormalized."""

    def __init__(self, router: torch.nn.Module) -> None:
        super().__init__()
        self.router = router

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.router.hidden_dim)
        logits = torch.nn.functional.linear(hidden_states, self.router.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        top_values, top_indices = torch.topk(probs, self.router.top_k, dim=-1)
        return logits, top_values, top_indices


def test_forced_normalization_none_matches_a_non_renormalizing_reference() -> None:
    config = TINY_CONFIGS[0]
    canonical = compiled(config, "canonicalize")
    result = run_pipeline(canonical, parse_pipeline("fuse-moe{normalization=none,force=true},dce"))
    assert result.history[0].stats["normalization_none"] == config.layers
    reference = copy.deepcopy(hf_model(config))
    for layer in reference.model.layers:
        layer.mlp.gate = _NoRenormalizeRouter(layer.mlp.gate)
    ids = input_ids(config, 2, 9)
    with torch.no_grad():
        expected = reference(ids).logits
        renormalized = hf_model(config)(ids).logits
    actual = TorchExecutable(result.program)(ids)
    assert max_rel_err(actual, expected) <= 1e-5
    assert max_rel_err(actual, renormalized) > 1e-3  # the mode really changes the model


def test_graph_without_renormalization_is_detected_as_none(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    from compiler.api import load

    def forward_without_renormalization(self, hidden_states):  # noqa: ANN001, ANN202 - HF's signature
        return _NoRenormalizeRouter(self)(hidden_states)

    # The frontend traces the Hugging Face classes, so patching the class changes what is traced (and the reference).
    monkeypatch.setattr(MixtralTopKRouter, "forward", forward_without_renormalization)
    config = TINY_CONFIGS[0]
    model = hf_model(config)
    program = run_pipeline(load(model), parse_pipeline("canonicalize,fuse-moe,dce")).program
    assert {n.args[5] for n in program.graph.nodes if n.name.startswith("moe")} == {"none"}
    ids = input_ids(config, 2, 5)
    with torch.no_grad():
        expected = model(ids).logits
    assert max_rel_err(TorchExecutable(program)(ids), expected) <= 1e-5


def test_explain_reports_each_layer(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", "tiny", "--passes", "canonicalize,fuse-moe", "--explain", "fuse-moe", "--no-weights"]) == 0
    out = capsys.readouterr().out
    for layer in range(4):  # the embedded tiny: 4 layers of 8 experts, top-2
        assert f"layers.{layer}: fused (top_k=2, 8 experts, normalization=renormalize)" in out


def test_explain_says_why_a_layer_did_not_fuse() -> None:
    from passes.fuse_moe import FuseMoe

    program = traced(TINY_CONFIGS[0])
    broken = program.clone()
    # Make expert 1 of layer 0 read a different input than the router: no longer Mixtral's MoE.
    eq = next(n for n in broken.graph.nodes if n.target == torch.ops.aten.eq.Scalar and n.args[1] == 1)
    eq.args = (eq.args[0], 7)
    lines = FuseMoe().explain(broken)
    assert lines[0] == "layers.0: not fused: indices compared with 7, not an expert id"
    assert lines[1].startswith("layers.1: fused")


def test_fusing_an_uncanonicalized_graph_drops_the_unfused_experts() -> None:
    config = TINY_CONFIGS[0]
    program = compiled(config, "fuse-moe,dce")
    counts = program.op_counts()
    assert counts["moec.moe"] == config.layers
    assert counts["aten.silu"] == 0 and counts["aten.topk"] == 0
    ids = input_ids(config, 2, 6)
    with torch.no_grad():
        expected = hf_model(config)(ids).logits
    assert max_rel_err(TorchExecutable(program)(ids), expected) <= 1e-5
