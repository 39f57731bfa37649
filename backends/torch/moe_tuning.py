"""Launch parameters of the fused MoE kernels (`triton_moe.py`): one `MoeConfig` per token-count regime, from an
explicit table rather than run-time autotuning, so the first call compiles exactly one variant per regime.

The table was measured (bench/moe_kernel.py --sweep, BENCHMARKS.md) and changes when the hardware or the model shapes
do; the kernels change when the algorithm does. Kept apart for that reason, and importable without Triton.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

__all__ = ["GEMV_TABLE", "SWAPPED_TABLE", "TUNING_TABLE", "GemvConfig", "MoeConfig", "SwappedConfig", "get_config",
           "get_gemv_config", "get_swapped_config", "next_pow2"]


@dataclass(frozen=True)
class MoeConfig:
    """Launch parameters for one call (one regime of the table)."""

    block_m: int  # rows (slots) per block; also the alignment granularity of each expert's segment
    gu_block_n: int  # gate/up: columns of I per program (the dot is 2x this wide: gate and up)
    gu_block_k: int
    gu_group_m: int  # programs walk GROUP_M row blocks for one column tile before moving on (L2 reuse of weights)
    gu_warps: int
    gu_stages: int
    dn_block_n: int  # down: columns of H per program
    dn_block_k: int
    dn_split_k: int  # number of K slices of the down GEMM (decode: more programs streaming w2)
    dn_group_m: int
    dn_warps: int
    dn_stages: int


# Explicit tuning table: (max T, config).  Chosen for Mixtral-8x7B shapes (H=4096,
# I=14336, E=8, k=2) on H100/H200 from the sweep in bench/moe_kernel.py (see
# bench/NOTES_moe_kernel.md).  Rows: decode (weights streaming), small batches
# (still weight-bound, several row blocks share each weight tile through L2),
# prefill (tensor-core bound, 128x128 tiles, 8 warps).
TUNING_TABLE: list[tuple[int, MoeConfig]] = [
    # T=1: only 2 experts' weights to stream, so few programs: small K tiles and deep pipelines
    # (2 programs per SM) keep more bytes in flight than 128-wide K tiles (1 program per SM).
    (1, MoeConfig(16, 64, 64, 8, 4, 6, 64, 64, 4, 8, 4, 6)),
    # Decode: 16-row blocks (tl.dot minimum), w2 split 4 ways along I so ~8x more programs stream it.
    (16, MoeConfig(16, 64, 128, 8, 4, 4, 64, 128, 4, 8, 4, 4)),
    (64, MoeConfig(32, 64, 128, 16, 4, 4, 64, 128, 4, 16, 4, 4)),
    (256, MoeConfig(64, 128, 64, 16, 4, 4, 128, 64, 1, 16, 4, 4)),
    # Prefill: 128x256 MMA tiles (gate/up: 128 gate + 128 up columns) on 8 warps.
    (1024, MoeConfig(128, 128, 64, 8, 8, 3, 256, 64, 1, 8, 8, 4)),
    (1 << 62, MoeConfig(128, 128, 64, 8, 8, 4, 256, 64, 1, 8, 8, 3)),
]


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of the CUDA-core decode path (`_gate_up_gemv_kernel`, `_down_gemv_kernel`): one program
    per (slot, column tile[, K slice])."""

    gu_block_n: int  # gate/up: columns of I per program (each reads BLOCK_N gate rows and BLOCK_N up rows)
    gu_block_k: int
    gu_warps: int
    dn_block_n: int
    dn_block_k: int
    dn_split_k: int
    dn_warps: int
    prefetch: bool = False  # two K tiles in flight per program (the next one's loads before this one's products)
    words: int = 0  # > 0: int8 / int4 codes as 32-bit words, this many per thread and row (triton_gemv_words): K
    # tiles follow from warps and words; the block_k above are for operands that are not whole words (byte kernels)
    max_regs: int = 0  # > 0: the word kernels' register cap per thread (Triton's `maxnreg`): more programs per SM


