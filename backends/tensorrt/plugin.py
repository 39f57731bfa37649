"""The `MoE` TensorRT plugin (IPluginV3, version "1", namespace "moec"), implemented in Python.

before: the ONNX node `trt.plugins::MoE(x, router, w13, w2)` written by `export_onnx(..., moe="plugin")`, with
        attributes plugin_version="1", plugin_namespace="moec", num_experts (E, routed over), num_local_experts
        (E', the rows of w13/w2), expert_offset (the first local expert's id), top_k, normalization, activation;
        weight-only quantized experts (`moec.quantized_moe`): `MoE(x, router, w13 codes, w2 codes, w13 scales,
        w2 scales)` with `precision` ("int8" codes, or "int4" nibble pairs, compiler/quantization.py's layout; both
        arrive as INT8 tensors, see `supports_format_combination`) and `group_size` (0: one scale per row), scales
        in the activation dtype; FP8 experts (`moec.fp8_moe`): the same six inputs with `precision` "fp8" (e4m3
        bytes as INT8, one float32 scale per expert) and the float attributes w13_input_scale / w2_input_scale
after:  one IPluginV3 layer in the TensorRT network; its attributes (plus the activation dtype, learnt from the
        network) are serialized into the engine by `get_fields_to_serialize`.

The plugin's code is Python, so it is NOT inside the engine file: a process that deserializes an engine built with
`--moe-plugin enable` must first run

    import backends.tensorrt.plugin
    backends.tensorrt.plugin.register_moe_plugin()

(`backends.tensorrt.loader` does this itself). On the GPU, `enqueue` wraps TensorRT's device pointers as torch
tensors on TensorRT's stream, routes with `backends/torch/kernels.route` and runs moec's fused Triton kernel
(`backends/torch/triton_moe.fused_moe`, on the codes for quantized experts); float32, or a machine without Triton,
uses the sort-by-expert reference (quantized experts: dequantized one expert at a time).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backends.tensorrt.runtime import dtype_name, import_tensorrt

PLUGIN_NAME = "MoE"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "moec"
NORMALIZATIONS = ("none", "renormalize")
ACTIVATIONS = ("swiglu",)
# Field name → (kind, default). Ints are INT32 plugin fields, floats FLOAT32, strings CHAR fields.
_FIELDS: dict[str, tuple[str, Any]] = {
    "num_experts": ("int", 0),
    "num_local_experts": ("int", 0),
    "top_k": ("int", 0),
    "normalization": ("str", "none"),
    "activation": ("str", "swiglu"),
    "dtype": ("str", ""),
    "expert_offset": ("int", 0),
    "precision": ("str", ""),  # "" float experts; "int8" / "int4" weight-only codes, "fp8" (+ two scale inputs)
    "group_size": ("int", 0),
    "w13_input_scale": ("float", 1.0),  # fp8: the static scales of the experts' inputs and SwiGLU output
    "w2_input_scale": ("float", 1.0),
}
PRECISIONS = ("", "int8", "int4", "fp8")
_FIELD_TYPES = {"int": "INT32", "str": "CHAR", "float": "FLOAT32"}
# Not ONNX attributes: the plugin learns them from the network (`configure_plugin`) and serializes them.
_LEARNT_FIELDS = ("dtype",)

trt = import_tensorrt()


def _decode_fields(fields: Any) -> dict[str, Any]:
    """A PluginFieldCollection (from the ONNX parser or an engine) → {name: int | str}."""
    values: dict[str, Any] = {name: default for name, (_, default) in _FIELDS.items()}
    for field in fields or ():
        if field.name not in _FIELDS:
            raise ValueError(f"MoE plugin: unknown attribute {field.name!r}; known: {', '.join(_FIELDS)}")
        data = np.asarray(field.data)
        if _FIELDS[field.name][0] == "int":
            values[field.name] = int(data.reshape(-1)[0])
        elif _FIELDS[field.name][0] == "float":
            values[field.name] = float(data.astype(np.float32).reshape(-1)[0])
        else:
            values[field.name] = data.astype(np.uint8).tobytes().split(b"\0", 1)[0].decode()
    return values


class _EncodedFields:
    """A PluginFieldCollection plus the numpy arrays behind it: a PluginField points into its array without owning
    it, so the arrays must outlive every use of the collection."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.arrays: list[np.ndarray] = []
        fields = []
        for name, (kind, _) in _FIELDS.items():
            if kind == "int":
                array = np.array([values[name]], dtype=np.int32)
                field_type = trt.PluginFieldType.INT32
            elif kind == "float":
                array = np.array([values[name]], dtype=np.float32)
                field_type = trt.PluginFieldType.FLOAT32
            else:
                array = np.array(list(values[name].encode() + b"\0"), dtype=np.int8)
                field_type = trt.PluginFieldType.CHAR
            self.arrays.append(array)
            fields.append(trt.PluginField(name, array, field_type))
        self.collection = trt.PluginFieldCollection(fields)


