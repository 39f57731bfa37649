"""`fuse-norm`: a residual add and the RMSNorm that reads its sum become one op with two results.

before (after canonicalize; per layer the post-attention norm, the next layer's input norm, and the final norm):
    %s = aten.add.Tensor(%a, %b)                  # the residual stream plus attention's (or the MoE's) output
    %n = moec.rms_norm(%s, %w, eps)
    ... %n's users ...; ... %s's other users (the next residual add) ...
after:
    %f = moec.add_rms_norm(%a, %b, %w, eps)
    %s' = getitem(%f, 0)                          # only where %s had users besides the norm
    %n' = getitem(%f, 1)

A GPU kernel then reads the residual stream once for both (the CPU reference computes exactly `aten.add` then
`rms_norm`, so the fused program's values are bit-identical). Left alone, and named by `--explain fuse-norm`: a norm
whose input is not a residual add (layer 0's input norm reads the embedding; a pipeline stage's first norm reads
`recv`), an add with alpha != 1 or a scalar operand, an add that broadcasts (operand shapes differ), an add of two
dtypes. The graph is the only thing rewritten: the norm weights are reused as they are. Run it after `shard` (the pass
manager maps it over the ranks; `shard` refuses fused norms, whose add and norm straddle a pipeline stage's cut), and
before or after `kv-cache`, `fuse-qkv` and `quantize-weights`. Not in the default pipeline.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from compiler import ops
from compiler.errors import PreconditionError
from compiler.ir import Program, _symbol_names, format_value_type, op_name
from compiler.pass_manager import Pass, PassResult, register_pass
from compiler.rewrite import MatchFailure, Rewriter, infer_value, tensor_value

aten = torch.ops.aten
RULE = "fuse-norm"


@dataclass
class NormMatch:
    """A norm and the residual add whose sum it reads."""

    norm: torch.fx.Node
    add: torch.fx.Node

    @property
    def operands(self) -> tuple[torch.fx.Node, torch.fx.Node]:
        return self.add.args[0], self.add.args[1]  # type: ignore[return-value]


def is_norm_output(node: Any) -> bool:
    """True for the normalized value of a `moec.rms_norm` or of a `moec.add_rms_norm` (its getitem 1)."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.target == ops.rms_norm:
        return True
    fused = node.args[0] if node.target == operator.getitem else None
    return isinstance(fused, torch.fx.Node) and fused.target == ops.add_rms_norm and node.args[1] == 1


def site(node: torch.fx.Node) -> str:
    """`layers.0.post_attention_layernorm`, `norm`: the module a norm (or a fused norm) normalizes for."""
    if node.target == ops.add_rms_norm:
        normed = [user for user in node.users if user.target == operator.getitem and user.args[1] == 1]
        if not normed:
            return f"%{node.name}"
        node = normed[0]
    stack = list(node.meta.get("nn_module_stack", {}).values())
    if not stack:
        return f"%{node.name}"
    return re.sub(r"^(model\.)+", "", stack[-1][0])


def _describe(value: Any) -> str:
    if isinstance(value, torch.fx.Node):
        return f"%{value.name} ({op_name(value)})" if value.op == "call_function" else f"the input %{value.name}"
    return repr(value)


def _same_size(left: Any, right: Any) -> bool:
    """Statically equal sizes: one symbol (`batch`), or one integer; a symbol never equals an integer here."""
    if isinstance(left, torch.SymInt) or isinstance(right, torch.SymInt):
        both = isinstance(left, torch.SymInt) and isinstance(right, torch.SymInt)
        return both and left.node.expr == right.node.expr
    return int(left) == int(right)


def match_norm(norm: torch.fx.Node, names: dict[Any, Any]) -> NormMatch:
    """The residual add `norm` reads; raises MatchFailure saying why the two cannot become one add_rms_norm."""
    add = norm.args[0]
    if not (isinstance(add, torch.fx.Node) and add.op == "call_function" and add.target == aten.add.Tensor):
        raise MatchFailure(f"its input {_describe(add)} is not a residual aten.add.Tensor")
    alpha = add.kwargs.get("alpha", 1)
    if alpha != 1:
        raise MatchFailure(f"the add %{add.name} has alpha={alpha}")
    values = [tensor_value(operand) for operand in add.args[:2]]
    for operand, value in zip(add.args[:2], values):
        if value is None:
            raise MatchFailure(f"the add %{add.name} has a scalar operand ({_describe(operand)})")
    left, right = values
    types = " + ".join(format_value_type(value, names) for value in values)
    if len(left.shape) != len(right.shape) or not all(map(_same_size, left.shape, right.shape)):
        raise MatchFailure(f"the add %{add.name} broadcasts ({types})")
    if left.dtype != right.dtype:
        raise MatchFailure(f"the add %{add.name} mixes dtypes ({types})")
    return NormMatch(norm, add)


