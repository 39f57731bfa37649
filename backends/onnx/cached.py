"""Decoder export: a program with KV caches (after `kv-cache`) as onnxruntime-genai's past/present decoder.

before (moec's IR: one program, caches mutated in place, right padding and per-sequence positions):
    %input_ids: i64[batch,seq]   %cache_position: i64[batch]   %kv_cache_{i}_key/_value: [batch,Hkv,max_seq,D]
    %position_ids = add(unsqueeze(%cache_position, 1), arange(seq))  ... rope(cos/sin of %position_ids)
    %a = moec.cached_attention(%q, %k, %v, %kv_cache_i_key, %kv_cache_i_value, %cache_position, scale, window)
after (functional ONNX, left padding, positions given by the caller):
    inputs  input_ids i64[batch,seq], attention_mask i64[batch,total_seq], position_ids i64[batch,seq],
            past_key_values.{i}.key/.value [batch,Hkv,past_seq,D]             (total_seq = past_seq + seq)
    outputs logits [batch,seq,vocab], present.{i}.key/.value [batch,Hkv,total_seq,D]
    present = Concat(past, new k/v) on the sequence axis; query i (slot past_seq + i) attends slot j iff
    j <= past_seq + i and attention_mask[b, j] == 1 (and, with a sliding window, the key's position
    cumsum(attention_mask)[b, j] - 1 > position_ids[b, i] - window: the window counts real tokens, not padding).

The rotary source is the `position_ids` input: the fx node `kv-cache` made (`cache_position[:, None] +
arange(seq)`) takes the input's value, so left-padded prompts get positions 0.. from their first real token, as in
Hugging Face. `cache_position` becomes `past_seq` for every sequence (the slots already cached); nothing else reads
it. Attention is opset-23 `Attention` with `past_key`/`past_value` inputs and `present_key`/`present_value` outputs
and a boolean mask (onnxruntime 1.32 runs it on the CPU, GQA included), or, with `decompose=("attention",)`,
Concat + MatMul + Softmax (what TensorRT parses). `moec.rope_cached_attention` (`fuse-rope`) is `moec.rope`'s
lowering of q and of k (canonical_ops.emit_rope, in every mode), then the same attention.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import torch
import torch.fx

from backends.onnx.canonical_ops import emit_rope, repeat_heads
from backends.onnx.context import ConversionContext, DecoderIO, OnnxExportError, dtype_of, onnx_dtype, value_of
from backends.onnx.converters import converter, out_dtype
from compiler import ops
from compiler.ir import KVCacheSpec, Program, op_name

ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"


def past_name(spec: KVCacheSpec) -> str:
    return f"past_key_values.{spec.layer}.{spec.kind}"


def present_name(spec: KVCacheSpec) -> str:
    return f"present.{spec.layer}.{spec.kind}"


def _runtime_inputs(program: Program) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]:
    """(input_ids, cache_position, the rotary positions node `kv-cache` made) of a cached program."""
    inputs = {node.name: node for node in program.input_nodes()}
    if not {"cache_position", "input_ids"} <= set(inputs):
        raise OnnxExportError(
            "a program with KV caches exports with runtime inputs input_ids and cache_position, got "
            + ", ".join(inputs)
        )
    cache_position = inputs["cache_position"]
    offsets = [user for user in cache_position.users if user.target == torch.ops.aten.unsqueeze.default]
    positions = [user for offset in offsets for user in offset.users if user.target == torch.ops.aten.add.Tensor]
    others = [
        user for user in cache_position.users if user not in offsets and user.target not in ops.CACHED_ATTENTIONS
    ]
    if len(positions) != 1 or others:
        raise OnnxExportError(
            "cannot export the decoder: cache_position must only feed the rotary positions (cache_position[:, None] "
            "+ arange(seq)) and moec.cached_attention, as the kv-cache pass writes them"
        )
    return inputs["input_ids"], cache_position, positions[0]


def declare_decoder_io(ctx: ConversionContext, program: Program) -> list[gs.Variable]:
    """Adds the decoder's graph inputs and binds the fx placeholders (and the rotary positions) to them; returns the
    graph inputs in order. The converters of `moec.cached_attention` then fill `ctx.decoder.presents`."""
    input_ids, cache_position, positions = _runtime_inputs(program)
    ids = gs.Variable("input_ids", dtype=onnx_dtype(torch.int64), shape=["batch", "seq"])
    mask = gs.Variable(ATTENTION_MASK, dtype=onnx_dtype(torch.int64), shape=["batch", "total_seq"])
    position_ids = gs.Variable(POSITION_IDS, dtype=onnx_dtype(torch.int64), shape=["batch", "seq"])
    pasts = []
    for node in program.cache_nodes():
        spec: KVCacheSpec = node.meta["kv_cache"]
        shape = ["batch", spec.kv_heads, "past_seq", spec.head_dim]
        past = gs.Variable(past_name(spec), dtype=onnx_dtype(spec.dtype), shape=shape)
        ctx.values[node] = past
        pasts.append(past)
    if not pasts:
        raise OnnxExportError("a decoder export needs at least one KV cache")
    past_seq = ctx.op("Shape", [pasts[0]], {"start": 2, "end": 3})
    batch = ctx.op("Shape", [ids], {"start": 0, "end": 1})
    ctx.values[input_ids] = ids
    ctx.values[cache_position] = ctx.op("Expand", [past_seq, batch])  # every sequence has past_seq slots cached
    ctx.values[positions] = position_ids
    ctx.decoder = DecoderIO(mask, position_ids, past_seq)
    return [ids, mask, position_ids, *pasts]  # a segment's other inputs (collective results) follow


def present_outputs(program: Program, ctx: ConversionContext) -> list[gs.Variable]:
    """The `present.*` graph outputs, one per cache placeholder in graph order (layer by layer, key then value)."""
    assert ctx.decoder is not None
    outputs = []
    for node in program.cache_nodes():
        spec: KVCacheSpec = node.meta["kv_cache"]
        name = present_name(spec)
        if name not in ctx.decoder.presents:
            raise OnnxExportError(f"KV cache {node.name} is not read by any moec.cached_attention")
        variable = gs.Variable(
            name, dtype=onnx_dtype(spec.dtype), shape=["batch", spec.kv_heads, "total_seq", spec.head_dim]
        )
        ctx.graph.nodes.append(
            gs.Node("Identity", name=f"{name}/Identity", inputs=[ctx.decoder.presents[name]], outputs=[variable])
        )
        outputs.append(variable)
    return outputs


def _visible(ctx: ConversionContext, sliding_window: int) -> gs.Tensor:
    """bool[batch, 1, seq, total_seq]: which slots each new token attends (see the module docstring); one per
    window size, shared by the layers."""
    decoder = ctx.decoder
    assert decoder is not None
    if sliding_window in decoder.masks:
        return decoder.masks[sliding_window]
    mask = decoder.attention_mask
    total = ctx.op("Squeeze", [ctx.op("Shape", [mask], {"start": 1, "end": 2}), ctx.ints([0])])
    past = ctx.op("Squeeze", [decoder.past_seq, ctx.ints([0])])
    key_slots = ctx.op("Unsqueeze", [ctx.op("Range", [ctx.const(0), total, ctx.const(1)]), ctx.ints([0])])
    query_slots = ctx.op("Unsqueeze", [ctx.op("Range", [past, total, ctx.const(1)]), ctx.ints([1])])
    causal = ctx.op("LessOrEqual", [key_slots, query_slots])  # [seq, total_seq]
    real = ctx.op("Unsqueeze", [ctx.cast(mask, torch.bool), ctx.ints([1, 2])])  # [batch, 1, 1, total_seq]
    visible = ctx.op("And", [real, causal])
    if sliding_window > 0:
        key_positions = ctx.op("Sub", [ctx.op("CumSum", [mask, ctx.const(1)]), ctx.const(1)])
        key_positions = ctx.op("Unsqueeze", [key_positions, ctx.ints([1, 2])])
        query_positions = ctx.op("Unsqueeze", [decoder.position_ids, ctx.ints([1, 3])])  # [batch, 1, seq, 1]
        lower = ctx.op("Sub", [query_positions, ctx.const(sliding_window)])
        visible = ctx.op("And", [visible, ctx.op("Greater", [key_positions, lower])])
    decoder.masks[sliding_window] = visible
    return visible


def _arguments(node: torch.fx.Node) -> dict[str, object]:
    return ops.named_arguments(node.target, node.args, node.kwargs)


def _key_dtype(node: torch.fx.Node) -> torch.dtype:
    """The dtype of the keys the attention attends: k's, or rope(k)'s for the op that rotates k itself."""
    arguments = _arguments(node)
    dtype = dtype_of(arguments["k"])
    if node.target == ops.rope_cached_attention:
        dtype = torch.promote_types(dtype, dtype_of(arguments["cos"]))
    return dtype


def _operands(ctx: ConversionContext, node: torch.fx.Node) -> tuple[gs.Tensor, ...]:
    """q, and k/v rounded through the cache dtype as torch's kernel reads them back; past k/v in k's dtype. The
    rotating op's q and k are rotated first, as its semantics (rope, then cached_attention) say."""
    arguments = _arguments(node)
    q_node, k_node, v_node, k_cache, v_cache = (arguments[name] for name in ("q", "k", "v", "k_cache", "v_cache"))
    if node.target == ops.rope_cached_attention:
        q, k = (emit_rope(ctx, operand, arguments["cos"], arguments["sin"]) for operand in (q_node, k_node))
    else:
        q, k = ctx.tensor(q_node), ctx.tensor(k_node)
    v = ctx.tensor(v_node)
    cache_dtype, kv_dtype = dtype_of(k_cache), _key_dtype(node)
    past_k, past_v = ctx.tensor(k_cache), ctx.tensor(v_cache)
    if cache_dtype != kv_dtype:
        k, v = (ctx.cast(ctx.cast(t, cache_dtype), kv_dtype) for t in (k, v))
        past_k, past_v = (ctx.cast(t, kv_dtype) for t in (past_k, past_v))
    return q, k, v, past_k, past_v


