"""Trace a Hugging Face Mixtral into moec's IR with torch.export, on the meta device.

before: a `ModelSource` (config + lazy weights)
after:  a `Program` whose graph takes `input_ids[batch, seq]` (both dynamic) and returns logits; every parameter
        and buffer is a placeholder carrying its `WeightExpr` in `node.meta["weight"]`.

Two parts of the Hugging Face model are swapped for export-friendly forms with the same semantics:
- The experts. transformers' loop visits only the experts some token picked (`nonzero`, a data-dependent shape that
  export cannot trace). Here every expert runs on every token and its output is weighted by that token's routing
  weight for it (zero when not picked): the same sum, in the decomposed form `fuse-moe` recognizes.
- Attention (by default). Mask construction differs across transformers 5.x releases and is noise for a compiler, so
  attention is registered through transformers' public `AttentionInterface` as the canonical `moec.attention` op
  (causal, grouped-query, sliding window). The projections, rotary embedding and reshapes around it are traced as
  is. `attention="eager"` traces Hugging Face's eager attention and mask instead; `canonicalize` folds them back.
"""

from __future__ import annotations

import copy
import re
import time
import types
from typing import Any

import torch
import torch.nn.functional as F

import compiler.ops  # noqa: F401 - registers moec ops used while tracing
from compiler.errors import UnsupportedModelError
from compiler.ir import Program
from compiler.weights import cast_weight
from frontends.hf.source import ModelSource

ATTENTION_IMPLEMENTATION = "moec"
ATTENTION_MODES = ("moec", "eager")
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 7
TRACED_LAYERS = 2  # layers exported; the rest are stamped from the last one
MAX_BATCH = 4096


def _moec_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return torch.ops.moec.attention(query, key, value, float(scale), int(sliding_window or 0)), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, _moec_attention)


def _decomposed_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    output = torch.zeros_like(hidden_states)
    for expert in range(self.num_experts):
        # Routing weight of this expert per token (float32 like HF's router); zero where the token did not pick it.
        routing = (top_k_weights * (top_k_index == expert)).sum(dim=-1, keepdim=True)
        gate, up = F.linear(hidden_states, self.gate_up_proj[expert]).chunk(2, dim=-1)
        expert_out = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
        output = output + (expert_out * routing).to(output.dtype)
    return output


class _Logits(torch.nn.Module):
    """input_ids -> logits, with no cache and no dict output, which is what the IR computes."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def build_meta_model(
    config: Any, dtype: torch.dtype, num_layers: int | None = None, attention: str = "moec"
) -> torch.nn.Module:
    """A MixtralForCausalLM on the meta device, in export-friendly form (see the module docstring).

    Parameters take `dtype`; buffers keep theirs (the rotary frequencies stay float32, as in Hugging Face).
    `attention="eager"` keeps Hugging Face's own eager attention (mask construction, repeat_kv, matmuls, softmax),
    which `canonicalize` then rewrites into `moec.attention`.
    """
    from transformers import MixtralForCausalLM

    if attention not in ATTENTION_MODES:
        raise UnsupportedModelError(f"attention={attention!r} is not one of {', '.join(ATTENTION_MODES)}")
    _register_attention()
    config = copy.deepcopy(config)
    config._attn_implementation = ATTENTION_IMPLEMENTATION if attention == "moec" else "eager"
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
    model.eval()
    for module in model.modules():
        if type(module).__name__ == "MixtralExperts":
            module.forward = types.MethodType(_decomposed_experts_forward, module)
    return model


def trace(source: ModelSource, dtype: torch.dtype | None = None, attention: str = "moec") -> Program:
    """Exports the model with dynamic batch and sequence length; no weight is read.

    `attention`: "moec" emits `moec.attention` directly (the default: no mask subgraph); "eager" traces Hugging
    Face's eager attention as ATen ops, for `canonicalize` to recognize.

    Decoder layers are identical, so at most two are exported and layers 2.. are stamped from layer 1's subgraph
    (`_stamp_layers`): tracing costs the same for 2 or 32 layers.
    """
    started = time.perf_counter()
    dtype = dtype or source.weights["model.embed_tokens.weight"].dtype
    num_layers = source.config.num_hidden_layers
    model = _Logits(build_meta_model(source.config, dtype, min(num_layers, TRACED_LAYERS), attention))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    seq = torch.export.Dim("seq", min=1, max=max(source.config.max_position_embeddings, EXAMPLE_SEQ + 1))
    example = torch.zeros((EXAMPLE_BATCH, EXAMPLE_SEQ), dtype=torch.long, device="meta")
    with torch.no_grad():
        exported = torch.export.export(model, (example,), dynamic_shapes={"input_ids": {0: batch, 1: seq}})
    exported = exported.run_decompositions({})
    weights = _weights_for(exported, source)
    if num_layers > TRACED_LAYERS:
        _stamp_layers(exported, weights, source, num_layers)
    program = Program.from_exported(exported, weights, source.config)
    program.trace_seconds = time.perf_counter() - started
    program.source_description = source.description
    return program


def _weight_for(source: ModelSource, fqn: str, placeholder: torch.fx.Node) -> Any:
    """The source's expression for a lifted parameter/buffer, cast to the dtype the traced graph uses."""
    name = fqn.removeprefix("model.")
    if name not in source.weights:
        raise UnsupportedModelError(f"the traced model needs {name}, which the source does not provide")
    return cast_weight(source.weights[name], placeholder.meta["val"].dtype)


