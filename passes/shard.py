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
unsharded one. The rules, one module per region kind, are in `passes/sharding/`.

`shard` runs before `kv-cache`: sharding rewrites `moec.attention`, and a rank's caches must hold only its own kv
heads and layers, which `kv-cache` can size only after the split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx

from compiler import ops
from compiler.errors import PassOptionError, PreconditionError
from compiler.ir import Program
from compiler.pass_manager import Pass, PassResult, register_pass
from compiler.rewrite import is_weight
from compiler.verifier import propagate_types
from passes.sharding.attention import shard_attention
from passes.sharding.layout import ModelShape, RankLayout, RankRewriter, ShardingError
from passes.sharding.moe import shard_moe
from passes.sharding.pipeline import cut_stage, stage_layers
from passes.sharding.vocabulary import lm_head_of, shard_embedding, shard_lm_head

aten = torch.ops.aten


@register_pass
@dataclass(frozen=True)
class Shard(Pass):
    """Split the model over tp x pp ranks: attention heads, vocabulary and experts across tp, layers across pp.

    before: one program
    after:  one program per rank (rank = pp_rank * tp + tp_rank) with all_reduce / all_gather inside a tp group
            and send / recv between pipeline stages; weights are lazy slices.
    moe_tp * moe_ep must equal tp (0 = derived: both 0 means moe_tp=tp, i.e. experts split by intermediate size).
    Needs canonicalize and fuse-moe first, and must run before kv-cache and fuse-norm.
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
        if counts.get("moec.cached_attention") or counts.get("moec.rope_cached_attention"):
            raise PreconditionError(
                "shard must run before kv-cache: the graph already attends over KV caches (moec.cached_attention), "
                "whose heads and layers a rank could not split"
            )
        if counts.get("moec.quantized_linear") or counts.get("moec.quantized_moe"):
            raise PreconditionError("shard must run before quantize-weights: each rank quantizes its own weight slices")
        if counts.get("moec.fp8_linear") or counts.get("moec.fp8_moe"):
            raise PreconditionError("shard must run before quantize-fp8: each rank quantizes its own weight slices")
        if counts.get("moec.add_rms_norm"):
            raise PreconditionError(
                "shard must run before fuse-norm: pipeline stages are cut between a residual add and the next "
                "layer's input norm, which moec.add_rms_norm fuses (run fuse-norm after shard: each rank fuses its own)"
            )
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


def _shard_rank(program: Program, shape: ModelShape, layout: RankLayout) -> Program:
    rank_program = program.clone()
    rw = RankRewriter(rank_program, shape, layout)
    last_stage = layout.pp_rank == layout.pp - 1
    if layout.pp > 1:
        cut_stage(rw)
    kv_heads = "split" if shape.kv_heads % layout.tp == 0 else f"replicated ({layout.tp} ranks > {shape.kv_heads})"
    if layout.tp > 1:
        handled: set[torch.fx.Node] = set()
        lm_head = lm_head_of(rank_program) if last_stage else None
        for node in list(rw.graph.nodes):
            if node.target == ops.attention:
                shard_attention(rw, node, handled)
            elif node.target == ops.moe:
                shard_moe(rw, node)
            elif node.target == aten.embedding.default and is_weight(node.args[0]):
                shard_embedding(rw, node)
        if lm_head is not None:
            shard_lm_head(rw, lm_head)
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
