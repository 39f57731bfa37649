"""`canonicalize`: exact canonical structure per layer, numerics against Hugging Face, and golden prints."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from backends.torch.runtime import TorchExecutable
from compiler.api import load
from compiler.ir import Program
from compiler.pass_manager import parse_pipeline, run_pipeline
from tests.models import CONFIG_IDS, TINY_CONFIGS, TinyConfig, hf_model, hf_model_in, input_ids, max_rel_err, traced

GOLDENS = Path(__file__).parent / "goldens"
UPDATE_GOLDENS = os.environ.get("MOEC_UPDATE_GOLDENS") == "1"


@lru_cache(maxsize=None)
def compiled(config: TinyConfig, pipeline: str, dtype: torch.dtype = torch.float32) -> Program:
    return run_pipeline(traced(config, dtype), parse_pipeline(pipeline)).program


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=CONFIG_IDS)
def test_canonical_structure_and_numerics(config: TinyConfig) -> None:
    program = compiled(config, "canonicalize")
    counts = program.op_counts()
    assert counts["moec.rms_norm"] == 2 * config.layers + 1  # two per layer + the final norm
    assert counts["moec.rope"] == 2 * config.layers  # q and k
    assert counts["moec.attention"] == config.layers
    assert counts["aten.linear"] == 0
    # q, k, v, o, router, E x (gate_up, down) per layer, plus lm_head
    assert counts["moec.linear"] == config.layers * (5 + 2 * config.experts) + 1
    for noise in ("aten._assert_tensor_metadata", "aten.alias", "aten.pow.Tensor_Scalar", "aten.rsqrt", "aten.neg"):
        assert counts[noise] == 0, noise
    ids = input_ids(config, 2, 9)
    with torch.no_grad():
        expected = hf_model(config)(ids).logits
    assert max_rel_err(TorchExecutable(program)(ids), expected) <= 1e-5


def test_bf16_casts_fold_into_rms_norm() -> None:
    config = TINY_CONFIGS[0]
    before = traced(config, torch.bfloat16)
    after = compiled(config, "canonicalize", torch.bfloat16)
    # The float32 round trip of each RMSNorm (2 casts) disappears into rms_norm; router and rope casts remain.
    assert after.op_counts()["aten._to_copy"] == before.op_counts()["aten._to_copy"] - 2 * (2 * config.layers + 1)
    model = hf_model_in(config, torch.bfloat16)
    ids = input_ids(config, 2, 6)
    with torch.no_grad():
        expected = model(ids).logits
    assert max_rel_err(TorchExecutable(after)(ids), expected) <= 2e-2


def test_every_created_node_names_its_rule() -> None:
    program = compiled(TINY_CONFIGS[0], "canonicalize")
    rules = {n.meta.get("moec_rule") for n in program.graph.nodes if n.op == "call_function" and n.name.startswith(("rms_norm", "rope"))}
    assert rules == {"rms_norm", "rope"}


def test_canonicalize_is_idempotent() -> None:
    once = compiled(TINY_CONFIGS[0], "canonicalize")
    result = run_pipeline(once, parse_pipeline("canonicalize"))
    assert result.history[0].changed is False
    assert result.program.format() == once.format()


def test_input_program_is_not_mutated() -> None:
    program = traced(TINY_CONFIGS[1])
    before = program.format()
    run_pipeline(program, parse_pipeline("canonicalize,fuse-moe,dce"))
    assert program.format() == before


GOLDEN_CONFIG = TinyConfig("golden", layers=1, heads=4, kv_heads=2, experts=4, top_k=2, hidden=16, intermediate=24, vocab=32)
GOLDEN_STAGES = ["trace", "canonicalize", "fuse-moe", "dce"]


@lru_cache(maxsize=None)
def _golden_history() -> dict[str, str]:
    program = load(GOLDEN_CONFIG.hf_config(), seed=0)
    result = run_pipeline(program, parse_pipeline("canonicalize,fuse-moe,dce"))
    texts = {"trace": program.format()}
    texts.update({record.spec: record.program.format() for record in result.history})
    return texts


@pytest.mark.parametrize("stage", GOLDEN_STAGES)
def test_golden_print_of_one_layer(stage: str) -> None:
    text = _golden_history()[stage]
    path = GOLDENS / f"one_layer_{GOLDEN_STAGES.index(stage)}_{stage}.txt"
    if UPDATE_GOLDENS:
        path.write_text(text)
    assert path.exists(), f"missing golden {path.name}; run with MOEC_UPDATE_GOLDENS=1"
    assert text == path.read_text(), f"{path.name} differs; if intended, rerun with MOEC_UPDATE_GOLDENS=1"


EAGER_CONFIGS = [TINY_CONFIGS[0], TINY_CONFIGS[1], TINY_CONFIGS[2], TINY_CONFIGS[3]]  # GQA, MHA, window, MQA


@lru_cache(maxsize=None)
def traced_eager(config: TinyConfig) -> Program:
    return load(hf_model_in(config, torch.float32), attention="eager")


@pytest.mark.parametrize("config", EAGER_CONFIGS, ids=[c.id for c in EAGER_CONFIGS])
def test_hugging_face_eager_attention_becomes_one_attention_op(config: TinyConfig) -> None:
    traced_program = traced_eager(config)
    assert traced_program.op_counts()["moec.attention"] == 0
    assert traced_program.op_counts()["aten.matmul"] == 2 * config.layers
    result = run_pipeline(traced_program, parse_pipeline("canonicalize"))
    program = result.program
    counts = program.op_counts()
    assert result.history[0].stats["attention"] == config.layers
    assert counts["moec.attention"] == config.layers
    # No repeat_kv, no score matmuls, no mask subgraph left.
    for gone in ("aten.matmul", "aten.expand", "aten.where.ScalarOther", "aten.clone"):
        assert counts[gone] == 0, gone
    assert counts["aten.softmax.int"] == config.layers  # the routers' softmax only (fuse-moe's to fold)
    windows = {n.args[4] for n in program.graph.nodes if n.name.startswith("attention")}
    assert windows == {config.sliding_window or 0}
    ids = input_ids(config, 2, 9)
    with torch.no_grad():
        expected = hf_model(config)(ids).logits
    assert max_rel_err(TorchExecutable(program)(ids), expected) <= 1e-5


def test_attention_rule_rejects_a_mask_that_disagrees_with_the_config() -> None:
    import copy as copy_module

    from compiler.rewrite import Rewriter
    from passes.canonicalize import RULES

    program = traced_eager(TINY_CONFIGS[2]).clone()  # traced with sliding window 3
    program.config = copy_module.deepcopy(program.config)
    program.config.sliding_window = 5
    rewriter = Rewriter(program)
    rewriter.run(RULES)
    assert rewriter.applied["attention"] == 0
    reasons = {reason for rule, _, reason in rewriter.failures if rule == "attention"}
    assert "attention mask is not causal with sliding window 5" in reasons
