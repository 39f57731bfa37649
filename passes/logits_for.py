"""`logits-for{positions=last|all}`: compute the lm_head only for the positions whose logits are used.

before:
    %h: f32[batch,seq,H] = moec.rms_norm(%x, %norm_weight, eps)
    %logits: f32[batch,seq,V] = moec.linear(%h, %lm_head_weight)
after (positions=last):
    %h: f32[batch,seq,H] = moec.rms_norm(%x, %norm_weight, eps)
    %last: f32[batch,H] = aten.select.int(%h, 1, -1); %h_last: f32[batch,1,H] = aten.unsqueeze(%last, 1)
    %logits: f32[batch,1,V] = moec.linear(%h_last, %lm_head_weight)

A prefill of S tokens then computes one row of the lm_head per sequence instead of S (the vocabulary projection is
the largest matmul of a small model's step). `positions=all` is the identity (changed=False).

`last` means the last position of the step's input, the same for every row of the batch: it is right for a batch
whose sequences all have one length and for decode steps (seq == 1). Generation from right-padded batches needs each
sequence's own last real position, which this pass does not know: `CompiledModel.generate` (compiler/generation.py)
prefills right-padded prompts and reads each sequence's own last row, so it needs the full logits and fails on a
program narrowed here. That is why the pass is not part of the default pipeline. Every later pass sees logits
`[batch, 1, vocab]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx

from compiler import ops
from compiler.errors import PassOptionError
from compiler.ir import Program
from compiler.pass_manager import Pass, PassResult, register_pass
from compiler.rewrite import MatchFailure, create_node, infer_value
from passes.fuse_norm import is_norm_output

aten = torch.ops.aten
RULE = "logits-for"
POSITIONS = ("last", "all")
# How far back from the graph's output to look for the lm_head (past e.g. a vocabulary all-gather or a cast).
_MAX_STEPS_TO_LM_HEAD = 4


class AlreadyNarrowed(MatchFailure):
    """The lm_head already reads this pass's last-position slice."""


def find_lm_head(program: Program) -> torch.fx.Node:
    """The moec.linear computing the program's logits from the final norm (a moec.rms_norm, or the normalized result
    of a `fuse-norm` moec.add_rms_norm); MatchFailure says why not."""
    output = next(node for node in program.graph.nodes if node.op == "output")
    results = output.args[0]
    node = results[0] if isinstance(results, (tuple, list)) else results
    for _ in range(_MAX_STEPS_TO_LM_HEAD):
        if not isinstance(node, torch.fx.Node) or node.op != "call_function" or node.target == ops.linear:
            break
        node = node.args[0]
    if not (isinstance(node, torch.fx.Node) and node.target == ops.linear):
        raise MatchFailure("the program's output is not computed by an lm_head moec.linear")
    hidden = node.args[0]
    if isinstance(hidden, torch.fx.Node) and hidden.meta.get("moec_rule") == RULE:
        raise AlreadyNarrowed("the lm_head already reads only the last position")
    if not is_norm_output(hidden):
        raise MatchFailure("the lm_head does not read the final moec.rms_norm (needs canonicalize first)")
    value = hidden.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() != 3:
        raise MatchFailure("the final norm's output is not [batch, seq, hidden]")
    return node


@register_pass
@dataclass(frozen=True)
class LogitsFor(Pass):
    """Narrow the final norm's output to the last position before the lm_head (logits [batch, 1, vocab]).

    before: %logits[batch,seq,V] = linear(rms_norm(%x), %lm_head)
    after:  %logits[batch,1,V] = linear(unsqueeze(select(rms_norm(%x), 1, -1), 1), %lm_head)
    Options: positions=last|all (all: unchanged). `last` is for single-length batches and decode steps: generation
    from right-padded batches (`CompiledModel.generate`) needs each sequence's own last position. Not in the default
    pipeline.
    """

    name = "logits-for"
    positions: Literal["last", "all"] = "last"

    def __post_init__(self) -> None:
        self.validate_options()

    def validate_options(self) -> None:
        if self.positions not in POSITIONS:
            raise PassOptionError(f"logits-for: positions={self.positions!r} must be one of {', '.join(POSITIONS)}")

    def run(self, program: Program) -> PassResult:
        result = program.clone()
        if self.positions == "all":
            return PassResult(result, False, {"narrowed": 0})
        try:
            lm_head = find_lm_head(result)
        except MatchFailure as failure:
            return PassResult(result, False, {"narrowed": 0, "skipped": str(failure)})
        graph, hidden = result.graph, lm_head.args[0]
        # select + unsqueeze rather than slice(-1, end): the result's seq dim is the literal 1, not min(seq, 1).
        with graph.inserting_before(lm_head):
            last = create_node(graph, aten.select.int, (hidden, 1, -1), None, RULE)
            narrowed = create_node(graph, aten.unsqueeze.default, (last, 1), None, RULE)
        for node in (last, narrowed):
            node.meta["val"] = infer_value(node)
            node.meta["nn_module_stack"] = hidden.meta.get("nn_module_stack", {})
        lm_head.replace_input_with(hidden, narrowed)
        # The lm_head and whatever follows it up to the output get one position: re-derive their types.
        pending = [lm_head]
        while pending:
            node = pending.pop()
            if node.op == "call_function":
                node.meta["val"] = infer_value(node)
                pending.extend(node.users)
        result.graph_module.recompile()
        return PassResult(result, True, {"narrowed": 1})

    def explain(self, program: Program) -> list[str]:
        if self.positions == "all":
            return ["logits-for: positions=all: logits for every position (unchanged)"]
        try:
            lm_head = find_lm_head(program)
        except AlreadyNarrowed as failure:
            return [f"logits-for: {failure}"]
        except MatchFailure as failure:
            return [f"logits-for: not applied: {failure}"]
        return [f"logits-for: %{lm_head.name} computes the logits of the last position only"]