def _record_presents(ctx: ConversionContext, node: torch.fx.Node, key: gs.Tensor, value: gs.Tensor) -> None:
    assert ctx.decoder is not None
    arguments = _arguments(node)
    for cache, tensor in ((arguments["k_cache"], key), (arguments["v_cache"], value)):
        spec: KVCacheSpec = cache.meta["kv_cache"]
        if dtype_of(cache) != _key_dtype(node):
            tensor = ctx.cast(tensor, spec.dtype)
        ctx.decoder.presents[present_name(spec)] = tensor


def _needs_decoder(ctx: ConversionContext, node: torch.fx.Node) -> None:
    if ctx.decoder is None:
        raise OnnxExportError(f"{node.name} ({op_name(node)}) reads KV caches that are not program inputs")


_ATTENTION_OPS = ("moec.cached_attention", "moec.rope_cached_attention")


@converter(*_ATTENTION_OPS, when=lambda ctx, node: "attention" not in ctx.options.decompose)
def _cached_attention(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    _needs_decoder(ctx, node)
    q, k, v, past_k, past_v = _operands(ctx, node)
    arguments = _arguments(node)
    attrs = {"scale": float(arguments["scale"])}
    if out_dtype(node) != torch.float32:
        attrs["softmax_precision"] = onnx_dtype(torch.float32)
    mask = _visible(ctx, int(arguments["sliding_window"]))
    out, present_k, present_v = ctx.op("Attention", [q, k, v, mask, past_k, past_v], attrs, outputs=3)
    _record_presents(ctx, node, present_k, present_v)
    return ctx.op("Transpose", [out], {"perm": [0, 2, 1, 3]})


@converter(*_ATTENTION_OPS, when=lambda ctx, node: "attention" in ctx.options.decompose)
def _cached_attention_decomposed(ctx: ConversionContext, node: torch.fx.Node) -> gs.Tensor:
    """present = Concat(past, new); softmax(q·presentᵀ·scale where visible, else float32 min) · present. Masking
    with the smallest float instead of -inf keeps a fully masked row (a padding token's query) finite."""
    _needs_decoder(ctx, node)
    q, k, v, past_k, past_v = _operands(ctx, node)
    present_k = ctx.op("Concat", [past_k, k], {"axis": 2})
    present_v = ctx.op("Concat", [past_v, v], {"axis": 2})
    _record_presents(ctx, node, present_k, present_v)
    dtype = out_dtype(node)
    arguments = _arguments(node)
    groups = value_of(arguments["q"]).shape[1] // value_of(arguments["k"]).shape[1]
    keys, values = present_k, present_v
    if groups > 1:
        keys, values = (repeat_heads(ctx, t, groups) for t in (keys, values))
    scores = ctx.op("MatMul", [q, ctx.op("Transpose", [keys], {"perm": [0, 1, 3, 2]})])
    scores = ctx.op("Mul", [ctx.cast(scores, torch.float32), ctx.scalar(float(arguments["scale"]), torch.float32)])
    mask = _visible(ctx, int(arguments["sliding_window"]))
    lowest = ctx.scalar(float(np.finfo(np.float32).min), torch.float32)
    probs = ctx.cast(ctx.op("Softmax", [ctx.op("Where", [mask, scores, lowest])], {"axis": -1}), dtype)
    return ctx.op("Transpose", [ctx.op("MatMul", [probs, values])], {"perm": [0, 2, 1, 3]})
