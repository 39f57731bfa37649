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

The last program to arrive combines (`arrival_counters`, `last_to_arrive`; opt-in): a kernel whose programs each
write a partial result (split-K flash decoding, the MoE's slots and K slices) leaves the sum to a second, tiny
kernel, a kernel boundary per layer. With `MOEC_COMBINE_IN_KERNEL=1` (`attention` or `moe`: only that one) every
program counts itself in on an int32 counter after its partial store; the one that finds the count complete reads
the others' partials from L2, writes the result and sets the counter back to 0 for the next launch (the MoE in the
combine kernel's fixed order, bit-identical; attention all heads of a kv group at once, float32 summation order
apart). The counters live in one buffer per device that the kernels keep zeroed, so no launch clears them (a CUDA
graph replays them as captured); kernels that use them must not run concurrently on one device (moec launches
them on one stream). Off by default: on an H200 it was slower than the separate combine kernels (whole-model
decode, batch 1, back to back: bf16 6.796 vs 6.699 ms, int8 4.189 vs 4.071 ms per step; BENCHMARKS.md, ninth
session): the atomic's release fence on every program and the last program's L2 round trips cost more than the
kernel boundary they remove.
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

__all__ = ["HAVE_TRITON", "arrival_counters", "codes_in_ptx", "combine_if_last", "combine_in_kernel", "device_reason",
           "early_weights", "grouped_tile_ids", "interpreting", "last_to_arrive", "pdl_launch", "routed_expert",
           "sum_slot_partials", "tl", "triton", "wait_for_producers"]


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def codes_in_ptx() -> bool:
    """Whether kernels that take `ASM` turn weight codes into floats with inline PTX (`triton_quant.int4_codes` /
    `int8_codes` in the swapped tiles: a few integer ops per pair of codes; `triton_gemv_words._byte_floats` in the
    word GEMVs: one PRMT per code): on compiled kernels unless `MOEC_CODE_ASM` is "0" (comparisons); the
    interpreter runs no PTX."""
    return not interpreting() and os.environ.get("MOEC_CODE_ASM", "1") != "0"


def early_weights() -> bool:
    """Whether the MoE down GEMVs read their slot's expert id and first weight tile before their PDL wait
    (`routed_expert`): unless `MOEC_EARLY_WEIGHTS` is "0" (comparisons, bench/decode_profile.py --env-variant)."""
    return os.environ.get("MOEC_EARLY_WEIGHTS", "1") != "0"


def combine_in_kernel(kind: str) -> bool:
    """Whether `kind`'s partials ("attention": flash decoding's splits, "moe": the down GEMVs' slots and K slices)
    are combined by the last program to arrive (the module docstring) rather than by a separate combine kernel:
    `MOEC_COMBINE_IN_KERNEL` "1" for both, "0" (the default: measured faster, BENCHMARKS.md, ninth session) for
    neither, or the one kind named."""
    if kind not in ("attention", "moe"):
        raise ValueError(f"combine kind {kind!r} is not 'attention' or 'moe'")
    return os.environ.get("MOEC_COMBINE_IN_KERNEL", "0") in ("1", kind)


_COUNTERS: dict[tuple[str, int | None], torch.Tensor] = {}


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """`count` zeroed int32 counters on `device` for `last_to_arrive`: a view of one buffer per device, grown (never
    shrunk) on demand. The kernels leave every counter they use at 0, so the buffer is cleared only when allocated."""
    key = (device.type, device.index if device.type != "cuda" or device.index is not None
           else torch.cuda.current_device())
    buffer = _COUNTERS.get(key)
    if buffer is None or buffer.numel() < count:
        buffer = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buffer
    return buffer[:count]


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
    def routed_expert(topk_ids_ptr, slot):
        """Slot `slot`'s routed expert id (int64), safe to read before the PDL wait of a kernel whose predecessor in
        the stream did not write the ids. Every kernel launched here opens with `wait_for_producers` and only then
        lets its successor start, and a non-PDL launch waits for its predecessor's end: so when a kernel starts,
        every kernel before its immediate predecessor has finished and flushed its writes. The MoE down kernels
        follow the gate/up kernel, which follows the router. The load bypasses L1 (`.cg`), whose lines are not
        coherent with other SMs' writes."""
        return tl.load(topk_ids_ptr + slot, cache_modifier=".cg").to(tl.int64)

    @triton.jit
    def last_to_arrive(counter_ptr, expected):
        """Count this program in on `*counter_ptr`; True in the program that arrives `expected`-th (the last), which
        also sets the counter back to 0. Every store the program made before the call is visible to the last one's
        loads after it: the barrier orders all of its threads' stores before the one thread's release, the
        acquire orders the last program's later loads after every release (read them with `.cg`, past L1)."""
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
        last = arrived == expected - 1
        if last:
            tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
        return last

    @triton.jit
    def sum_slot_partials(partial_ptr, topk_ids_ptr, t, offs, expert_offset, E, N, stride_ps, stride_pm,
                          TOPK: tl.constexpr, SPLIT_K: tl.constexpr):
        """sum over (K slice s, slot j) of partial[s, t * TOPK + j, offs] in float32, in that fixed order
        (deterministic, unlike atomics), skipping the slots routed to another rank's experts (never written).
        Loads go past L1 (`.cg`): the last program of a down GEMV reads what other programs wrote."""
        acc = tl.zeros(offs.shape, dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            for j in tl.static_range(TOPK):
                local = tl.load(topk_ids_ptr + t * TOPK + j).to(tl.int64) - expert_offset
                # A non-local slot's row has length 0 (a bound, not a scalar mask: the interpreter rejects
                # a vector mask combined with a scalar one).
                row_len = tl.where((local >= 0) & (local < E), N, 0)
                p = partial_ptr + s * stride_ps + (t * TOPK + j) * stride_pm + offs
                acc += tl.load(p, mask=offs < row_len, other=0.0, cache_modifier=".cg").to(tl.float32)
        return acc

    @triton.jit
    def combine_if_last(counter_ptr, partial_ptr, out_ptr, topk_ids_ptr, slot, pid_n, offs_n, expert_offset, E, N,
                        stride_ps, stride_pm, stride_om, TOPK: tl.constexpr, SPLIT_K: tl.constexpr):
        """A down GEMV program's end (grid: slot, column tile, K slice): count in on the (token, column tile)
        counter; the last of its TOPK * SPLIT_K programs writes out[token, offs_n] = `sum_slot_partials`."""
        t = (slot // TOPK).to(tl.int64)
        if last_to_arrive(counter_ptr + t * tl.num_programs(1) + pid_n, TOPK * SPLIT_K):
            acc = sum_slot_partials(partial_ptr, topk_ids_ptr, t, offs_n, expert_offset, E, N, stride_ps, stride_pm,
                                    TOPK, SPLIT_K)
            tl.store(out_ptr + t * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)

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
    routed_expert = None
    grouped_tile_ids = None
    last_to_arrive = None
    sum_slot_partials = None
    combine_if_last = None