def _lifted_targets(exported: torch.export.ExportedProgram) -> dict[str, str]:
    signature = exported.graph_signature
    targets = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    targets.update(getattr(signature, "inputs_to_lifted_tensor_constants", {}))
    return targets


def _weights_for(exported: torch.export.ExportedProgram, source: ModelSource) -> dict[str, Any]:
    placeholders = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    return {
        name: _weight_for(source, fqn, placeholders[name]) for name, fqn in _lifted_targets(exported).items()
    }


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def _layer_of(node: torch.fx.Node, targets: dict[str, str]) -> int | None:
    if node.op == "placeholder":
        match = _LAYER.search(targets.get(node.name, ""))
        return int(match.group(1)) if match else None
    layers = [int(m.group(1)) for path, _ in node.meta.get("nn_module_stack", {}).values() for m in [_LAYER.search(path)] if m]
    return layers[-1] if layers else None


def _stamp_layers(
    exported: torch.export.ExportedProgram, weights: dict[str, Any], source: ModelSource, num_layers: int
) -> None:
    """Copies decoder layer 1's subgraph for layers 2..num_layers-1, each bound to its own weights.

    Layer 1's subgraph reads exactly one value of layer 0 (the residual stream), its own weights, and values shared
    by all layers (rotary cos/sin, symbolic sizes); its result is read only by what follows the layers. Anything
    else means the layers are not uniform, and tracing says so instead of guessing.
    """
    graph = exported.graph
    targets = _lifted_targets(exported)
    layer = {node: _layer_of(node, targets) for node in graph.nodes}
    template = [n for n in graph.nodes if n.op == "call_function" and layer[n] == 1]
    template_set = set(template)
    inputs_from_layer0 = {a for n in template for a in n.all_input_nodes if layer[a] == 0 and a.op != "placeholder"}
    outputs = {n for n in template if any(u not in template_set for u in n.users)}
    if len(inputs_from_layer0) != 1 or len(outputs) != 1:
        raise UnsupportedModelError(
            "decoder layers are not uniform (layer 1 reads "
            f"{len(inputs_from_layer0)} values of layer 0 and exposes {len(outputs)}); cannot stamp layers"
        )
    (layer_input,) = inputs_from_layer0
    # A value shared by all layers must not depend on layer 0 (it would be computed once, from the wrong layer).
    downstream_of_layer0 = set()
    for node in graph.nodes:
        if layer[node] == 0 or any(a in downstream_of_layer0 for a in node.all_input_nodes):
            downstream_of_layer0.add(node)
    shared = {a for n in template for a in n.all_input_nodes if a not in template_set and layer[a] != 1} - {layer_input}
    if any(a in downstream_of_layer0 for a in shared):
        raise UnsupportedModelError("decoder layer 1 reads values derived from layer 0 other than its input")
    (layer_output,) = outputs
    consumers = [u for u in layer_output.users if u not in template_set]
    first_consumer = min(consumers, key=lambda n: list(graph.nodes).index(n))
    layer1_weights = [n for n in graph.nodes if n.op == "placeholder" and layer[n] == 1]
    first_input = next(n for n in graph.nodes if n.op == "placeholder" and n.name not in targets)
    previous_output = layer_output
    for index in range(2, num_layers):
        mapping: dict[torch.fx.Node, torch.fx.Node] = {layer_input: previous_output}
        for weight in layer1_weights:
            fqn = re.sub(r"(^|\.)layers\.1\.", rf"\g<1>layers.{index}.", targets[weight.name], count=1)
            with graph.inserting_before(first_input):
                stamped = graph.placeholder(weight.name.replace("_layers_1_", f"_layers_{index}_", 1))
            stamped.meta = dict(weight.meta)
            weights[stamped.name] = _weight_for(source, fqn, weight)
            mapping[weight] = stamped
        with graph.inserting_before(first_consumer):
            for node in template:
                copied = graph.node_copy(node, lambda arg: mapping.get(arg, arg))
                copied.meta = dict(node.meta)
                copied.meta["nn_module_stack"] = {
                    key.replace("layers.1", f"layers.{index}"): (path.replace("layers.1", f"layers.{index}", 1), kind)
                    for key, (path, kind) in node.meta.get("nn_module_stack", {}).items()
                }
                mapping[node] = copied
        previous_output = mapping[layer_output]
    for consumer in consumers:
        consumer.replace_input_with(layer_output, previous_output)
