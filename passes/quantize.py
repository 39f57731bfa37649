"""`quantize-weights`: weight-only, symmetric INT8/INT4 quantization of the linears and the MoE experts.

before: %y = moec.linear(%x, %w: f32[O,I])
        %m = moec.moe(%x, %router, %w13: f32[E,2I,H], %w2: f32[E,H,I], top_k, normalization, activation)
after:  %w_q: i8[O,I] (int8) or u8[O,I/2] (int4) = weight quantize(w, precision, group_size)
        %w_scales: f32[O,G] = weight quantize_scales(w, precision, group_size)       (G = I/group_size, or 1)
        %y = moec.quantized_linear(%x, %w_q, %w_scales, None, precision, group_size)
        %m = moec.quantized_moe(%x, %router, %w13_q, %w13_scales, %w2_q, %w2_scales, top_k, normalization,
                                activation, precision, group_size[, expert_offset])

The router (inside the `moe` op), the norms and the embedding are never quantized; `lm_head` is kept unless
`quantize_lm_head=true`; `exclude` names more (see `QuantizeWeights`). The quantized weights are lazy
expressions over the float ones (`compiler.quantization.quantize_weight`): nothing is read or quantized at compile
time, and a backend materializes the compact codes and scales only.

Sharding: `quantize-weights` runs after `shard` (on every rank's program; each rank quantizes its own slice, so a
row-parallel slice gets scales from its own columns) and before or after `kv-cache`. `shard` refuses a quantized
program.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch.fx

from compiler import collectives, ops
from compiler.errors import PassOptionError, PreconditionError
from compiler.ir import Program
from compiler.pass_manager import NumericsBudget, Pass, PassResult, register_pass
from compiler.quantization import check_options, check_weight, quantize_weight
from compiler.rewrite import Rewriter, is_weight
from compiler.weights import WeightExpr

LM_HEAD = "lm_head"


def module_path(node: torch.fx.Node) -> str:
    """`layers.0.self_attn.q_proj`, `layers.0.mlp.experts`, `lm_head`: the module a linear or moe op came from
    (export's `model.model.` prefixes dropped); where the graph does not record it, `lm_head` for the linear whose
    result (or its all_gather, when sharded) the program returns, else its weight's name."""
    stack = list(node.meta.get("nn_module_stack", {}).values())
    if stack:
        return re.sub(r"^(model\.)+", "", stack[-1][0])
    returned = node
    if len(node.users) == 1 and next(iter(node.users)).target == collectives.all_gather:
        returned = next(iter(node.users))
    if any(user.op == "output" for user in returned.users):
        return LM_HEAD
    return node.args[1].name if isinstance(node.args[1], torch.fx.Node) else node.name


def pattern_matches(pattern: str, path: str) -> bool:
    """A pattern matches a run of whole dotted components of the path (globs allowed): `q_proj`, `layers.0`,
    `self_attn`, `layers.*.mlp.experts`."""
    return fnmatch.fnmatchcase(f".{path}.", f"*.{pattern}.*")


@dataclass(frozen=True)
class _Site:
    """One op the pass could rewrite."""

    node: torch.fx.Node
    path: str
    weights: tuple[torch.fx.Node, ...]  # the float weights to quantize (w13 and w2 for a moe)


def _sites(program: Program) -> Iterator[_Site]:
    for node in program.graph.nodes:
        if node.target == ops.linear:
            yield _Site(node, module_path(node), (node.args[1],))
        elif node.target == ops.moe:
            yield _Site(node, module_path(node), (node.args[2], node.args[3]))


class OpSelection:
    """What the quantizing passes share: which linear / moe ops their `exclude` patterns and `quantize_lm_head` keep
    float, and their preconditions checked on every rank. The pass dataclass declares the two option fields."""

    exclude: str
    quantize_lm_head: bool

    def check_exclude(self) -> None:
        if self.exclude and not all(self.exclude.split("|")):
            raise PassOptionError(f"{self.name}: exclude={self.exclude!r} has an empty pattern")  # type: ignore[attr-defined]

    @property
    def patterns(self) -> list[str]:
        return [pattern for pattern in self.exclude.split("|") if pattern]

    def excluded_by(self, path: str) -> str | None:
        """Why the op at `path` stays float (None when it is quantized)."""
        if path == LM_HEAD and not self.quantize_lm_head:
            return "lm_head is kept float unless quantize_lm_head=true"
        for pattern in self.patterns:
            if pattern_matches(pattern, path):
                return f"excluded by pattern {pattern!r}"
        return None

    def run(self, program: Program) -> PassResult:
        """`_run_one` on the program, or on each rank (each quantizes its own slices), stats summed over ranks."""
        if not program.ranks:
            return self._run_one(program)  # type: ignore[attr-defined]
        results = [self._run_one(rank) for rank in program.ranks]  # type: ignore[attr-defined]
        sharded = replace(program, ranks=tuple(result.program for result in results))
        stats: dict[str, Any] = {}
        for result in results:
            for key, value in result.stats.items():
                stats[key] = stats.get(key, 0) + value
        return PassResult(sharded, any(result.changed for result in results), stats)

    def require_on_every_rank(
        self,
        program: Program,
        requires_one: Callable[[Program], None],
        site_paths: Callable[[Program], set[str]],
    ) -> None:
        """`requires_one` on the program or each rank (errors name the rank), then every exclude pattern must match
        one of the ops `site_paths` lists."""
        programs = program.ranks or (program,)
        for index, each in enumerate(programs):
            where = f"rank {index}: " if program.ranks else ""
            try:
                requires_one(each)
            except PreconditionError as error:
                raise PreconditionError(f"{where}{error}") from None
        paths = set().union(*(site_paths(each) for each in programs))
        for pattern in self.patterns:
            if not any(pattern_matches(pattern, path) for path in paths):
                examples = ", ".join(sorted(paths)[:3])
                raise PreconditionError(
                    f"exclude pattern {pattern!r} matches no linear or moe op (they are: {examples}, ...)"
                )


@register_pass
@dataclass(frozen=True)
class QuantizeWeights(OpSelection, Pass):
    """Weight-only symmetric quantization of the linears and MoE experts (TensorRT-LLM's --use_weight_only).

    before: moec.linear(x, w: f32[O,I]);  moec.moe(x, router, w13, w2, ...)
    after:  moec.quantized_linear(x, w_q: i8[O,I] | u8[O,I/2], w_scales: f32[O,G], None, precision, group_size)
            moec.quantized_moe(x, router, w13_q, w13_scales, w2_q, w2_scales, ..., precision, group_size)
    precision=int8|int4; group_size=0 (one scale per output channel) or a power of two >= 16 (int4 group-wise as
    in AWQ/GPTQ layouts; int8 too). Routers and norms are never quantized; lm_head only with quantize_lm_head=true;
    exclude=PATTERN|PATTERN... keeps more ops float (a pattern matches dotted module path components, globs
    allowed: exclude=o_proj|layers.0). Runs once, after fuse-moe (and after shard); weights stay lazy.
    """

    name: ClassVar[str] = "quantize-weights"
    handles_ranks: ClassVar[bool] = True
    precision: Literal["int8", "int4"] = "int8"
    group_size: int = 0
    exclude: str = ""
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        self.validate_options()

    def validate_options(self) -> None:
        try:
            check_options(self.precision, self.group_size)
        except ValueError as error:
            raise PassOptionError(f"quantize-weights: {error}") from None
        self.check_exclude()

    # --- preconditions ---------------------------------------------------------------------------------------

    def requires(self, program: Program) -> None:
        self.require_on_every_rank(program, self._requires_one, lambda each: {site.path for site in _sites(each)})

    def _requires_one(self, program: Program) -> None:
        counts = program.op_counts()
        quantized = sum(1 for node in program.graph.nodes if node.target in ops.QUANTIZED_OPS)
        if quantized:
            raise PreconditionError(
                f"the program is already quantized ({quantized} quantized ops); quantize-weights runs once"
            )
        if counts.get("aten.linear"):
            raise PreconditionError("needs canonicalize first: the graph has ATen linears, not moec.linear")
        if counts.get("aten.topk"):
            raise PreconditionError(
                "needs fuse-moe first: a router (softmax -> topk) is not fused, and routers are never quantized"
            )
        for site in _sites(program):
            if self.excluded_by(site.path) is not None:
                continue
            for weight in site.weights:
                if not is_weight(weight):
                    raise PreconditionError(f"{site.path}: its weight %{weight.name} is computed, not a weight")
                expr: WeightExpr = weight.meta["weight"]
                try:
                    check_weight(expr.shape, self.precision, self.group_size)
                except ValueError as error:
                    raise PreconditionError(
                        f"{site.path}: weight %{weight.name} {expr.type_str}: {self.precision}: {error}"
                    ) from None

    # --- rewrite ---------------------------------------------------------------------------------------------

    def _run_one(self, program: Program) -> PassResult:
        result = program.clone()
        rewriter = Rewriter(result)
        rewriter._current_rule = self.name
        # A weight read by several ops (none in Mixtral, but allowed) is quantized once.
        quantized: dict[torch.fx.Node, tuple[torch.fx.Node, torch.fx.Node]] = {}
        stats = {"quantized_linear": 0, "quantized_moe": 0, "kept_float": 0, "float_bytes": 0, "quantized_bytes": 0}

        def quantize(weight: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
            if weight not in quantized:
                expr = weight.meta["weight"]
                qweight, scales = quantize_weight(expr, self.precision, self.group_size)
                quantized[weight] = (
                    rewriter.weight(f"{weight.name}_q", qweight),
                    rewriter.weight(f"{weight.name}_scales", scales),
                )
                stats["float_bytes"] += expr.nbytes
                stats["quantized_bytes"] += qweight.nbytes + scales.nbytes
            return quantized[weight]

        options = (self.precision, self.group_size)
        for site in list(_sites(result)):
            node = site.node
            if self.excluded_by(site.path) is not None:
                stats["kept_float"] += 1
                continue
            with result.graph.inserting_before(node):
                if node.target == ops.linear:
                    qweight, scales = quantize(node.args[1])
                    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
                    new = rewriter.call(ops.quantized_linear, (node.args[0], qweight, scales, bias, *options))
                    stats["quantized_linear"] += 1
                else:
                    w13, w2 = quantize(node.args[2]), quantize(node.args[3])
                    offset = node.args[7] if len(node.args) > 7 else node.kwargs.get("expert_offset", 0)
                    args = (*node.args[:2], *w13, *w2, *node.args[4:7], *options)
                    new = rewriter.call(ops.quantized_moe, args, {"expert_offset": offset} if offset else None)
                    stats["quantized_moe"] += 1
            new.meta["val"] = node.meta["val"]
            new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
            node.replace_all_uses_with(new)
            result.graph.erase_node(node)
        for weight in quantized:
            if not weight.users:
                result.graph.erase_node(weight)
        result.graph_module.recompile()
        return PassResult(result, bool(quantized), stats)

    def numerics_budget(self) -> NumericsBudget:
        """`--check-numerics`: the perplexity targets of BENCHMARKS.md (int8 1%, int4 8%); the logits' max relative
        error is only a loose net (one outlier position sets it: 0.07 for int8 and 0.35 for int4 on `tiny`, 0.21 for
        int8 on a `tiny` whose expert was broken first), so it is bounded by 0.5 and 1.0."""
        if self.precision == "int8":
            return NumericsBudget("quantization", max_rel_err=0.5, max_perplexity_change=0.01)
        return NumericsBudget("quantization", max_rel_err=1.0, max_perplexity_change=0.08)

    def explain(self, program: Program) -> list[str]:
        lines = []
        for each in program.ranks or (program,):
            for site in _sites(each):
                reason = self.excluded_by(site.path)
                if reason is not None:
                    lines.append(f"{site.path}: kept float: {reason}")
                    continue
                parts = []
                for weight in site.weights:
                    expr = weight.meta["weight"]
                    try:
                        qweight, scales = quantize_weight(expr, self.precision, self.group_size)
                    except ValueError as error:
                        parts.append(f"{expr.type_str} cannot be quantized: {error}")
                        continue
                    parts.append(f"{expr.type_str} -> {qweight.type_str} + scales {scales.type_str}")
                router = " (router kept float)" if site.node.target == ops.moe else ""
                lines.append(f"{site.path}: {self.precision}, group_size={self.group_size}: {'; '.join(parts)}{router}")
        # A sharded program: the union over ranks (tensor-parallel ranks print alike, pipeline stages add layers).
        return list(dict.fromkeys(lines)) or ["no linear or moe op to quantize"]
