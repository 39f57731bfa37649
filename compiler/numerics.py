"""`--check-numerics`: run every program of a pipeline on the torch backend and name the pass that moved the logits.

before: the traced program and the pipeline's history (one program per pass)
after:  a `NumericsReport`: per pass, its logits against the trace's and against the previous program's (max
        relative error, top-1 agreement), the sample's perplexity where it is real text, and the first pass whose
        own step exceeds its budget (`Pass.numerics_budget()`: exact passes fp32 rounding, quantization its own);
        with `layers`, the first decoder layer whose hidden state diverges in that step.

The sample is small (by default 2 prompts x 64 tokens of the bundled held-out text, or seeded random ids for a
model without a tokenizer) so a check costs a few seconds for `tiny`. A sharded program runs as all its ranks
(`compiler.rank_processes`: one forked process per rank over gloo, every sharded program of the pipeline in one set of
processes), and the logits of its logits rank (the first rank of the last stage) are compared as the program's.

Layers are matched structurally, not by node name (passes rename nodes): the hidden state leaving decoder layer i
is the last residual `aten.add.Tensor` of shape [batch, seq, hidden] the frontend attributed to `layers.i` (its
module stack, which passes keep on the nodes they rewrite), or the sum (result 0) of the `moec.add_rms_norm` that
`fuse-norm` made of it. Each such value becomes an extra output of a copy of the program; a pipeline stage holds only
its own layers, so each layer is read from the lowest rank that holds it.
"""

from __future__ import annotations

import math
import operator
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx

from compiler import ops
from compiler.errors import MoecError
from compiler.ir import Program
from compiler.pass_manager import NumericsBudget, PassRecord
from compiler.rewrite import layer_of

DEFAULT_PROMPTS, DEFAULT_TOKENS = 2, 64
# Exact passes reorder float arithmetic: fp32 rounding for float32 programs. 16-bit programs round every op (and a
# sharded all_reduce its partial sums) in the narrow type: shard{tp=2} on `tiny` moves logits by 0.07 (fp16) and
# 0.12 (bf16) of their largest magnitude, so their exact bound is that of the type, not of the pass.
EXACT_REL_ERR = {torch.float32: 1e-5, torch.float16: 0.1, torch.bfloat16: 0.2}
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Sample:
    """The prompts every program runs on."""

    prompts: tuple[tuple[int, ...], ...]
    description: str
    is_text: bool  # real text: its perplexity means something

    @property
    def tokens(self) -> int:
        return sum(len(prompt) for prompt in self.prompts)


@dataclass(frozen=True)
class Comparison:
    """One program's logits (or one layer's hidden state) against a reference."""

    max_rel_err: float  # max |a - e| / max |e| over the sample
    top1: float | None  # fraction of positions whose argmax agrees (logits only)


@dataclass(frozen=True)
class PassNumerics:
    """One row of the table: the trace (index 0) or the program after pass `index`."""

    index: int
    spec: str
    budget: NumericsBudget | None  # None for the trace (the reference)
    tolerance: float  # the budget's max_rel_err for this program's dtype
    ranks: int  # 0: one process
    perplexity: float | None
    vs_trace: Comparison
    step: Comparison  # against the previous program
    layers_vs_trace: dict[int, float] = field(default_factory=dict)
    layers_step: dict[int, float] = field(default_factory=dict)
    over_budget: str = ""  # why this step exceeds the pass's budget ("" when it does not)

    def budget_text(self) -> str:
        if self.budget is None:
            return "reference"
        text = f"{self.budget.kind}: err <= {self.tolerance:.0e}"
        if self.budget.max_perplexity_change is not None:
            text += f", perplexity within {self.budget.max_perplexity_change:.0%}"
        return text

    @property
    def first_layer(self) -> int | None:
        """The first decoder layer whose hidden state moved more than the tolerance in this step."""
        return next((layer for layer, err in sorted(self.layers_step.items()) if not err <= self.tolerance), None)


