"""What every Triton module of the torch backend shares: the optional import and the device rule of its dispatch.

Triton is optional (CPU-only installs may lack it); without CUDA the kernels still run in Triton's interpreter when
`TRITON_INTERPRET=1` (the CPU tests do this), which must be set before the kernels' `@triton.jit` decoration runs.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAVE_TRITON = False

__all__ = ["HAVE_TRITON", "device_reason", "interpreting", "tl", "triton"]


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_reason(tensor: torch.Tensor, have_triton: bool) -> str | None:
    """The first rule of every dispatch: Triton present, and the operands on CUDA (or the interpreter on).
    `have_triton` is the caller module's flag (tests switch one module off)."""
    if not have_triton:
        return "triton is not installed"
    if not (tensor.is_cuda or interpreting()):
        return f"operands are on {tensor.device}, not CUDA (and TRITON_INTERPRET is off)"
    return None