class MoEPlugin(  # type: ignore[misc]
    trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime
):
    """One Mixtral MoE block: y[..., H] = Σ_k weight_k · SwiGLU-expert_k(x); inputs (x, router, w13, w2), and the
    two scales after quantized experts' codes."""

    def __init__(self, values: dict[str, Any]) -> None:
        trt.IPluginV3.__init__(self)
        trt.IPluginV3OneCore.__init__(self)
        trt.IPluginV3OneBuild.__init__(self)
        trt.IPluginV3OneRuntime.__init__(self)
        if values["normalization"] not in NORMALIZATIONS:
            raise ValueError(f"MoE plugin: normalization {values['normalization']!r} not in {NORMALIZATIONS}")
        if values["activation"] not in ACTIVATIONS:
            raise ValueError(f"MoE plugin: activation {values['activation']!r} not in {ACTIVATIONS}")
        if values["precision"] not in PRECISIONS or values["group_size"] < 0 or not (
            values["w13_input_scale"] > 0 and values["w2_input_scale"] > 0
        ):
            raise ValueError(
                f"MoE plugin: precision {values['precision']!r} not in {PRECISIONS[1:]} (or empty for float experts), "
                f"group_size {values['group_size']} < 0, or input scales {values['w13_input_scale']}, "
                f"{values['w2_input_scale']} not positive"
            )
        experts, local, offset = values["num_experts"], values["num_local_experts"], values["expert_offset"]
        if values["top_k"] < 1 or local < 1 or offset < 0 or offset + local > experts:
            raise ValueError(
                f"MoE plugin: need top_k >= 1 and experts [expert_offset, expert_offset + num_local_experts) among "
                f"the num_experts routed; got top_k={values['top_k']}, num_experts={experts}, "
                f"num_local_experts={local}, expert_offset={offset}"
            )
        self.values = dict(values)
        self.num_outputs = 1
        self.plugin_name = PLUGIN_NAME
        self.plugin_version = PLUGIN_VERSION
        self.plugin_namespace = PLUGIN_NAMESPACE

    # --- core / build -------------------------------------------------------------------------------------------

    def get_capability_interface(self, capability_type: Any) -> Any:
        return self

    def clone(self) -> MoEPlugin:
        return MoEPlugin(self.values)

    def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
        return [input_types[0]]

    def get_output_shapes(self, inputs: list[Any], shape_inputs: list[Any], expr_builder: Any) -> list[Any]:
        return [trt.DimsExprs(inputs[0])]

    def supports_format_combination(self, pos: int, in_out: list[Any], num_inputs: int) -> bool:
        desc = in_out[pos].desc
        if desc.format != trt.TensorFormat.LINEAR:
            return False
        activation = in_out[0].desc.type
        if pos == 0:
            return activation in (trt.float32, trt.float16, trt.bfloat16)
        if pos == 1:  # the router may be kept in float32 while the experts run in half precision
            return desc.type in (trt.float32, activation)
        precision = self.values["precision"]
        if precision and pos in (2, 3):
            # The codes' bytes, typed INT8 for int4 and fp8 too: TensorRT-RTX 1.7's build process died
            # (malloc_consolidate(): invalid chunk size, heap corruption) on a plugin layer with UINT8 inputs, where
            # INT8 ones build; INT8 bytes also keep FP8 weights away from TensorRT's own FP8 type rules.
            return desc.type == trt.int8
        if precision == "fp8" and pos in (4, 5):  # one float32 scale per expert
            return desc.type == trt.float32
        return desc.type == activation  # float experts, weight-only scales, the output

    def configure_plugin(self, inputs: list[Any], outputs: list[Any]) -> None:
        self.values["dtype"] = dtype_name(inputs[0].desc.type)

    def get_workspace_size(self, inputs: list[Any], outputs: list[Any]) -> int:
        return 0

    def get_valid_tactics(self) -> list[int]:
        return []

    # --- runtime ------------------------------------------------------------------------------------------------

    def get_fields_to_serialize(self) -> Any:
        self._serialized = _EncodedFields(self.values)
        return self._serialized.collection

    def on_shape_change(self, inputs: list[Any], outputs: list[Any]) -> None:
        self.values["dtype"] = dtype_name(inputs[0].type)

    def set_tactic(self, tactic: int) -> None:
        return None

    def attach_to_context(self, resource_context: Any) -> MoEPlugin:
        return self.clone()

    def enqueue(
        self,
        input_desc: list[Any],
        output_desc: list[Any],
        inputs: list[int],
        outputs: list[int],
        workspace: int,
        stream: int,
    ) -> None:
        import torch

        tensors = [_device_tensor(ptr, desc) for ptr, desc in zip(inputs, input_desc)]
        x, router, w13, w2 = tensors[:4]
        scales = tuple(tensors[4:6]) if self.values["precision"] else None
        out = _device_tensor(outputs[0], output_desc[0])
        with torch.cuda.stream(torch.cuda.ExternalStream(stream, device=x.device)):
            moe_forward(x, router, w13, w2, self.values, out, scales)