# (precision, grouped) -> (max slots = T * top_k, config): where the decode path beats the tensor-core tiles above
# (bench/quantized_kernels.py --sweep on the H200, fourth and fifth sessions, BENCHMARKS.md, Mixtral-8x7B experts;
# us per call in a CUDA graph); no entry: always the tiles. The word kernels' 80-register cap (eighth session, same
# card, bench/gemv_registers.py): T=1 int8 95.6 vs 104.1 us uncapped, int4 66.4 vs 69.1, g128 76.1 vs 80.9 (the
# ~100 registers they take held 10 two-warp programs per SM, Nsight Compute; T=2 within 1% either way; a 64 cap
# slower than 80 everywhere); the whole model's batch-1 step did not move with it (within run-to-run noise,
# BENCHMARKS.md). The fifth-session figures below drifted: uncapped int8 T=1 measured 104.1 this session, and 95.9
# with the PTX off (MOEC_CODE_ASM=0; the cap with the PTX off was not measured).
GEMV_TABLE: dict[tuple[str | None, bool], tuple[int, GemvConfig]] = {
    (None, False): (2, GemvConfig(8, 512, 4, 8, 512, 4, 4)),  # bf16 T=1 168.3 vs tiles 172.2 (T=2: tiles, 269.8)
    # int8 on words, 4 per thread: T=1 95.7 / T=2 164.1 vs the byte GEMV 107.1 / 190.2 (fifth session); grouped int8
    # was not swept on words and keeps the byte GEMV (fourth session: T=1 106.0 vs tiles 121.8)
    # tenth session, after the int8 word products lost their per-code subtraction (bench/quantized_kernels.py
    # --sweep --sweep-only int8): two K slices in the down GEMV instead of four, T=1 89.2 / T=2 147.6 vs 92.9 / 157.3
    ("int8", False): (4, GemvConfig(4, 256, 2, 4, 256, 2, 2, words=4, max_regs=80)),
    ("int8", True): (4, GemvConfig(16, 256, 4, 16, 256, 4, 4, prefetch=True)),
    # int4 on 32-bit words, 2 per thread and row (triton_gemv_words; fifth session): T=1 66.7 / T=2 122.6 vs the
    # byte GEMV 107.5 / 200.5 and the tiles 162.5 / 273.1; g128: 77.5 / 142.0 vs 115.7 / 214.5
    ("int4", False): (4, GemvConfig(4, 256, 2, 8, 256, 4, 2, words=2, max_regs=80)),
    ("int4", True): (4, GemvConfig(4, 256, 2, 8, 256, 4, 2, words=2, max_regs=80)),
}


@dataclass(frozen=True)
class SwappedConfig:
    """Launch parameters of the swapped-operand tiles of weight-only int8 / int4 experts (`triton_moe_swapped`):
    weights on the MMA's M side, `block_m` tokens on its N side."""

    block_m: int  # token rows (slots) per block, also the routing's alignment
    gu_block_n: int  # gate/up: columns of I per program (2x this many weight rows)
    gu_block_k: int
    gu_warps: int
    gu_stages: int
    dn_block_n: int  # down: columns of H per program
    dn_block_k: int
    dn_split_k: int
    dn_warps: int
    dn_stages: int
    group_m: int = 8


# (precision, grouped) -> rows above the GEMV table's slots. Measured on an H200 at Mixtral-8x7B shapes, graph
# replays (bench/swapped_tiles.py, BENCHMARKS.md): seventh session, int4 T = 32 351 us vs the tiles' 569 (per
# channel), 382 vs 541 (g128); eighth, with the codes converted in PTX (triton_support.codes_in_ptx), int4 per
# channel on 256-deep K tiles and 8 warps (two warpgroups per program, half the registers per thread) T = 8 / 16 /
# 32 257.8 / 286.7 / 286.5 us against the 128-deep 4-warp ones' 267.0 / 306.3 / 310.7 (T = 64: 360.5 vs 358.9;
# g128 groups cannot take 256-deep tiles); int8 on 16-token blocks ahead of the tiles from T = 8 (314.8 vs 328.5;
# T = 16 364.7 vs 374.2). Not timed: int4 T = 33-48 and int8 T = 3-7 (the rows' limits interpolate); grouped int8
# (keeps the tiles); bf16 / fp8 experts always keep them (the swapped tiles take codes only).
_INT4_SWAPPED = SwappedConfig(16, 64, 128, 4, 4, 128, 128, 4, 4, 4)
_INT4_SWAPPED_K256 = SwappedConfig(16, 64, 256, 8, 3, 128, 256, 2, 8, 3)
_INT8_SWAPPED = SwappedConfig(16, 32, 128, 4, 4, 64, 128, 4, 4, 4)
# Each row: (max tokens, the configs to try in order, the first whose K tiles the experts' shapes fit; None: the
# tiles). A K that is a multiple of 128 but not of 256 takes the 128-deep config the row falls back to.
SWAPPED_TABLE: dict[tuple[str, bool], list[tuple[int, tuple[SwappedConfig | None, ...]]]] = {
    ("int4", False): [(48, (_INT4_SWAPPED_K256, _INT4_SWAPPED)), (64, (_INT4_SWAPPED,))],
    ("int4", True): [(64, (_INT4_SWAPPED,))],
    ("int8", False): [(48, (_INT8_SWAPPED,)), (64, (SwappedConfig(32, 32, 128, 4, 4, 64, 128, 4, 4, 4),))],
}


