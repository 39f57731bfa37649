"""`canonicalize`: rewrite the exported ATen patterns into moec's canonical ops and drop export noise.

before (one RMSNorm, as exported from Hugging Face in bf16):
    %x32 = aten._to_copy(%x, dtype=float32); %p = aten.pow(%x32, 2); %m = aten.mean.dim(%p, [-1], True)
    %r = aten.rsqrt(aten.add(%m, 1e-05)); %n = aten._to_copy(aten.mul(%x32, %r), dtype=bfloat16)
    %y = aten.mul(%weight, %n)
after:
    %y = moec.rms_norm(%x, %weight, 1e-05)

Rules (each can say why it did not match):
- `rms_norm`  the pattern above (with or without the float32 round trip).
- `rope`      x*cos + cat(-x[..., D/2:], x[..., :D/2])*sin  ->  moec.rope(x, cos, sin).
- `attention` Hugging Face's eager attention (traced with `attention="eager"`): repeat_kv, q@k^T*scale + mask,
              float32 softmax, @v, transpose -> moec.attention(q, k, v, scale, window) (no repeat_kv kept). The
              mask must depend on sizes only; it is computed at a few lengths and must be causal (with the config's
              sliding window), else the rule says why it did not match.
- `linear`    aten.linear -> moec.linear.
- noise       `_assert_tensor_metadata`, `alias`, casts to the dtype a value already has, `x*1.0`, `x+0`,
              views of views, views to the shape a value already has.
By default attention already arrives as `moec.attention` from the frontend (causal, grouped-query, no repeat_kv).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from compiler.ir import Program
from compiler.pass_manager import Pass, PassResult, register_pass
from compiler.rewrite import MatchFailure, Rewriter, Rule, expect, tensor_value
from compiler import ops

aten = torch.ops.aten


def _strip_cast(node: torch.fx.Node, dtype: torch.dtype | None = None) -> torch.fx.Node:
    """The input of a pure dtype cast (`_to_copy(x, dtype=...)`), or the node itself."""
    if (
        isinstance(node, torch.fx.Node)
        and node.target == aten._to_copy.default
        and set(node.kwargs) <= {"dtype"}
        and (dtype is None or node.kwargs.get("dtype") == dtype)
    ):
        return node.args[0]
    return node


def _rms_norm(node: torch.fx.Node, rw: Rewriter) -> torch.fx.Node:
    left, right = node.args[0], node.args[1]
    if not all(isinstance(a, torch.fx.Node) for a in (left, right)):
        raise MatchFailure("not a product of two tensors")
    for weight, normalized in ((left, right), (right, left)):
        weight_value = tensor_value(weight)
        if weight_value is None or weight_value.dim() != 1:
            continue
        try:
            scaled = expect(_strip_cast(normalized), aten.mul.Tensor, what="normalized value")
            x32, inv = scaled.args
            rsqrt = expect(inv, aten.rsqrt.default, what="scale")
            add = expect(rsqrt.args[0], aten.add.Tensor, what="rsqrt input")
            mean = expect(add.args[0], aten.mean.dim, what="variance")
            eps = add.args[1]
            if not isinstance(eps, float):
                raise MatchFailure("epsilon is not a constant")
            if list(mean.args[1]) != [-1] or not (len(mean.args) > 2 and mean.args[2]):
                raise MatchFailure("variance is not a keepdim mean over the last dim")
            power = expect(mean.args[0], aten.pow.Tensor_Scalar, what="mean input")
            if power.args[0] is not x32 or power.args[1] != 2:
                raise MatchFailure("variance is not mean(x**2) of the normalized value")
        except MatchFailure:
            continue
        x = _strip_cast(x32, torch.float32)
        return rw.call(ops.rms_norm, (x, weight, float(eps)))
    raise MatchFailure("no operand is a 1-d weight times x * rsqrt(mean(x**2) + eps)")


def _rotate_half_of(rotated: torch.fx.Node) -> torch.fx.Node:
    cat = expect(rotated, aten.cat.default, what="rotated value")
    parts = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else 0
    if len(parts) != 2:
        raise MatchFailure("rotate_half concatenates two halves")
    neg = expect(parts[0], aten.neg.default, what="first half")
    upper = expect(neg.args[0], aten.slice.Tensor, what="negated half")
    lower = expect(parts[1], aten.slice.Tensor, what="second half")
    x = upper.args[0]
    value = tensor_value(x)
    if lower.args[0] is not x or value is None:
        raise MatchFailure("halves come from different tensors")
    rank, half = value.dim(), value.shape[-1] // 2
    if dim % rank != rank - 1 or upper.args[1] % rank != rank - 1 or lower.args[1] % rank != rank - 1:
        raise MatchFailure("rotation is not over the last dim")
    if tuple(lower.args[2:4]) != (0, half) or upper.args[2] != half:
        raise MatchFailure("halves are not [:D/2] and [D/2:]")
    return x


def _rope(node: torch.fx.Node, rw: Rewriter) -> torch.fx.Node:
    first, second = node.args[0], node.args[1]
    if not all(isinstance(a, torch.fx.Node) and a.target == aten.mul.Tensor for a in (first, second)):
        raise MatchFailure("not a sum of two products")
    for direct, rotated in ((first, second), (second, first)):
        for x, cos_u in (direct.args, reversed(direct.args)):
            for rot, sin_u in (rotated.args, reversed(rotated.args)):
                try:
                    if _rotate_half_of(rot) is not x:
                        continue
                    cos = expect(cos_u, aten.unsqueeze.default, what="cos")
                    sin = expect(sin_u, aten.unsqueeze.default, what="sin")
                except MatchFailure:
                    continue
                x_value = tensor_value(x)
                if x_value is None or x_value.dim() != 4 or cos.args[1] != 1 or sin.args[1] != 1:
                    continue
                return rw.call(ops.rope, (x, cos.args[0], sin.args[0]))
    raise MatchFailure("not x*cos + rotate_half(x)*sin with cos/sin unsqueezed at dim 1")


_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _unrepeated_kv(node: torch.fx.Node) -> torch.fx.Node:
    """k or v before Hugging Face's repeat_kv (`reshape(expand(x[:, :, None]))`), or the node itself."""
    if node.target not in _VIEWS:
        return node
    expanded = node.args[0]
    if expanded.target == aten.clone.default:
        expanded = expanded.args[0]
    expand = expect(expanded, aten.expand.default, what="repeated kv")
    unsqueeze = expect(expand.args[0], aten.unsqueeze.default, what="repeat_kv input")
    if unsqueeze.args[1] != 2:
        raise MatchFailure("repeat_kv does not insert the group dim at 2")
    return unsqueeze.args[0]


