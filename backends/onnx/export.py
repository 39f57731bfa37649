"""Convert a moec Program (at any point of the pipeline) into one `.onnx` file plus one external data file.

before: a Program (fx graph on the meta device; weights are lazy `WeightExpr`s)
after:  `model.onnx` (opset 23; graph input `input_ids[batch, seq]` int64, output `logits[batch, seq, vocab]`)
        and `model.onnx.data` holding every initializer's bytes. A program with KV caches (after `kv-cache`) becomes
        a past/present decoder instead (inputs input_ids, attention_mask, position_ids, past_key_values.{i}.key/.value;
        outputs logits, present.{i}.key/.value; metadata `moec.max_seq`): see `cached.py`.

The graph is built with onnx-graphsurgeon, one registered converter per fx op (`converters.py` is the registry;
`aten_ops.py`, `canonical_ops.py` and `moe.py` the converters).
Initializers are `LazyValues` over TensorProtos that point into the data file and hold no bytes; the data file is
then written by streaming each weight (a stack of experts one expert at a time), so exporting never holds more
than the largest single piece of one weight in memory, whatever the model size.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs
import torch
import torch.fx

import backends.onnx.aten_ops  # noqa: F401 - registers the ATen converters
import backends.onnx.canonical_ops  # noqa: F401 - registers the converters of moec's canonical ops
from backends.onnx.cached import declare_decoder_io, present_outputs
import backends.onnx.moe  # noqa: F401 - registers the moec.moe converters
import backends.onnx.fp8  # noqa: F401 - registers the converters of the FP8 ops
import backends.onnx.quantized  # noqa: F401 - registers the converters of the weight-only quantized ops
from backends.onnx.context import ConversionContext, ExportOptions, OnnxExportError, onnx_dtype
from backends.onnx.converters import find_converter
from backends.onnx.moe import MOE_MODES, moe_refusal
from compiler import ops
from compiler.ir import Program, op_name
from compiler.weights import Rewrite, WeightExpr

OPSET = 23
DECOMPOSABLE = ("attention", "rms_norm", "rope")
# Offsets in the data file are page-aligned, so runtimes can mmap each initializer.
_ALIGNMENT = 4096
_CUSTOM_DOMAINS = {"com.microsoft": 1, "trt.plugins": 1}
MAX_SEQ_METADATA = "moec.max_seq"
# By default onnxruntime's optimizer fuses DequantizeLinear(int8, per-axis) + MatMul into MatMulNBits with int8
# activations (accuracy level 4): a weight-only int8 export would compute ~5e-3 away from backends/torch.
ONNXRUNTIME_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}


@dataclass(frozen=True)
class OnnxExport:
    """What one export wrote."""

    path: Path
    data_path: Path
    opset: int
    moe: str
    node_count: int
    initializer_count: int
    data_bytes: int
    seconds: float
    op_types: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{self.path} ({self.node_count} nodes, opset {self.opset}, moe={self.moe}) + {self.data_path.name} "
            f"({self.initializer_count} initializers, {self.data_bytes:,} bytes) in {self.seconds:.2f}s"
        )


def session_options() -> Any:
    """onnxruntime `SessionOptions` for moec's own sessions over its exports, so they compute what the program
    computes (`ONNXRUNTIME_CONFIG`)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    for key, value in ONNXRUNTIME_CONFIG.items():
        options.add_session_config_entry(key, value)
    return options


def _prepare_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    model_path = Path(path)
    if model_path.suffix != ".onnx":
        raise OnnxExportError(f"ONNX output path must end in .onnx, got {model_path}")
    try:
        model_path.parent.mkdir(parents=True, exist_ok=True)
        with open(model_path, "ab"):
            pass
    except OSError as error:
        raise OnnxExportError(f"cannot write ONNX model to {model_path}: {error.strerror or error}") from None
    return model_path, model_path.with_name(model_path.name + ".data")


def _dim_names(program: Program) -> dict[Any, str]:
    """The runtime input's symbolic dims, named `batch` and `seq` (by position) as the ONNX inputs declare them."""
    names: dict[Any, str] = {}
    for node in program.input_nodes():
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            for size, label in zip(value.shape, ("batch", "seq")):
                if isinstance(size, torch.SymInt):
                    names.setdefault(size.node.expr, label)
    return names


def _onnx_shape(value: torch.Tensor, names: dict[Any, str]) -> list[Any]:
    shape: list[Any] = []
    for size in value.shape:
        if isinstance(size, torch.SymInt):
            shape.append(names.get(size.node.expr))
        else:
            shape.append(int(size))
    return shape


def _io_variable(name: str, value: torch.Tensor, names: dict[Any, str]) -> gs.Variable:
    return gs.Variable(name, dtype=onnx_dtype(value.dtype), shape=_onnx_shape(value, names))


def build_graph(program: Program, options: ExportOptions) -> ConversionContext:
    """Converts every node; returns the context holding the onnx-graphsurgeon graph and its initializers."""
    ctx = ConversionContext(options)
    names = _dim_names(program)
    if program.cache_nodes():
        ctx.graph.inputs.extend(declare_decoder_io(ctx, program))
    for node in program.graph.nodes:
        ctx.current = node
        if node in ctx.values:
            continue  # a decoder input, or the rotary positions the `position_ids` input replaces
        if node.op == "placeholder":
            expr = node.meta.get("weight")
            if expr is not None:
                ctx.weights[node] = expr
                ctx.values[node] = ctx.initializer(node.name, expr)
            else:
                variable = _io_variable(node.name, node.meta["val"], names)
                ctx.graph.inputs.append(variable)
                ctx.values[node] = variable
        elif node.op == "call_function":
            ctx.values[node] = find_converter(ctx, node)(ctx, node)
        elif node.op == "output":
            results = node.args[0]
            results = list(results) if isinstance(results, (tuple, list)) else [results]
            for index, result in enumerate(results):
                name = "logits" if len(results) == 1 else f"output_{index}"
                variable = _io_variable(name, result.meta["val"], names)
                identity = gs.Node("Identity", name=f"{name}/Identity", inputs=[ctx.tensor(result)], outputs=[variable])
                ctx.graph.nodes.append(identity)
                ctx.graph.outputs.append(variable)
            if ctx.decoder is not None:
                ctx.graph.outputs.extend(present_outputs(program, ctx))
        else:
            raise OnnxExportError(f"cannot export fx node {node.name} of kind {node.op}")
    ctx.current = None
    ctx.graph.cleanup(remove_unused_graph_inputs=False)
    return ctx


