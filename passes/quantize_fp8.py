"""`quantize-fp8`: FP8 (E4M3) post-training quantization of the linears, the MoE experts and optionally the KV cache.

before (after calibrate):
        %y = moec.linear(%x, %w: f32[O,I])
        %m = moec.moe(%x, %router, %w13: f32[E,2I,H], %w2: f32[E,H,I], top_k, normalization, activation)
        %a = moec.cached_attention(%q, %k, %v, %kv_cache_0_key: f32[B,Hkv,M,D], %kv_cache_0_value, %pos, scale, window)
after:  %w_fp8: f8e4m3[O,I] = weight fp8_quantize(w)        %w_scale: f32[] = weight fp8_scale(w)
        %y = moec.fp8_linear(%x, %w_fp8, %w_scale, input_scale, None)
        %w13_fp8: f8e4m3[E,2I,H] = weight stack(fp8_quantize(w13[e]) ...)   %w13_scale: f32[E]   (and w2's)
        %m = moec.fp8_moe(%x, %router, %w13_fp8, %w13_scale, %w2_fp8, %w2_scale, top_k, normalization, activation,
                          w13_input_scale, w2_input_scale[, expert_offset])
        kv_cache=true:  %kv_cache_0_key: f8e4m3[B,Hkv,M,D] = kv cache (...);  moec.cached_attention(...,
                        k_scale=..., v_scale=...)

Weight scales are computed from the weights, lazily (`compiler.fp8.quantize_weight`: nothing is read or quantized at
compile time); activation and cache scales are static, amax / 448 of the ranges `calibrate` recorded (an error
without them). The router (inside the moe op), the norms and the embedding stay float; `lm_head` is kept unless
`quantize_lm_head=true`; `exclude` names more, as in `quantize-weights`.

Order: after calibrate; kv_cache=true after kv-cache too (before or after fuse-rope: `moec.rope_cached_attention`
takes the same cache scales, calibrated on the cached_attention it replaced). Sharding: after `shard` (each rank
computes its weight scales from its own slices, like `quantize-weights`; activation scales come from the unsharded
calibration, which covers every rank's slice). `shard` refuses a quantized program; quantizing twice (fp8 after quantize-weights or
after itself) is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.fx
from torch._guards import detect_fake_mode

from compiler import fp8, ops
from compiler.errors import PassOptionError, PreconditionError
from compiler.ir import Program
from compiler.pass_manager import NumericsBudget, Pass, PassResult, register_pass
from compiler.rewrite import Rewriter, is_weight
from passes.quantize import OpSelection, module_path


def _sites(program: Program) -> list[torch.fx.Node]:
    return [node for node in program.graph.nodes if node.target in (ops.linear, ops.moe)]


def _cached_attentions(program: Program) -> list[torch.fx.Node]:
    # fuse-rope's op too: its keys' range was calibrated (after rope) on the cached_attention it replaced, same module.
    return [node for node in program.graph.nodes if node.target in ops.CACHED_ATTENTIONS]


@register_pass
@dataclass(frozen=True)
class QuantizeFP8(OpSelection, Pass):
    """FP8 E4M3 weights with per-tensor scales and static activation scales (ModelOpt's --qformat fp8).

    before: moec.linear(x, w);  moec.moe(x, router, w13, w2, ...);  [cached_attention over float caches]
    after:  moec.fp8_linear(x, w: f8e4m3[O,I], w_scale: f32[], input_scale, None)
            moec.fp8_moe(x, router, w13: f8e4m3, w13_scales: f32[E], w2: f8e4m3, w2_scales: f32[E], ...,
                         w13_input_scale, w2_input_scale)       (one scale per expert; its w1 and w3 share it)
            kv_cache=true: f8e4m3 KV caches, cached_attention(..., k_scale=, v_scale=) per layer
    Activation and cache scales are amax / 448 from calibrate (run it first); weight scales come from the weights,
    lazily. Routers and norms stay float; lm_head only with quantize_lm_head=true; exclude=PATTERN|... keeps more ops
    float (as quantize-weights). Runs once, after calibrate (and after shard; kv_cache=true after kv-cache).
    """

    name: ClassVar[str] = "quantize-fp8"
    handles_ranks: ClassVar[bool] = True
    kv_cache: bool = False
    exclude: str = ""
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        self.validate_options()

    def validate_options(self) -> None:
        for key in ("kv_cache", "quantize_lm_head"):
            if not isinstance(getattr(self, key), bool):
                raise PassOptionError(f"quantize-fp8: {key}={getattr(self, key)!r} must be true or false")
        self.check_exclude()

    # --- preconditions ---------------------------------------------------------------------------------------

    def requires(self, program: Program) -> None:
        self.require_on_every_rank(program, self._requires_one, lambda each: {module_path(n) for n in _sites(each)})

    def _requires_one(self, program: Program) -> None:
        quantized = [node for node in program.graph.nodes if node.target in ops.QUANTIZED_OPS]
        fp8_caches = [n for n in program.cache_nodes() if n.meta["kv_cache"].dtype == fp8.FP8_DTYPE]
        if quantized or fp8_caches:
            what = f"{len(quantized)} quantized ops" if quantized else f"{len(fp8_caches)} fp8 KV caches"
            ran = "quantize-fp8" if fp8_caches or quantized[0].target in ops.FP8_OPS else "quantize-weights"
            raise PreconditionError(f"the program is already quantized ({what}: {ran} ran); quantize once")
        counts = program.op_counts()
        if counts.get("aten.linear"):
            raise PreconditionError("needs canonicalize first: the graph has ATen linears, not moec.linear")
        if counts.get("aten.topk"):
            raise PreconditionError(
                "needs fuse-moe first: a router (softmax -> topk) is not fused, and routers are never quantized"
            )
        if program.calibration is None:
            raise PreconditionError(
                "needs calibrate first: static fp8 activation scales come from calibrated ranges, and the program has "
                "none (e.g. calibrate,quantize-fp8)"
            )
        if self.kv_cache and not program.cache_nodes():
            raise PreconditionError(
                "kv_cache=true needs kv-cache first: the program has no KV caches to store in fp8 (e.g. "
                "kv-cache,calibrate,quantize-fp8{kv_cache=true})"
            )
        for node in _sites(program):
            path = module_path(node)
            if self.excluded_by(path) is not None:
                continue
            weights = (node.args[1],) if node.target == ops.linear else (node.args[2], node.args[3])
            for weight in weights:
                if not is_weight(weight):
                    raise PreconditionError(f"{path}: its weight %{weight.name} is computed, not a weight")
            roles = ("input",) if node.target == ops.linear else ("input", "intermediate")
            self._check_ranges(program, path, roles)
        if self.kv_cache:
            for node in _cached_attentions(program):
                self._check_ranges(program, module_path(node), ("key", "value"))

    @staticmethod
    def _check_ranges(program: Program, path: str, roles: tuple[str, ...]) -> None:
        assert program.calibration is not None
        missing = [role for role in roles if program.calibration.amax(path, role) is None]
        if missing:
            raise PreconditionError(
                f"{path}: calibrate recorded no {' or '.join(missing)} range for it (the op did not exist when "
                "calibrate ran: run calibrate after the passes that create it)"
            )

    # --- rewrite ---------------------------------------------------------------------------------------------

    def _run_one(self, program: Program) -> PassResult:
        result = program.clone()
        calibration = result.calibration
        assert calibration is not None
        rewriter = Rewriter(result)
        rewriter._current_rule = self.name
        quantized: dict[tuple[torch.fx.Node, bool], tuple[torch.fx.Node, torch.fx.Node]] = {}
        stats = {"fp8_linear": 0, "fp8_moe": 0, "kept_float": 0, "float_bytes": 0, "quantized_bytes": 0}

        def quantize(weight: torch.fx.Node, per_expert: bool) -> tuple[torch.fx.Node, torch.fx.Node]:
            if (weight, per_expert) not in quantized:  # a weight read by several ops is quantized once
                expr = weight.meta["weight"]
                codes, scale = fp8.quantize_weight(expr, per_expert)
                quantized[weight, per_expert] = (
                    rewriter.weight(f"{weight.name}_fp8", codes),
                    rewriter.weight(f"{weight.name}_scale", scale),
                )
                stats["float_bytes"] += expr.nbytes
                stats["quantized_bytes"] += codes.nbytes + scale.nbytes
            return quantized[weight, per_expert]

        def scale(path: str, role: str) -> float:
            amax = calibration.amax(path, role)
            assert amax is not None
            return fp8.scale_of_amax(amax)

        for node in _sites(result):
            path = module_path(node)
            if self.excluded_by(path) is not None:
                stats["kept_float"] += 1
                continue
            with result.graph.inserting_before(node):
                if node.target == ops.linear:
                    codes, weight_scale = quantize(node.args[1], per_expert=False)
                    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
                    args = (node.args[0], codes, weight_scale, scale(path, "input"), bias)
                    new = rewriter.call(ops.fp8_linear, args)
                    stats["fp8_linear"] += 1
                else:
                    w13, w2 = quantize(node.args[2], per_expert=True), quantize(node.args[3], per_expert=True)
                    offset = node.args[7] if len(node.args) > 7 else node.kwargs.get("expert_offset", 0)
                    input_scales = (scale(path, "input"), scale(path, "intermediate"))
                    args = (*node.args[:2], *w13, *w2, *node.args[4:7], *input_scales)
                    new = rewriter.call(ops.fp8_moe, args, {"expert_offset": offset} if offset else None)
                    stats["fp8_moe"] += 1
            new.meta["val"] = node.meta["val"]
            new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
            node.replace_all_uses_with(new)
            result.graph.erase_node(node)
        for weight, _ in quantized:
            if not weight.users:
                result.graph.erase_node(weight)
        fp8_layers = self._quantize_caches(result, scale) if self.kv_cache else 0
        if self.kv_cache:
            stats["fp8_kv_layers"] = fp8_layers
            stats["cache_bytes_per_sequence"] = result.cache_bytes_per_sequence()
        result.graph_module.recompile()
        return PassResult(result, bool(quantized) or fp8_layers > 0, stats)

    @staticmethod
    def _quantize_caches(program: Program, scale: Callable[[str, str], float]) -> int:
        """float8_e4m3fn caches, and each cached attention's static per-layer k/v scales; returns the layers."""
        attentions = _cached_attentions(program)
        for attention in attentions:
            path = module_path(attention)
            attention.kwargs = {**attention.kwargs, "k_scale": scale(path, "key"), "v_scale": scale(path, "value")}
            for cache in attention.args[3:5]:
                value = cache.meta["val"]
                with detect_fake_mode([value]):
                    fp8_value = torch.empty_like(value, dtype=fp8.FP8_DTYPE)
                spec = replace(cache.meta["kv_cache"], dtype=fp8.FP8_DTYPE)
                cache.meta = {**cache.meta, "val": fp8_value, "kv_cache": spec}
        return len(attentions)

    def numerics_budget(self) -> NumericsBudget:
        """`--check-numerics`: issue #13's perplexity target (fp8 within 2% of float); the logits' max relative error
        is only a loose net (one outlier position sets it)."""
        return NumericsBudget("quantization", max_rel_err=0.5, max_perplexity_change=0.02)

    def explain(self, program: Program) -> list[str]:
        lines = []
        for each in program.ranks or (program,):
            calibration = each.calibration
            for node in _sites(each):
                path = module_path(node)
                reason = self.excluded_by(path)
                if reason is not None:
                    lines.append(f"{path}: kept float: {reason}")
                    continue
                weights = (node.args[1],) if node.target == ops.linear else (node.args[2], node.args[3])
                parts = []
                for weight in weights:
                    expr = weight.meta["weight"]
                    codes, scales = fp8.quantize_weight(expr, per_expert=node.target == ops.moe)
                    parts.append(f"{expr.type_str} -> {codes.type_str} + scale {scales.type_str}")
                roles = ("input",) if node.target == ops.linear else ("input", "intermediate")
                ranges = [(role, calibration.amax(path, role) if calibration else None) for role in roles]
                activations = ", ".join(
                    f"{role} scale {fp8.scale_of_amax(amax):.4g} (amax {amax:.4g})" if amax is not None
                    else f"{role}: not calibrated" for role, amax in ranges
                )
                router = " (router kept float)" if node.target == ops.moe else ""
                lines.append(f"{path}: fp8: {'; '.join(parts)}; {activations}{router}")
            if self.kv_cache:
                for node in _cached_attentions(each):
                    path = module_path(node)
                    amaxes = [calibration.amax(path, role) if calibration else None for role in ("key", "value")]
                    text = ", ".join(
                        f"{role} scale {fp8.scale_of_amax(amax):.4g}" if amax is not None else f"{role}: not calibrated"
                        for role, amax in zip(("key", "value"), amaxes)
                    )
                    lines.append(f"{path}: fp8 KV cache, {text}")
        return list(dict.fromkeys(lines)) or ["no linear or moe op to quantize"]