@dataclass(frozen=True)
class NumericsReport:
    sample: Sample
    rows: list[PassNumerics]
    layers: bool  # hidden states were compared
    seconds: float

    @property
    def first_diverging(self) -> PassNumerics | None:
        return next((row for row in self.rows if row.over_budget), None)

    def summary(self) -> str:
        """One line: every pass within its budget, or the first that is not (with its layer when known)."""
        row = self.first_diverging
        if row is None:
            worst = max((r.step.max_rel_err for r in self.rows[1:]), default=0.0)
            return f"numerics: every pass is within its budget (largest step error {worst:.1e})"
        text = f"numerics: first pass over its budget: {row.index}. {row.spec}: {row.over_budget}"
        if self.layers:
            text += "; " + _layer_verdict(row)
        return text

    def format(self) -> str:
        """The per-pass table and the summary line."""
        width = min(max(len(row.spec) for row in self.rows), 48)
        lines = [
            f"== numerics ({self.sample.description}; reference: the traced program; {self.seconds:.1f}s)",
            f"{'#':>2}  {'pass':<{width}} {'step err':>9} {'step top1':>9} {'trace err':>9} {'trace top1':>10} "
            f"{'perplexity':>10}" + ("  first layer" if self.layers else "") + "  budget",
        ]
        for row in self.rows:
            cells = [
                f"{row.index:>2}  {_clip(row.spec, width):<{width}}",
                _err(row.step.max_rel_err, row.index), _pct(row.step.top1, 9),
                _err(row.vs_trace.max_rel_err, row.index), _pct(row.vs_trace.top1, 10),
                f"{row.perplexity:>10.3f}" if row.perplexity is not None else f"{'-':>10}",
            ]
            line = " ".join(cells)
            if self.layers:
                layer = row.first_layer if row.index else None
                line += f"  {'-' if layer is None else layer:>11}"
            line += f"  {row.budget_text()}" + ("  <- over budget" if row.over_budget else "")
            lines.append(line)
        lines.append(self.summary())
        return "\n".join(lines) + "\n"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _err(value: float, index: int) -> str:
    return f"{'-':>9}" if index == 0 else f"{value:>9.1e}"


def _pct(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{100 * value:>{width - 1}.1f}%"


def _layer_verdict(row: PassNumerics) -> str:
    layer = row.first_layer
    if not row.layers_step:
        return "no decoder layer's hidden state could be located in this program"
    if layer is None:
        return "every decoder layer's hidden state agrees: the change is after the last layer (final norm, lm_head)"
    agree = {0: "", 1: " (layer 0 agrees)"}.get(layer, f" (layers 0-{layer - 1} agree)")
    return f"first diverging layer: {layer}, hidden state error {row.layers_step[layer]:.1e}{agree}"


# --- the sample --------------------------------------------------------------------------------------------------


def default_sample(tokenizer: Any, vocab_size: int, prompts: int = DEFAULT_PROMPTS, tokens: int = DEFAULT_TOKENS) -> Sample:
    """`prompts` x `tokens` consecutive tokens of the bundled held-out text, or seeded random ids without a tokenizer."""
    from frontends.hf.source import EMBEDDED_MODELS_DIR

    if tokenizer is not None:
        path = EMBEDDED_MODELS_DIR / "tiny" / "eval.txt"
        ids = list(tokenizer(path.read_text(encoding="utf-8")[: 64 * prompts * tokens], verbose=False)["input_ids"])
        if len(ids) >= prompts * tokens:
            chunks = tuple(tuple(ids[i * tokens : (i + 1) * tokens]) for i in range(prompts))
            return Sample(chunks, f"{prompts} prompts x {tokens} tokens of {path.parent.name}/{path.name}", True)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (prompts, tokens), generator=generator).tolist()
    return Sample(tuple(tuple(row) for row in ids), f"{prompts} x {tokens} random token ids (seed 0)", False)


def sample_of_ids(prompts: Sequence[Sequence[int]], vocab_size: int, is_text: bool = False) -> Sample:
    """The user's own prompts (`--input-ids`), checked against the vocabulary."""
    rows = tuple(tuple(int(t) for t in prompt) for prompt in prompts)
    if not rows or any(not row for row in rows):
        raise MoecError("--check-numerics needs at least one non-empty prompt")
    if any(not 0 <= t < vocab_size for row in rows for t in row):
        raise MoecError(f"--input-ids for --check-numerics must lie in [0, {vocab_size}) for this model's vocabulary")
    return Sample(rows, f"{len(rows)} given prompts, {sum(map(len, rows))} tokens", is_text)


def _batches(sample: Sample) -> list[torch.Tensor]:
    """Prompts of equal length run as one batch (shortest first)."""
    return [torch.tensor(group, dtype=torch.long) for _, group in sorted(_group_by_length(sample).items())]


def _group_by_length(sample: Sample) -> dict[int, list[tuple[int, ...]]]:
    groups: dict[int, list[tuple[int, ...]]] = {}
    for prompt in sample.prompts:
        groups.setdefault(len(prompt), []).append(prompt)
    return groups


# --- layers ------------------------------------------------------------------------------------------------------


def residual_stream(program: Program) -> dict[int, torch.fx.Node]:
    """The hidden state leaving each decoder layer this program holds (see the module docstring), by layer index."""
    hidden = int(program.config.hidden_size)
    found: dict[int, torch.fx.Node] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.ops.aten.add.Tensor, ops.add_rms_norm):
            continue
        match = re.fullmatch(r"layers\.(\d+)", layer_of(node))
        value = node.meta.get("val")
        if node.target is ops.add_rms_norm:
            value = value[0]
        if match is None or not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
            continue
        if value.dim() == 3 and value.shape[-1] == hidden:
            found[int(match.group(1))] = node  # the last one in graph order wins
    return found


