"""moec's IR: a torch.fx GraphModule from torch.export, wrapped with what passes and backends need to know.

Conventions every pass keeps:
- A placeholder with `node.meta["weight"]` (a `WeightExpr`) is a weight; one with `node.meta["kv_cache"]` (a
  `KVCacheSpec`, added by the `kv-cache` pass) is a layer's key or value cache, which the runtime allocates and owns
  and `moec.cached_attention` (or `fuse-rope`'s `moec.rope_cached_attention`) updates in place; every other
  placeholder is a runtime input (`input_ids`, `cache_position`). Weights are never tensors: backends materialize them.
- `node.meta["val"]` is a fake tensor (meta device, symbolic batch/seq) giving each value's shape and dtype.
- `node.meta["moec_rule"]` names the rule or pass that created a node.
- `Program.calibration` (filled by `calibrate`) holds the activation ranges measured per op, keyed by the op's module
  path so that it survives rewrites of the nodes (kv-cache, fuse-qkv, shard); the header of a printed program
  lists them.
Programs are values: passes `clone()` and never mutate a program they were given.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx

from compiler.weights import WeightExpr, dtype_name, format_type


@dataclass(frozen=True)
class KVCacheSpec:
    """What one cache placeholder holds: `[batch, kv_heads, max_seq, head_dim]` keys or values of one layer."""

    layer: int
    kind: Literal["key", "value"]
    kv_heads: int
    max_seq: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape_per_sequence(self) -> tuple[int, int, int]:
        return (self.kv_heads, self.max_seq, self.head_dim)

    @property
    def bytes_per_sequence(self) -> int:
        return self.kv_heads * self.max_seq * self.head_dim * self.dtype.itemsize

    def describe(self) -> str:
        return f"layer {self.layer} {self.kind}, max_seq {self.max_seq}"


@dataclass(frozen=True)
class Calibration:
    """Activation ranges `calibrate` measured: per op (by module path, in graph order) the absolute maximum of each
    of its activations over the calibration text (`input` of a linear; `input` and `intermediate` (w2's input) of a
    moe; `key` and `value` of an attention: what its KV cache holds)."""

    description: str  # what ran: "113 sequences x 256 tokens of the builtin calibration text"
    ranges: dict[str, dict[str, float]]

    def amax(self, path: str, role: str) -> float | None:
        return self.ranges.get(path, {}).get(role)

    def format_lines(self) -> list[str]:
        lines = [f"# calibration: {self.description}; activation amax per op:"]
        for path, roles in self.ranges.items():
            lines.append(f"#   {path}: " + ", ".join(f"{role} {amax:.4g}" for role, amax in roles.items()))
        return lines


@dataclass
class Program:
    """A graph plus its weights' expressions and the model config it came from."""

    graph_module: torch.fx.GraphModule
    config: Any
    source_description: str = ""
    trace_seconds: float = 0.0
    # Parallel layout of this graph (filled by sharding passes); a program is one rank's graph.
    attributes: dict[str, Any] = field(default_factory=dict)
    # A sharded program: one program per rank (`rank = pp_rank * tp + tp_rank`). This program's own graph stays
    # the unsharded, logical one; passes after `shard` are mapped over the ranks by the pass manager.
    ranks: tuple[Program, ...] = ()
    # Activation ranges measured by `calibrate` (None before it runs); ranks inherit them.
    calibration: Calibration | None = None
    # Text -> token ids with the model's tokenizer, attached by the driver (`compiler.api.load`) for passes that read
    # text (`calibrate`); None when the source has no tokenizer.
    tokenize: Callable[[str], list[int]] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_exported(
        cls, exported: torch.export.ExportedProgram, weights: dict[str, WeightExpr], config: Any
    ) -> Program:
        graph_module = exported.graph_module
        for node in list(graph_module.graph.nodes):
            if node.op == "placeholder" and node.name in weights:
                node.meta["weight"] = weights[node.name]
                # `p_model_model_layers_0_...` -> `layers_0_...`: export's prefixes say nothing to a reader.
                readable = re.sub(r"^[pbc]_(model_)*", "", node.name)
                node._rename(readable)
        graph_module.meta.pop("forward_arg_names", None)
        return cls(graph_module, config)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph

    def clone(self) -> Program:
        """A new program whose graph can be rewritten without touching this one (metadata dicts are copied)."""
        new_graph = torch.fx.Graph()
        value_map: dict[torch.fx.Node, torch.fx.Node] = {}
        output = new_graph.graph_copy(self.graph, value_map)
        new_graph.output(output)
        for old, new in value_map.items():
            new.meta = dict(old.meta)
        module = torch.fx.GraphModule(self.graph_module, new_graph)
        return Program(
            module,
            self.config,
            self.source_description,
            self.trace_seconds,
            copy.deepcopy(self.attributes),
            tuple(rank.clone() for rank in self.ranks),
            self.calibration,
            self.tokenize,
        )

    def weight_nodes(self) -> list[torch.fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder" and "weight" in n.meta]

    def input_nodes(self) -> list[torch.fx.Node]:
        """The runtime inputs a caller passes (`input_ids`, and `cache_position` in a cached program): neither
        weights nor caches."""
        return [
            n for n in self.graph.nodes if n.op == "placeholder" and "weight" not in n.meta and "kv_cache" not in n.meta
        ]

    def cache_nodes(self) -> list[torch.fx.Node]:
        """The KV cache placeholders, in graph order (layer by layer, key before value)."""
        return [n for n in self.graph.nodes if n.op == "placeholder" and "kv_cache" in n.meta]

    def cache_specs(self) -> dict[str, KVCacheSpec]:
        return {node.name: node.meta["kv_cache"] for node in self.cache_nodes()}

    def cache_bytes_per_sequence(self) -> int:
        return sum(spec.bytes_per_sequence for spec in self.cache_specs().values())

    def weights(self) -> dict[str, WeightExpr]:
        return {node.name: node.meta["weight"] for node in self.weight_nodes()}

    def weight_bytes(self) -> int:
        return sum(expr.nbytes for expr in self.weights().values())

    def op_counts(self) -> Counter[str]:
        return Counter(op_name(node) for node in self.graph.nodes if node.op == "call_function")

    def format(self, weights: bool = True) -> str:
        return format_program(self, weights=weights)


def op_name(node: torch.fx.Node) -> str:
    """`aten.linear`, `moec.moe`, `getitem`: the stable name of a node's target."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        namespace = target.namespace
        base = target._schema.name.split("::")[-1]
        overload = target._overloadname
        return f"{namespace}.{base}" + ("" if overload == "default" else f".{overload}")
    return getattr(target, "__name__", str(target))


def _symbol_names(program: Program) -> dict[Any, Any]:
    """Export names dynamic dims by hash (`s27`); print them as `batch` and `seq` instead, deterministically."""
    import sympy

    names: dict[Any, Any] = {}
    for node in program.input_nodes():
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        for size, label in zip(value.shape, ("batch", "seq")):
            if isinstance(size, torch.SymInt):
                expr = size.node.expr
                if isinstance(expr, sympy.Symbol) and expr not in names:
                    names[expr] = sympy.Symbol(label)
    return names


def _format_size(size: Any, names: dict[Any, Any]) -> str:
    if isinstance(size, torch.SymInt):
        return str(size.node.expr.xreplace(names)).replace(" ", "")
    return str(size)


def format_value_type(value: Any, names: dict[Any, Any]) -> str:
    if isinstance(value, torch.Tensor):
        return format_type([_format_size(s, names) for s in value.shape], value.dtype)
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(format_value_type(v, names) for v in value) + ")"
    if isinstance(value, torch.SymInt):
        return f"sym {_format_size(value, names)}"
    return type(value).__name__


def _format_arg(arg: Any) -> str:
    if isinstance(arg, torch.fx.Node):
        return f"%{arg.name}"
    if isinstance(arg, (tuple, list)):
        return "[" + ", ".join(_format_arg(a) for a in arg) + "]"
    if isinstance(arg, torch.dtype):
        return str(arg).removeprefix("torch.")
    if isinstance(arg, float):
        return repr(arg)
    if isinstance(arg, str):
        return repr(arg)
    return str(arg)


def format_node(node: torch.fx.Node, names: dict[Any, Any]) -> str:
    value_type = format_value_type(node.meta.get("val"), names) if "val" in node.meta else "?"
    if node.op == "placeholder":
        weight = node.meta.get("weight")
        if weight is not None:
            return f"%{node.name}: {weight.type_str} = weight {weight.describe()}"
        cache = node.meta.get("kv_cache")
        if cache is not None:
            return f"%{node.name}: {value_type} = kv cache ({cache.describe()})"
        return f"%{node.name}: {value_type} = input"
    if node.op == "output":
        return "return " + _format_arg(node.args[0])
    args = [_format_arg(a) for a in node.args]
    args += [f"{key}={_format_arg(value)}" for key, value in node.kwargs.items()]
    return f"%{node.name}: {value_type} = {op_name(node)}({', '.join(args)})"


def format_program(program: Program, weights: bool = True) -> str:
    """Deterministic text: op counts, then one line per node with its type inline; a sharded program prints each
    rank's program under a `== rank r` header."""
    if program.ranks:
        lines = [f"# {program.source_description}" if program.source_description else "# program"]
        layout = ", ".join(f"{k}={v}" for k, v in sorted(program.attributes.items()))
        lines.append(f"# sharded over {len(program.ranks)} ranks: {layout}")
        text = "\n".join(lines) + "\n"
        for index, rank in enumerate(program.ranks):
            text += f"== rank {index}\n" + format_program(rank, weights=weights)
        return text
    names = _symbol_names(program)
    counts = program.op_counts()
    lines = [f"# {program.source_description}" if program.source_description else "# program"]
    if program.attributes:
        lines.append("# " + ", ".join(f"{k}={v}" for k, v in sorted(program.attributes.items())))
    lines.append(f"# weights: {len(program.weight_nodes())} tensors, {program.weight_bytes():,} bytes")
    specs = list(program.cache_specs().values())
    if specs:
        dtypes = ", ".join(sorted({dtype_name(spec.dtype) for spec in specs}))
        lines.append(
            f"# kv cache: {len(specs)} tensors, {program.cache_bytes_per_sequence():,} bytes per sequence "
            f"(max_seq {max(spec.max_seq for spec in specs)}, {dtypes})"
        )
    if program.calibration is not None:
        lines += program.calibration.format_lines()
    lines.append("# op counts:")
    lines += [f"#   {name}: {count}" for name, count in sorted(counts.items())]
    lines.append("graph:")
    for node in program.graph.nodes:
        if node.op == "placeholder" and "weight" in node.meta and not weights:
            continue
        lines.append("  " + format_node(node, names))
    return "\n".join(lines) + "\n"