def moe_forward(x: Any, router: Any, w13: Any, w2: Any, values: dict[str, Any], out: Any,
                scales: tuple[Any, Any] | None = None) -> None:
    """The plugin's computation on torch tensors (any device), written into `out` (x's shape and dtype).
    Quantized experts (`values["precision"]`): `w13`/`w2` are the codes and `scales` their (w13, w2) scales."""
    import torch

    from backends.torch import triton_moe
    from backends.torch.kernels import DequantizedExperts, fp8_experts_reference, moe_experts_reference, route

    hidden = x.shape[-1]
    tokens = x.reshape(-1, hidden)
    routed = tokens if router.dtype == tokens.dtype else tokens.to(router.dtype)
    experts, weights = route(routed, router, values["top_k"], values["normalization"])
    flat_out = out.view(-1, hidden)
    offset = values["expert_offset"]
    precision, group_size = values.get("precision", ""), values.get("group_size", 0)
    if precision:
        if scales is None:
            raise ValueError(f"MoE plugin: {precision} experts need their scales")
        if precision in ("int4", "fp8"):  # their bytes arrive typed int8 (see supports_format_combination)
            storage = torch.uint8 if precision == "int4" else torch.float8_e4m3fn
            w13, w2 = w13.view(storage), w2.view(storage)
        if precision == "fp8":
            in_scale, mid_scale = values["w13_input_scale"], values["w2_input_scale"]
            if tokens.is_cuda and triton_moe.unsupported_reason(tokens, w13, w2, precision, scales) is None:
                triton_moe.fused_moe(tokens, experts, weights, w13, w2, expert_offset=offset, out=flat_out,
                                     precision="fp8", w13_scales=scales[0], w2_scales=scales[1],
                                     w13_input_scale=in_scale, w2_input_scale=mid_scale)
            else:
                flat_out.copy_(fp8_experts_reference(tokens, experts, weights, w13, scales[0], w2, scales[1], in_scale,
                                                     mid_scale, offset))
        elif tokens.is_cuda and triton_moe.unsupported_reason(tokens, w13, w2, precision, scales) is None:
            triton_moe.fused_moe(tokens, experts, weights, w13, w2, expert_offset=offset, out=flat_out,
                                 precision=precision, w13_scales=scales[0], w2_scales=scales[1], group_size=group_size)
        else:  # the torch backend's reference: only the experts that receive tokens are dequantized
            dequantized = [DequantizedExperts(w, s, precision, group_size) for w, s in zip((w13, w2), scales)]
            flat_out.copy_(moe_experts_reference(tokens, experts - offset, weights, *dequantized))  # type: ignore[arg-type]
    elif offset or w13.shape[0] != router.shape[0]:
        # Expert parallelism: this rank holds experts [offset, offset + E'); others' slots contribute 0.
        flat_out.copy_(moe_experts_reference(tokens, experts - offset, weights, w13, w2))
    elif tokens.is_cuda and tokens.dtype in (torch.float16, torch.bfloat16) and triton_moe.is_available():
        triton_moe.fused_moe(tokens, experts, weights, w13, w2, out=flat_out)
    else:
        flat_out.copy_(moe_experts_reference(tokens, experts, weights, w13, w2))


