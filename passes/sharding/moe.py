"""Expert sharding of the fused `moe` op: tp rank t holds expert block `t % moe_ep` (expert parallelism) and
intermediate slice `t // moe_ep` of each of its experts (tensor parallelism), and the tp group sums the results.

before: %m = moe(%y, %router[E,H], %w13[E,2I,H], %w2[E,H,I], top_k, ...)
after:  %m = all_reduce(moe(%y, %router (replicated), %w13[E/moe_ep, 2I/moe_tp, H], %w2[E/moe_ep, H, I/moe_tp], ...,
        expert_offset=first expert of the block), tp group)
"""

from __future__ import annotations

import torch.fx

from compiler import collectives
from compiler.weights import WeightExpr, concat_weights, slice_weight
from passes.sharding.layout import RankRewriter


def shard_moe(rw: RankRewriter, moe: torch.fx.Node) -> None:
    """Gives one `moe` op this rank's expert block and intermediate slice, and sums the group's results."""
    layout, shape = rw.layout, rw.shape
    experts_per_rank = shape.experts // layout.moe_ep
    first_expert = layout.moe_ep_rank * experts_per_rank
    stop_expert = first_expert + experts_per_rank
    part = shape.intermediate // layout.moe_tp
    lo, hi = layout.moe_tp_rank * part, (layout.moe_tp_rank + 1) * part
    intermediate = shape.intermediate

    def w13_slice(expr: WeightExpr) -> WeightExpr:
        block = slice_weight(expr, 0, first_expert, stop_expert)
        if layout.moe_tp == 1:
            return block
        # Rows [0, I) are the gate (w1), [I, 2I) the up projection (w3): keep this rank's part of each.
        return concat_weights(
            [slice_weight(block, 1, lo, hi), slice_weight(block, 1, intermediate + lo, intermediate + hi)], 1
        )

    def w2_slice(expr: WeightExpr) -> WeightExpr:
        return slice_weight(slice_weight(expr, 0, first_expert, stop_expert), 2, lo, hi)

    rw.slice_weight_node(moe.args[2], ("w13", first_expert, stop_expert, lo, hi), w13_slice)
    rw.slice_weight_node(moe.args[3], ("w2", first_expert, stop_expert, lo, hi), w2_slice)
    if layout.moe_ep > 1:
        moe.kwargs = {**moe.kwargs, "expert_offset": first_expert}
    rw.after(moe, lambda n: rw.call(collectives.all_reduce, (n, layout.tp_group)))
