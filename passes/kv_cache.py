"""`kv-cache`: attention over a per-layer key/value cache, so that decoding a token costs one position, not all.

before (after canonicalize; every layer reads the same rotary cos/sin):
    %input_ids: i64[batch,seq] = input
    %arange: i64[seq] = aten.arange(%seq); %pos: i64[1,seq] = aten.unsqueeze(%arange, 0) ... %cos: f32[1,seq,D]
    %a = moec.attention(moec.rope(%q, %cos, %sin), moec.rope(%k, %cos, %sin), %v, scale, window)
after:
    %input_ids: i64[batch,seq] = input
    %cache_position: i64[batch] = input                     # tokens already cached per sequence
    %kv_cache_0_key: f32[batch,Hkv,M,D] = kv cache (layer 0 key, max_seq M)      (and _value; per layer)
    %pos: i64[batch,seq] = aten.add(aten.unsqueeze(%cache_position, 1), %arange) ... %cos: f32[batch,seq,D]
    %a = moec.cached_attention(%q', %k', %v, %kv_cache_0_key, %kv_cache_0_value, %cache_position, scale, window)

One program serves prefill (seq > 1 from cache_position 0, or a chunk) and decode (seq == 1): sequence b's tokens
sit at absolute positions cache_position[b] + [0, seq), which both the rotary embedding and the cache slots use
(see `moec.cached_attention` in compiler/ops.py). The caches are inputs the runtime allocates once and the op
updates in place. Run it after `canonicalize` (the rotary source must be canonical) and, for a sharded model,
after `shard`: each rank then caches only its own kv heads and layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx
from torch._guards import detect_fake_mode

from compiler import ops
from compiler.errors import PassOptionError, PreconditionError
from compiler.ir import KVCacheSpec, Program
from compiler.pass_manager import EXACT, NumericsBudget, Pass, PassResult, register_pass
from compiler.rewrite import create_node, layer_of
from compiler.verifier import propagate_types

aten = torch.ops.aten
RULE = "kv-cache"
# The default cache length when the config allows more: Mixtral's 32768 positions would cost 4 GiB of bf16 cache
# per sequence for Mixtral-8x7B; 4096 (512 MiB) is what a serving default can afford. `max_seq=N` overrides it.
MAX_SEQ_CAP = 4096
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ARANGES = (aten.arange.default, aten.arange.start, aten.arange.start_step)
# ATen ops of Hugging Face's eager attention that only `canonicalize` folds into `moec.attention`.
_EAGER_ATTENTION_OPS = (aten.softmax.int, aten._softmax.default)


class RotarySourceError(PreconditionError):
    """The rotary embedding's positions are not the `arange(seq)[None]` this pass knows how to offset."""


def _is_cached(program: Program) -> bool:
    return bool(program.cache_nodes()) or any(n.target in ops.CACHED_ATTENTIONS for n in program.graph.nodes)


def _attentions(program: Program) -> list[torch.fx.Node]:
    return [n for n in program.graph.nodes if n.target == ops.attention]


def _attention_operands(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node, float, int]:
    """(q, k, v, scale, sliding_window) of a `moec.attention` node, whether given positionally or by keyword."""
    names = ("q", "k", "v", "scale", "sliding_window")
    values = dict(zip(names, node.args))
    values.update(node.kwargs)
    return values["q"], values["k"], values["v"], float(values["scale"]), int(values.get("sliding_window", 0))


def _layer_index(node: torch.fx.Node, fallback: int) -> int:
    match = re.fullmatch(r"layers\.(\d+)", layer_of(node))
    return int(match.group(1)) if match else fallback


def _ancestors(roots: list[torch.fx.Node]) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    pending = list(roots)
    while pending:
        node = pending.pop()
        if node not in seen:
            seen.add(node)
            pending.extend(node.all_input_nodes)
    return seen


def _descendants(root: torch.fx.Node) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    pending = [root]
    while pending:
        node = pending.pop()
        if node not in seen:
            seen.add(node)
            pending.extend(user for user in node.users if user.op == "call_function")
    return seen


def _same_size(a: object, b: object) -> bool:
    """Two sizes are the same symbol or the same integer (comparing SymInts with == would add a guard)."""
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return not isinstance(a, torch.SymInt) and not isinstance(b, torch.SymInt) and a == b