def _evaluate_mask(mask: torch.fx.Node, seq: int) -> torch.Tensor:
    """Computes a mask subgraph on the CPU for input ids of shape [1, seq] (it may depend on sizes only)."""
    ancestors: set[torch.fx.Node] = set()
    pending = [mask]
    while pending:
        node = pending.pop()
        if node not in ancestors:
            ancestors.add(node)
            pending.extend(node.all_input_nodes)
    values: dict[torch.fx.Node, object] = {}
    for node in mask.graph.nodes:
        if node not in ancestors:
            continue
        if node.op == "placeholder":
            if "weight" in node.meta:
                raise MatchFailure("attention mask depends on weights")
            values[node] = torch.zeros((1, seq), dtype=torch.long)
            continue
        args = torch.fx.node.map_arg(node.args, lambda n: values[n])
        kwargs = {k: ("cpu" if k == "device" else v) for k, v in torch.fx.node.map_arg(node.kwargs, lambda n: values[n]).items()}
        values[node] = node.target(*args, **kwargs)
    return values[mask]


def _mask_window(mask: torch.fx.Node | None, rw: Rewriter) -> int:
    """The sliding window (0 = none) of a causal mask, checked by computing the mask at a few lengths."""
    if mask is None:
        raise MatchFailure("attention has no mask, so it is not causal")
    window = int(getattr(rw.program.config, "sliding_window", None) or 0)
    key = ("mask_window", mask)
    if key not in rw.memo:
        rw.memo[key] = None
        for seq in sorted({1, 5, window + 2 if window else 9}):
            computed = _evaluate_mask(mask, seq)
            allowed = computed if computed.dtype == torch.bool else computed == 0
            query, key_pos = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
            expected = key_pos <= query
            if window:
                expected &= key_pos > query - window
            if not torch.equal(torch.broadcast_to(allowed, (*allowed.shape[:-2], seq, seq)), expected.expand_as(allowed)):
                rw.memo[key] = f"attention mask is not causal with sliding window {window}" if window else "attention mask is not causal"
                break
    if rw.memo[key] is not None:
        raise MatchFailure(rw.memo[key])
    return window


