"""`moec.cached_attention` on CUDA in Triton: cache write, flash prefill, split-K flash decoding.

before: q [B,Hq,S,D], k/v [B,Hkv,S,D], k_cache/v_cache [B,Hkv,M,D], cache_position [B] (int64, on the device)
after:  k_cache/v_cache[b, :, pos_b : pos_b + S] = k/v (cast to the cache dtype), out [B,S,Hq,D] in q's dtype

Three kernels, none of which reads anything back to the host, so a whole step can be captured in a CUDA graph
(grids depend on shapes only; per-sequence lengths are read on the device and ranges past them exit early):

1. ``_write_kernel`` (S > 1): copies the step's k and v into the caches at each sequence's own offset.
2. ``_prefill_kernel`` (S > 1): flash attention, one program per (BLOCK_M query rows, query head). Query row i of
   sequence b sits at absolute position pos_b + i and attends cache slots j <= pos_b + i (and, with a window,
   j > pos_b + i - window), read from the cache after the write, so a first prefill (pos_b = 0) and a chunk that
   continues a cached prefix are the same code. Key blocks that every row of the program sees run unmasked; only
   the diagonal (and, with a window, the window's edge) blocks pay for the mask. Scores never reach memory.
3. ``_decode_kernel`` + ``_decode_combine_kernel`` (S == 1): flash decoding. One program per (sequence, kv head,
   split): the G query heads of a kv group are the rows of one tile (padded to 16, the smallest ``tl.dot``), so
   each K/V byte is read once for all of them. Sequence b's visible slots [start_b, pos_b] are cut into ``splits``
   equal chunks (a multiple of BLOCK_N each); a split past the end returns at once. The split holding slot pos_b
   also writes the step's k/v there and attends that slot from registers (so decode needs no write launch). Each
   split writes its normalized partial output and log-sum-exp in float32; the combine kernel merges the splits
   that sequence used (with `MOEC_COMBINE_IN_KERNEL=1` or `attention`, the last split of a (sequence, kv head) to
   finish does, no combine launch: `triton_support.last_to_arrive`, measured slower). With one split the decode
   kernel writes the output itself.

`moec.rope_cached_attention` (``rotary=(cos, sin)``) is the same op on q and k rotated first. Decode rotates inside
``_decode_kernel`` (ROPE): q as it is loaded, the step's k before it is written and attended, with the rope kernel's
arithmetic (``triton_norm.rope_rotate``), so the two rope launches of a decode step disappear and the result is the
unfused one's. Prefill runs the rope kernel on q and k, then the write and prefill kernels (no gain, no loss: two
launches among a prefill's heavy ones).

Softmax runs in float32 with exp2 (scale folded with log2 e); the probabilities are rounded to the value dtype
for the P @ V product (as flash attention does); accumulators are float32. float32 inputs use IEEE-precision
dots (not tf32). Launch parameters come from small explicit tables below, not from run-time autotuning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from backends.torch import triton_norm
from backends.torch.triton_attention_kernels import _HAVE_TRITON, triton
from backends.torch.triton_fp8 import capability_reason
from backends.torch.triton_support import arrival_counters, combine_in_kernel, pdl_launch

if _HAVE_TRITON:
    from backends.torch.triton_attention_kernels import (
        _decode_combine_kernel,
        _decode_kernel,
        _prefill_kernel,
        _write_kernel,
    )

__all__ = ["DecodeConfig", "PrefillConfig", "cached_attention", "decode_config", "decode_splits", "unsupported_reason"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_CACHE_DTYPE = torch.float8_e4m3fn  # `quantize-fp8{kv_cache=true}`'s caches: codes of k / k_scale, v / v_scale
_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, k_cache: torch.Tensor, cache_position: torch.Tensor
) -> str | None:
    """Why these operands cannot run here (None when they can): the dispatch's one rule, stated once."""
    if not _HAVE_TRITON:
        return "triton is not installed"
    if not (q.is_cuda or _interpreting()):
        return f"operands are on {q.device}, not CUDA (and TRITON_INTERPRET is off)"
    if q.dtype not in SUPPORTED_DTYPES or k_cache.dtype not in (*SUPPORTED_DTYPES, FP8_CACHE_DTYPE):
        return f"dtypes q {q.dtype} / cache {k_cache.dtype} are not among {SUPPORTED_DTYPES} (+ e4m3 caches)"
    if k_cache.dtype == FP8_CACHE_DTYPE:
        if q.dtype == torch.float32:
            return "an e4m3 cache with float32 queries (the FP8 path reads codes in q's 16-bit dtype)"
        reason = capability_reason(q.device)  # Triton has no e4m3 type before sm89
        if reason is not None:
            return f"an e4m3 cache: {reason}"
    if k.dtype != q.dtype:
        return f"k/v dtype {k.dtype} differs from q's {q.dtype}"
    if q.shape[-1] < 16:
        return f"head_dim {q.shape[-1]} < 16 (tl.dot's smallest tile)"
    if cache_position.device != q.device:
        return f"cache_position is on {cache_position.device}, not with q on {q.device}"
    return None


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernel."""

    block_n: int  # cache slots per loop step
    warps: int
    stages: int
    waves: int  # target programs = waves * multiprocessors; splits = that over (batch * kv heads)


@dataclass(frozen=True)
class PrefillConfig:
    """Launch parameters of the prefill kernel."""

    block_m: int  # query rows per program
    block_n: int  # cache slots per loop step
    warps: int
    stages: int


# Tuned on an H200 for Mixtral-8x7B attention shapes (32 q heads, 8 kv heads, head_dim 128, bf16) by
# bench/decode_attention.py --sweep (see BENCHMARKS.md): one wave of programs (waves=1) won at every batch; 64-slot
# blocks 3 stages deep (96 KiB of shared memory: two programs per multiprocessor) while the programs fit two per
# multiprocessor, 32-slot blocks (four fit) beyond that: at batch 64 x 8 kv heads the 64-slot blocks ran 12-15% slower
# (two waves) than the 32-slot ones (one wave).
DECODE_CONFIG = DecodeConfig(block_n=64, warps=4, stages=3, waves=1)
DECODE_CONFIG_WIDE = DecodeConfig(block_n=32, warps=4, stages=3, waves=1)
# (max S, config): short chunks use thin query blocks, long prefills 128-row blocks on 8 warps.
_PREFILL_TABLE: list[tuple[int, PrefillConfig]] = [
    (16, PrefillConfig(16, 64, 4, 3)),
    (64, PrefillConfig(64, 64, 4, 3)),
    (1 << 62, PrefillConfig(128, 64, 8, 3)),
]

_SM_COUNT: dict[int, int] = {}


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so the tests exercise the combine
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def decode_splits(batch: int, kv_heads: int, max_seq: int, device: torch.device, config: DecodeConfig) -> int:
    """Splits of the cache length per (sequence, kv head): enough programs for `waves` per multiprocessor, never
    more than the cache has BLOCK_N chunks. Depends on shapes only (CUDA-graph safe)."""
    target = config.waves * _multiprocessors(device)
    splits = max(1, -(-target // (batch * kv_heads)))
    return min(splits, max(1, -(-max_seq // config.block_n)))


def decode_config(batch: int, kv_heads: int, device: torch.device) -> DecodeConfig:
    """The table's decode config for a batch: see DECODE_CONFIG."""
    return DECODE_CONFIG if batch * kv_heads <= 2 * _multiprocessors(device) else DECODE_CONFIG_WIDE