def _rotary_positions(program: Program, input_ids: torch.fx.Node) -> torch.fx.Node:
    """The `unsqueeze(arange(seq), 0)` node ([1, seq] positions) that every rope's cos/sin is computed from."""
    ropes = [n for n in program.graph.nodes if n.target == ops.rope]
    sources = _ancestors([arg for rope in ropes for arg in rope.args[1:3]])
    aranges = [n for n in sources if n.target in _ARANGES]
    if len(aranges) != 1:
        raise RotarySourceError(f"rope's cos/sin derive from {len(aranges)} aranges, expected one arange(seq)")
    (arange,) = aranges
    start = 0 if arange.target == aten.arange.default else arange.args[0]
    step = arange.args[2] if arange.target == aten.arange.start_step else 1
    value, seq = arange.meta.get("val"), input_ids.meta["val"].shape[1]
    if start != 0 or step != 1 or value is None or value.dim() != 1 or not _same_size(value.shape[0], seq):
        raise RotarySourceError("rope's positions are not arange(seq) over the input's sequence")
    users = [user for user in arange.users if user in sources]
    if len(users) != 1 or users[0].target != aten.unsqueeze.default or users[0].args[1] != 0:
        raise RotarySourceError("rope's positions are not arange(seq)[None] (a [1, seq] position_ids)")
    return users[0]


def _check_canonical(program: Program) -> None:
    """Raises PreconditionError when attention or its rotary embedding is not canonical yet."""
    if any(n.target in _EAGER_ATTENTION_OPS for n in program.graph.nodes) and not _attentions(program):
        raise PreconditionError("needs canonicalize first: attention is still Hugging Face's eager ATen form")
    for node in _attentions(program):
        q, k, _, _, _ = _attention_operands(node)
        if q.target != ops.rope or k.target != ops.rope:
            raise PreconditionError(
                f"needs canonicalize first: the queries and keys of attention %{node.name} ({layer_of(node)}) "
                "are not moec.rope outputs"
            )