def _instrumented(program: Program, layers: bool) -> tuple[Program, list[int]]:
    """A copy returning its residual stream too: outputs (first output, *hidden states of the listed layers)."""
    copy = program.clone()
    states = residual_stream(copy) if layers else {}
    output = next(node for node in reversed(copy.graph.nodes) if node.op == "output")
    returned = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    indices = sorted(states)
    output.args = ([returned[0], *(_sum_of(states[i]) for i in indices)],)
    copy.graph_module.recompile()
    return copy, indices


def _sum_of(node: torch.fx.Node) -> torch.fx.Node:
    """The residual stream's value at `node`: itself, or result 0 of a moec.add_rms_norm (read through a getitem,
    added here where the program reads only the normalized result)."""
    if node.target is not ops.add_rms_norm:
        return node
    for user in node.users:
        if user.target is operator.getitem and user.args[1] == 0:
            return user
    with node.graph.inserting_after(node):
        total = node.graph.call_function(operator.getitem, (node, 0))
    total.meta = {"val": node.meta["val"][0], "nn_module_stack": node.meta.get("nn_module_stack", {})}
    return total


# --- running -----------------------------------------------------------------------------------------------------


@dataclass
class _Outputs:
    logits: torch.Tensor  # [positions, vocab], float64
    states: dict[int, torch.Tensor]  # layer -> [positions, hidden], float64
    last: torch.Tensor  # [sequences, vocab]: each sequence's last-position logits (all a narrowed program computes)


def _flatten(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.as_tensor(part).double().reshape(-1, part.shape[-1]) for part in parts])


def _last_positions(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.as_tensor(part).double()[:, -1] for part in parts])


def _run_single(program: Program, batches: list[torch.Tensor], layers: bool) -> _Outputs:
    from backends.torch.runtime import TorchExecutable

    copy, indices = _instrumented(program, layers)
    executable = TorchExecutable(copy)
    results = [_as_list(executable(batch)) for batch in batches]
    return _Outputs(
        _flatten([r[0] for r in results]),
        {layer: _flatten([r[1 + k] for r in results]) for k, layer in enumerate(indices)},
        _last_positions([r[0] for r in results]),
    )


def _as_list(outputs: Any) -> list[torch.Tensor]:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _run_sharded(programs: list[Program], batches: list[torch.Tensor], layers: bool) -> list[_Outputs]:
    """Every program (all of one world size) as forked rank processes; each program's outputs as one process's."""
    from compiler.rank_processes import run_ranks

    copies, layouts = [], []
    for program in programs:
        ranks, indices = zip(*(_instrumented(rank, layers) for rank in program.ranks))
        logits_rank = next(i for i, r in enumerate(program.ranks) if r.attributes.get("returns_logits", True))
        # Every rank of the copy returns its outputs (an earlier stage its send token and its layers' states).
        ranks = tuple(replace(r, attributes={**r.attributes, "returns_logits": True}) for r in ranks)
        copies.append(replace(program, ranks=ranks))
        layouts.append((logits_rank, indices))
    by_rank = run_ranks(copies, batches)
    world = len(by_rank)
    outputs = []
    for number, (logits_rank, indices) in enumerate(layouts):
        parts = [torch.from_numpy(out[0]) for out in by_rank[logits_rank][number]]
        logits = _flatten(parts)
        states: dict[int, torch.Tensor] = {}
        for rank in range(world):
            for k, layer in enumerate(indices[rank]):
                if layer not in states:
                    states[layer] = _flatten([torch.from_numpy(out[1 + k]) for out in by_rank[rank][number]])
        outputs.append(_Outputs(logits, states, _last_positions(parts)))
    return outputs


# --- comparing ---------------------------------------------------------------------------------------------------


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| in float64; infinite when `actual` is not finite."""
    if not bool(torch.isfinite(actual).all()):
        return math.inf
    scale = float(expected.abs().max()) or 1.0
    return float((actual - expected).abs().max()) / scale


def _compare(actual: _Outputs, expected: _Outputs) -> tuple[Comparison, dict[int, float]]:
    actual_logits, expected_logits = actual.logits, expected.logits
    if actual_logits.shape != expected_logits.shape:
        # One side computes only each sequence's last position (logits-for{positions=last}): compare those.
        actual_logits, expected_logits = actual.last, expected.last
    top1 = float((actual_logits.argmax(-1) == expected_logits.argmax(-1)).double().mean())
    layers = {
        layer: max_rel_err(state, expected.states[layer])
        for layer, state in actual.states.items()
        if layer in expected.states
    }
    return Comparison(max_rel_err(actual_logits, expected_logits), top1), layers


def _perplexity(outputs: _Outputs, sample: Sample) -> float:
    """exp(mean NLL) of each prompt's tokens 1.. given the ones before (batches in `_batches` order)."""
    log_probs = torch.log_softmax(outputs.logits, dim=-1)
    prompts = [p for _, group in sorted(_group_by_length(sample).items()) for p in group]
    total, count, offset = 0.0, 0, 0
    for prompt in prompts:
        targets = torch.tensor(prompt[1:], dtype=torch.long)
        rows = log_probs[offset : offset + len(prompt) - 1]
        total -= float(rows[torch.arange(len(targets)), targets].sum())
        count += len(targets)
        offset += len(prompt)
    return math.exp(total / count) if count else math.nan


