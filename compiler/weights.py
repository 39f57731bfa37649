"""Lazy weights: expressions over checkpoint tensors that are recorded at compile time and evaluated by a backend.

A weight in the IR is never a tensor. It is a `WeightExpr`: a leaf naming where the data lives (a tensor in a
safetensors file, a tensor of a user's in-memory model, or reproducible random data) or a `Rewrite` of other
expressions (slice for a rank, stack experts, concatenate, transpose, cast, quantize...). Shapes and dtypes are
inferred when an expression is built, so passes can reason about weights without reading a byte.

Expressions simplify as they are built: a slice of a stack keeps only the stacked parts it covers, and a slice of
a checkpoint tensor stays a slice of that leaf, which `materialize` reads with safetensors' partial reads. So the
expression of one rank's weight references exactly the bytes that rank needs.

New kinds of rewrite register themselves with `register_rewrite` (quantization adds its own), so the mechanism
is shared by every pass that changes weights.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from compiler.errors import CheckpointError

Shape = tuple[int, ...]

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "bool",
    torch.float8_e4m3fn: "f8e4m3",
}


def dtype_name(dtype: torch.dtype) -> str:
    """Short, stable name of a dtype for printed graphs."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def format_type(shape: Sequence[Any], dtype: torch.dtype) -> str:
    """`bf16[8,28672,4096]`: the type notation used by every printer."""
    return f"{dtype_name(dtype)}[{','.join(str(s) for s in shape)}]"


