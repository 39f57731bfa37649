"""What every Triton module of the torch backend shares: the optional import and the device rule of its dispatch.

Triton is optional (CPU-only installs may lack it); without CUDA the kernels still run in Triton's interpreter when
`TRITON_INTERPRET=1` (the CPU tests do this), which must be set before the kernels' `@triton.jit` decoration runs.

Programmatic dependent launch (PDL, Hopper and later): a decode step is ~400 short kernels back to back, and each
launch leaves the GPU idle for ~1.5 us between one kernel's last block and the next one's first (0.6 ms of a 7.6 ms
step, measured). Kernels launched with `pdl_launch(...)` may be scheduled while their predecessor still runs; each
one's first statement is `wait_for_producers(USE_PDL)`, which blocks until the predecessor has finished and its
writes are visible, and then lets the next kernel launch. Nothing but the launch overlaps: every read of a
predecessor's output still happens after it completed, so results are bit-identical with PDL on or off
(`MOEC_PDL=0` turns it off, for comparisons).
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

__all__ = ["HAVE_TRITON", "codes_in_ptx", "device_reason", "grouped_tile_ids", "interpreting",
           "pdl_launch", "tl", "triton", "wait_for_producers"]


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def codes_in_ptx() -> bool:
    """Whether kernels that take `ASM` turn weight codes into floats with inline PTX (`triton_quant.int4_codes` /
    `int8_codes` in the swapped tiles: a few integer ops per pair of codes; `triton_gemv_words._byte_floats` in the
    word GEMVs: one PRMT per code): on compiled kernels unless `MOEC_CODE_ASM` is "0" (comparisons); the
    interpreter runs no PTX."""
    return not interpreting() and os.environ.get("MOEC_CODE_ASM", "1") != "0"


def device_reason(tensor: torch.Tensor, have_triton: bool) -> str | None:
    """The first rule of every dispatch: Triton present, and the operands on CUDA (or the interpreter on).
    `have_triton` is the caller module's flag (tests switch one module off)."""
    if not have_triton:
        return "triton is not installed"
    if not (tensor.is_cuda or interpreting()):
        return f"operands are on {tensor.device}, not CUDA (and TRITON_INTERPRET is off)"
    return None


def _triton_has_pdl() -> bool:
    """Whether this Triton exposes the grid-dependency intrinsics and the `launch_pdl` launch option (3.5+)."""
    if not HAVE_TRITON or not hasattr(getattr(tl.extra, "cuda", None), "gdc_wait"):
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - a Triton without the NVIDIA backend
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


_TRITON_HAS_PDL = _triton_has_pdl()
_PDL_DEVICES: dict[int, bool] = {}


def pdl_launch(tensor: torch.Tensor) -> dict[str, bool]:
    """Launch keywords for a kernel that takes `USE_PDL` and opens with `wait_for_producers(USE_PDL)`: PDL on CUDA
    devices of compute capability 9.0+ when this Triton supports it and `MOEC_PDL` is not "0"; nothing otherwise
    (the interpreter, older GPUs: the kernel's default USE_PDL=False, an ordinary launch)."""
    if not (_TRITON_HAS_PDL and tensor.is_cuda) or interpreting() or os.environ.get("MOEC_PDL", "1") == "0":
        return {}
    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    if index not in _PDL_DEVICES:
        _PDL_DEVICES[index] = torch.cuda.get_device_capability(index) >= (9, 0)
    return {"USE_PDL": True, "launch_pdl": True} if _PDL_DEVICES[index] else {}


if HAVE_TRITON:
    if _TRITON_HAS_PDL:

        @triton.jit
        def _grid_dependency_sync():
            tl.extra.cuda.gdc_wait()  # the predecessor grid has completed and its writes are visible
            tl.extra.cuda.gdc_launch_dependents()  # only now may the next kernel be scheduled: at most two overlap

    else:  # pragma: no cover - a Triton without the intrinsics never launches with PDL

        @triton.jit
        def _grid_dependency_sync():
            pass

    @triton.jit
    def wait_for_producers(USE_PDL: tl.constexpr):
        """A PDL-launched kernel's first statement (before any read of a predecessor's output); nothing otherwise."""
        if USE_PDL:
            _grid_dependency_sync()

    @triton.jit
    def grouped_tile_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        """(row block, column tile) of program `pid` in a grouped GEMM: GROUP_M row blocks walk down one column tile
        before moving right, so the programs that run together read the same weight tile (one expert's n-slice) and
        repeats are served from L2."""
        num_pid_in_group = GROUP_M * num_pid_n
        first_m = (pid // num_pid_in_group) * GROUP_M
        group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
        return first_m + (pid % num_pid_in_group) % group_size, (pid % num_pid_in_group) // group_size

else:  # pragma: no cover - exercised only without triton
    wait_for_producers = None
    grouped_tile_ids = None
