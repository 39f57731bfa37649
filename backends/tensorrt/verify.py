"""Run the exact ONNX file a TensorRT build parsed in onnxruntime (CPU), to check it against `backends/torch`.

before: `onnx/rank{r}.onnx` of a `--keep-onnx` build; with the MoE plugin it holds `trt.plugins::MoE` nodes,
        which onnxruntime cannot run
after:  an onnxruntime session over the same graph where each `MoE(x, router, w13, w2)` node is swapped for
        onnxruntime's `com.microsoft::MoE`, computed in float32:
            tokens = Reshape(x, [-1, H]); logits = Cast(MatMul(tokens, Transpose(router)), f32)
            y = Cast(com.microsoft.MoE(Cast(tokens, f32), logits, interleave(Cast(w13, f32)), -, Cast(w2, f32)), x)
        (`interleave` = gate/up rows interleaved, `swiglu_fusion=1`, as onnxruntime wants). An expert-parallel node
        (num_local_experts < num_experts) has its expert block zero-padded to all experts at expert_offset: a zero
        expert adds silu(0)·0 = 0, exactly what routing to another rank's expert adds here. A node of quantized
        experts, `MoE(x, router, w13 codes, w2 codes, w13 scales, w2 scales)` with `precision`/`group_size`, has its
        codes dequantized first, as compiler/quantization.py does: int8 Cast; int4 (its bytes typed INT8) each byte
        mod 256 in int32, the low (BitwiseAnd 15) and high (Div 16) nibbles interleaved along k, minus 8; times the
        scales, one per row or per group of k. Every
        other node is the file TensorRT read, untouched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from compiler.errors import MoecError

_FLOAT = TensorProto.FLOAT


def _initializer_dims(model: onnx.ModelProto, name: str) -> list[int]:
    for initializer in model.graph.initializer:
        if initializer.name == name:
            return list(initializer.dims)
    raise MoecError(f"MoE plugin node input {name!r} is not an initializer; cannot build its onnxruntime form")


def _scalar(graph: onnx.GraphProto, name: str, value: float | int) -> str:
    """A scalar initializer: int32 for ints (the nibble ops' operand type), float32 otherwise."""
    if isinstance(value, int):
        graph.initializer.append(helper.make_tensor(name, TensorProto.INT32, [], [value]))
    else:
        graph.initializer.append(helper.make_tensor(name, _FLOAT, [], [value]))
    return name


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """elem_type of every tensor onnx's shape inference can type (initializers, inputs, inferred values)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {init.name: init.data_type for init in model.graph.initializer}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        types[info.name] = info.type.tensor_type.elem_type
    return types


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == "MoE" and node.domain == "trt.plugins"]


def swap_plugin_for_onnxruntime(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every `trt.plugins::MoE` node replaced (see the module docstring)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    plugin_nodes = _plugin_nodes(result)
    if not plugin_nodes:
        return result
    types = _value_types(model)
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node not in plugin_nodes:
            new_nodes.append(node)
            continue
        attrs = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
        x, router, w13, w2 = node.input[:4]
        experts, rows, packed_hidden = _initializer_dims(model, w13)
        precision = _text(attrs.get("precision", ""))
        if precision == "fp8":
            raise MoecError(
                f"{node.name}: an FP8 MoE plugin node has no onnxruntime form (com.microsoft::MoE cannot quantize its "
                "SwiGLU output to e4m3 between the two GEMMs); check FP8 experts on the torch backend instead"
            )
        hidden = packed_hidden * (2 if precision == "int4" else 1)
        x_type = types.get(x, _FLOAT)
        router_type = types.get(router, _FLOAT)
        p = f"{node.name}/ort"

        def const(name: str, values: list[int]) -> str:
            graph.initializer.append(helper.make_tensor(f"{p}/{name}", TensorProto.INT64, [len(values)], values))
            return f"{p}/{name}"

        def add(op: str, inputs: list[str], output: str, domain: str = "", **kwargs: Any) -> str:
            name = f"{p}/{output}"
            new_nodes.append(helper.make_node(op, inputs, [name], name=name, domain=domain, **kwargs))
            return f"{p}/{output}"

        if precision:
            group_size = int(attrs.get("group_size", 0))

            def dequantized(codes: str, scales: str, label: str) -> str:
                dims = _initializer_dims(model, codes)
                width = dims[2] * (2 if precision == "int4" else 1)
                if precision == "int4":  # the bytes arrive typed int8: widen to int32 and take them mod 256
                    wide = add("BitwiseAnd", [add("Cast", [codes], f"{label}_i32", to=TensorProto.INT32),
                                              _scalar(graph, f"{p}/{label}_byte", 255)], f"{label}_bytes")
                    low = add("BitwiseAnd", [wide, _scalar(graph, f"{p}/{label}_mask", 15)], f"{label}_low")
                    high = add("Div", [wide, _scalar(graph, f"{p}/{label}_shift", 16)], f"{label}_high")
                    pairs = add("Concat", [add("Unsqueeze", [low, const(f"{label}_ax", [3])], f"{label}_lo4"),
                                           add("Unsqueeze", [high, const(f"{label}_ax2", [3])], f"{label}_hi4")],
                                f"{label}_pairs", axis=3)
                    nibbles = add("Reshape", [pairs, const(f"{label}_flat", [dims[0], dims[1], width])],
                                  f"{label}_nibbles")
                    values = add("Sub", [add("Cast", [nibbles], f"{label}_f", to=_FLOAT),
                                         _scalar(graph, f"{p}/{label}_eight", 8.0)], f"{label}_codes")
                else:
                    values = add("Cast", [codes], f"{label}_codes", to=_FLOAT)
                groups = 1 if group_size == 0 else width // group_size
                grouped = add("Reshape", [values, const(f"{label}_groups", [dims[0], dims[1], groups, -1])],
                              f"{label}_grouped")
                scale = add("Unsqueeze", [add("Cast", [scales], f"{label}_s32", to=_FLOAT), const(f"{label}_sax", [3])],
                            f"{label}_scale")
                weight = add("Mul", [grouped, scale], f"{label}_scaled")
                return add("Reshape", [weight, const(f"{label}_shape", [dims[0], dims[1], width])], f"{label}_float")

            w13 = dequantized(w13, node.input[4], "w13q")
            w2 = dequantized(w2, node.input[5], "w2q")
        tokens = add("Reshape", [x, const("tokens_shape", [-1, hidden])], "tokens")
        routed = tokens if router_type == x_type else add("Cast", [tokens], "tokens_router", to=router_type)
        logits = add("MatMul", [routed, add("Transpose", [router], "router_t", perm=[1, 0])], "logits")
        logits32 = add("Cast", [logits], "logits32", to=_FLOAT)
        pairs = add("Reshape", [w13, const("pairs_shape", [experts, 2, rows // 2, hidden])], "w13_pairs")
        pairs = add("Transpose", [pairs], "w13_pairs_t", perm=[0, 2, 1, 3])
        w13_interleaved = add("Reshape", [pairs, const("w13_shape", [experts, rows, hidden])], "w13_interleaved")
        offset, routed = int(attrs["expert_offset"]), int(attrs["num_experts"])

        def all_experts(name: str) -> str:
            if routed == experts:
                return name
            label = name.rsplit("/", 1)[-1]
            pads = const(f"{label}_pads", [offset, 0, 0, routed - offset - experts, 0, 0])
            return add("Pad", [name, pads], f"{label}_padded")

        moe = add(
            "MoE",
            [
                add("Cast", [tokens], "tokens32", to=_FLOAT),
                logits32,
                all_experts(add("Cast", [w13_interleaved], "w13_32", to=_FLOAT)),
                "",
                all_experts(add("Cast", [w2], "w2_32", to=_FLOAT)),
            ],
            "moe",
            domain="com.microsoft",
            k=int(attrs["top_k"]),
            activation_type="swiglu",
            swiglu_fusion=1,
            activation_alpha=1.0,
            activation_beta=0.0,
            normalize_routing_weights=int(_text(attrs["normalization"]) == "renormalize"),
        )
        moe_x = add("Cast", [moe], "moe_x", to=x_type)
        x_shape = add("Shape", [x], "x_shape")
        new_nodes.append(helper.make_node("Reshape", [moe_x, x_shape], list(node.output), name=f"{p}/out"))
    del graph.node[:]
    graph.node.extend(new_nodes)
    opsets = {entry.domain: entry for entry in result.opset_import}
    if "com.microsoft" not in opsets:
        result.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return result


def onnxruntime_file(onnx_path: str | os.PathLike[str]) -> Path:
    """`onnx_path` itself, or, when it holds plugin nodes, a sibling `*.onnxruntime.onnx` with them swapped (external
    data still resolves beside it)."""
    path = Path(onnx_path)
    model = onnx.load(str(path), load_external_data=False)
    if not _plugin_nodes(model):
        return path
    target = path.with_name(path.stem + ".onnxruntime.onnx")
    onnx.save(swap_plugin_for_onnxruntime(model), str(target))
    return target


def onnxruntime_session(onnx_path: str | os.PathLike[str]) -> Any:
    """A CPU onnxruntime session over `onnx_path` (plugin nodes swapped); external data resolves beside it."""
    import onnxruntime

    from backends.onnx.export import session_options

    path = str(onnxruntime_file(onnx_path))
    return onnxruntime.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"])


def decoder_ranks(directory: str | os.PathLike[str], vocab_size: int) -> Any:
    """Every rank of a `--keep-onnx` decoder build (config.json's `kv_cache`) as one `backends.onnx.ranks.RankDecoder`
    over the parsed ONNX files (plugins swapped), following config.json's steps: `greedy_generate` runs it."""
    from types import SimpleNamespace

    from backends.onnx.ranks import RankDecoder, RankExport
    from backends.tensorrt.loader import read_config

    directory = Path(directory)
    config = read_config(directory)
    if not config.get("kv_cache"):
        raise MoecError(f"{directory} holds stateless engines, not decoder engines (build with --kv-cache)")
    exports = []
    for entry in config["ranks"]:
        if any(engine["onnx"] is None for engine in entry["engines"]):
            raise MoecError(f"{directory} was built without --keep-onnx: the parsed ONNX files are gone")
        files = [SimpleNamespace(path=onnxruntime_file(directory / engine["onnx"])) for engine in entry["engines"]]
        exports.append(RankExport(entry["rank"], files, entry["steps"], entry["output"]))  # type: ignore[arg-type]
    return RankDecoder(exports, vocab_size)


def onnxruntime_decoder(onnx_path: str | os.PathLike[str]) -> Any:
    """The parsed ONNX of a decoder engine (past/present) as a `backends.onnx.decoder.OnnxDecoder` (plugins swapped)."""
    from backends.onnx.decoder import OnnxDecoder

    return OnnxDecoder(onnxruntime_file(onnx_path))


def run_onnxruntime(onnx_path: str | os.PathLike[str], input_ids: np.ndarray) -> np.ndarray:
    (logits,) = onnxruntime_session(onnx_path).run(None, {"input_ids": input_ids})
    return logits


def simulate_ranks(directory: str | os.PathLike[str], input_ids: np.ndarray) -> list[np.ndarray]:
    """Runs every rank of a `--keep-onnx` build in this process with onnxruntime, following each rank's steps from
    config.json, with the collectives done in numpy (all_reduce = sum over the group, all_gather = concatenation in
    group order, send/recv = a mailbox). Returns each rank's final value (logits where the rank returns them).

    Ranks advance in lockstep, one step each per round; a rank whose next step is a collective waits until every
    member of the group has reached it (or, for recv, until the matching send happened).
    """
    from backends.tensorrt.loader import read_config

    directory = Path(directory)
    config = read_config(directory)
    ranks = config["ranks"]
    sessions = {
        (entry["rank"], index): onnxruntime_session(directory / engine["onnx"])
        for entry in ranks
        for index, engine in enumerate(entry["engines"])
    }
    values: list[dict[str, np.ndarray]] = [{"input_ids": input_ids} for _ in ranks]
    position = [0] * len(ranks)
    mailbox: dict[tuple[int, int], np.ndarray] = {}
    while any(position[r] < len(ranks[r]["steps"]) for r in range(len(ranks))):
        progressed = False
        for r, entry in enumerate(ranks):
            if position[r] >= len(entry["steps"]):
                continue
            step = entry["steps"][position[r]]
            if "engine" in step:
                session = sessions[(r, step["engine"])]
                feeds = {inp.name: values[r][inp.name] for inp in session.get_inputs()}
                (values[r][step["output"]],) = session.run(None, feeds)
            elif step["collective"] in ("all_reduce", "all_gather"):
                group = step["group"]
                waiting = [
                    other for other in group
                    if position[other] >= len(ranks[other]["steps"])
                    or ranks[other]["steps"][position[other]].get("output") != step["output"]
                ]
                if waiting:
                    continue
                parts = [values[other][step["input"]] for other in group]
                if step["collective"] == "all_reduce":
                    total = np.sum(np.stack([part.astype(np.float32) for part in parts]), axis=0).astype(parts[0].dtype)
                    results = [total] * len(group)
                else:
                    results = [np.concatenate(parts, axis=step["dim"])] * len(group)
                for other, result in zip(group, results):
                    values[other][step["output"]] = result
                    position[other] += 1
                progressed = True
                continue
            elif step["collective"] == "send":
                mailbox[(r, step["dst"])] = values[r][step["input"]]
                values[r][step["output"]] = np.zeros((0,), dtype=np.float32)
            elif step["collective"] == "recv":
                if (step["src"], r) not in mailbox:
                    continue
                values[r][step["output"]] = mailbox.pop((step["src"], r))
            position[r] += 1
            progressed = True
        if not progressed:
            raise MoecError("simulated ranks deadlocked: the ranks' collective steps do not match")
    return [values[r][entry["output"]] for r, entry in enumerate(ranks)]