def _over_budget(step: Comparison, budget: NumericsBudget, tolerance: float, ppl: float | None, previous: float | None) -> str:
    if not step.max_rel_err <= tolerance:
        return f"step max rel err {step.max_rel_err:.1e} > {tolerance:.0e} ({budget.kind})"
    limit = budget.max_perplexity_change
    if limit is not None and ppl is not None and previous is not None:
        change = ppl / previous - 1
        if not abs(change) <= limit:
            return f"perplexity {previous:.3f} -> {ppl:.3f} ({change:+.1%}, budget {limit:.0%}, {budget.kind})"
    return ""


def check_numerics(
    traced: Program,
    history: Sequence[PassRecord],
    tokenizer: Any = None,
    input_ids: Sequence[Sequence[int]] | None = None,
    layers: bool = False,
    progress: Progress | None = None,
) -> NumericsReport:
    """Runs the trace and every pass's program on the sample and compares them (see the module docstring)."""
    import time

    started = time.perf_counter()
    vocab = int(traced.config.vocab_size)
    if input_ids is not None:
        sample = sample_of_ids(input_ids, vocab, is_text=tokenizer is not None)
    else:
        sample = default_sample(tokenizer, vocab)
    _check_memory(traced, history)
    batches = _batches(sample)
    programs = [traced, *(record.program for record in history)]
    outputs: list[_Outputs | None] = [None] * len(programs)
    for index, program in enumerate(programs):
        if not program.ranks:
            if progress is not None:
                progress(f"numerics: running {'the trace' if index == 0 else history[index - 1].spec}")
            outputs[index] = _run_single(program, batches, layers)
    for world in sorted({len(p.ranks) for p in programs if p.ranks}):
        numbers = [i for i, p in enumerate(programs) if len(p.ranks) == world]
        if progress is not None:
            progress(f"numerics: running {len(numbers)} sharded program(s) on {world} rank processes (gloo)")
        for number, result in zip(numbers, _run_sharded([programs[i] for i in numbers], batches, layers)):
            outputs[number] = result
    dtype = _logits_dtype(traced)
    rows: list[PassNumerics] = []
    reference = outputs[0]
    assert reference is not None
    for index, result in enumerate(outputs):
        assert result is not None
        vs_trace, layers_vs_trace = _compare(result, reference)
        previous = outputs[max(index - 1, 0)]
        assert previous is not None
        step, layers_step = _compare(result, previous)
        # A program narrowed to last positions has no per-token likelihoods to score.
        ppl = _perplexity(result, sample) if sample.is_text and len(result.logits) == len(reference.logits) else None
        if index == 0:
            rows.append(PassNumerics(0, "trace", None, 0.0, 0, ppl, vs_trace, step, layers_vs_trace, {}))
            continue
        record = history[index - 1]
        budget = record.numerics
        tolerance = EXACT_REL_ERR.get(dtype, budget.max_rel_err) if budget.kind == "exact" else budget.max_rel_err
        over = _over_budget(step, budget, tolerance, ppl, rows[-1].perplexity)
        rows.append(PassNumerics(
            index, record.spec, budget, tolerance, len(programs[index].ranks), ppl, vs_trace, step,
            layers_vs_trace, layers_step, over,
        ))
    return NumericsReport(sample, rows, layers, time.perf_counter() - started)


def _logits_dtype(program: Program) -> torch.dtype:
    output = next(node for node in reversed(program.graph.nodes) if node.op == "output")
    first = output.args[0][0] if isinstance(output.args[0], (list, tuple)) else output.args[0]
    return first.meta["val"].dtype


def _check_memory(traced: Program, history: Sequence[PassRecord]) -> None:
    """Refuses before reading a byte when one program's weights would not fit in this machine's memory."""
    needed = max([traced.weight_bytes(), *(r.program.weight_bytes() for r in history if not r.program.ranks)])
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > 0.5 * available:
        raise MoecError(
            f"--check-numerics runs every program on this CPU, and one needs {needed / 1e9:.1f} GB of weights "
            f"({available / 1e9:.1f} GB of memory here); check a smaller model with the same pipeline"
        )