def _attention(node: torch.fx.Node, rw: Rewriter) -> torch.fx.Node:
    """Hugging Face's eager attention (repeat_kv, q@k^T*scale + mask, float32 softmax, @v, transpose(1, 2))."""
    if tuple(node.args[1:]) != (1, 2):
        raise MatchFailure("not the (1, 2) transpose that ends attention")
    output = expect(node.args[0], aten.matmul.default, what="transposed value")
    probs, repeated_v = output.args
    while probs.target in (aten.clone.default, aten._to_copy.default):  # dropout in eval mode; cast to the q dtype
        probs = probs.args[0]
    softmax = expect(probs, aten.softmax.int, aten._softmax.default, what="attention weights")
    if softmax.args[1] not in (-1, 3):
        raise MatchFailure("softmax is not over the keys")
    scores, mask = softmax.args[0], None
    if scores.target == aten.add.Tensor:
        scores, mask = scores.args
        if mask.target == aten.mul.Tensor:
            scores, mask = mask, scores
    scaled = expect(scores, aten.mul.Tensor, what="attention scores")
    product, scale = scaled.args
    if not isinstance(scale, float):
        raise MatchFailure("attention scale is not a constant")
    product = expect(product, aten.matmul.default, what="scaled scores")
    query, transposed = product.args
    transposed = expect(transposed, aten.transpose.int, what="keys")
    if sorted(d % 4 for d in transposed.args[1:]) != [2, 3]:
        raise MatchFailure("keys are not transposed on their last two dims")
    key, value = _unrepeated_kv(transposed.args[0]), _unrepeated_kv(repeated_v)
    return rw.call(ops.attention, (query, key, value, scale, _mask_window(mask, rw)))


def _linear(node: torch.fx.Node, rw: Rewriter) -> torch.fx.Node:
    return rw.call(ops.linear, tuple(node.args), dict(node.kwargs))


def _same_shape(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    va, vb = tensor_value(a), tensor_value(b)
    return va is not None and vb is not None and va.dtype == vb.dtype and tuple(va.shape) == tuple(vb.shape)


def _no_op(node: torch.fx.Node, rw: Rewriter) -> torch.fx.Node:
    target, source = node.target, node.args[0] if node.args else None
    if target == aten.alias.default:
        return source
    if target == aten.clone.default:  # values are never mutated in these graphs; only the layout can matter
        value = tensor_value(source)
        if node.kwargs.get("memory_format") is None or (value is not None and value.is_contiguous()):
            return source
        raise MatchFailure("clone makes a strided value contiguous")
    if target == aten._to_copy.default:
        if set(node.kwargs) <= {"dtype"} and _same_shape(node, source):
            return source
        raise MatchFailure("cast changes the dtype")
    if target in (aten.mul.Tensor, aten.add.Tensor):
        identity = 1.0 if target == aten.mul.Tensor else 0
        if node.args[1] == identity and type(node.args[1]) is type(identity) or (
            target == aten.add.Tensor and node.args[1] == 0 and isinstance(node.args[1], int)
        ):
            if _same_shape(node, source):
                return source
        raise MatchFailure("not an identity operation")
    if target == aten.view.default:
        if _same_shape(node, source):
            return source
        if isinstance(source, torch.fx.Node) and source.target == aten.view.default:
            return rw.call(aten.view.default, (source.args[0], node.args[1]))
        raise MatchFailure("view changes the shape")
    raise MatchFailure("not a no-op")


RULES = (
    Rule("rms_norm", (aten.mul.Tensor,), _rms_norm),
    Rule("rope", (aten.add.Tensor,), _rope),
    Rule("attention", (aten.transpose.int,), _attention),
    Rule("linear", (aten.linear.default,), _linear),
    Rule(
        "no_op",
        (aten.alias.default, aten.clone.default, aten._to_copy.default, aten.mul.Tensor, aten.add.Tensor, aten.view.default),
        _no_op,
    ),
)


@register_pass
@dataclass(frozen=True)
class Canonicalize(Pass):
    """Rewrite exported ATen into canonical ops (rms_norm, rope, attention, linear) and remove export noise.

    before: pow/mean/add/rsqrt/mul chains, rotate_half cat/neg/slice, Hugging Face eager attention (repeat_kv,
            masked float32 softmax), aten.linear, asserts, no-op casts/views/clones
    after:  moec.rms_norm, moec.rope, moec.attention, moec.linear; no asserts, no identity casts or views
    """

    name = "canonicalize"

    def run(self, program: Program) -> PassResult:
        result = program.clone()
        rewriter = Rewriter(result)
        # Views of views only collapse once their inner view is final, so iterate to a fixed point (2-3 rounds).
        while rewriter.run(RULES):
            result.graph.eliminate_dead_code()
        asserts = [n for n in result.graph.nodes if n.target == aten._assert_tensor_metadata.default]
        for node in asserts:
            result.graph.erase_node(node)
        result.graph.eliminate_dead_code()
        for node in list(result.graph.nodes):
            if node.op == "placeholder" and "weight" in node.meta and not node.users:
                result.graph.erase_node(node)
        result.graph_module.recompile()
        stats = dict(sorted(rewriter.applied.items()))
        stats["asserts_removed"] = len(asserts)
        return PassResult(result, bool(rewriter.applied) or bool(asserts), stats)

    def explain(self, program: Program) -> list[str]:
        rewriter = Rewriter(program.clone())
        rewriter.run(RULES)
        lines = [f"{rule}: rewrote {count}" for rule, count in sorted(rewriter.applied.items())]
        return lines or ["canonicalize: nothing to rewrite"]
