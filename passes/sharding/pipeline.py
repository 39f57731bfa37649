"""Pipeline stages: layers split into contiguous stages; a stage receives the hidden state from the previous one
and sends its own to the next.

before: %h_0 = embedding(...); layers 0..L-1; %logits = lm_head(rms_norm(%h_L))
after (stage p of pp, layers [first, stop)):
    p > 0:      %h_first = recv(%ids, [batch, seq, H], dtype, src=rank - tp)         (instead of the earlier layers)
    p < pp-1:   return send(%h_stop, dst=rank + tp)                                   (instead of the later layers)
"""

from __future__ import annotations

import re

import torch
import torch.fx

from compiler import collectives, ops
from compiler.ir import Program
from compiler.rewrite import layer_of
from passes.sharding.layout import RankRewriter, ShardingError

aten = torch.ops.aten


def stage_layers(layers: int, pp: int) -> list[tuple[int, int]]:
    """Contiguous [first, stop) per stage; the first `layers % pp` stages take one extra layer."""
    base, extra = divmod(layers, pp)
    bounds, first = [], 0
    for stage in range(pp):
        stop = first + base + (1 if stage < extra else 0)
        bounds.append((first, stop))
        first = stop
    return bounds


def _layer_index(node: torch.fx.Node) -> int | None:
    match = re.fullmatch(r"layers\.(\d+)", layer_of(node))
    return int(match.group(1)) if match else None


def _stage_boundaries(program: Program, layers: int) -> list[torch.fx.Node]:
    """The hidden state entering each layer, and (last) the one entering the final norm: `layers + 1` values."""
    entries: dict[int, torch.fx.Node] = {}
    final = None
    for node in program.graph.nodes:
        if node.target != ops.rms_norm:
            continue
        index = _layer_index(node)
        if index is None:
            final = node.args[0]
        else:
            entries.setdefault(index, node.args[0])
    if sorted(entries) != list(range(layers)) or final is None:
        raise ShardingError("shard: cannot find each layer's input norm and the final norm to split pipeline stages")
    return [entries[i] for i in range(layers)] + [final]


def cut_stage(rw: RankRewriter) -> None:
    """Keeps layers [first, stop): receives the hidden state from the previous stage, sends it to the next."""
    layout = rw.layout
    first, stop = layout.layers
    boundaries = _stage_boundaries(rw.program, rw.shape.layers)
    ids = rw.input_ids()
    if first > 0:
        entry = boundaries[first]
        value = entry.meta["val"]
        first_user = min(entry.users, key=lambda n: list(rw.graph.nodes).index(n))
        with rw.graph.inserting_before(first_user):
            sizes = [rw.call(aten.sym_size.int, (ids, 0)), rw.call(aten.sym_size.int, (ids, 1)), value.shape[-1]]
            received = rw.call(collectives.recv, (ids, sizes, value.dtype, layout.rank - layout.tp))
        entry.replace_all_uses_with(received)
    if stop < rw.shape.layers:
        output = next(n for n in rw.graph.nodes if n.op == "output")
        with rw.graph.inserting_before(output):
            token = rw.call(collectives.send, (boundaries[stop], layout.rank + layout.tp))
        output.args = ([token],)
    _eliminate_dead_code(rw.graph)


def _eliminate_dead_code(graph: torch.fx.Graph) -> None:
    graph.eliminate_dead_code()
    for node in list(graph.nodes):
        if node.op == "placeholder" and "weight" in node.meta and not node.users:
            graph.erase_node(node)
