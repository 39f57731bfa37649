"""The pass manager: pipeline strings, honest `changed`, untouched inputs, numerics, and a verifier that names the
node, the pass and the passes before it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Literal

import pytest
import torch
import torch.fx

from backends.torch.runtime import TorchExecutable
from compiler.api import load
from compiler.errors import PassOptionError, VerificationError
from compiler.ir import Program, op_name
from compiler.pass_manager import Pass, PassResult, parse_pipeline, register_pass, registered_passes, run_pipeline
from compiler.weights import transpose_weight
from passes.cleanup import CommonSubexpressionElimination, DeadCodeElimination
from passes.fold_weights import FoldWeights
from tests.models import TINY_CONFIGS, input_ids

CONFIG = TINY_CONFIGS[0]


@lru_cache(maxsize=None)
def _traced() -> Program:
    """One trace per test session; every test treats it as read-only (which is what passes promise)."""
    return load(CONFIG.hf_config())


# --- test-only passes (the registry is global: unique names, registered once at import) -----------------------


@register_pass
@dataclass(frozen=True)
class _OptionsProbe(Pass):
    """Test-only: one option of each kind; returns an unchanged copy."""

    name: ClassVar[str] = "test-passes-probe"
    width: int = 1
    strict: bool = False
    mode: Literal["fast", "exact"] = "fast"

    def run(self, program: Program) -> PassResult:
        return PassResult(program.clone(), False)


def _key_projection(program: Program) -> torch.fx.Node:
    """Layer 0's k_proj linear: its weight is [kv_heads*head_dim, hidden], not square, so a transpose is wrong."""
    return next(
        node for node in program.graph.nodes
        if op_name(node) == "aten.linear" and node.args[1].name == "layers_0_self_attn_k_proj_weight"
    )


@register_pass
@dataclass(frozen=True)
class _MiswireWeight(Pass):
    """Test-only: feeds layer 0's k_proj a transposed (wrongly shaped, but self-consistent) weight."""

    name: ClassVar[str] = "test-passes-miswire"

    def run(self, program: Program) -> PassResult:
        result = program.clone()
        linear = _key_projection(result)
        weight = linear.args[1]
        with result.graph.inserting_before(weight):
            wrong = result.graph.placeholder("wrong_k_proj")
        wrong.meta = {"val": weight.meta["val"].transpose(0, 1), "weight": transpose_weight(weight.meta["weight"], 0, 1)}
        linear.replace_input_with(weight, wrong)
        return PassResult(result, True)


@register_pass
@dataclass(frozen=True)
class _RecordWrongType(Pass):
    """Test-only: records layer 0's k_proj output as having its input's (wider) shape."""

    name: ClassVar[str] = "test-passes-wrong-val"

    def run(self, program: Program) -> PassResult:
        result = program.clone()
        linear = _key_projection(result)
        linear.meta["val"] = linear.args[0].meta["val"]
        return PassResult(result, True)


@register_pass
@dataclass(frozen=True)
class _ReturnInput(Pass):
    """Test-only: breaks the contract by handing back the program it was given."""

    name: ClassVar[str] = "test-passes-identity"

    def run(self, program: Program) -> PassResult:
        return PassResult(program, False)


# --- pipeline strings -----------------------------------------------------------------------------------------


def test_pipeline_strings_parse_into_pass_instances() -> None:
    assert parse_pipeline("dce,cse") == [DeadCodeElimination(), CommonSubexpressionElimination()]
    assert parse_pipeline(" fold-weights ") == [FoldWeights()]
    assert parse_pipeline("") == []
    assert parse_pipeline(["dce", FoldWeights(), "cse,dce"]) == [
        DeadCodeElimination(), FoldWeights(), CommonSubexpressionElimination(), DeadCodeElimination()
    ]


def test_options_in_braces_are_typed() -> None:
    parsed = parse_pipeline("dce, test-passes-probe{width=3, strict=true, mode=exact}, cse")
    assert parsed == [DeadCodeElimination(), _OptionsProbe(width=3, strict=True, mode="exact"), CommonSubexpressionElimination()]
    assert parsed[1].spec() == "test-passes-probe{width=3,strict=true,mode=exact}"
    assert parse_pipeline(parsed[1].spec()) == [parsed[1]]
    assert parse_pipeline("test-passes-probe{strict=0}") == [_OptionsProbe()]
    assert _OptionsProbe().spec() == "test-passes-probe"


@pytest.mark.parametrize(
    "pipeline, message",
    [
        ("dce{", "unbalanced '{' in pipeline 'dce{'"),
        ("dce}", "unbalanced '}' in pipeline 'dce}'"),
        ("dce{x}", "malformed option 'x' of pass 'dce'; expected key=value"),
        ("dce cse", "malformed pass 'dce cse'; expected name or name{key=value,...}"),
        ("dce{x=1}", "pass 'dce' has no option 'x' (options: none)"),
        ("test-passes-probe{depth=1}", "pass 'test-passes-probe' has no option 'depth' (options: mode, strict, width)"),
        ("test-passes-probe{width=wide}", "option width='wide' of pass 'test-passes-probe' is not a valid int"),
        ("test-passes-probe{strict=maybe}", "option strict='maybe' of pass 'test-passes-probe' is not a valid bool"),
        ("test-passes-probe{mode=slow}", "option mode='slow' of pass 'test-passes-probe' must be one of fast, exact"),
        ("test-passes-probe{width=1,width=2}", "option 'width' of pass 'test-passes-probe' is given twice"),
    ],
)
def test_malformed_pipelines_are_rejected_with_their_cause(pipeline: str, message: str) -> None:
    with pytest.raises(PassOptionError) as error:
        parse_pipeline(pipeline)
    assert str(error.value) == message