def stream_pieces(expr: WeightExpr) -> Iterator[torch.Tensor]:
    """`expr`'s bytes as a sequence of tensors whose row-major bytes, concatenated, are `expr`'s: a stack or
    concatenation on dim 0 is written part by part (and a cast of one, cast part by part)."""
    if isinstance(expr, Rewrite):
        attrs = dict(expr.attrs)
        if expr.kind in ("stack", "concat") and attrs["dim"] == 0:
            for part in expr.inputs:
                yield from stream_pieces(part)
            return
        if expr.kind == "cast":
            for piece in stream_pieces(expr.inputs[0]):
                yield piece.to(attrs["dtype"])
            return
    yield expr.materialize()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_external_data(ctx: ConversionContext, data_path: Path, used: set[str]) -> int:
    """Streams every used initializer into `data_path`; fills each proto's external-data location."""
    offset = 0
    try:
        handle = open(data_path, "wb")
    except OSError as error:
        raise OnnxExportError(f"cannot write ONNX data file {data_path}: {error.strerror or error}") from None
    with handle:
        for name, initializer in ctx.initializers.items():
            if name not in used:
                continue
            padding = -offset % _ALIGNMENT
            handle.write(b"\0" * padding)
            offset += padding
            length = 0
            for piece in stream_pieces(initializer.expr):
                length += handle.write(_tensor_bytes(piece))
                del piece
            if length != initializer.expr.nbytes:
                raise OnnxExportError(f"weight {name} streamed {length} bytes, expected {initializer.expr.nbytes}")
            proto = initializer.proto
            del proto.external_data[:]
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
                entry = proto.external_data.add()
                entry.key, entry.value = key, value
            offset += length
    return offset


def unexportable_reason(program: Program, moe: str = "ootb") -> str | None:
    """Why `program` (every rank of it) cannot be exported in MoE mode `moe` (None when it can): an op with no ONNX
    form yet (FP8 KV caches), or the first MoE node the mode cannot take (`moe.moe_refusal`), found before anything is
    written."""
    for each in (program, *program.ranks):
        for node in each.graph.nodes:
            spec = node.meta.get("kv_cache")
            if spec is not None and spec.dtype == torch.float8_e4m3fn:
                return (f"ONNX export of FP8 KV caches is not supported yet ({node.name}); quantize with "
                        "quantize-fp8{kv_cache=false} to export")
            if node.target in (ops.moe, ops.quantized_moe, ops.fp8_moe):
                reason = moe_refusal(node, moe)
                if reason is not None:
                    return reason
    return None


def export_program(
    program: Program,
    path: str | os.PathLike[str],
    moe: str = "ootb",
    decompose: tuple[str, ...] | frozenset[str] = (),
) -> OnnxExport:
    """Writes `program` as `path` (+ `path.data`); see the module docstring."""
    started = time.perf_counter()
    if moe not in MOE_MODES:
        raise OnnxExportError(f"unknown MoE export mode {moe!r}; choose one of {', '.join(MOE_MODES)}")
    unknown = set(decompose) - set(DECOMPOSABLE)
    if unknown:
        raise OnnxExportError(f"cannot decompose {', '.join(sorted(unknown))}; decomposable: {', '.join(DECOMPOSABLE)}")
    reason = unexportable_reason(program, moe)
    if reason is not None:
        raise OnnxExportError(reason)
    model_path, data_path = _prepare_paths(path)
    ctx = build_graph(program, ExportOptions(moe=moe, decompose=frozenset(decompose)))
    graph = ctx.graph
    domains = {node.domain for node in graph.nodes if node.domain}
    graph.import_domains = [onnx.helper.make_opsetid("", OPSET)] + [
        onnx.helper.make_opsetid(domain, _CUSTOM_DOMAINS[domain]) for domain in sorted(domains)
    ]
    used = {name for name, tensor in graph.tensors().items() if isinstance(tensor, gs.Constant)}
    data_bytes = write_external_data(ctx, data_path, used)
    model = gs.export_onnx(graph, do_type_check=False)
    model.producer_name = "moec"
    model.graph.name = program.source_description or "moec"
    specs = program.cache_specs()
    if specs:
        # What bounds past_seq + seq: the kv-cache pass's max_seq (the generation loop and genai_config read it).
        entry = model.metadata_props.add()
        entry.key, entry.value = MAX_SEQ_METADATA, str(min(spec.max_seq for spec in specs.values()))
    try:
        model_path.write_bytes(model.SerializeToString())
    except OSError as error:
        raise OnnxExportError(f"cannot write ONNX model to {model_path}: {error.strerror or error}") from None
    op_types = Counter(node.op_type for node in model.graph.node)
    return OnnxExport(
        model_path,
        data_path,
        OPSET,
        moe,
        len(model.graph.node),
        sum(1 for name in ctx.initializers if name in used),
        data_bytes,
        time.perf_counter() - started,
        dict(sorted(op_types.items())),
    )
