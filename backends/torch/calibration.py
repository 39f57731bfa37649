"""Activation ranges of a program on token ids, measured by the reference kernels (what `calibrate` records; the
roles are `compiler.calibration`'s).

before: a float program and token ids [sequences, seq_len]
after:  {node name: {role: amax}} over every token, in graph order

The weights are materialized on the CPU and the program runs node by node (`TorchExecutable.run_observed`), each
linear, moe and attention op's operands read before it runs. A moe's intermediate (w2's input) is not an operand: it
is computed here as the float `moe` computes it, from the op's own operands and routing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from backends.torch.kernels import route
from backends.torch.runtime import TorchExecutable
from compiler import ops
from compiler.calibration import ROLES
from compiler.ir import Program

BATCH = 8  # sequences per forward pass


def moe_intermediate_amax(
    x: torch.Tensor, router_weight: torch.Tensor, w13: torch.Tensor, top_k: int, normalization: str,
    expert_offset: int = 0,
) -> float:
    """The largest |silu(gate) * up| a float `moe` computes on `x`, over each local expert's routed tokens."""
    flat = x.reshape(-1, x.shape[-1])
    experts, _ = route(flat, router_weight, top_k, normalization)
    intermediate = w13.shape[1] // 2
    amax = 0.0
    for expert in range(w13.shape[0]):
        tokens = (experts == expert + expert_offset).any(dim=-1)
        if not bool(tokens.any()):
            continue
        gate_up = F.linear(flat[tokens], w13[expert])
        activated = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
        amax = max(amax, float(activated.abs().amax()))
    return amax


def _amax(value: torch.Tensor) -> float:
    return float(value.detach().abs().amax())


def _ranges_of(node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, float]:
    if node.target == ops.linear:
        return {"input": _amax(args[0])}
    if node.target == ops.moe:
        x, router, w13, _, top_k, normalization = args[:6]
        offset = args[7] if len(args) > 7 else kwargs.get("expert_offset", 0)
        return {"input": _amax(x), "intermediate": moe_intermediate_amax(x, router, w13, top_k, normalization, offset)}
    return {"key": _amax(args[1]), "value": _amax(args[2])}


def measure_activation_ranges(
    program: Program, sequences: torch.Tensor, progress: Callable[[int], None]
) -> dict[str, dict[str, float]]:
    executable = TorchExecutable(program, "cpu")
    table: dict[str, dict[str, float]] = {}

    def observe(node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if node.target not in ROLES:
            return
        roles = table.setdefault(node.name, {})
        for role, amax in _ranges_of(node, args, kwargs).items():
            roles[role] = max(roles.get(role, 0.0), amax)

    done = 0
    for batch in sequences.split(BATCH):
        executable.run_observed(batch, observe)
        done += len(batch)
        progress(done)
    return table