def test_unknown_pass_lists_the_known_ones() -> None:
    with pytest.raises(PassOptionError) as error:
        parse_pipeline("dce,no-such-pass")
    assert str(error.value) == f"unknown pass 'no-such-pass'; known passes: {', '.join(registered_passes())}"
    assert {"dce", "cse", "fold-weights"} <= set(registered_passes())


# --- pass behaviour -------------------------------------------------------------------------------------------


def _changed(program: Program, pipeline: str) -> list[tuple[str, bool]]:
    return [(record.spec, record.changed) for record in run_pipeline(program, parse_pipeline(pipeline)).history]


def test_changed_is_honest() -> None:
    traced = _traced()
    # The trace carries one unused buffer (dce) and two duplicated rotary computations (cse).
    assert _changed(traced, "dce,dce") == [("dce", True), ("dce", False)]
    assert _changed(traced, "cse,cse") == [("cse", True), ("cse", False)]
    assert _changed(traced, "fold-weights,fold-weights") == [("fold-weights", True), ("fold-weights", False)]
    # fold-weights already drops the weights it made unused.
    assert _changed(traced, "fold-weights,dce") == [("fold-weights", True), ("dce", False)]


def test_stats_count_what_changed() -> None:
    history = run_pipeline(_traced(), parse_pipeline("fold-weights,dce,cse")).history
    assert [record.stats for record in history] == [
        {"weights_folded": 2 * CONFIG.experts * CONFIG.layers},
        {"nodes_removed": 0, "weights_removed": 0},
        {"nodes_merged": 2, "weights_merged": 0},
    ]
    assert [record.index for record in history] == [1, 2, 3]


@pytest.mark.parametrize("name", ["dce", "cse", "fold-weights"])
def test_passes_never_mutate_their_input(name: str) -> None:
    traced = _traced()
    before = traced.format()
    nodes_before = list(traced.graph.nodes)
    result = parse_pipeline(name)[0].run(traced)
    assert result.program is not traced and result.program.graph is not traced.graph
    assert result.program.format() != before
    assert traced.format() == before
    assert list(traced.graph.nodes) == nodes_before


def test_fold_weights_removes_every_select_of_expert_weights() -> None:
    def expert_selects(program: Program) -> int:
        return sum(
            1 for node in program.graph.nodes
            if op_name(node) == "aten.select.int" and "weight" in node.args[0].meta
        )

    traced = _traced()
    assert expert_selects(traced) == 2 * CONFIG.experts * CONFIG.layers
    folded = run_pipeline(traced, [FoldWeights()]).program
    assert expert_selects(folded) == 0
    assert folded.op_counts()["aten.select.int"] == 0
    described = sorted(expr.describe() for expr in folded.weights().values() if "experts" in expr.describe())
    # Random experts are stacked per-expert leaves (a checkpoint's layout), so selecting expert 3 is that expert.
    assert (
        "concat(random(model.layers.0.block_sparse_moe.experts.3.w1.weight), "
        "random(model.layers.0.block_sparse_moe.experts.3.w3.weight), dim=0)"
    ) in described
    assert len(described) == 2 * CONFIG.experts * CONFIG.layers


def test_numerics_after_cleanup_pipeline_equal_the_trace() -> None:
    traced = _traced()
    optimized = run_pipeline(traced, parse_pipeline("fold-weights,dce,cse")).program
    ids = input_ids(CONFIG, batch=2, seq=9)
    expected = TorchExecutable(traced)(ids)
    actual = TorchExecutable(optimized)(ids)
    assert actual.shape == (2, 9, CONFIG.vocab)
    assert torch.equal(actual, expected)


# --- the verifier ---------------------------------------------------------------------------------------------


def test_verifier_names_node_pass_and_earlier_passes_for_a_miswired_weight() -> None:
    traced = _traced()
    node = _key_projection(traced).name
    with pytest.raises(VerificationError) as error:
        run_pipeline(traced, parse_pipeline("fold-weights,dce,test-passes-miswire"))
    message = str(error.value)
    assert message.startswith(
        "verification failed after pass 'test-passes-miswire' (passes before it: fold-weights, dce): "
        f"node %{node} (aten.linear): its operands are invalid: "
    )


def test_verifier_rejects_a_wrong_recorded_type() -> None:
    traced = _traced()
    node = _key_projection(traced).name
    head_dim = CONFIG.hidden // CONFIG.heads
    with pytest.raises(VerificationError) as error:
        run_pipeline(traced, parse_pipeline("test-passes-wrong-val"))
    assert str(error.value) == (
        "verification failed after pass 'test-passes-wrong-val' (the first pass): "
        f"node %{node} (aten.linear): recorded type f32[batch,seq,{CONFIG.hidden}] "
        f"but its operands give f32[batch,seq,{CONFIG.kv_heads * head_dim}]"
    )


def test_pass_returning_its_input_is_rejected() -> None:
    with pytest.raises(VerificationError) as error:
        run_pipeline(_traced(), parse_pipeline("dce,test-passes-identity"))
    assert str(error.value) == "pass 'test-passes-identity' returned its input program instead of a new one"