def _prefill_config(seq: int, head_dim: int) -> PrefillConfig:
    for max_s, cfg in _PREFILL_TABLE:
        if seq <= max_s:
            return cfg
    raise AssertionError("the table's last row covers every length")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _dot_in_f32(dtype: torch.dtype) -> bool:
    # Triton's CPU interpreter (seen with 3.9.0) multiplies the raw bit patterns of bf16 dot operands (see
    # triton_moe._dot_in_f32); compiled kernels never take this path.
    return dtype == torch.bfloat16 and _interpreting()


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           cache_position: torch.Tensor) -> None:
    reason = unsupported_reason(q, k, k_cache, cache_position)
    if reason is not None:
        raise ValueError(f"cached_attention (triton): {reason}")
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q [B,Hq,S,D] and k, v [B,Hkv,S,D], got {tuple(q.shape)}, {tuple(k.shape)}")
    batch, q_heads, seq, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2] != seq or k.shape[3] != head_dim or q_heads % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} does not match k {tuple(k.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError("k_cache and v_cache must have one shape and dtype")
    if k_cache.dim() != 4 or k_cache.shape[:2] != k.shape[:2] or k_cache.shape[3] != head_dim:
        raise ValueError(f"cache {tuple(k_cache.shape)} is not [B={batch}, Hkv={k.shape[1]}, M, D={head_dim}]")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same strides")
    if k_cache.stride(3) != 1:
        raise ValueError("the caches must be contiguous along head_dim")
    if cache_position.shape != (batch,) or cache_position.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cache_position must be [B={batch}] int32/int64, got {tuple(cache_position.shape)}")


def _interpreter_precasts(kv_dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
    # Triton's CPU interpreter (seen with 3.9.0) truncates float32 -> bf16 instead of rounding to nearest even as
    # compiled kernels do; k/v are cast on the host so the interpreted cache holds what a GPU would write.
    return _interpreting() and cache_dtype == torch.bfloat16 and kv_dtype != torch.bfloat16


def _precast_for_interpreter(
    k: torch.Tensor, v: torch.Tensor, cache_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    if _interpreter_precasts(k.dtype, cache_dtype):
        return k.to(torch.bfloat16), v.to(torch.bfloat16)
    return k, v


def write_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                cache_position: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k_cache/v_cache[b, :, pos_b : pos_b + S] = k/v[b] cast to the cache dtype (e4m3 caches: the codes of k / k_scale
    and v / v_scale, compiler/fp8.py's rounding), on the device."""
    batch, kv_heads, seq, head_dim = k.shape
    k, v = _precast_for_interpreter(k, v, k_cache.dtype)
    block_s = min(64, max(16, _next_pow2(seq)))
    fp8_cache = k_cache.dtype == FP8_CACHE_DTYPE
    _write_kernel[(batch * kv_heads, triton.cdiv(seq, block_s))](
        k, v, k_cache, v_cache, cache_position, kv_heads, seq, k_cache.shape[2],
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), float(k_scale), float(v_scale),
        D=head_dim, BLOCK_D=_next_pow2(head_dim), BLOCK_S=block_s, FP8_CACHE=fp8_cache,
        EMULATE_FP8=fp8_cache and _interpreting(), **pdl_launch(k), num_warps=4,
    )


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands


def prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_position: torch.Tensor,
            scale: float, sliding_window: int, out: torch.Tensor, config: PrefillConfig | None = None,
            k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Flash attention of S query rows per sequence over the (already written) caches; writes out [B,S,Hq,D]."""
    batch, q_heads, seq, head_dim = q.shape
    cfg = config if config is not None else _prefill_config(seq, head_dim)
    block_m = min(cfg.block_m, max(16, _next_pow2(seq)))
    _prefill_kernel[(triton.cdiv(seq, block_m), batch * q_heads)](
        q, k_cache, v_cache, out, cache_position, seq, q_heads, sliding_window, scale * _LOG2E * k_scale,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2), float(v_scale),
        GROUP=q_heads // k_cache.shape[1], D=head_dim, BLOCK_D=_next_pow2(head_dim), BLOCK_M=block_m,
        BLOCK_N=cfg.block_n, WINDOW=sliding_window > 0, PRECISION=_precision(q.dtype),
        DOT_F32=_dot_in_f32(q.dtype), **pdl_launch(q), num_warps=cfg.warps, num_stages=cfg.stages,
    )


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           cache_position: torch.Tensor, scale: float, sliding_window: int, out: torch.Tensor,
           config: DecodeConfig | None = None, splits: int | None = None, k_scale: float = 1.0,
           v_scale: float = 1.0, rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Split-K flash decoding of one query row per sequence; writes the step's k/v into the caches and out. With
    `rotary` = (cos, sin) the kernel rotates q and k first (`moec.rope_cached_attention`)."""
    if rotary is not None and _interpreter_precasts(k.dtype, k_cache.dtype):
        # The interpreter's host-side cast must see the rotated k: rotate on the host (interpreter only; a compiled
        # kernel rotates and casts in registers).
        q, k = (triton_norm.rope(t, *rotary) for t in (q, k))
        rotary = None
    batch, q_heads, _, head_dim = q.shape
    kv_heads, max_seq = k_cache.shape[1], k_cache.shape[2]
    cfg = config if config is not None else decode_config(batch, kv_heads, q.device)
    if splits is None:
        splits = decode_splits(batch, kv_heads, max_seq, q.device, cfg)
    group = q_heads // kv_heads
    if splits > 1:
        part_acc = torch.empty((batch, q_heads, splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, q_heads, splits), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_lse = out  # unused
    window = sliding_window > 0
    combine = splits > 1 and combine_in_kernel("attention")  # else the combine kernel merges the splits
    k, v = _precast_for_interpreter(k, v, k_cache.dtype)
    cos, sin, rotary_batch_stride = triton_norm.rotary_operands(*rotary) if rotary is not None else (q, q, 0)
    _decode_kernel[(batch, kv_heads, splits)](
        q, k, v, k_cache, v_cache, cache_position, out, part_acc, part_lse, sliding_window,
        scale * _LOG2E * k_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(2), splits, float(k_scale), float(v_scale), cos, sin, rotary_batch_stride,
        GROUP=group, BLOCK_G=max(16, _next_pow2(group)), D=head_dim, BLOCK_D=_next_pow2(head_dim),
        BLOCK_N=cfg.block_n, SINGLE=splits == 1, WINDOW=window, PRECISION=_precision(q.dtype),
        DOT_F32=_dot_in_f32(q.dtype), FP8_CACHE=k_cache.dtype == FP8_CACHE_DTYPE,
        EMULATE_FP8=k_cache.dtype == FP8_CACHE_DTYPE and _interpreting(), ROPE=rotary is not None,
        COMBINE=combine, SPLITS_P=_next_pow2(splits), GROUP_P=_next_pow2(group),
        counter_ptr=arrival_counters(q.device, batch * kv_heads) if combine else part_lse, **pdl_launch(q),
        num_warps=cfg.warps, num_stages=cfg.stages,
    )
    if splits > 1 and not combine:
        _decode_combine_kernel[(batch * q_heads,)](
            part_acc, part_lse, cache_position, out, q_heads, sliding_window, out.stride(0), out.stride(2), splits,
            D=head_dim, BLOCK_D=_next_pow2(head_dim), BLOCK_N=cfg.block_n, SPLITS_P=_next_pow2(splits),
            WINDOW=window,
            **pdl_launch(q), num_warps=4,
        )


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_position: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    *,
    decode_config: DecodeConfig | None = None,
    prefill_config: PrefillConfig | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`moec.cached_attention` (semantics in compiler/ops.py): writes the caches in place, returns [B,S,Hq,D].
    Scales (`k_scale`, `v_scale`) other than 1 need e4m3 caches (`quantize-fp8{kv_cache=true}`). With `rotary` =
    (cos [B or 1,S,D], sin): `moec.rope_cached_attention`, the attention of rope(q) and rope(k).

    No host synchronisation and shape-only allocations: the call can be captured in a CUDA graph.
    """
    _check(q, k, v, k_cache, v_cache, cache_position)
    if rotary is not None:
        for operand in (q, k):
            reason = triton_norm.rope_unsupported_reason(operand, *rotary)
            if reason is not None:
                raise ValueError(f"rope_cached_attention (triton): {reason}")
    if (k_scale != 1.0 or v_scale != 1.0) and k_cache.dtype != FP8_CACHE_DTYPE:
        raise ValueError(f"cache scales {k_scale}, {v_scale} need an e4m3 cache, not {k_cache.dtype}")
    if not (k_scale > 0 and v_scale > 0):
        raise ValueError(f"cache scales {k_scale}, {v_scale} must be positive")
    # The kernels take any strides but unit ones along head_dim (vector loads); other layouts are copied once.
    q, k, v = (t if t.stride(3) == 1 else t.contiguous() for t in (q, k, v))
    batch, q_heads, seq, head_dim = q.shape
    out = torch.empty((batch, seq, q_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0 or seq == 0:
        return out
    if seq == 1:
        decode(q, k, v, k_cache, v_cache, cache_position, scale, sliding_window, out, decode_config,
               k_scale=k_scale, v_scale=v_scale, rotary=rotary)
    else:
        if rotary is not None:  # the rope kernel, as unfused: a prefill gains nothing from rotating inside
            q, k = (triton_norm.rope(t, *rotary) for t in (q, k))
        write_cache(k, v, k_cache, v_cache, cache_position, k_scale, v_scale)
        prefill(q, k_cache, v_cache, cache_position, scale, sliding_window, out, prefill_config, k_scale, v_scale)
    return out
