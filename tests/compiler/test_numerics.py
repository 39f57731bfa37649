"""`--check-numerics`: every pass's program runs on the torch backend; a deliberately broken pass is named, with its
layer, and the exact pipelines stay within fp32 rounding at every step (sharded ones run as gloo rank processes).

The embedded trained `tiny` is traced once for the module (and for test_report.py, which imports `tiny_traced`).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import pytest

from compiler import cli, ops
from compiler.api import CompiledModel, load, resolve_tokenizer
from compiler.errors import MoecError
from compiler.ir import Program
from compiler.numerics import NumericsReport, check_numerics, residual_stream, sample_of_ids
from compiler.pass_manager import EXACT, Pass, PassRecord, PassResult, parse_pipeline, register_pass, run_pipeline
from compiler.rewrite import layer_of
from compiler.weights import MemoryTensor

# On the default sample, layer 2's expert 5 receives the most tokens (117 of 256 slots); its expert 3 receives none,
# so flipping that one would change nothing the sample can see.
BROKEN = "flip-expert-sign{layer=2,expert=5}"


@register_pass
@dataclass(frozen=True)
class FlipExpertSign(Pass):
    """Broken on purpose: negates one expert's down projection in one layer (each rank flips its own slice)."""

    name: ClassVar[str] = "flip-expert-sign"
    layer: int = 0
    expert: int = 0

    def run(self, program: Program) -> PassResult:
        result = program.clone()
        for node in result.graph.nodes:
            if node.target == ops.moe and layer_of(node) == f"layers.{self.layer}":
                w2 = node.args[3]
                flipped = w2.meta["weight"].materialize().clone()  # a test pass may read weights; real ones never do
                flipped[self.expert] *= -1
                w2.meta = {**w2.meta, "weight": MemoryTensor(f"{w2.name}_flipped", flipped)}
                return PassResult(result, True, {"flipped": 1})
        return PassResult(result, False, {"flipped": 0})


@lru_cache(maxsize=None)
def tiny_traced() -> Program:
    return load("tiny")


@lru_cache(maxsize=None)
def tiny_tokenizer() -> object:
    return resolve_tokenizer("tiny", None, tiny_traced().config.vocab_size)


@lru_cache(maxsize=None)
def history(spec: str) -> list[PassRecord]:
    return run_pipeline(tiny_traced(), parse_pipeline(spec)).history


@lru_cache(maxsize=None)
def checked(spec: str) -> NumericsReport:
    return check_numerics(tiny_traced(), history(spec), tiny_tokenizer(), layers=True)


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(list(argv))
    return status, out.getvalue(), err.getvalue()


def test_a_broken_pass_is_named_with_its_layer() -> None:
    report = checked(f"canonicalize,fuse-moe,{BROKEN},kv-cache,dce")
    row = report.first_diverging
    assert row is not None and (row.index, row.spec) == (3, BROKEN)
    assert row.first_layer == 2
    assert set(row.layers_step) == {0, 1, 2, 3}
    assert row.layers_step[0] == row.layers_step[1] == 0.0 and row.layers_step[2] > 1e-3
    assert row.step.max_rel_err > 0.1 and row.vs_trace.top1 < 0.9
    # Later exact passes do not move the numbers again: only the broken pass is over its budget.
    assert [r.index for r in report.rows if r.over_budget] == [3]
    assert report.rows[4].vs_trace.max_rel_err == row.vs_trace.max_rel_err
    assert report.rows[3].perplexity > 1.5 * report.rows[0].perplexity
    summary = report.summary()
    assert summary.startswith(f"numerics: first pass over its budget: 3. {BROKEN}: step max rel err")
    assert summary.endswith("(layers 0-1 agree)") and "first diverging layer: 2" in summary


def test_a_broken_pass_after_pipeline_sharding_is_located_across_stages() -> None:
    """tp=2 x pp=2: four rank processes; layer 2 lives on the second stage's ranks, each flipping its slice."""
    spec = f"canonicalize,fuse-moe,shard{{tp=2,pp=2}},{BROKEN},dce"
    assert sorted(residual_stream(tiny_traced())) == [0, 1, 2, 3]
    for record in history(spec):  # layers are found structurally in every program, whatever the passes renamed
        held = [sorted(residual_stream(program)) for program in record.program.ranks or (record.program,)]
        assert held == ([[0, 1], [0, 1], [2, 3], [2, 3]] if record.program.ranks else [[0, 1, 2, 3]]), record.spec
    report = checked(spec)
    assert [row.ranks for row in report.rows] == [0, 0, 0, 4, 4, 4]
    row = report.first_diverging
    assert row is not None and row.spec == BROKEN and row.first_layer == 2
    assert set(row.layers_step) == {0, 1, 2, 3}  # layers 0-1 read from rank 0, layers 2-3 from rank 2
    assert report.rows[3].step.max_rel_err <= 1e-5  # the shard itself is exact


