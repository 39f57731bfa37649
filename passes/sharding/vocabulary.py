"""Vocabulary-parallel embedding and lm_head: each tp rank holds V/tp rows of the vocabulary.

before: %h = embedding(%E[V,H], %ids) ... %logits = linear(%x, %lm_head[V,H])
after:  %mine = (%ids >= lo) & (%ids < hi); %h = all_reduce(where(%mine, embedding(%E[lo:hi], where(%mine, %ids - lo,
        0)), 0), tp group) ... %logits = all_gather(linear(%x, %lm_head[lo:hi]), dim=-1, tp group)
"""

from __future__ import annotations

import torch
import torch.fx

from compiler import collectives, ops
from compiler.ir import Program
from passes.sharding.layout import RankRewriter, no_bias

aten = torch.ops.aten


def shard_embedding(rw: RankRewriter, embedding: torch.fx.Node) -> None:
    """Looks up only this rank's vocabulary rows; the tp group's sum is the full lookup."""
    layout = rw.layout
    rows = rw.shape.vocab // layout.tp
    first, stop = layout.tp_rank * rows, (layout.tp_rank + 1) * rows
    weight, ids = embedding.args[0], embedding.args[1]
    rw.rows(weight, 0, first, stop)
    with rw.graph.inserting_before(embedding):
        mine = rw.call(
            aten.logical_and.default, (rw.call(aten.ge.Scalar, (ids, first)), rw.call(aten.lt.Scalar, (ids, stop)))
        )
        local_ids = rw.call(aten.where.ScalarOther, (mine, rw.call(aten.sub.Scalar, (ids, first)), 0))
    embedding.args = (weight, local_ids, *embedding.args[2:])

    def reduce(lookup: torch.fx.Node) -> torch.fx.Node:
        # Rows of ids another rank holds are zeroed here, so the sum over the group is the full lookup.
        zeroed = rw.call(aten.where.ScalarOther, (rw.call(aten.unsqueeze.default, (mine, -1)), lookup, 0.0))
        return rw.call(collectives.all_reduce, (zeroed, layout.tp_group))

    rw.after(embedding, reduce)


def shard_lm_head(rw: RankRewriter, lm_head: torch.fx.Node) -> None:
    """Computes this rank's vocabulary columns of the logits, then gathers the group's along the last dim."""
    layout = rw.layout
    rows = rw.shape.vocab // layout.tp
    no_bias(lm_head)
    rw.rows(lm_head.args[1], 0, layout.tp_rank * rows, (layout.tp_rank + 1) * rows)
    rw.after(lm_head, lambda n: rw.call(collectives.all_gather, (n, -1, layout.tp_group)))


def lm_head_of(program: Program) -> torch.fx.Node | None:
    """The `moec.linear` whose result the program returns as logits, or None when the output is not one."""
    output = next(n for n in program.graph.nodes if n.op == "output")
    results = output.args[0]
    logits = results[0] if isinstance(results, (list, tuple)) else results
    return logits if isinstance(logits, torch.fx.Node) and logits.target == ops.linear else None