class _CudaArray:
    """A raw device pointer seen through `__cuda_array_interface__`, so torch can wrap it without a copy."""

    def __init__(self, pointer: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (pointer, False), "version": 3}


def _device_tensor(pointer: int, desc: Any) -> Any:
    import torch

    shape = tuple(int(d) for d in desc.dims)
    # bfloat16 has no array-interface type string: wrap as int16 and reinterpret.
    typestr, view = {
        trt.float32: ("<f4", None),
        trt.float16: ("<f2", None),
        trt.bfloat16: ("<i2", torch.bfloat16),
        trt.int32: ("<i4", None),
        trt.int64: ("<i8", None),
        trt.int8: ("|i1", None),  # quantized codes (int4 nibble pairs and e4m3 as their bytes)
    }[desc.type]
    tensor = torch.as_tensor(_CudaArray(pointer, shape, typestr), device="cuda")
    return tensor.view(view) if view is not None else tensor


class MoEPluginCreator(trt.IPluginCreatorV3One):  # type: ignore[misc]
    """Creates `MoEPlugin`s from ONNX attributes (build) or from an engine's serialized fields (deserialize)."""

    def __init__(self) -> None:
        trt.IPluginCreatorV3One.__init__(self)
        self.name = PLUGIN_NAME
        self.plugin_version = PLUGIN_VERSION
        self.plugin_namespace = PLUGIN_NAMESPACE
        self.field_names = trt.PluginFieldCollection(
            [
                trt.PluginField(name, np.array([]), getattr(trt.PluginFieldType, _FIELD_TYPES[kind]))
                for name, (kind, _) in _FIELDS.items()
                if name not in _LEARNT_FIELDS
            ]
        )

    def create_plugin(self, name: str, fields: Any, phase: Any) -> MoEPlugin:
        return MoEPlugin(_decode_fields(fields))


_CREATOR: MoEPluginCreator | None = None


def register_moe_plugin() -> MoEPluginCreator:
    """Registers the `MoE` creator (namespace `moec`) with TensorRT's plugin registry, once per process.

    Must run before parsing an ONNX file with `MoE` nodes and before deserializing an engine that holds one.
    """
    global _CREATOR
    if _CREATOR is None:
        creator = MoEPluginCreator()
        registry = trt.get_plugin_registry()
        if not registry.register_creator(creator, PLUGIN_NAMESPACE):
            raise RuntimeError(
                f"TensorRT refused to register plugin {PLUGIN_NAMESPACE}::{PLUGIN_NAME} v{PLUGIN_VERSION}"
            )
        # The registry holds a raw pointer: the Python object must live as long as the process.
        _CREATOR = creator
    return _CREATOR