class WeightExpr:
    """A weight whose bytes are described, not held. Subclasses are immutable."""

    shape: Shape
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()

    def materialize(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Reads and computes this weight (only the bytes it covers) on `device`: each stored tensor is moved there as
        it is read, so rewrites (quantization, concatenation) run on the device, not on the host's cores."""
        return _evaluate(self, torch.device(device)).to(device)

    def leaves(self) -> list[WeightLeaf]:
        """The stored tensors this expression reads, in order."""
        raise NotImplementedError

    def describe(self) -> str:
        """One deterministic line: the expression with its leaves abbreviated by name."""
        raise NotImplementedError

    @property
    def type_str(self) -> str:
        return format_type(self.shape, self.dtype)


class WeightLeaf(WeightExpr):
    """A stored tensor."""

    name: str

    def leaves(self) -> list[WeightLeaf]:
        return [self]

    def read(self, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """Reads the whole tensor, or only `index` (one slice per leading dim)."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class CheckpointTensor(WeightLeaf):
    """A tensor stored in a safetensors file, read through mmap (partially, when sliced)."""

    path: str
    key: str
    shape: Shape
    dtype: torch.dtype

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.key

    def read(self, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="pt") as handle:
                if index is None:
                    return handle.get_tensor(self.key)
                return handle.get_slice(self.key)[index]
        except FileNotFoundError as error:
            raise CheckpointError(f"checkpoint shard {self.path} is missing (needed for {self.key})") from error

    def describe(self) -> str:
        return f"ckpt({self.key})"


@dataclass(frozen=True, eq=False)
class MemoryTensor(WeightLeaf):
    """A tensor of a model the user passed in memory; held by reference, never copied at compile time."""

    name: str
    tensor: torch.Tensor = field(repr=False)

    @property
    def shape(self) -> Shape:  # type: ignore[override]
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.tensor.dtype

    def read(self, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        data = self.tensor.detach()
        return data if index is None else data[index]

    def describe(self) -> str:
        return f"memory({self.name})"


@dataclass(frozen=True, eq=False)
class RandomTensor(WeightLeaf):
    """Reproducible dummy data: a function of (seed, name) only, so every rank draws the same full tensor."""

    name: str
    shape: Shape
    dtype: torch.dtype
    seed: int
    init: str = "normal"  # "normal" (std) | "ones"
    std: float = 0.02

    def read(self, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        if self.init == "ones":
            data = torch.ones(self.shape, dtype=self.dtype)
        else:
            generator = torch.Generator().manual_seed(self.seed ^ zlib.crc32(self.name.encode()))
            data = (torch.randn(self.shape, generator=generator) * self.std).to(self.dtype)
        return data if index is None else data[index]

    def describe(self) -> str:
        return f"random({self.name})"


@dataclass(frozen=True)
class RewriteRule:
    """How one kind of rewrite infers its type and computes its value."""

    infer: Callable[[Sequence[WeightExpr], dict[str, Any]], tuple[Shape, torch.dtype]]
    apply: Callable[[Sequence[torch.Tensor], dict[str, Any]], torch.Tensor]


_REWRITES: dict[str, RewriteRule] = {}


def register_rewrite(kind: str, rule: RewriteRule) -> None:
    """Adds a kind of weight rewrite (e.g. a quantization scheme)."""
    if kind in _REWRITES:
        raise ValueError(f"weight rewrite {kind!r} is already registered")
    _REWRITES[kind] = rule


@dataclass(frozen=True, eq=False)
class Rewrite(WeightExpr):
    """`kind(inputs, **attrs)`, evaluated only when a backend materializes it."""

    kind: str
    inputs: tuple[WeightExpr, ...]
    attrs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        # Infer now, so a mismatched stack or an out-of-range slice fails where it is built, not where it is used.
        self._type  # noqa: B018

    @cached_property
    def _type(self) -> tuple[Shape, torch.dtype]:
        return _REWRITES[self.kind].infer(self.inputs, dict(self.attrs))

    @property
    def shape(self) -> Shape:  # type: ignore[override]
        return self._type[0]

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self._type[1]

    def leaves(self) -> list[WeightLeaf]:
        return [leaf for expr in self.inputs for leaf in expr.leaves()]

    def describe(self) -> str:
        if len(self.inputs) > 4:
            args = f"{self.inputs[0].describe()}, ... {len(self.inputs) - 2} more ..., {self.inputs[-1].describe()}"
        else:
            args = ", ".join(expr.describe() for expr in self.inputs)
        attrs = "".join(f", {key}={_format_attr(value)}" for key, value in self.attrs)
        return f"{self.kind}({args}{attrs})"


def _format_attr(value: Any) -> str:
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, tuple):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def _normalize_dim(dim: int, rank: int) -> int:
    if not -rank <= dim < rank:
        raise ValueError(f"dim {dim} out of range for a {rank}-d weight")
    return dim % rank


# --- rewrite kinds ---------------------------------------------------------------------------------------------


def _infer_slice(inputs: Sequence[WeightExpr], attrs: dict[str, Any]) -> tuple[Shape, torch.dtype]:
    (source,) = inputs
    dim, start, stop = attrs["dim"], attrs["start"], attrs["stop"]
    if not 0 <= start <= stop <= source.shape[dim]:
        raise ValueError(f"slice [{start}:{stop}] out of range for dim {dim} of {source.type_str}")
    shape = list(source.shape)
    shape[dim] = stop - start
    return tuple(shape), source.dtype


def _infer_select(inputs: Sequence[WeightExpr], attrs: dict[str, Any]) -> tuple[Shape, torch.dtype]:
    (source,) = inputs
    shape = list(source.shape)
    del shape[attrs["dim"]]
    return tuple(shape), source.dtype


def _infer_join(inputs: Sequence[WeightExpr], attrs: dict[str, Any], new_dim: bool) -> tuple[Shape, torch.dtype]:
    first = inputs[0]
    dim = attrs["dim"]
    for other in inputs[1:]:
        if other.dtype != first.dtype:
            raise ValueError(f"cannot join weights of dtypes {first.type_str} and {other.type_str}")
        if new_dim and other.shape != first.shape:
            raise ValueError(f"cannot stack weights of shapes {first.type_str} and {other.type_str}")
        if not new_dim and (other.shape[:dim] + other.shape[dim + 1 :]) != (first.shape[:dim] + first.shape[dim + 1 :]):
            raise ValueError(f"cannot concatenate {first.type_str} and {other.type_str} on dim {dim}")
    shape = list(first.shape)
    if new_dim:
        shape.insert(dim, len(inputs))
    else:
        shape[dim] = sum(expr.shape[dim] for expr in inputs)
    return tuple(shape), first.dtype


def _infer_transpose(inputs: Sequence[WeightExpr], attrs: dict[str, Any]) -> tuple[Shape, torch.dtype]:
    (source,) = inputs
    shape = list(source.shape)
    dim0, dim1 = attrs["dims"]
    shape[dim0], shape[dim1] = shape[dim1], shape[dim0]
    return tuple(shape), source.dtype


def _infer_reshape(inputs: Sequence[WeightExpr], attrs: dict[str, Any]) -> tuple[Shape, torch.dtype]:
    (source,) = inputs
    shape = tuple(attrs["shape"])
    if torch.Size(shape).numel() != torch.Size(source.shape).numel():
        raise ValueError(f"cannot reshape {source.type_str} to {list(shape)}")
    return shape, source.dtype


register_rewrite(
    "slice",
    RewriteRule(_infer_slice, lambda xs, a: xs[0].narrow(a["dim"], a["start"], a["stop"] - a["start"])),
)
register_rewrite("select", RewriteRule(_infer_select, lambda xs, a: xs[0].select(a["dim"], a["index"])))
register_rewrite(
    "stack",
    RewriteRule(lambda xs, a: _infer_join(xs, a, new_dim=True), lambda xs, a: torch.stack(list(xs), a["dim"])),
)
register_rewrite(
    "concat",
    RewriteRule(lambda xs, a: _infer_join(xs, a, new_dim=False), lambda xs, a: torch.cat(list(xs), a["dim"])),
)
register_rewrite("transpose", RewriteRule(_infer_transpose, lambda xs, a: xs[0].transpose(*a["dims"]).contiguous()))
register_rewrite("cast", RewriteRule(lambda xs, a: (xs[0].shape, a["dtype"]), lambda xs, a: xs[0].to(a["dtype"])))
register_rewrite("reshape", RewriteRule(_infer_reshape, lambda xs, a: xs[0].reshape(a["shape"])))


# --- builders (simplifying) -------------------------------------------------------------------------------------


def slice_weight(expr: WeightExpr, dim: int, start: int, stop: int) -> WeightExpr:
    """`expr[..., start:stop, ...]` on `dim`, pushed through stacks and concatenations to the leaves it covers."""
    dim = _normalize_dim(dim, len(expr.shape))
    _infer_slice([expr], {"dim": dim, "start": start, "stop": stop})
    if start == 0 and stop == expr.shape[dim]:
        return expr
    if isinstance(expr, Rewrite) and expr.kind in ("stack", "concat"):
        join_dim = dict(expr.attrs)["dim"]
        if expr.kind == "stack" and dim == join_dim:
            return stack_weights(expr.inputs[start:stop], dim)
        if expr.kind == "concat" and dim == join_dim:
            parts, offset = [], 0
            for part in expr.inputs:
                size = part.shape[dim]
                lo, hi = max(start, offset), min(stop, offset + size)
                if lo < hi:
                    parts.append(slice_weight(part, dim, lo - offset, hi - offset))
                offset += size
            return parts[0] if len(parts) == 1 else concat_weights(parts, dim)
        inner_dim = dim - 1 if expr.kind == "stack" and dim > join_dim else dim
        return Rewrite(
            expr.kind, tuple(slice_weight(part, inner_dim, start, stop) for part in expr.inputs), expr.attrs
        )
    if isinstance(expr, Rewrite) and expr.kind == "slice" and dict(expr.attrs)["dim"] == dim:
        attrs = dict(expr.attrs)
        return slice_weight(expr.inputs[0], dim, attrs["start"] + start, attrs["start"] + stop)
    if isinstance(expr, Rewrite) and expr.kind == "cast":
        return cast_weight(slice_weight(expr.inputs[0], dim, start, stop), dict(expr.attrs)["dtype"])
    return Rewrite("slice", (expr,), (("dim", dim), ("start", start), ("stop", stop)))


def select_weight(expr: WeightExpr, dim: int, index: int) -> WeightExpr:
    """`expr.select(dim, index)`; selecting a stacked part returns that part itself."""
    dim = _normalize_dim(dim, len(expr.shape))
    if not -expr.shape[dim] <= index < expr.shape[dim]:
        raise ValueError(f"index {index} out of range for dim {dim} of {expr.type_str}")
    index %= expr.shape[dim]
    if isinstance(expr, Rewrite) and expr.kind == "stack" and dict(expr.attrs)["dim"] == dim:
        return expr.inputs[index]
    return Rewrite("select", (expr,), (("dim", dim), ("index", index)))


def stack_weights(exprs: Sequence[WeightExpr], dim: int = 0) -> WeightExpr:
    """Stacks `exprs` on a new `dim`; re-stacking every `select` of one weight in order gives that weight back."""
    first = exprs[0]
    if isinstance(first, Rewrite) and first.kind == "select":
        base = first.inputs[0]
        if base.shape[dim] == len(exprs) and all(
            isinstance(e, Rewrite) and e.kind == "select" and e.inputs[0] is base
            and dict(e.attrs) == {"dim": dim, "index": i}
            for i, e in enumerate(exprs)
        ):
            return base
    return Rewrite("stack", tuple(exprs), (("dim", dim),))


def concat_weights(exprs: Sequence[WeightExpr], dim: int = 0) -> WeightExpr:
    if len(exprs) == 1:
        return exprs[0]
    return Rewrite("concat", tuple(exprs), (("dim", _normalize_dim(dim, len(exprs[0].shape))),))


def transpose_weight(expr: WeightExpr, dim0: int, dim1: int) -> WeightExpr:
    rank = len(expr.shape)
    return Rewrite("transpose", (expr,), (("dims", (_normalize_dim(dim0, rank), _normalize_dim(dim1, rank))),))


def cast_weight(expr: WeightExpr, dtype: torch.dtype) -> WeightExpr:
    if expr.dtype == dtype:
        return expr
    if isinstance(expr, Rewrite) and expr.kind == "cast":
        expr = expr.inputs[0]
        if expr.dtype == dtype:
            return expr
    return Rewrite("cast", (expr,), (("dtype", dtype),))


def reshape_weight(expr: WeightExpr, shape: Sequence[int]) -> WeightExpr:
    shape = tuple(int(s) for s in shape)
    if shape == expr.shape:
        return expr
    return Rewrite("reshape", (expr,), (("shape", shape),))


# --- evaluation ------------------------------------------------------------------------------------------------


def _evaluate(expr: WeightExpr, device: torch.device) -> torch.Tensor:
    if isinstance(expr, WeightLeaf):
        return expr.read().to(device)
    assert isinstance(expr, Rewrite)
    attrs = dict(expr.attrs)
    # A slice or select of a stored tensor reads only those bytes (safetensors get_slice over mmap).
    if expr.kind in ("slice", "select") and isinstance(expr.inputs[0], WeightLeaf):
        leaf = expr.inputs[0]
        dim = attrs["dim"]
        if expr.kind == "slice":
            index = (slice(None),) * dim + (slice(attrs["start"], attrs["stop"]),)
            return leaf.read(index).to(device)
        index = (slice(None),) * dim + (slice(attrs["index"], attrs["index"] + 1),)
        return leaf.read(index).squeeze(dim).to(device)
    values = [_evaluate(part, device) for part in expr.inputs]
    return _REWRITES[expr.kind].apply(values, attrs)
