"""`fuse-rope`: the rotary embedding of q and k moves into the cached attention that reads them.

before (after kv-cache; per layer):
    %rope = moec.rope(%q, %cos, %sin)             # q's only user is the attention
    %rope_1 = moec.rope(%k, %cos, %sin)           # so is k's; both read the same cos and sin
    %a = moec.cached_attention(%rope, %rope_1, %v, %kv_cache_i_key, %kv_cache_i_value, %cache_position, scale,
                               window[, k_scale=, v_scale=])
after:
    %a = moec.rope_cached_attention(%q, %k, %v, %kv_cache_i_key, %kv_cache_i_value, %cache_position, %cos, %sin,
                                    scale, window[, k_scale=, v_scale=])

The fused op is exactly rope then cached_attention (compiler/ops.py): the CPU reference computes just that, so the
logits are bit-identical. On CUDA a decode step's attention kernel rotates q as it loads it and the step's k before
it writes it into the cache, so the layer's two rope launches disappear; a prefill runs the rope kernel and then the
prefill kernels, as unfused (no gain, no loss). ONNX gets the rope lowering, then the cached attention's.

Left alone, and named by `--explain fuse-rope`: an attention whose q or k is not a `moec.rope`, a rope with users
besides the attention (its rotated value must stay), ropes of different cos/sin, and `moec.attention` (no KV cache
to write the rotated k into: run kv-cache first). Order: after `kv-cache` (and `shard`, which runs before it), and
after `calibrate` (which records the rotated keys and refuses a fused program); before or after `fuse-qkv`,
`fuse-norm`, `quantize-weights` and `quantize-fp8` (whose fp8 KV caches the fused op takes as cached_attention
does). Not in the default pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from compiler import ops
from compiler.errors import PreconditionError
from compiler.ir import Program, op_name
from compiler.pass_manager import Pass, PassResult, register_pass
from compiler.rewrite import MatchFailure, Rewriter, infer_value, layer_of

RULE = "fuse-rope"
_CACHE_SCALES = ("k_scale", "v_scale")


class AlreadyFused(MatchFailure):
    """The attention is already this pass's moec.rope_cached_attention."""


@dataclass
class RopeMatch:
    """A cached attention and the ropes of its q and k."""

    attention: torch.fx.Node
    q_rope: torch.fx.Node
    k_rope: torch.fx.Node


def _describe(value: object) -> str:
    if isinstance(value, torch.fx.Node):
        return f"%{value.name} ({op_name(value)})" if value.op == "call_function" else f"the input %{value.name}"
    return repr(value)


def _rope_of(attention: torch.fx.Node, operand: object, role: str) -> torch.fx.Node:
    """The moec.rope that computes `operand` for `attention` alone; MatchFailure saying why not."""
    if not (isinstance(operand, torch.fx.Node) and operand.target == ops.rope):
        raise MatchFailure(f"its {role} operand {_describe(operand)} is not a moec.rope")
    others = [user for user in operand.users if user is not attention]
    if others or list(attention.args).count(operand) > 1:
        users = ", ".join(f"%{user.name}" for user in others) or f"%{attention.name} twice"
        raise MatchFailure(f"the {role} rope %{operand.name} has other users ({users}): its rotated value must stay")
    return operand


def match_rope(attention: torch.fx.Node) -> RopeMatch:
    """The q and k ropes of a cached attention; raises MatchFailure saying why they cannot move into it."""
    if attention.target == ops.rope_cached_attention:
        raise AlreadyFused("already fused")
    if attention.target == ops.attention:
        raise MatchFailure(
            "moec.attention reads no KV cache (fuse-rope fuses into moec.cached_attention: run kv-cache first)"
        )
    arguments = ops.named_arguments(attention.target, attention.args, attention.kwargs)
    q_rope = _rope_of(attention, arguments["q"], "q")
    k_rope = _rope_of(attention, arguments["k"], "k")
    q_rotary = ops.named_arguments(ops.rope, q_rope.args, q_rope.kwargs)
    k_rotary = ops.named_arguments(ops.rope, k_rope.args, k_rope.kwargs)
    if (q_rotary["cos"], q_rotary["sin"]) != (k_rotary["cos"], k_rotary["sin"]):
        pairs = [", ".join(_describe(rotary[name]) for name in ("cos", "sin")) for rotary in (q_rotary, k_rotary)]
        raise MatchFailure(f"the q and k ropes read different cos/sin (q: {pairs[0]}; k: {pairs[1]})")
    return RopeMatch(attention, q_rope, k_rope)