def get_swapped_config(num_tokens: int, precision: str | None, group_size: int,
                       fits: Callable[[SwappedConfig], bool] = lambda cfg: True) -> SwappedConfig | None:
    """The swapped tiles' config for `num_tokens` tokens of weight-only experts, or None where the tiles serve: in
    the first of the table's rows at or above `num_tokens`, the first config that `fits` the experts' shapes."""
    for max_t, options in SWAPPED_TABLE.get((precision, group_size > 0), []) if precision else []:
        if num_tokens <= max_t:
            for cfg in options:
                if cfg is None or fits(cfg):
                    return cfg
            return None
    return None


def get_gemv_config(num_slots: int, hidden: int, inter: int, group_size: int, precision: str | None) -> GemvConfig | None:
    """The decode path's config for `num_slots` slots of this precision, or None where the tiles are used. K tiles
    no wider than the problem; one wider than a group holds whole groups (triton_quant.tile_groups)."""
    entry = GEMV_TABLE.get((precision, group_size > 0))
    if entry is None or num_slots > entry[0]:
        return None
    return clamp_gemv_config(entry[1], hidden, inter, group_size)


def clamp_gemv_config(cfg: GemvConfig, hidden: int, inter: int, group_size: int) -> GemvConfig:
    def whole_groups(block_k: int) -> int:  # a tile wider than a group must hold whole groups
        return group_size if group_size and block_k > group_size and block_k % group_size else block_k

    return replace(
        cfg,
        gu_block_n=min(cfg.gu_block_n, max(16, next_pow2(inter))),
        gu_block_k=whole_groups(min(cfg.gu_block_k, max(32, next_pow2(hidden)))),
        dn_block_n=min(cfg.dn_block_n, max(16, next_pow2(hidden))),
        dn_block_k=whole_groups(min(cfg.dn_block_k, max(32, next_pow2(inter)))),
    )


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def get_config(num_tokens: int, hidden: int, inter: int, group_size: int = 0, quantized: bool = False,
               fp8: bool = False) -> MoeConfig:
    """Table entry for ``num_tokens``, with tiles clamped to small problems (tests, tiny models).

    Group-quantized weights get K tiles no wider than a group (both powers of two), so every tile lies inside one
    group and its scales multiply the tile's partial sums. FP8 experts (1-byte operands on both sides of the dot) get
    K tiles twice as deep in every regime, the same bytes per pipeline stage as the bf16 tiles the table was tuned
    with, and at most 3 stages for 128-row tiles (4 would not fit in shared memory: x arrives as e4m3 codes, but
    the gate/up tile is 2 x BLOCK_N wide)."""
    cfg = TUNING_TABLE[-1][1]
    for max_t, entry in TUNING_TABLE:
        if num_tokens <= max_t:
            cfg = entry
            break
    # tl.dot needs every tile dimension >= 16; tiles larger than the problem only waste work.
    if quantized and num_tokens <= 64:
        # Weight-streaming regimes read 1 (int8) or 0.5 (int4) bytes per element: twice the table's K per tile keeps
        # as many bytes in flight per stage as the bf16 tiles it was tuned with.
        cfg = replace(cfg, gu_block_k=cfg.gu_block_k * 2, dn_block_k=cfg.dn_block_k * 2)
    min_k = 16
    if fp8:
        cfg = replace(cfg, gu_block_k=cfg.gu_block_k * 2, dn_block_k=cfg.dn_block_k * 2)
        if cfg.block_m >= 128:
            cfg = replace(cfg, gu_stages=min(cfg.gu_stages, 3), dn_stages=min(cfg.dn_stages, 3))
        min_k = 32  # an FP8 MMA is 32 deep
    group_cap = group_size if group_size else 1 << 30
    return replace(
        cfg,
        gu_block_n=min(cfg.gu_block_n, max(16, next_pow2(inter))),
        gu_block_k=min(cfg.gu_block_k, max(min_k, next_pow2(hidden)), group_cap),
        dn_block_n=min(cfg.dn_block_n, max(16, next_pow2(hidden))),
        dn_block_k=min(cfg.dn_block_k, max(min_k, next_pow2(inter)), group_cap),
    )
