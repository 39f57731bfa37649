"""The state of one fx → ONNX conversion: the onnx-graphsurgeon graph being built, the ONNX value of every fx
node, and helpers the converters share (constants, casts, runtime shape tensors, weights as initializers).

Value representation:
- a tensor node becomes a `gs.Tensor`;
- a symbolic size (`sym_size`, `SymInt` arithmetic) becomes a 1-element int64 `gs.Tensor` computed from `Shape`,
  so a size list such as `[sym_size_int_16, sym_size_int_17, -1, 8]` becomes a `Concat` evaluated at run time and
  one file serves every batch and sequence length;
- a multi-output op (`topk`, `split`) becomes a tuple of `gs.Tensor`s, unpacked by `getitem`;
- a node that computes nothing at run time (`_assert_tensor_metadata`) becomes `None`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.fx

from compiler.errors import MoecError
from compiler.weights import WeightExpr


class OnnxExportError(MoecError):
    """A graph cannot be exported to ONNX (unsupported op, bad option, unwritable path)."""


TORCH_TO_ONNX: dict[torch.dtype, int] = {
    torch.float32: onnx.TensorProto.FLOAT,
    torch.float16: onnx.TensorProto.FLOAT16,
    torch.bfloat16: onnx.TensorProto.BFLOAT16,
    torch.float64: onnx.TensorProto.DOUBLE,
    torch.int64: onnx.TensorProto.INT64,
    torch.int32: onnx.TensorProto.INT32,
    torch.int8: onnx.TensorProto.INT8,
    torch.uint8: onnx.TensorProto.UINT8,
    torch.bool: onnx.TensorProto.BOOL,
    torch.float8_e4m3fn: onnx.TensorProto.FLOAT8E4M3FN,  # FP8 weights: their bytes are written as they are
}

# numpy has no bfloat16: small bf16 constants are built in float32 and cast by an ONNX Cast node.
NUMPY_DTYPES: dict[torch.dtype, Any] = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
}


def onnx_dtype(dtype: torch.dtype) -> int:
    if dtype not in TORCH_TO_ONNX:
        raise OnnxExportError(f"dtype {dtype} has no ONNX equivalent here")
    return TORCH_TO_ONNX[dtype]


@dataclass
class Initializer:
    """A weight written to the external data file: its ONNX name, its lazy expression, its proto (no bytes)."""

    name: str
    expr: WeightExpr
    proto: onnx.TensorProto


@dataclass
class ExportOptions:
    moe: str = "ootb"
    # Canonical ops to emit as elementary ONNX ops instead of their opset-23 fused forms (for older parsers).
    decompose: frozenset[str] = frozenset()


@dataclass
class DecoderIO:
    """The past/present interface of a program with KV caches (filled by `backends/onnx/cached.py`)."""

    attention_mask: gs.Tensor  # int64 [batch, past_seq + seq]: 1 = a real token in that slot
    position_ids: gs.Tensor  # int64 [batch, seq]: the rotary position of every new token
    past_seq: gs.Tensor  # 1-element int64: the slots each past_key_values input holds
    # `present.{layer}.{key|value}` -> its tensor, in the order the converters emit them.
    presents: dict[str, gs.Tensor] = field(default_factory=dict)
    masks: dict[int, gs.Tensor] = field(default_factory=dict)  # sliding window -> bool[batch, 1, seq, total_seq]


@dataclass
class ConversionContext:
    """Everything a converter reads or writes while one program is converted."""

    options: ExportOptions
    graph: gs.Graph = field(default_factory=lambda: gs.Graph(opset=23))
    values: dict[torch.fx.Node, Any] = field(default_factory=dict)
    # The weight placeholders' expressions, so converters can rewrite a weight lazily instead of at run time.
    weights: dict[torch.fx.Node, WeightExpr] = field(default_factory=dict)
    initializers: dict[str, Initializer] = field(default_factory=dict)
    _initializer_by_expr: dict[tuple[int, int, tuple[int, ...]], gs.Constant] = field(default_factory=dict)
    _counter: int = 0
    current: torch.fx.Node | None = None
    decoder: DecoderIO | None = None  # set for a program with KV caches

    # --- naming and node creation ------------------------------------------------------------------------------

    def fresh(self, hint: str) -> str:
        self._counter += 1
        base = self.current.name if self.current is not None else "export"
        return f"{base}/{hint}_{self._counter}"

    def op(
        self,
        op_type: str,
        inputs: Sequence[gs.Tensor | None],
        attrs: dict[str, Any] | None = None,
        outputs: int = 1,
        domain: str | None = None,
    ) -> Any:
        """Adds one node; returns its output tensor (or a tuple of them when `outputs` > 1)."""
        name = self.fresh(op_type)
        out_tensors = [gs.Variable(f"{name}:{i}") for i in range(outputs)]
        node_inputs = [tensor if tensor is not None else gs.Variable.empty() for tensor in inputs]
        node = gs.Node(op_type, name=name, attrs=attrs or {}, inputs=node_inputs, outputs=out_tensors)
        if domain is not None:
            node.domain = domain
        self.graph.nodes.append(node)
        return out_tensors[0] if outputs == 1 else tuple(out_tensors)

    # --- constants ---------------------------------------------------------------------------------------------

    def const(self, value: Any, dtype: torch.dtype = torch.int64) -> gs.Tensor:
        """A small constant tensor of `dtype` (bf16 via a Cast, since numpy has no bf16)."""
        if dtype == torch.bfloat16:
            return self.cast(self.const(value, torch.float32), torch.bfloat16)
        array = np.asarray(value, dtype=NUMPY_DTYPES[dtype])
        return gs.Constant(self.fresh("const"), array)

    def ints(self, values: Sequence[int]) -> gs.Tensor:
        return self.const(list(values), torch.int64)

    def scalar(self, value: Any, dtype: torch.dtype) -> gs.Tensor:
        return self.const(value, dtype)

    # --- values of fx arguments --------------------------------------------------------------------------------

    def tensor(self, arg: Any, dtype: torch.dtype | None = None) -> gs.Tensor:
        """The ONNX tensor of an fx argument; a Python number becomes a constant of `dtype`."""
        if isinstance(arg, torch.fx.Node):
            value = self.values[arg]
            if not isinstance(value, gs.Tensor):
                raise OnnxExportError(f"{arg.name} is not a tensor (got {type(value).__name__})")
            return value
        if isinstance(arg, (bool, int, float)):
            return self.scalar(arg, dtype or (torch.float32 if isinstance(arg, float) else torch.int64))
        raise OnnxExportError(f"cannot use {arg!r} as a tensor")

    def cast(self, tensor: gs.Tensor, dtype: torch.dtype) -> gs.Tensor:
        return self.op("Cast", [tensor], {"to": onnx_dtype(dtype)})

    def cast_to(self, arg: Any, dtype: torch.dtype) -> gs.Tensor:
        """`arg` as a tensor of `dtype`: numbers become constants of it, tensors of another dtype are cast."""
        if isinstance(arg, torch.fx.Node):
            source = dtype_of(arg)
            tensor = self.tensor(arg)
            if source is not None and source != dtype:
                return self.cast(tensor, dtype)
            return tensor
        return self.scalar(arg, dtype)

    def size_tensor(self, size: Any) -> gs.Tensor:
        """A 1-element int64 tensor holding a size (an int, or a SymInt computed at run time)."""
        if isinstance(size, torch.fx.Node):
            return self.tensor(size)
        return self.ints([int(size)])

    def shape_tensor(self, sizes: Sequence[Any]) -> gs.Tensor:
        """A 1-D int64 shape: static sizes are folded into constants, symbolic ones are `Concat`ed at run time."""
        if all(not isinstance(size, torch.fx.Node) for size in sizes):
            return self.ints([int(size) for size in sizes])
        parts: list[gs.Tensor] = []
        pending: list[int] = []
        for size in sizes:
            if isinstance(size, torch.fx.Node):
                if pending:
                    parts.append(self.ints(pending))
                    pending = []
                parts.append(self.tensor(size))
            else:
                pending.append(int(size))
        if pending:
            parts.append(self.ints(pending))
        return self.op("Concat", parts, {"axis": 0})

    def scalar_int(self, size: Any) -> gs.Tensor:
        """A 0-d int64 tensor (for `Range`), from an int or a SymInt."""
        if isinstance(size, torch.fx.Node):
            return self.op("Squeeze", [self.tensor(size), self.ints([0])])
        return self.const(int(size), torch.int64)

    # --- weights -----------------------------------------------------------------------------------------------

    def initializer(
        self, name: str, expr: WeightExpr, data_type: int | None = None, dims: Sequence[int] | None = None
    ) -> gs.Constant:
        """A weight stored in the external data file; the same expression object is stored once per ONNX type (tied
        weights). `data_type`/`dims` declare `expr`'s bytes as another ONNX type without rewriting them: uint8
        `[out, in/2]` int4 codes as INT4 `[out, in]`, scales `[out, 1]` as `[out]`."""
        data_type = onnx_dtype(expr.dtype) if data_type is None else data_type
        dims = tuple(expr.shape if dims is None else dims)
        key = (id(expr), data_type, dims)
        existing = self._initializer_by_expr.get(key)
        if existing is not None:
            return existing
        proto = onnx.TensorProto()
        proto.name = name
        proto.data_type = data_type
        proto.dims.extend(dims)
        proto.data_location = onnx.TensorProto.EXTERNAL
        constant = gs.Constant(name, gs.ir.tensor.LazyValues(proto))
        self.initializers[name] = Initializer(name, expr, proto)
        self._initializer_by_expr[key] = constant
        return constant


def value_of(node: torch.fx.Node) -> Any:
    return node.meta.get("val")


def dtype_of(node: Any) -> torch.dtype | None:
    if isinstance(node, torch.fx.Node):
        value = value_of(node)
        if isinstance(value, torch.Tensor):
            return value.dtype
    return None


def rank_of(node: torch.fx.Node) -> int:
    value = value_of(node)
    if not isinstance(value, torch.Tensor):
        raise OnnxExportError(f"{node.name} has no tensor type to take the rank of")
    return value.dim()


def static_size(node: torch.fx.Node, dim: int) -> int | None:
    """The size of `dim` if it is a plain int, else None (symbolic)."""
    size = value_of(node).shape[dim]
    return size if isinstance(size, int) else None