def _matches(program: Program) -> list[tuple[torch.fx.Node, NormMatch | MatchFailure]]:
    """Every norm in graph order, with its match or the reason it does not fuse."""
    names = _symbol_names(program)
    results: list[tuple[torch.fx.Node, NormMatch | MatchFailure]] = []
    claimed: dict[torch.fx.Node, torch.fx.Node] = {}  # add -> the (earlier) norm it fuses with
    for node in program.graph.nodes:
        if node.target != ops.rms_norm:
            continue
        try:
            match = match_norm(node, names)
            if match.add in claimed:
                raise MatchFailure(f"the add %{match.add.name} is fused with {site(claimed[match.add])} already")
            claimed[match.add] = node
            results.append((node, match))
        except MatchFailure as failure:
            results.append((node, failure))
    return results


def _fuse(rewriter: Rewriter, match: NormMatch) -> None:
    graph, norm, add = rewriter.graph, match.norm, match.add
    _, weight, eps = norm.args
    others = [user for user in add.users if user is not norm]
    # Before the add: its operands dominate it, and every user of the sum and of the norm comes after it.
    with graph.inserting_before(add):
        fused = rewriter.call(ops.add_rms_norm, (*match.operands, weight, eps))
        total = rewriter.call(operator.getitem, (fused, 0)) if others else None
        normed = rewriter.call(operator.getitem, (fused, 1))
    # The fused op and its sum belong to the add's layer (`--check-numerics-layers` reads the residual stream by
    # layer), the normalized value to the norm's module.
    for node, origin in ((fused, add), (total, add), (normed, norm)):
        if node is not None:
            node.meta["nn_module_stack"] = origin.meta.get("nn_module_stack", {})
            node.meta["val"] = infer_value(node)
    norm.replace_all_uses_with(normed)
    graph.erase_node(norm)
    if total is not None:
        add.replace_all_uses_with(total)
    graph.erase_node(add)


@register_pass
@dataclass(frozen=True)
class FuseNorm(Pass):
    """Fuse each residual add with the RMSNorm that reads its sum into one moec.add_rms_norm (sum, normed).

    before: %s = aten.add.Tensor(%a, %b); %n = moec.rms_norm(%s, %w, eps)
    after:  %f = moec.add_rms_norm(%a, %b, %w, eps); %s = getitem(%f, 0); %n = getitem(%f, 1)
    Run after canonicalize (and after shard for a sharded model). Not fused: a norm of anything but a same-shape,
    same-dtype add with alpha 1 (layer 0's input norm reads the embedding). No options; not in the default pipeline.
    """

    name = "fuse-norm"

    def requires(self, program: Program) -> None:
        counts = program.op_counts()
        if not counts.get("moec.rms_norm") and not counts.get("moec.add_rms_norm"):
            raise PreconditionError("needs canonicalize first: the graph has no moec.rms_norm")

    def run(self, program: Program) -> PassResult:
        result = program.clone()
        planned = _matches(result)
        rewriter = Rewriter(result)
        rewriter._current_rule = RULE
        fused = [match for _, match in planned if isinstance(match, NormMatch)]
        for match in fused:
            _fuse(rewriter, match)
        result.graph_module.recompile()
        already = sum(1 for node in result.graph.nodes if node.target == ops.add_rms_norm) - len(fused)
        stats = {"fused": len(fused), "not_fused": len(planned) - len(fused), "already_fused": already}
        return PassResult(result, bool(fused), stats)

    def explain(self, program: Program) -> list[str]:
        if program.ranks:  # the pass runs on each rank's program, not on the unsharded graph a sharded one keeps
            return [f"rank {index}: {line}" for index, rank in enumerate(program.ranks) for line in self.explain(rank)]
        names = _symbol_names(program)
        planned = dict(_matches(program))
        lines = []
        for node in program.graph.nodes:
            match = planned.get(node)
            if node.target == ops.add_rms_norm:
                lines.append(f"{site(node)}: already fused")
            elif isinstance(match, MatchFailure):
                lines.append(f"{site(node)}: not fused: {match}")
            elif match is not None:
                value = format_value_type(match.add.meta["val"], names)
                lines.append(f"{site(node)}: fused with the residual add %{match.add.name} ({value})")
        return lines or ["fuse-norm: no moec.rms_norm found"]
