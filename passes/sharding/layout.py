"""What every `shard` rule shares: the sizes read from the graph, one rank's place in the grid, and the rewriter
that slices weights and inserts collectives into one clone of the program.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode

from compiler import ops
from compiler.errors import MoecError
from compiler.ir import Program
from compiler.rewrite import create_node, is_weight
from compiler.weights import WeightExpr, slice_weight

aten = torch.ops.aten
RULE = "shard"


class ShardingError(MoecError):
    """The model cannot be split the way the `shard` options ask."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes sharding depends on, read from the graph itself."""

    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    intermediate: int
    vocab: int
    layers: int

    @classmethod
    def of(cls, program: Program) -> ModelShape:
        nodes = program.graph.nodes
        attention = next(n for n in nodes if n.target == ops.attention)
        moe = next(n for n in nodes if n.target == ops.moe)
        embedding = next(n for n in nodes if n.target == aten.embedding.default)
        query, key = attention.args[0].meta["val"], attention.args[1].meta["val"]
        return cls(
            heads=query.shape[1],
            kv_heads=key.shape[1],
            head_dim=query.shape[-1],
            experts=moe.args[1].meta["val"].shape[0],
            intermediate=moe.args[3].meta["val"].shape[-1],
            vocab=embedding.args[0].meta["val"].shape[0],
            layers=sum(1 for n in nodes if n.target == ops.attention),
        )


@dataclass(frozen=True)
class RankLayout:
    """Where one rank sits in the tp x pp grid, and what it holds."""

    rank: int
    tp: int
    pp: int
    moe_tp: int
    moe_ep: int
    layers: tuple[int, int]  # [first, stop) of this rank's pipeline stage

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def moe_ep_rank(self) -> int:
        return self.tp_rank % self.moe_ep

    @property
    def moe_tp_rank(self) -> int:
        return self.tp_rank // self.moe_ep

    @property
    def tp_group(self) -> list[int]:
        return list(range(self.pp_rank * self.tp, (self.pp_rank + 1) * self.tp))


@dataclass
class RankRewriter:
    """Rewrites one clone of the program into one rank's program."""

    program: Program
    shape: ModelShape
    layout: RankLayout
    # Slices of one expression are built once, so tied weights stay one tensor when materialized.
    _slices: dict[tuple[Any, ...], WeightExpr] = field(default_factory=dict)
    _planned: dict[torch.fx.Node, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph

    def call(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> torch.fx.Node:
        return create_node(self.graph, target, args, kwargs, RULE)

    def input_ids(self) -> torch.fx.Node:
        return self.program.input_nodes()[0]

    def slice_weight_node(
        self, node: torch.fx.Node, plan: tuple[Any, ...], build: Callable[[WeightExpr], WeightExpr]
    ) -> None:
        """Replaces weight placeholder `node`'s expression by `build(expr)`; `plan` names the slicing."""
        if not is_weight(node):
            raise ShardingError(f"shard: %{getattr(node, 'name', node)} is computed, not a weight; cannot slice it")
        if node in self._planned:
            if self._planned[node] != plan:
                raise ShardingError(f"shard: weight %{node.name} is used with two different splits")
            return
        self._planned[node] = plan
        expr = node.meta["weight"]
        key = (id(expr), plan)
        if key not in self._slices:
            self._slices[key] = build(expr)
        sliced = self._slices[key]
        fake_mode = detect_fake_mode([node.meta["val"]])
        with fake_mode:
            value = torch.empty(sliced.shape, dtype=sliced.dtype, device="meta")
        node.meta = {**node.meta, "weight": sliced, "val": value, "moec_rule": RULE}

    def rows(self, node: torch.fx.Node, dim: int, start: int, stop: int) -> None:
        self.slice_weight_node(node, ("slice", dim, start, stop), lambda e: slice_weight(e, dim, start, stop))

    def after(self, node: torch.fx.Node, make: Callable[[torch.fx.Node], torch.fx.Node]) -> torch.fx.Node:
        """Inserts `make(node)` right after `node` and redirects node's other users to it."""
        users = list(node.users)
        # Before the next node, not `inserting_after(node)`: that would put several new nodes in reverse order.
        with self.graph.inserting_before(node.next):
            replacement = make(node)
        for user in users:
            user.replace_input_with(node, replacement)
        return replacement


def no_bias(linear: torch.fx.Node) -> None:
    """Raises unless `linear` has no bias: a split projection's bias would be added once per rank."""
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    if bias is not None:
        raise ShardingError(f"shard: linear %{linear.name} has a bias; sharding biased projections is not supported")

