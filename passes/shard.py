"""`shard`: tensor, pipeline and expert parallelism; one program per rank (`rank = pp_rank * tp + tp_rank`).

before (one rank, after canonicalize + fuse-moe):
    %h = embedding(%E[V,H], %ids) ... per layer:
    %q = linear(%x, %Wq[Hq*D,H]); %k = linear(%x, %Wk[Hkv*D,H]); %v = ...; %a = attention(...)
    %o = linear(view(%a), %Wo[H,Hq*D]); %m = moe(%y, %router[E,H], %w13[E,2I,H], %w2[E,H,I], ...)
    %logits = linear(rms_norm(%h_L), %lm_head[V,H])
after (rank r, tensor-parallel rank t of tp, pipeline stage p of pp):
    stage p > 0:  %h_a = recv(%ids, [batch, seq, H], dtype, src=r - tp)        (instead of the earlier layers)
    attention:    q/k/v column-parallel (Hq/tp query heads; Hkv/tp kv heads, or the one kv head this rank's query
                  heads read when tp > Hkv: kv heads are then replicated, attribute `kv_heads=replicated`)
                  %o = all_reduce(linear(view(%a), %Wo[:, t-th Hq/tp heads]), tp group)      (row-parallel)
    moe:          %m = all_reduce(moe(%y, %router (replicated, float32), w13/w2 of this rank's expert block
                  [E/moe_ep experts, starting at expert_offset] and intermediate slice [I/moe_tp]), tp group)
    embedding:    vocab-parallel: ids outside this rank's rows are masked, local lookup, zeroed, all_reduce
    lm_head:      column-parallel over the vocabulary, then all_gather of the logits on the last dim
    stage p < pp-1: return send(%h_b, dst=r + tp)                                (instead of the later layers)

Within the tp group, `moe_tp * moe_ep == tp`: tp rank t holds expert block `t % moe_ep` and intermediate slice
`t // moe_ep` (TensorRT-LLM's mapping). Layers are split into contiguous stages, earlier stages taking the extra
layer when `pp` does not divide them. Weight slices are lazy (`slice_weight`): a rank's expressions reference only
the bytes it needs. The result is one `Program` whose `ranks` hold the per-rank programs; its own graph stays the
unsharded one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx
from torch._guards import detect_fake_mode

from compiler import collectives, ops
from compiler.errors import MoecError, PassOptionError, PreconditionError
from compiler.ir import Program
from compiler.pass_manager import Pass, PassResult, register_pass
from compiler.rewrite import create_node, is_weight, layer_of
from compiler.verifier import propagate_types
from compiler.weights import WeightExpr, concat_weights, slice_weight

aten = torch.ops.aten
RULE = "shard"
# Ops between a q/k/v projection and attention, or between attention and the output projection.
_HEAD_LAYOUT_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, ops.rope)
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


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


def stage_layers(layers: int, pp: int) -> list[tuple[int, int]]:
    """Contiguous [first, stop) per stage; the first `layers % pp` stages take one extra layer."""
    base, extra = divmod(layers, pp)
    bounds, first = [], 0
    for stage in range(pp):
        stop = first + base + (1 if stage < extra else 0)
        bounds.append((first, stop))
        first = stop
    return bounds


@register_pass
@dataclass(frozen=True)
class Shard(Pass):
    """Split the model over tp x pp ranks: attention heads, vocabulary and experts across tp, layers across pp.

    before: one program
    after:  one program per rank (rank = pp_rank * tp + tp_rank) with all_reduce / all_gather inside a tp group
            and send / recv between pipeline stages; weights are lazy slices.
    moe_tp * moe_ep must equal tp (0 = derived: both 0 means moe_tp=tp, i.e. experts split by intermediate size).
    Needs canonicalize and fuse-moe first.
    """

    name: ClassVar[str] = "shard"
    handles_ranks: ClassVar[bool] = True
    tp: int = 1
    pp: int = 1
    moe_tp: int = 0
    moe_ep: int = 0

    def validate_options(self) -> None:
        for key in ("tp", "pp"):
            if getattr(self, key) < 1:
                raise PassOptionError(f"shard: {key}={getattr(self, key)} must be at least 1")
        for key in ("moe_tp", "moe_ep"):
            if getattr(self, key) < 0:
                raise PassOptionError(f"shard: {key}={getattr(self, key)} must be at least 1 (or 0 to derive it)")
        self.moe_split()

    def moe_split(self) -> tuple[int, int]:
        """(moe_tp, moe_ep), with 0s derived from tp; raises if their product is not tp."""
        moe_tp, moe_ep = self.moe_tp, self.moe_ep
        if moe_tp == 0 and moe_ep == 0:
            moe_tp, moe_ep = self.tp, 1
        elif moe_tp == 0:
            moe_tp = self.tp // moe_ep if self.tp % moe_ep == 0 else 0
        elif moe_ep == 0:
            moe_ep = self.tp // moe_tp if self.tp % moe_tp == 0 else 0
        if moe_tp * moe_ep != self.tp:
            raise PassOptionError(
                f"shard: moe_tp * moe_ep must equal tp, got moe_tp={self.moe_tp} * moe_ep={self.moe_ep} != tp={self.tp}"
            )
        return moe_tp, moe_ep

    def requires(self, program: Program) -> None:
        if program.ranks:
            raise PreconditionError(f"the program is already sharded over {len(program.ranks)} ranks")
        counts = program.op_counts()
        if counts.get("aten.linear") or not counts.get("moec.linear"):
            raise PreconditionError("needs canonicalize first: the graph has no canonical moec.linear ops")
        if not counts.get("moec.moe") or counts.get("aten.topk"):
            raise PreconditionError("needs fuse-moe first: the graph has no fused moec.moe op per layer")

    def check(self, shape: ModelShape) -> tuple[int, int]:
        """Raises `ShardingError` naming the first size the options do not divide."""
        moe_tp, moe_ep = self.moe_split()
        tp = self.tp
        if shape.heads % tp:
            raise ShardingError(f"shard: tp={tp} does not divide the {shape.heads} attention heads")
        if shape.kv_heads % tp and tp % shape.kv_heads:
            raise ShardingError(f"shard: tp={tp} neither divides nor is a multiple of the {shape.kv_heads} kv heads")
        if shape.vocab % tp:
            raise ShardingError(f"shard: tp={tp} does not divide the vocabulary size {shape.vocab}")
        if shape.experts % moe_ep:
            raise ShardingError(f"shard: moe_ep={moe_ep} does not divide the {shape.experts} experts")
        if shape.intermediate % moe_tp:
            raise ShardingError(
                f"shard: moe_tp={moe_tp} does not divide the expert intermediate size {shape.intermediate}"
            )
        if self.pp > shape.layers:
            raise ShardingError(f"shard: pp={self.pp} is larger than the {shape.layers} layers")
        return moe_tp, moe_ep

    def run(self, program: Program) -> PassResult:
        shape = ModelShape.of(program)
        moe_tp, moe_ep = self.check(shape)
        stages = stage_layers(shape.layers, self.pp)
        ranks = tuple(
            _shard_rank(program, shape, RankLayout(rank, self.tp, self.pp, moe_tp, moe_ep, stages[rank // self.tp]))
            for rank in range(self.tp * self.pp)
        )
        result = program.clone()
        result.ranks = ranks
        result.attributes.update(tp=self.tp, pp=self.pp, moe_tp=moe_tp, moe_ep=moe_ep)
        collectives_per_rank = [sum(r.op_counts()[f"moec.{op}"] for op in ("all_reduce", "all_gather", "send", "recv"))
                                for r in ranks]
        stats = {
            "ranks": len(ranks),
            "collectives": sum(collectives_per_rank),
            "max_rank_weight_bytes": max(r.weight_bytes() for r in ranks),
        }
        return PassResult(result, len(ranks) > 1, stats)


# --- one rank -----------------------------------------------------------------------------------------------


@dataclass
class _RankRewriter:
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

    def slice_weight_node(self, node: torch.fx.Node, plan: tuple[Any, ...], build: Callable[[WeightExpr], WeightExpr]) -> None:
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


def _no_bias(linear: torch.fx.Node) -> None:
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    if bias is not None:
        raise ShardingError(f"shard: linear %{linear.name} has a bias; sharding biased projections is not supported")


def _shard_attention(rw: _RankRewriter, attention: torch.fx.Node, handled: set[torch.fx.Node]) -> None:
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
        _no_bias(linear)
        handled.add(linear)
    rw.after(output_linear, lambda n: rw.call(collectives.all_reduce, (n, layout.tp_group)))


def _shard_moe(rw: _RankRewriter, moe: torch.fx.Node) -> None:
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


def _shard_embedding(rw: _RankRewriter, embedding: torch.fx.Node) -> None:
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


def _shard_lm_head(rw: _RankRewriter, lm_head: torch.fx.Node) -> None:
    layout = rw.layout
    rows = rw.shape.vocab // layout.tp
    _no_bias(lm_head)
    rw.rows(lm_head.args[1], 0, layout.tp_rank * rows, (layout.tp_rank + 1) * rows)
    rw.after(lm_head, lambda n: rw.call(collectives.all_gather, (n, -1, layout.tp_group)))


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


def _cut_stage(rw: _RankRewriter) -> None:
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


def _lm_head(program: Program) -> torch.fx.Node | None:
    output = next(n for n in program.graph.nodes if n.op == "output")
    results = output.args[0]
    logits = results[0] if isinstance(results, (list, tuple)) else results
    return logits if isinstance(logits, torch.fx.Node) and logits.target == ops.linear else None


def _shard_rank(program: Program, shape: ModelShape, layout: RankLayout) -> Program:
    rank_program = program.clone()
    rw = _RankRewriter(rank_program, shape, layout)
    last_stage = layout.pp_rank == layout.pp - 1
    if layout.pp > 1:
        _cut_stage(rw)
    kv_heads = "split" if shape.kv_heads % layout.tp == 0 else f"replicated ({layout.tp} ranks > {shape.kv_heads})"
    if layout.tp > 1:
        handled: set[torch.fx.Node] = set()
        lm_head = _lm_head(rank_program) if last_stage else None
        for node in list(rw.graph.nodes):
            if node.target == ops.attention:
                _shard_attention(rw, node, handled)
            elif node.target == ops.moe:
                _shard_moe(rw, node)
            elif node.target == aten.embedding.default and is_weight(node.args[0]):
                _shard_embedding(rw, node)
        if lm_head is not None:
            _shard_lm_head(rw, lm_head)
            handled.add(lm_head)
        for node in rw.graph.nodes:
            if node.target == ops.linear and node not in handled:
                raise ShardingError(f"shard: linear %{node.name} is neither an attention projection nor the lm_head")
    rank_program.graph_module.recompile()
    # Re-derive every computed type from the (now sliced) weights: propagation keeps recorded values otherwise.
    for node in rank_program.graph.nodes:
        if node.op == "call_function":
            node.meta.pop("val", None)
    propagate_types(rank_program)
    rank_program.attributes.update(
        rank=layout.rank,
        tp=layout.tp,
        pp=layout.pp,
        tp_rank=layout.tp_rank,
        pp_rank=layout.pp_rank,
        moe_tp=layout.moe_tp,
        moe_ep=layout.moe_ep,
        moe_tp_rank=layout.moe_tp_rank,
        moe_ep_rank=layout.moe_ep_rank,
        layers=f"{layout.layers[0]}..{layout.layers[1] - 1}",
        kv_heads=kv_heads,
        returns_logits=last_stage,
    )
    return rank_program
