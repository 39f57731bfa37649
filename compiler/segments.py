"""Split one rank's program at its collectives into consecutive engine programs and a step list for the runtime.

before: a rank's program with collectives, e.g.
    %a = all_reduce(%x1, [0, 1]) ... %m = moe(...); %b = all_reduce(%m, [0, 1]) ... return all_gather(%y, -1, [0, 1])
after:  segment programs, each computing ONE collective's operand (or the rank's output) from `input_ids` and the
        results of earlier collectives (new placeholders named after the collective nodes), and steps:
    [engine 0 → x1] [all_reduce x1 → all_reduce] [engine 1 → m] [all_reduce m → all_reduce_1] ...
    [all_gather → out]

TensorRT cannot call torch.distributed, so the runtime runs engine, collective, engine, ... in order. Each segment is
the backward slice of its output, cut at collectives and placeholders: `input_ids` is an input of every segment, so
symbolic sizes and rotary tables are recomputed per segment (cheap) instead of crossing engine boundaries; cheap
elementwise values used after several collectives (a residual sum) are recomputed where needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from compiler.collectives import COLLECTIVE_OPS, all_gather, all_reduce, recv, send
from compiler.ir import Program, op_name


@dataclass
class Segment:
    program: Program
    inputs: list[str]  # value names: the runtime input (`input_ids`) or collective results
    output: str  # the value this segment computes (a collective's operand, or the rank's output)


@dataclass
class RankPlan:
    segments: list[Segment] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    output: str = ""


def symbol_names(program: Program) -> dict[Any, str]:
    names: dict[Any, str] = {}
    for node in program.input_nodes():
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            for size, label in zip(value.shape, ("batch", "seq")):
                if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                    names.setdefault(size.node.expr, label)
    return names


def dim_exprs(value: torch.Tensor, names: dict[Any, str]) -> list[int | str]:
    """A fake tensor's shape with symbolic dims written in `batch`/`seq` (e.g. `batch*seq`)."""
    import sympy

    symbols = {symbol: sympy.Symbol(label) for symbol, label in names.items()}
    return [str(size.node.expr.subs(symbols)) if isinstance(size, torch.SymInt) else int(size) for size in value.shape]


def _slice(output: torch.fx.Node) -> list[torch.fx.Node]:
    """Nodes `output` depends on, stopping at placeholders and collectives (which become segment inputs)."""
    seen: set[torch.fx.Node] = set()
    stack = [output]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder" or node.target in COLLECTIVE_OPS:
            continue
        stack.extend(node.all_input_nodes)
    return [node for node in output.graph.nodes if node in seen]


def _segment(program: Program, output: torch.fx.Node, runtime_input: torch.fx.Node) -> Segment:
    graph = torch.fx.Graph()
    mapping: dict[torch.fx.Node, torch.fx.Node] = {}
    nodes = _slice(output)
    cuts = [node for node in nodes if node.target in COLLECTIVE_OPS]
    weights = [node for node in nodes if node.op == "placeholder" and "weight" in node.meta]
    # A program with KV caches: the segments holding attention also read cache_position and their layers' caches.
    state = [
        node for node in nodes if node.op == "placeholder" and node is not runtime_input and "weight" not in node.meta
    ]
    # input_ids first: the ONNX export names batch/seq from the first runtime input.
    for node in [runtime_input, *state, *cuts, *weights]:
        placeholder = graph.placeholder(node.name)
        kept = ("val", "weight", "kv_cache", "moec_rule")
        placeholder.meta = {key: value for key, value in node.meta.items() if key in kept}
        mapping[node] = placeholder
    for node in nodes:
        if node in mapping:
            continue
        copied = graph.node_copy(node, lambda n: mapping[n])
        copied.meta = dict(node.meta)
        mapping[node] = copied
    graph.output(mapping[output])
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    segment = Program(module, program.config, program.source_description, 0.0, dict(program.attributes))
    return Segment(segment, [runtime_input.name, *(node.name for node in [*state, *cuts])], output.name)


def split_at_collectives(program: Program) -> RankPlan:
    """The segments and steps of one rank; a program without collectives is one segment."""
    runtime_input = program.input_nodes()[0]  # input_ids (then cache_position in a program with KV caches)
    (output,) = program.graph.find_nodes(op="output")
    (result,) = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    plan = RankPlan(output=result.name)
    names = symbol_names(program)

    def compute(value: torch.fx.Node) -> None:
        """Steps that make `value` available: nothing for inputs and collective results, else a segment."""
        if value.op == "placeholder" or value.target in COLLECTIVE_OPS:
            return
        segment = _segment(program, value, runtime_input)
        plan.steps.append({"engine": len(plan.segments), "inputs": segment.inputs, "output": segment.output})
        plan.segments.append(segment)

    for node in program.graph.nodes:
        if node.target not in COLLECTIVE_OPS:
            continue
        step: dict[str, Any] = {"collective": op_name(node).removeprefix("moec."), "output": node.name}
        if node.target == all_reduce:
            operand, group = node.args
            step.update(input=operand.name, group=list(group))
        elif node.target == all_gather:
            operand, dim, group = node.args
            step.update(input=operand.name, dim=int(dim), group=list(group))
        elif node.target == send:
            operand, dst = node.args
            step.update(input=operand.name, dst=int(dst))
        elif node.target == recv:
            _, _, dtype, src = node.args
            step.update(shape=dim_exprs(node.meta["val"], names), dtype=str(dtype).removeprefix("torch."), src=int(src))
            operand = None
        if operand is not None:
            compute(operand)
        plan.steps.append(step)
    compute(result)
    return plan
