"""Calibration's contract: which activation ranges `calibrate` records, and what it needs from outside the passes'
floor, which the driver installs (`install`): a way to run a program on token ids and measure those ranges (the torch
backend's reference kernels, `backends/torch/calibration.py`) and the builtin calibration text (shipped with the
embedded `tiny`).

The ranges, per op kind, by role (absolute maxima over every calibration token):
- `moec.linear`: `input` (its x).
- `moec.moe`: `input` (x, w13's input) and `intermediate` (silu(gate) * up over the tokens routed to each expert this
  op holds: w2's input).
- `moec.attention` / `moec.cached_attention`: `key` (after rope) and `value`: what a KV cache holds.
  (`moec.rope_cached_attention` reads its keys before rope: `calibrate` refuses a program that has it.)
The measured table is keyed by node name; `calibrate` re-keys it by module path (`compiler.ir.Calibration`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from compiler import ops
from compiler.errors import MoecError
from compiler.ir import Program

ROLES: dict[object, tuple[str, ...]] = {
    ops.linear: ("input",),
    ops.moe: ("input", "intermediate"),
    ops.attention: ("key", "value"),
    ops.cached_attention: ("key", "value"),
}

# (program, token ids [sequences, seq_len], progress(sequences done)) -> {node name: {role: amax}}, in graph order.
Measure = Callable[[Program, torch.Tensor, Callable[[int], None]], dict[str, dict[str, float]]]


@dataclass(frozen=True)
class CalibrationSupport:
    measure: Measure
    builtin_text: Callable[[], Path]


_installed: CalibrationSupport | None = None


def install(support: CalibrationSupport) -> None:
    """Called by the driver (`compiler.api`) when it loads: it alone may reach the backends and the frontends."""
    global _installed
    _installed = support


def support() -> CalibrationSupport:
    if _installed is None:
        raise MoecError(
            "calibrate runs the program on the torch backend, which the driver provides: import compiler.api "
            "(moec's `compile`) before running a pipeline with calibrate"
        )
    return _installed