@pytest.mark.parametrize(
    "spec",
    [
        "canonicalize,fuse-moe,kv-cache,dce",  # the default pipeline
        "canonicalize,fuse-moe,shard{tp=2},kv-cache,dce",
        "fold-weights,canonicalize,cse,fuse-moe,dce",
    ],
)
def test_exact_pipelines_stay_within_fp32_rounding_at_every_pass(spec: str) -> None:
    report = checked(spec)
    assert report.first_diverging is None, report.format()
    assert [row.spec for row in report.rows] == ["trace", *(p.spec() for p in parse_pipeline(spec))]
    for row in report.rows[1:]:
        assert row.budget is not None and row.budget.kind == "exact" and row.tolerance == 1e-5
        assert row.step.max_rel_err <= 1e-5 and row.vs_trace.max_rel_err <= 1e-5, row
        assert row.vs_trace.top1 == 1.0
        assert max(row.layers_step.values()) <= 1e-5 and sorted(row.layers_step) == [0, 1, 2, 3]
        assert row.perplexity == pytest.approx(report.rows[0].perplexity, rel=1e-6)
    assert 5 < report.rows[0].perplexity < 100  # real text under a trained model


def test_lossy_options_declare_their_own_budgets() -> None:
    from passes.kv_cache import KVCache
    from passes.quantize import QuantizeWeights

    assert KVCache().numerics_budget() == KVCache(dtype="float32").numerics_budget() == EXACT
    assert KVCache(dtype="bfloat16").numerics_budget().kind == "cache rounding"
    int8, int4 = QuantizeWeights().numerics_budget(), QuantizeWeights(precision="int4").numerics_budget()
    assert (int8.max_perplexity_change, int4.max_perplexity_change) == (0.01, 0.08)  # BENCHMARKS.md's targets


def test_cli_holds_quantization_to_its_own_budget_and_names_the_broken_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "load_traced", lambda args: tiny_traced())  # one trace for the module
    status, out, _ = _cli(
        "compile", "tiny", "--passes", f"canonicalize,fuse-moe,{BROKEN},quantize-weights,dce",
        "--check-numerics-layers", "--print-after", "dce", "--no-weights",
    )
    assert status == 1
    table = out[out.index("== numerics") :].splitlines()
    assert table[0].startswith("== numerics (2 prompts x 64 tokens of tiny/eval.txt; reference: the traced program")
    assert "first layer" in table[1]
    broken = table[5].split()
    assert broken[:2] == ["3", BROKEN] and broken[7] == "2" and table[5].endswith("<- over budget")
    # int8 moves the logits by far more than fp32 rounding, but within its own budget (BENCHMARKS.md's targets).
    quantized = table[6].split()
    assert quantized[:2] == ["4", "quantize-weights"] and 1e-3 < float(quantized[2]) <= 0.5
    assert float(quantized[3].rstrip("%")) >= 95 and float(quantized[6]) == pytest.approx(float(broken[6]), rel=0.01)
    assert table[6].endswith("quantization: err <= 5e-01, perplexity within 1%")
    assert table[-1].startswith(f"numerics: first pass over its budget: 3. {BROKEN}")


def test_cli_takes_its_sample_from_input_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "load_traced", lambda args: tiny_traced())
    status, out, _ = _cli("compile", "tiny", "--passes", "canonicalize,dce", "--check-numerics",
                          "--input-ids", "1 2 3 4; 5 6 7 8; 9 10", "--print-after", "dce", "--no-weights")
    assert status == 0
    assert "== numerics (3 given prompts, 10 tokens;" in out
    assert out.rstrip().splitlines()[-1].startswith("numerics: every pass is within its budget")


def test_compiled_model_checks_and_keeps_its_numerics() -> None:
    history = run_pipeline(tiny_traced(), parse_pipeline("canonicalize")).history
    compiled = CompiledModel(history[-1].program, tiny_traced(), history, tokenizer=None)
    report = compiled.check_numerics(input_ids=[[1, 2, 3]])
    assert compiled.numerics is report and report.sample.prompts == ((1, 2, 3),)
    assert report.rows[1].perplexity is None  # no tokenizer: the ids are not known to be text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--input-ids", "1 2"], "moec: error: --input-ids on moec compile is the sample of --check-numerics; "
                                 "add --check-numerics\n"),
        (["--check-numerics", "--input-ids", "1 x"], "moec: error: --input-ids must be integers separated by "
                                                     "spaces, got '1 x'\n"),
    ],
)
def test_bad_numerics_arguments_are_one_error_line(argv: list[str], message: str) -> None:
    status, _, err = _cli("compile", "tiny", *argv)
    assert status == 2 and err == message


def test_token_ids_outside_the_vocabulary_are_refused() -> None:
    with pytest.raises(MoecError, match=r"must lie in \[0, 3072\)"):
        sample_of_ids([[1, 3072]], 3072)
    with pytest.raises(MoecError, match="at least one non-empty prompt"):
        sample_of_ids([[]], 3072)
