"""Tensor-parallel attention: query/key/value projections split by heads (column-parallel), the output projection
split by its input (row-parallel) and summed across the tp group.

before: %q = linear(%x, %Wq[Hq*D,H]); %k = linear(%x, %Wk[Hkv*D,H]); %v = ...; %a = attention(view(%q), ...)
        %o = linear(view(%a), %Wo[H,Hq*D])
after:  %q = linear(%x, %Wq[t-th Hq/tp heads]); %k, %v: this rank's Hkv/tp kv heads, or, when tp > Hkv, the one kv
        head its query heads read (kv heads replicated); views resized to the local heads
        %o = all_reduce(linear(view(%a), %Wo[:, t-th Hq/tp heads]), tp group)
"""

from __future__ import annotations

import torch
import torch.fx

from compiler import collectives, ops
from passes.sharding.layout import RankRewriter, ShardingError, no_bias

aten = torch.ops.aten
# Ops between a q/k/v projection and attention, or between attention and the output projection.
_HEAD_LAYOUT_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, ops.rope)
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _producer_linear(node: torch.fx.Node, what: str) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """The moec.linear a q/k/v operand of attention comes from, and the layout ops in between."""
    chain = []
    while isinstance(node, torch.fx.Node) and node.target in _HEAD_LAYOUT_OPS:
        chain.append(node)
        node = node.args[0]
    if not (isinstance(node, torch.fx.Node) and node.target == ops.linear):
        raise ShardingError(f"shard: cannot find the projection feeding the {what} of attention")
    return node, chain


def _consumer_linear(attention: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """The output projection reading attention's result, and the layout ops in between."""
    node, chain = attention, []
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise ShardingError(f"shard: attention %{attention.name} does not feed one output projection")
        user = users[0]
        if user.target == ops.linear and user.args[0] is node:
            return user, chain
        if user.target not in _HEAD_LAYOUT_OPS:
            raise ShardingError(f"shard: attention %{attention.name} feeds {user.target}, not an output projection")
        chain.append(user)
        node = user


def _set_view_size(view: torch.fx.Node, index: int, size: int) -> None:
    """A view whose literal size at `index` encodes the unsharded width gets this rank's width."""
    if view.target not in _VIEWS:
        return
    sizes = list(view.args[1])
    if isinstance(sizes[index], int) and sizes[index] != -1:
        sizes[index] = size
        view.args = (view.args[0], sizes, *view.args[2:])


def shard_attention(rw: RankRewriter, attention: torch.fx.Node, handled: set[torch.fx.Node]) -> None:
    """Splits one attention block's projections across the tp group; adds the projections it handled to `handled`."""
    layout, shape = rw.layout, rw.shape
    tp, t, d = layout.tp, layout.tp_rank, shape.head_dim
    local_heads = shape.heads // tp
    query_linear, query_chain = _producer_linear(attention.args[0], "query")
    rw.rows(query_linear.args[1], 0, t * local_heads * d, (t + 1) * local_heads * d)
    for view in query_chain:
        if view.target in _VIEWS and len(view.args[1]) == 4:
            _set_view_size(view, 2, local_heads)
    if shape.kv_heads % tp == 0:
        local_kv = shape.kv_heads // tp
        kv_first = t * local_kv
    else:
        # tp > kv heads: this rank's query heads all read one kv head, which it holds (kv heads are replicated).
        local_kv = 1
        kv_first = t * local_heads // (shape.heads // shape.kv_heads)
    for operand, what in ((attention.args[1], "key"), (attention.args[2], "value")):
        linear, chain = _producer_linear(operand, what)
        rw.rows(linear.args[1], 0, kv_first * d, (kv_first + local_kv) * d)
        for view in chain:
            if view.target in _VIEWS and len(view.args[1]) == 4:
                _set_view_size(view, 2, local_kv)
        handled.add(linear)
    output_linear, output_chain = _consumer_linear(attention)
    for view in output_chain:
        _set_view_size(view, -1, local_heads * d)
    rw.rows(output_linear.args[1], 1, t * local_heads * d, (t + 1) * local_heads * d)
    for linear in (query_linear, output_linear):
        no_bias(linear)
        handled.add(linear)
    rw.after(output_linear, lambda n: rw.call(collectives.all_reduce, (n, layout.tp_group)))