def _attentions(program: Program) -> list[torch.fx.Node]:
    return [node for node in program.graph.nodes if node.target in (ops.attention, *ops.CACHED_ATTENTIONS)]


def _matches(program: Program) -> list[tuple[torch.fx.Node, RopeMatch | MatchFailure]]:
    """Every attention in graph order, with its match or the reason it does not fuse."""
    results: list[tuple[torch.fx.Node, RopeMatch | MatchFailure]] = []
    for attention in _attentions(program):
        try:
            results.append((attention, match_rope(attention)))
        except MatchFailure as failure:
            results.append((attention, failure))
    return results


def _fuse(rewriter: Rewriter, match: RopeMatch) -> None:
    graph, attention = rewriter.graph, match.attention
    arguments = ops.named_arguments(attention.target, attention.args, attention.kwargs)
    rotary = ops.named_arguments(ops.rope, match.q_rope.args, match.q_rope.kwargs)
    args = (
        match.q_rope.args[0], match.k_rope.args[0], *(arguments[name] for name in ("v", "k_cache", "v_cache")),
        arguments["cache_position"], rotary["cos"], rotary["sin"], arguments["scale"], arguments["sliding_window"],
    )
    # The fp8 cache scales `quantize-fp8{kv_cache=true}` set travel as they were given: keywords, left out at 1.
    scales = {name: arguments[name] for name in _CACHE_SCALES if arguments[name] != 1.0}
    # At the attention: every operand (the ropes' inputs included) dominates it, and its users follow it.
    with graph.inserting_before(attention):
        fused = rewriter.call(ops.rope_cached_attention, args, scales)
    fused.meta["nn_module_stack"] = attention.meta.get("nn_module_stack", {})
    fused.meta["val"] = infer_value(fused)
    attention.replace_all_uses_with(fused)
    graph.erase_node(attention)
    graph.erase_node(match.q_rope)
    graph.erase_node(match.k_rope)


@register_pass
@dataclass(frozen=True)
class FuseRope(Pass):
    """Move each layer's q and k rope into its cached attention: one moec.rope_cached_attention.

    before: %q' = rope(%q, %cos, %sin); %k' = rope(%k, %cos, %sin); cached_attention(%q', %k', %v, caches, ...)
    after:  rope_cached_attention(%q, %k, %v, caches, %cache_position, %cos, %sin, scale, window)
    On CUDA the decode kernel rotates q and the new k itself (two launches fewer per layer); prefill is unchanged.
    Run after kv-cache and calibrate (which refuses a fused program). Not fused: a q or k that is not a rope, a rope
    with other users, ropes of different cos/sin, attention without a KV cache. No options; not in the default
    pipeline.
    """

    name = "fuse-rope"

    def requires(self, program: Program) -> None:
        counts = program.op_counts()
        if not counts.get("moec.cached_attention") and not counts.get("moec.rope_cached_attention"):
            raise PreconditionError(
                "needs kv-cache first: fuse-rope moves the rotary embedding into moec.cached_attention, and the graph "
                "has none"
            )

    def run(self, program: Program) -> PassResult:
        result = program.clone()
        planned = _matches(result)
        rewriter = Rewriter(result)
        rewriter._current_rule = RULE
        fused = [match for _, match in planned if isinstance(match, RopeMatch)]
        for match in fused:
            _fuse(rewriter, match)
        result.graph_module.recompile()
        already = sum(1 for _, match in planned if isinstance(match, AlreadyFused))
        stats = {"fused": len(fused), "not_fused": len(planned) - len(fused) - already, "already_fused": already}
        return PassResult(result, bool(fused), stats)

    def explain(self, program: Program) -> list[str]:
        if program.ranks:  # the pass runs on each rank's program, not on the unsharded graph a sharded one keeps
            return [f"rank {index}: {line}" for index, rank in enumerate(program.ranks) for line in self.explain(rank)]
        lines = []
        for attention, match in _matches(program):
            if isinstance(match, RopeMatch):
                lines.append(f"{layer_of(attention)}: fused (%{match.q_rope.name}, %{match.k_rope.name} into "
                             f"%{attention.name})")
            elif isinstance(match, AlreadyFused):
                lines.append(f"{layer_of(attention)}: {match}")
            else:
                lines.append(f"{layer_of(attention)}: not fused: {match}")
        return lines or ["fuse-rope: no attention found"]