@register_pass
@dataclass(frozen=True)
class KVCache(Pass):
    """Attend over per-layer KV caches: one program for prefill and decode, caches updated in place.

    before: %a = moec.attention(rope(%q, %cos, %sin), rope(%k, %cos, %sin), %v, scale, window)
            with cos/sin of positions arange(seq)[None]
    after:  inputs input_ids, cache_position[batch], kv_cache_{i}_key/_value[batch, kv_heads, max_seq, head_dim];
            positions cache_position[:, None] + arange(seq) (cos/sin [batch, seq, D]);
            %a = moec.cached_attention(%q', %k', %v, %kv_cache_i_key, %kv_cache_i_value, %cache_position, scale, window)
    Options: max_seq (0 = the config's max_position_embeddings, at most 4096), dtype=auto|float32|float16|bfloat16
    (auto = the keys' dtype). Run after canonicalize, and after shard for a sharded model.
    """

    name = "kv-cache"
    max_seq: int = 0
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"

    def __post_init__(self) -> None:
        self.validate_options()

    def validate_options(self) -> None:
        if not isinstance(self.max_seq, int) or isinstance(self.max_seq, bool) or self.max_seq < 0:
            raise PassOptionError(f"kv-cache: max_seq={self.max_seq!r} must be a positive integer (0 = the default)")
        if self.dtype != "auto" and self.dtype not in CACHE_DTYPES:
            raise PassOptionError(f"kv-cache: dtype={self.dtype!r} must be one of auto, {', '.join(CACHE_DTYPES)}")

    def numerics_budget(self) -> NumericsBudget:
        """`--check-numerics`: exact, except that caches narrower than the keys round them (on float32 `tiny`:
        float16 caches move the logits by 8e-4 of their largest magnitude, bfloat16 ones by 3e-3)."""
        if self.dtype in ("float16", "bfloat16"):
            return NumericsBudget("cache rounding", max_rel_err=2e-2, max_perplexity_change=0.01)
        return EXACT

    def cache_length(self, program: Program) -> int:
        """The cache length this pass gives `program`: the option, or the config's limit capped at MAX_SEQ_CAP."""
        if self.max_seq:
            return self.max_seq
        configured = getattr(program.config, "max_position_embeddings", None) or MAX_SEQ_CAP
        return min(int(configured), MAX_SEQ_CAP)

    def requires(self, program: Program) -> None:
        if _is_cached(program):
            return  # already cached: run() reports changed=False
        _check_canonical(program)
        if not _attentions(program):
            return
        inputs = program.input_nodes()
        if [n.name for n in inputs] != ["input_ids"]:
            raise PreconditionError(f"expects one runtime input input_ids, got {', '.join(n.name for n in inputs)}")
        _rotary_positions(program, inputs[0])

    def run(self, program: Program) -> PassResult:
        result = program.clone()
        attentions = _attentions(result)
        if _is_cached(result) or not attentions:
            reason = "already cached" if _is_cached(result) else "no attention"
            return PassResult(result, False, {"cached_layers": 0, "skipped": reason})
        self.requires(result)
        graph = result.graph
        (input_ids,) = result.input_nodes()
        ids_value = input_ids.meta["val"]
        fake_mode = detect_fake_mode([ids_value])
        batch = ids_value.shape[0]
        max_seq = self.cache_length(result)

        with graph.inserting_after(input_ids):
            cache_position = graph.placeholder("cache_position")
        with fake_mode:
            cache_position.meta = {
                "val": torch.empty((batch,), dtype=torch.int64, device="meta"),
                "moec_rule": RULE,
            }
        last_input = cache_position
        replacements: list[tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]] = []
        specs: list[KVCacheSpec] = []
        for index, attention in enumerate(attentions):
            layer = _layer_index(attention, index)
            _, k, _, _, _ = _attention_operands(attention)
            key_value = k.meta["val"]
            dtype = key_value.dtype if self.dtype == "auto" else CACHE_DTYPES[self.dtype]
            caches = []
            for kind in ("key", "value"):
                spec = KVCacheSpec(layer, kind, int(key_value.shape[1]), max_seq, int(key_value.shape[3]), dtype)
                with graph.inserting_after(last_input):
                    cache = graph.placeholder(f"kv_cache_{layer}_{kind}")
                with fake_mode:
                    value = torch.zeros((batch, *spec.shape_per_sequence), dtype=dtype, device="meta")
                cache.meta = {"val": value, "kv_cache": spec, "moec_rule": RULE}
                caches.append(cache)
                specs.append(spec)
                last_input = cache
            replacements.append((attention, caches[0], caches[1]))

        positions = _rotary_positions(result, input_ids)
        with graph.inserting_before(positions):
            offsets = create_node(graph, aten.unsqueeze.default, (cache_position, 1), None, RULE)
            absolute = create_node(graph, aten.add.Tensor, (offsets, positions.args[0]), None, RULE)
        absolute._rename("position_ids")  # what Hugging Face calls these positions
        absolute.meta["nn_module_stack"] = positions.meta.get("nn_module_stack", {})
        positions.replace_all_uses_with(absolute)
        graph.erase_node(positions)

        for attention, key_cache, value_cache in replacements:
            q, k, v, scale, window = _attention_operands(attention)
            with graph.inserting_before(attention):
                cached = create_node(
                    graph,
                    ops.cached_attention,
                    (q, k, v, key_cache, value_cache, cache_position, scale, window),
                    None,
                    RULE,
                )
            cached.meta["val"] = attention.meta["val"]
            cached.meta["nn_module_stack"] = attention.meta.get("nn_module_stack", {})
            attention.replace_all_uses_with(cached)
            graph.erase_node(attention)
        result.graph_module.recompile()
        # cos/sin (and what is computed from them) gain the batch dim: forget their recorded types and re-derive them.
        for node in _descendants(absolute):
            node.meta.pop("val", None)
        propagate_types(result)
        stats = {
            "cached_layers": len(replacements),
            "cache_bytes_per_sequence": sum(spec.bytes_per_sequence for spec in specs),
            "max_seq": str(max_seq),
            "dtype": str(specs[0].dtype).removeprefix("torch."),
        }
        return PassResult(result, True, stats)

    def explain(self, program: Program) -> list[str]:
        if _is_cached(program):
            return ["kv-cache: the program already attends over KV caches"]
        try:
            self.requires(program)
        except PreconditionError as error:
            return [f"kv-cache: not applied: {error}"]
        attentions = _attentions(program)
        if not attentions:
            return ["kv-cache: no moec.attention to cache"]
        max_seq = self.cache_length(program)
        lines = []
        for index, attention in enumerate(attentions):
            _, k, _, _, window = _attention_operands(attention)
            value = k.meta["val"]
            window_text = f", sliding window {window}" if window else ""
            lines.append(
                f"layers.{_layer_index(attention, index)}: cached ({value.shape[1]} kv heads x {value.shape[3]}, "
                f"max_seq {max_seq}{window_text})"
            )
        return lines
