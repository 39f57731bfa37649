"""Weight-only INT8/INT4 and FP8 Triton kernels (the fused MoE with quantized experts on the tensor-core tiles and on
the CUDA-core decode path, the quantized linear and its GEMV, the FP8 activation quantizer) against the CPU
reference's dequantized weights and the FP8 ops' reference kernels.

Without CUDA they run in Triton's interpreter on tiny shapes, in float16: the interpreter casts float32 to bfloat16
by truncation (seen with triton 3.9.0), not round-to-nearest as the GPU does, so its bf16 results carry errors of a
few bf16 ulps that the compiled kernels do not have; float16 casts round properly there. With CUDA, the tests marked
`gpu` run Mixtral-8x7B shapes in bfloat16 and check that the weights stayed compact (no float copy of the experts is
allocated) and that a decode call is CUDA-graph capturable.
"""

import importlib
import itertools
import os
import sys
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' @triton.jit decoration, which reads it

triton = pytest.importorskip("triton")

import backends.torch.triton_fp8 as tf  # noqa: E402
import backends.torch.triton_moe as tm  # noqa: E402
import backends.torch.triton_quant as tq  # noqa: E402
from backends.torch import kernels  # noqa: E402
from backends.torch.kernels import moe_experts_reference  # noqa: E402
from backends.torch.moe_tuning import GemvConfig, get_gemv_config  # noqa: E402
from compiler import fp8  # noqa: E402
from compiler.quantization import dequantize, quantize  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and type(tq._quantized_matmul_kernel).__name__ != "InterpretedFunction":
    tq = importlib.reload(sys.modules["backends.torch.triton_quant"])
    tf = importlib.reload(sys.modules["backends.torch.triton_fp8"])
    importlib.reload(sys.modules["backends.torch.triton_moe_swapped"])  # before triton_moe, which imports from it
    tm = importlib.reload(sys.modules["backends.torch.triton_moe"])
    if "backends.torch.triton_moe_decode" in sys.modules:
        importlib.reload(sys.modules["backends.torch.triton_moe_decode"])

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float16
# ||out - ref|| / ||ref|| against an fp32 product of the very dequantized weights: only the activation dtype's
# rounding of the intermediate and of the output remains (FP8 on Hopper adds the tensor cores' reduced-precision
# accumulation over K: ~1.1e-2 at Mixtral widths, BENCHMARKS.md).
RTOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
SCHEMES = [("int8", 0), ("int8", 16), ("int8", 32), ("int4", 0), ("int4", 32), ("int4", 64)]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def _count_calls(monkeypatch: pytest.MonkeyPatch, module, name: str) -> list[str]:
    """Calls of `module.name` from now on (it still runs): which kernels a dispatch chose."""
    calls: list[str] = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _swapped_configs(monkeypatch: pytest.MonkeyPatch) -> list:
    """The SwappedConfig of every swapped-tiles call of `fused_moe` from now on (the calls still run)."""
    configs = []
    original = tm.gate_up_down

    def recording(*args, **kwargs):
        configs.append(args[11])
        return original(*args, **kwargs)

    monkeypatch.setattr(tm, "gate_up_down", recording)
    return configs


def _experts(e: int, h: int, i: int, precision: str, group_size: int, seed: int):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    w13 = (torch.randn(e, 2 * i, h, generator=gen, device=DEVICE) / h**0.5).to(DTYPE)
    w2 = (torch.randn(e, h, i, generator=gen, device=DEVICE) / i**0.5).to(DTYPE)
    q13, s13 = quantize(w13, precision, group_size)
    q2, s2 = quantize(w2, precision, group_size)
    return (q13, s13), (q2, s2)


def _routing(t: int, e: int, k: int, seed: int):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    probs = torch.softmax(torch.randn(t, e, generator=gen, device=DEVICE), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    return ids, weights / weights.sum(-1, keepdim=True)


def _check_moe(t, h, i, e, k, precision, group_size, seed, *, expert_slice=None):
    (q13, s13), (q2, s2) = _experts(e, h, i, precision, group_size, seed)
    gen = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    x = torch.randn(t, h, generator=gen, device=DEVICE).to(DTYPE)
    ids, rw = _routing(t, e, k, seed + 2)
    lo, hi = expert_slice if expert_slice else (0, e)
    out = tm.fused_moe(x, ids, rw, q13[lo:hi], q2[lo:hi], expert_offset=lo, precision=precision,
                       w13_scales=s13[lo:hi], w2_scales=s2[lo:hi], group_size=group_size)
    w13 = dequantize(q13[lo:hi], s13[lo:hi], precision, group_size).float()
    w2 = dequantize(q2[lo:hi], s2[lo:hi], precision, group_size).float()
    ref = moe_experts_reference(x.float(), ids - lo, rw, w13, w2)
    assert out.dtype == DTYPE and out.shape == (t, h)
    assert _rel(out, ref) < RTOL[DTYPE], f"{precision} g{group_size} T={t}: {_rel(out, ref):.2e}"
    return out


@pytest.mark.parametrize("precision,group_size", SCHEMES)
@pytest.mark.parametrize("t", [1, 37])
def test_quantized_moe_matches_dequantized_reference(precision: str, group_size: int, t: int) -> None:
    _check_moe(t, 128, 64, 4, 2, precision, group_size, seed=10 + t)


@pytest.mark.parametrize("precision,group_size", SCHEMES)
def test_swapped_tiles_match_the_dequantized_reference(precision: str, group_size: int) -> None:
    """The swapped-operand tiles (weights on the MMA's M side): 16-token blocks, column tiles past N on both GEMMs
    (wrapped and dropped), the down GEMM split in two K slices, and an EP rank's half of the experts."""
    bk = min(32, group_size or 32)
    cfg = tm.SwappedConfig(16, 128, bk, 4, 2, 128, bk, 2, 4, 2)
    (q13, s13), (q2, s2) = _experts(4, 192, 192, precision, group_size, seed=20)
    x = torch.randn(13, 192, device=DEVICE).to(DTYPE)
    ids, rw = _routing(13, 4, 2, seed=21)
    for lo, hi in ((0, 4), (2, 4)):
        out = tm.fused_moe(x, ids, rw, q13[lo:hi], q2[lo:hi], expert_offset=lo, config=cfg, precision=precision,
                           w13_scales=s13[lo:hi], w2_scales=s2[lo:hi], group_size=group_size)
        ref = moe_experts_reference(x.float(), ids - lo, rw, dequantize(q13[lo:hi], s13[lo:hi], precision,
                                    group_size).float(), dequantize(q2[lo:hi], s2[lo:hi], precision, group_size).float())
        assert _rel(out, ref) < RTOL[DTYPE], f"experts [{lo}, {hi}): {_rel(out, ref):.2e}"


def test_small_batches_of_int4_experts_take_the_swapped_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table sends 8 tokens of int4 experts to the swapped tiles: 256-deep K tiles where H and I are multiples of
    256, the row's 128-deep fallback where they are multiples of 128 only, and the ordinary tiles where I (80) fits
    neither; each matches the reference."""
    configs = _swapped_configs(monkeypatch)
    for hidden, inter, expected in ((256, 256, [256]), (128, 128, [128]), (128, 80, [])):
        (q13, s13), (q2, s2) = _experts(3, hidden, inter, "int4", 0, seed=22)
        x = torch.randn(8, hidden, device=DEVICE).to(DTYPE)
        ids, rw = _routing(8, 3, 2, seed=23)
        out = tm.fused_moe(x, ids, rw, q13, q2, precision="int4", w13_scales=s13, w2_scales=s2)
        ref = moe_experts_reference(x.float(), ids, rw, dequantize(q13, s13, "int4", 0).float(),
                                    dequantize(q2, s2, "int4", 0).float())
        assert _rel(out, ref) < RTOL[DTYPE]
        depths = [cfg.gu_block_k for cfg in configs]
        assert depths == expected, f"H={hidden} I={inter}: {depths}"
        configs.clear()


def test_int8_experts_take_the_swapped_tiles_above_the_gemv(monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 experts: the GEMV at 2 tokens, 16-token swapped blocks from 3 to 48, 32-token blocks at 64 (the table's
    rows), each matching the reference."""
    configs = _swapped_configs(monkeypatch)
    (q13, s13), (q2, s2) = _experts(3, 128, 128, "int8", 0, seed=26)
    for t, expected in ((2, []), (3, [16]), (32, [16]), (64, [32])):
        x = torch.randn(t, 128, device=DEVICE).to(DTYPE)
        ids, rw = _routing(t, 3, 2, seed=27)
        out = tm.fused_moe(x, ids, rw, q13, q2, precision="int8", w13_scales=s13, w2_scales=s2)
        ref = moe_experts_reference(x.float(), ids, rw, dequantize(q13, s13, "int8", 0).float(),
                                    dequantize(q2, s2, "int8", 0).float())
        blocks = [cfg.block_m for cfg in configs]
        assert _rel(out, ref) < RTOL[DTYPE] and blocks == expected, (t, blocks)
        configs.clear()


def test_swapped_tiles_reject_float_experts_and_off_grid_shapes() -> None:
    cfg = tm.SwappedConfig(16, 64, 32, 4, 2, 64, 32, 2, 4, 2)
    x = torch.randn(4, 96, device=DEVICE).to(DTYPE)
    ids, rw = _routing(4, 2, 2, seed=24)
    w13 = torch.randn(2, 192, 96, device=DEVICE).to(DTYPE)
    with pytest.raises(ValueError, match="the swapped tiles take int8 / int4 experts"):
        tm.fused_moe(x, ids, rw, w13, torch.randn(2, 96, 96, device=DEVICE).to(DTYPE), config=cfg)
    (q13, s13), (q2, s2) = _experts(2, 96, 80, "int8", 0, seed=25)
    with pytest.raises(ValueError, match="cannot take these experts: I=80 is not a multiple of the K tile 32"):
        tm.fused_moe(x, ids, rw, q13, q2, config=cfg, precision="int8", w13_scales=s13, w2_scales=s2)
    (q13, s13), (q2, s2) = _experts(2, 96, 96, "int4", 0, seed=25)
    with pytest.raises(ValueError, match="cannot take these experts: a dot dimension of these tiles is under 16"):
        tm.fused_moe(x, ids, rw, q13, q2, config=tm.SwappedConfig(16, 64, 16, 4, 2, 64, 32, 2, 4, 2),
                     precision="int4", w13_scales=s13, w2_scales=s2)


def test_quantized_moe_ragged_k_and_split_k() -> None:
    """K of both GEMMs not a multiple of the tiles (masked activations and int4 bytes) and 3 K-splits; groups always
    divide K and the tiles never straddle them, so only per-row scales meet ragged tiles."""
    for precision in ("int8", "int4"):
        (q13, s13), (q2, s2) = _experts(3, 96, 80, precision, 0, seed=3)
        x = torch.randn(9, 96, device=DEVICE).to(DTYPE)
        ids, rw = _routing(9, 3, 2, seed=4)
        cfg = tm.MoeConfig(16, 32, 64, 2, 4, 2, 16, 64, 3, 2, 4, 2)
        out = tm.fused_moe(x, ids, rw, q13, q2, config=cfg, precision=precision, w13_scales=s13, w2_scales=s2)
        ref = moe_experts_reference(x.float(), ids, rw, dequantize(q13, s13, precision, 0).float(),
                                    dequantize(q2, s2, precision, 0).float())
        assert _rel(out, ref) < RTOL[DTYPE]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_grouped_tiles_scale_the_weights_or_the_partial_sums(precision: str) -> None:
    """Grouped tiles scale whichever is smaller, the [BK, BN] weight tile or the [BM, BN] partial sums (both match
    the dequantized reference): 64-row tiles over 32-deep K tiles scale the weights, 16-row tiles the sums."""
    assert tq.scale_weights(32, 64, 32) and tq.scale_weights(32, 32, 32)
    assert not tq.scale_weights(32, 16, 32) and not tq.scale_weights(0, 128, 32)
    (q13, s13), (q2, s2) = _experts(3, 128, 64, precision, 32, seed=12)
    x = torch.randn(40, 128, device=DEVICE).to(DTYPE)
    ids, rw = _routing(40, 3, 2, seed=13)
    ref = moe_experts_reference(x.float(), ids, rw, dequantize(q13, s13, precision, 32).float(),
                                dequantize(q2, s2, precision, 32).float())
    for block_m in (64, 16):
        cfg = tm.MoeConfig(block_m, 32, 32, 2, 4, 2, 32, 32, 1, 2, 4, 2)
        out = tm.fused_moe(x, ids, rw, q13, q2, config=cfg, precision=precision, w13_scales=s13, w2_scales=s2,
                           group_size=32)
        assert _rel(out, ref) < RTOL[DTYPE], f"block_m {block_m}: {_rel(out, ref):.2e}"


def test_int4_groups_of_16_stay_on_the_reference() -> None:
    (q13, s13), (q2, s2) = _experts(2, 64, 32, "int4", 16, seed=8)
    x = torch.zeros(1, 64, device=DEVICE).to(DTYPE)
    assert "groups of 16" in tm.unsupported_reason(x, q13, q2, "int4", (s13, s2))
    assert "groups of 16" in tq.unsupported_reason(x, q2[0], s2[0], "int4")
    (q13, s13), (q2, s2) = _experts(2, 64, 32, "int8", 16, seed=8)
    assert tm.unsupported_reason(x, q13, q2, "int8", (s13, s2)) is None


def test_quantized_moe_expert_parallel_slices_sum_to_full() -> None:
    full = _check_moe(7, 128, 64, 4, 2, "int8", 0, seed=5)
    parts = sum(_check_moe(7, 128, 64, 4, 2, "int8", 0, seed=5, expert_slice=(lo, lo + 2)).float() for lo in (0, 2))
    assert _rel(parts, full.float()) < RTOL[DTYPE]


def test_quantized_moe_rejects_mismatched_operands() -> None:
    (q13, s13), (q2, s2) = _experts(2, 64, 32, "int4", 32, seed=6)
    x = torch.randn(2, 64, device=DEVICE).to(DTYPE)
    ids, rw = _routing(2, 2, 1, seed=7)
    with pytest.raises(ValueError, match=r"w13 scales \(2, 64, 1\) are not \[2, 64, 2\]"):
        tm.fused_moe(x, ids, rw, q13, q2, precision="int4", w13_scales=s13[..., :1], w2_scales=s2, group_size=32)
    with pytest.raises(TypeError, match="int8 codes must be torch.int8"):
        tm.fused_moe(x, ids, rw, q13, q2, precision="int8", w13_scales=s13, w2_scales=s2, group_size=32)
    assert "not torch.uint8" in tm.unsupported_reason(x, q13.view(torch.int8), q2, "int4", (s13, s2))
    assert "dtype" in tm.unsupported_reason(x, q13, q2, "int4", (s13.float(), s2))


@pytest.mark.parametrize("precision,group_size", SCHEMES)
@pytest.mark.parametrize("m,n,k", [(1, 48, 128), (5, 40, 256), (70, 24, 192)])
def test_quantized_matmul_matches_dequantized_reference(precision: str, group_size: int, m: int, n: int, k: int) -> None:
    if group_size and k % group_size:
        pytest.skip("group does not divide k")
    gen = torch.Generator(device=DEVICE).manual_seed(m + n + k)
    w = torch.randn(n, k, generator=gen, device=DEVICE).to(DTYPE)
    q, s = quantize(w, precision, group_size)
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(DTYPE)
    bias = torch.randn(n, generator=gen, device=DEVICE).to(DTYPE)
    out = tq.quantized_matmul(x, q, s, precision, group_size, bias)
    ref = x.float() @ dequantize(q, s, precision, group_size).float().T + bias.float()
    assert out.shape == (m, n) and out.dtype == DTYPE
    assert _rel(out, ref) < RTOL[DTYPE]


@pytest.mark.parametrize("precision,group_size", SCHEMES)
def test_swapped_linear_matches_dequantized_reference(precision: str, group_size: int) -> None:
    """The swapped-operand tiles (weights on the MMA's M side): 19 rows over two 16-row blocks, 40 output columns
    over a wrapped 32-column tile, a bias, per-channel or group scales."""
    bk = min(32, group_size or 32)
    gen = torch.Generator(device=DEVICE).manual_seed(30)
    w = torch.randn(40, 128, generator=gen, device=DEVICE).to(DTYPE)
    q, s = quantize(w, precision, group_size)
    x = torch.randn(19, 128, generator=gen, device=DEVICE).to(DTYPE)
    bias = torch.randn(40, generator=gen, device=DEVICE).to(DTYPE)
    out = tq.quantized_matmul(x, q, s, precision, group_size, bias, config=tq.LinearConfig(16, 32, bk, 4, 2),
                              kernel="swapped")
    ref = x.float() @ dequantize(q, s, precision, group_size).float().T + bias.float()
    assert out.shape == (19, 40) and _rel(out, ref) < RTOL[DTYPE]


def test_decode_batches_of_int4_rows_take_the_swapped_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table sends 8 and 32 rows of int4 (K = 256) to the 256-deep swapped tiles, 32 rows of K = 128 to the
    128-deep fallback of its row, and neither one row (the GEMV), nor 8 rows of K = 128 (that row's fallback: the
    tiles), nor 32 rows of K = 192, nor 100 rows (the tiles)."""
    launched: list[tuple[int, int]] = []
    kernel = tq._swapped_matmul_kernel

    class Recording:
        def __getitem__(self, grid):
            launched.append(grid)
            return kernel[grid]

    monkeypatch.setattr(tq, "_swapped_matmul_kernel", Recording())
    for m, k, taken in ((32, 256, True), (32, 128, True), (1, 256, False), (8, 256, True), (8, 128, False),
                        (32, 192, False), (100, 256, False)):
        w = torch.randn(48, k, device=DEVICE).to(DTYPE)
        q, s = quantize(w, "int4", 0)
        x = torch.randn(m, k, device=DEVICE).to(DTYPE)
        out = tq.quantized_matmul(x, q, s, "int4", 0)
        assert _rel(out, x.float() @ dequantize(q, s, "int4", 0).float().T) < RTOL[DTYPE]
        assert bool(launched) == taken, (m, k, launched)
        launched.clear()
    q, s = quantize(torch.randn(48, 192, device=DEVICE).to(DTYPE), "int4", 0)
    with pytest.raises(ValueError, match=r"the swapped tiles cannot take 32 rows of int4 \[48, 96\]: K=192 is not a "
                                         r"multiple of the K tile 256"):
        tq.quantized_matmul(torch.randn(32, 192, device=DEVICE).to(DTYPE), q, s, "int4", 0, kernel="swapped")
    with pytest.raises(ValueError, match=r"the swapped tiles cannot take 100 rows of int4 \[48, 96\]: no swapped "
                                         r"config for these rows: pass one"):
        tq.quantized_matmul(torch.randn(100, 192, device=DEVICE).to(DTYPE), q, s, "int4", 0, kernel="swapped")
    with pytest.raises(ValueError, match=r"the swapped tiles cannot take 32 rows of int4 \[48, 96\]: tiles 16x64x16 "
                                         r"have a dot dimension under 16"):
        tq.quantized_matmul(torch.randn(32, 192, device=DEVICE).to(DTYPE), q, s, "int4", 0,
                            config=tq.LinearConfig(16, 64, 16, 4, 2), kernel="swapped")
    launched.clear()  # a config without a kernel is the tiles', even where the table would swap
    w = torch.randn(48, 256, device=DEVICE).to(DTYPE)
    q, s = quantize(w, "int4", 0)
    x = torch.randn(32, 256, device=DEVICE).to(DTYPE)
    out = tq.quantized_matmul(x, q, s, "int4", 0, config=tq.LinearConfig(32, 32, 64, 4, 2))
    assert not launched and _rel(out, x.float() @ dequantize(q, s, "int4", 0).float().T) < RTOL[DTYPE]


def test_quantized_matmul_leading_dims_and_bad_shapes() -> None:
    w = torch.randn(32, 64, device=DEVICE).to(DTYPE)
    q, s = quantize(w, "int8", 0)
    x = torch.randn(2, 3, 64, device=DEVICE).to(DTYPE)
    out = tq.quantized_matmul(x, q, s, "int8", 0)
    assert out.shape == (2, 3, 32)
    assert _rel(out, x.float() @ dequantize(q, s, "int8", 0).float().T) < RTOL[DTYPE]
    with pytest.raises(ValueError, match=r"int8 weight \[32, 64\] does not fit inputs of 48 features"):
        tq.quantized_matmul(x[..., :48], q, s, "int8", 0)
    with pytest.raises(TypeError, match="scales are torch.float32"):
        tq.quantized_matmul(x, q, s.float(), "int8", 0)
    q, s = quantize(torch.randn(32, 64, device=DEVICE).to(DTYPE), "int8", 32)
    with pytest.raises(ValueError, match="group_size=48 does not divide the input features 64"):
        tq.quantized_matmul(torch.randn(2, 64, device=DEVICE).to(DTYPE), q, s, "int8", 48)


def test_unsupported_reasons_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    q, s = quantize(torch.randn(8, 64).bfloat16(), "int4", 0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "not CUDA" in tq.unsupported_reason(x, q, s, "int4")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tq.unsupported_reason(x, q, s, "int4") is None
    assert "activation dtype torch.float32" in tq.unsupported_reason(x.float(), q, s.float(), "int4")


# --- the CUDA-core decode path (GEMV) ---------------------------------------------------------


@pytest.mark.parametrize("precision,group_size", [(None, 0), *SCHEMES])
def test_gemv_moe_matches_dequantized_reference(precision: str | None, group_size: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced onto the decode kernels: 1 and 3 tokens, a ragged K in the down GEMV (I = 80, or 96 for groups of 16
    and 32: K tiles of 64 holding several groups, the last split half empty), tiles of several groups in the gate/up
    GEMV, and an expert-parallel slice whose other slots must contribute nothing."""
    h, i, e = 128, {0: 80, 16: 96, 32: 96}.get(group_size, 64), 4
    gen = torch.Generator(device=DEVICE).manual_seed(31)
    w13 = (torch.randn(e, 2 * i, h, generator=gen, device=DEVICE) / h**0.5).to(DTYPE)
    w2 = (torch.randn(e, h, i, generator=gen, device=DEVICE) / i**0.5).to(DTYPE)
    if precision is None:
        (q13, s13), (q2, s2) = (w13, None), (w2, None)
        d13, d2 = w13.float(), w2.float()
    else:
        (q13, s13), (q2, s2) = quantize(w13, precision, group_size), quantize(w2, precision, group_size)
        d13, d2 = (dequantize(q, sc, precision, group_size).float() for q, sc in ((q13, s13), (q2, s2)))
    # prefetch: the next K tile's loads in flight before this one is multiplied; words: one-warp tiles of 2 words
    # per thread (K tiles of 512 int4 / 256 int8 codes: masked here), float experts stay on the byte tiles
    configs = (GemvConfig(16, 64, 4, 16, 64, 3, 4), GemvConfig(16, 64, 4, 16, 64, 3, 4, prefetch=True),
               GemvConfig(8, 64, 1, 16, 64, 2, 1, words=2))
    word_calls = _count_calls(monkeypatch, tm, "_fused_moe_words")
    for cfg, (t, (lo, hi)) in itertools.product(configs, ((1, (0, e)), (3, (0, e)), (3, (2, e)))):
        x = torch.randn(t, h, generator=gen, device=DEVICE).to(DTYPE)
        ids, rw = _routing(t, e, 2, seed=t)
        kw = {} if precision is None else dict(precision=precision, w13_scales=s13[lo:hi], w2_scales=s2[lo:hi],
                                               group_size=group_size)
        before = len(word_calls)
        out = tm.fused_moe(x, ids, rw, q13[lo:hi], q2[lo:hi], expert_offset=lo, config=cfg, **kw)
        assert len(word_calls) - before == (1 if cfg.words and precision is not None else 0)
        ref = moe_experts_reference(x.float(), ids - lo, rw, d13[lo:hi], d2[lo:hi])
        if ref.norm() == 0:
            assert out.abs().max() == 0
        else:
            assert _rel(out, ref) < RTOL[DTYPE], f"{precision} g{group_size} T={t} experts {lo}:{hi} {cfg}"


@pytest.mark.parametrize("precision,group_size", [("int8", 0), ("int4", 32)])
def test_word_moe_splits_k_and_skips_other_ranks(precision: str, group_size: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The word kernels over an intermediate of 640: three K splits of one word per thread in the down GEMV (the
    last ragged) for one token; one masked split of four words per thread for 3 tokens of an expert-parallel slice
    whose other slots contribute nothing."""
    h, i, e = 128, 640, 4
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    w13 = (torch.randn(e, 2 * i, h, generator=gen, device=DEVICE) / h**0.5).to(DTYPE)
    w2 = (torch.randn(e, h, i, generator=gen, device=DEVICE) / i**0.5).to(DTYPE)
    (q13, s13), (q2, s2) = quantize(w13, precision, group_size), quantize(w2, precision, group_size)
    d13, d2 = (dequantize(q, sc, precision, group_size).float() for q, sc in ((q13, s13), (q2, s2)))
    word_calls = _count_calls(monkeypatch, tm, "_fused_moe_words")
    for cfg, (t, (lo, hi)) in ((GemvConfig(16, 64, 1, 16, 64, 3, 1, words=1), (1, (0, e))),
                               (GemvConfig(4, 64, 1, 8, 64, 2, 1, words=4), (3, (2, e)))):
        x = torch.randn(t, h, generator=gen, device=DEVICE).to(DTYPE)
        ids, rw = _routing(t, e, 2, seed=t)
        out = tm.fused_moe(x, ids, rw, q13[lo:hi], q2[lo:hi], expert_offset=lo, config=cfg, precision=precision,
                           w13_scales=s13[lo:hi], w2_scales=s2[lo:hi], group_size=group_size)
        ref = moe_experts_reference(x.float(), ids - lo, rw, d13[lo:hi], d2[lo:hi])
        assert _rel(out, ref) < RTOL[DTYPE], f"{precision} g{group_size} T={t} experts {lo}:{hi}"
    assert len(word_calls) == 2  # both calls ran the word kernels, not the byte ones


@pytest.mark.parametrize("precision,group_size", [(None, 0), ("int8", 0), ("int4", 32)])
def test_down_gemv_last_program_combines_as_the_combine_kernel(precision: str | None, group_size: int,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The down GEMVs' last program per (token, column tile) sums the slots and K splits itself
    (`triton_support.combine_if_last`): bit-identical to the combine kernel (`MOEC_COMBINE_IN_KERNEL=0`) on the
    byte and the word kernels, split and unsplit, with another rank's slots counted in but not summed; no
    combine launch, and every arrival counter back at 0."""
    from backends.torch.triton_support import arrival_counters

    h, i, e = 128, 384, 4
    gen = torch.Generator(device=DEVICE).manual_seed(17)
    w13 = (torch.randn(e, 2 * i, h, generator=gen, device=DEVICE) / h**0.5).to(DTYPE)
    w2 = (torch.randn(e, h, i, generator=gen, device=DEVICE) / i**0.5).to(DTYPE)
    if precision is None:
        (q13, s13), (q2, s2) = (w13, None), (w2, None)
    else:
        (q13, s13), (q2, s2) = quantize(w13, precision, group_size), quantize(w2, precision, group_size)
    words = 0 if precision is None else 1
    combines = _count_calls(monkeypatch, tm, "_combine_slots")
    for cfg, (t, (lo, hi)) in ((GemvConfig(16, 64, 1, 16, 64, 3, 1, words=words), (1, (0, e))),
                               (GemvConfig(16, 64, 1, 16, 64, 1, 1, words=words), (3, (2, e)))):
        x = torch.randn(t, h, generator=gen, device=DEVICE).to(DTYPE)
        ids, rw = _routing(t, e, 2, seed=t + 5)
        kw = {} if precision is None else dict(precision=precision, w13_scales=s13[lo:hi], w2_scales=s2[lo:hi],
                                               group_size=group_size)
        outs = {}
        for switch in ("0", "1"):
            monkeypatch.setenv("MOEC_COMBINE_IN_KERNEL", switch)
            before = len(combines)
            outs[switch] = tm.fused_moe(x, ids, rw, q13[lo:hi], q2[lo:hi], expert_offset=lo, config=cfg, **kw)
            assert len(combines) - before == (1 if switch == "0" else 0)
        assert torch.equal(outs["0"], outs["1"]), f"{precision} T={t} experts {lo}:{hi}"
        assert not arrival_counters(x.device, t * h // 16).any()


@pytest.mark.parametrize("precision,group_size", [(None, 0), ("int8", 0), ("int4", 32)])
def test_down_gemv_early_weights_change_no_bit(precision: str | None, group_size: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The down GEMVs' expert id and first K tile read before the PDL wait (`MOEC_EARLY_WEIGHTS`, default on): the
    byte kernel (with and without two tiles in flight) and the word kernel, over ragged K splits of one tile and of
    several, and an expert-parallel slice, give the very bits of the kernels that wait first."""
    h, i, e = 128, 640, 4
    gen = torch.Generator(device=DEVICE).manual_seed(23)
    w13 = (torch.randn(e, 2 * i, h, generator=gen, device=DEVICE) / h**0.5).to(DTYPE)
    w2 = (torch.randn(e, h, i, generator=gen, device=DEVICE) / i**0.5).to(DTYPE)
    if precision is None:
        (q13, s13), (q2, s2) = (w13, None), (w2, None)
    else:
        (q13, s13), (q2, s2) = quantize(w13, precision, group_size), quantize(w2, precision, group_size)
    configs = [GemvConfig(16, 64, 4, 16, 64, 3, 4), GemvConfig(16, 64, 4, 16, 128, 2, 4, prefetch=True)]
    if precision is not None:
        configs.append(GemvConfig(16, 64, 1, 16, 64, 3, 1, words=1))
    for cfg, (t, (lo, hi)) in itertools.product(configs, ((1, (0, e)), (3, (2, e)))):
        x = torch.randn(t, h, generator=gen, device=DEVICE).to(DTYPE)
        ids, rw = _routing(t, e, 2, seed=t + 9)
        kw = {} if precision is None else dict(precision=precision, w13_scales=s13[lo:hi], w2_scales=s2[lo:hi],
                                               group_size=group_size)
        outs = {}
        for switch in ("0", "1"):
            monkeypatch.setenv("MOEC_EARLY_WEIGHTS", switch)
            outs[switch] = tm.fused_moe(x, ids, rw, q13[lo:hi], q2[lo:hi], expert_offset=lo, config=cfg, **kw)
        assert torch.equal(outs["0"], outs["1"]), f"{precision} T={t} experts {lo}:{hi} {cfg}"


def test_words_need_whole_words(monkeypatch: pytest.MonkeyPatch) -> None:
    """What keeps operands off the word kernels, and that the byte kernel then gives the same result."""
    from backends.torch.triton_gemv_words import words_unsupported_reason

    q, s = quantize(torch.randn(40, 128, device=DEVICE).to(DTYPE), "int4", 0)
    x = torch.randn(1, 128, device=DEVICE).to(DTYPE)
    assert words_unsupported_reason(x, q, 128, 2, 0) is None
    assert words_unsupported_reason(x, q, 128, 0, 0) == "QUANT 0 has no word layout"
    assert words_unsupported_reason(x, q, 124, 2, 0) == "K 124 / group 0 are not whole words of 8 codes"
    assert words_unsupported_reason(x.float(), q, 128, 2, 0).startswith("activations torch.float32 [1, 128]")
    odd_row = torch.randn(1, 129, device=DEVICE).to(DTYPE)[:, 1:]
    assert words_unsupported_reason(odd_row, q, 128, 2, 0) == "activation rows do not start on a 32-bit pair"
    wide = torch.zeros(40, 66, dtype=q.dtype, device=DEVICE)
    wide[:, :64] = q
    assert words_unsupported_reason(x, wide[:, :64], 128, 2, 0) == "code strides [66, 1] are not whole 32-bit words"
    w = dequantize(q, s, "int4", 0).float()
    words = tq.LinearConfig(1, 16, 64, 1, 1, words=2)
    word_calls = _count_calls(monkeypatch, tq, "launch_gemv_words")
    # whole words: the word kernel; an activation row off its pairs, or codes off their words: the byte kernel
    for row, codes, on_words in ((x, q, True), (odd_row, q, False), (x, wide[:, :64], False)):
        before = len(word_calls)
        out = tq.quantized_matmul(row, codes, s, "int4", 0, config=words, kernel="gemv")
        assert _rel(out, row.float() @ w.T) < RTOL[DTYPE]
        assert len(word_calls) - before == int(on_words)


def test_word_gemv_register_cap_reaches_the_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The int4 / int8 word GEMVs' table entries carry the 80-register cap; both word kernels are launched with it
    as Triton's `maxnreg` (and without it for an uncapped config), and the capped call matches the reference."""
    import backends.torch.triton_gemv_words as tw

    assert get_gemv_config(2, 4096, 14336, 0, "int4").max_regs == 80
    assert get_gemv_config(2, 4096, 14336, 0, "int8").max_regs == 80
    caps: list[object] = []

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                caps.append(kwargs.get("maxnreg"))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in ("_gate_up_words_kernel", "_down_words_kernel"):
        monkeypatch.setattr(tw, name, Recording(getattr(tw, name)))
    (q13, s13), (q2, s2) = _experts(2, 128, 128, "int4", 0, seed=31)
    x = torch.randn(1, 128, device=DEVICE).to(DTYPE)
    ids, rw = _routing(1, 2, 2, seed=32)
    for max_regs, expected in ((80, [80, 80]), (0, [None, None])):
        cfg = GemvConfig(4, 64, 1, 8, 64, 2, 1, words=2, max_regs=max_regs)
        out = tm.fused_moe(x, ids, rw, q13, q2, config=cfg, precision="int4", w13_scales=s13, w2_scales=s2)
        ref = moe_experts_reference(x.float(), ids, rw, dequantize(q13, s13, "int4", 0).float(),
                                    dequantize(q2, s2, "int4", 0).float())
        assert _rel(out, ref) < RTOL[DTYPE] and caps == expected, caps
        caps.clear()


def test_gemv_tables_pick_the_decode_path_for_a_handful_of_slots() -> None:
    from backends.torch.moe_tuning import GEMV_TABLE

    for (precision, grouped), (max_slots, _) in GEMV_TABLE.items():
        group = 128 if grouped else 0
        assert get_gemv_config(max_slots, 4096, 14336, group, precision) is not None
        assert get_gemv_config(max_slots + 1, 4096, 14336, group, precision) is None
    grouped = get_gemv_config(2, 4096, 14336, 128, "int4")
    assert grouped.gu_block_k % 128 == 0 and grouped.dn_block_k % 128 == 0  # K tiles hold whole groups
    assert grouped.words == 2 and get_gemv_config(2, 4096, 14336, 0, "int8").words == 4  # the word kernels
    assert get_gemv_config(2, 4096, 14336, 0, "fp8") is None
    assert tq.gemv_config(1, 4096, 4096, 0, "int4") is not None and tq.gemv_config(2, 4096, 4096, 0, "int4") is None
    assert tq.gemv_config(1, 4096, 4096, 64, "int4").block_k % 64 == 0
    assert tq.gemv_config(1, 4096, 4096, 96, "int4").block_k == 96  # no whole groups in a power of two: one group
    assert [tq.tile_groups(bk, g) for bk, g in ((512, 0), (64, 128), (128, 128), (512, 128))] == [1, 1, 1, 4]
    with pytest.raises(ValueError, match="a 256-wide K tile does not hold whole groups of 96"):
        tq.tile_groups(256, 96)
    assert tq.gemv_config(1, 32000, 4096, 0, "int8").words == 4  # on words the lm_head-sized int8 GEMV wins
    assert tq.gemv_config(1, 32000, 4096, 128, "int8") is None  # grouped int8's byte GEMV lost to the tiles there
    x = torch.zeros(1, 64, device=DEVICE).to(DTYPE)
    q, s = quantize(torch.randn(2, 32, 64, device=DEVICE).to(DTYPE), "int8", 0)
    with pytest.raises(ValueError, match="CUDA-core decode path takes float / int8 / int4 experts"):
        tm.fused_moe(x, torch.zeros(1, 1, dtype=torch.int64, device=DEVICE), torch.ones(1, 1, device=DEVICE), q,
                     q[:, :16, :].transpose(1, 2), precision="int8", w13_scales=s,
                     w2_scales=torch.ones(2, 64, 1, device=DEVICE).to(DTYPE), config=GemvConfig(16, 64, 4, 16, 32, 1, 4))


@pytest.mark.parametrize("precision,group_size", SCHEMES)
@pytest.mark.parametrize("k,block_k", [(128, 64), (200, 64), (256, 64), (192, 128)])
def test_gemv_linear_matches_dequantized_reference(precision: str, group_size: int, k: int, block_k: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """K tiles inside one group, holding several (64 over groups of 16/32), and ragged (200; 192 over 128-wide tiles
    of 4 or 2 groups: the last tile half empty, its missing groups' scales not read)."""
    m = 1
    if group_size and k % group_size:
        pytest.skip("group does not divide k")
    gen = torch.Generator(device=DEVICE).manual_seed(m + k)
    w = torch.randn(40, k, generator=gen, device=DEVICE).to(DTYPE)
    q, s = quantize(w, precision, group_size)
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(DTYPE)
    bias = torch.randn(40, generator=gen, device=DEVICE).to(DTYPE)
    ref = x.float() @ dequantize(q, s, precision, group_size).float().T + bias.float()
    # stages 2: the next K tile's loads in flight (PREFETCH); words: 1, 2 or 4 per thread on one or two warps
    for cfg in (tq.LinearConfig(1, 16, block_k, 4, 1), tq.LinearConfig(1, 16, block_k, 4, 2),
                tq.LinearConfig(1, 16, 64, 1, 1, words=1), tq.LinearConfig(1, 8, 64, 2, 1, words=2),
                tq.LinearConfig(1, 8, 64, 1, 1, words=4)):
        word_calls = _count_calls(monkeypatch, tq, "launch_gemv_words")
        out = tq.quantized_matmul(x, q, s, precision, group_size, bias, config=cfg, kernel="gemv")
        assert _rel(out, ref) < RTOL[DTYPE], f"{cfg}"
        assert len(word_calls) == (1 if cfg.words and k % (8 if precision == "int4" else 4) == 0 else 0), f"{cfg}"
        monkeypatch.undo()
    with pytest.raises(ValueError, match="the GEMV kernel takes one row, not 2"):
        tq.quantized_matmul(torch.cat([x] * 2), q, s, precision, group_size, config=cfg, kernel="gemv")


# --- FP8 ------------------------------------------------------------------------------------------


def test_fp8_quantize_kernel_equals_the_reference_rounding() -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(41)
    x = torch.randn(7, 300, generator=gen, device=DEVICE).to(DTYPE) * 30
    x[0, :6] = torch.tensor([0.0, 1e-6, -3e-3, 1e4, -1e4, float("nan")])  # zero, subnormals, saturation, NaN stays
    for scale in (0.05, 1.0, 7.3):
        codes = tf.quantize(x, scale)
        assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape
        assert torch.equal(codes.view(torch.uint8), fp8.quantize(x, scale).view(torch.uint8))
    with pytest.raises(ValueError, match="scale 0.0 must be positive"):
        tf.quantize(x, 0.0)


def _fp8_experts(e: int, h: int, i: int, seed: int):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    codes, scales = [], []
    for shape in ((2 * i, h), (h, i)):
        pairs = [fp8.quantize_tensor(torch.randn(*shape, generator=gen, device=DEVICE) / shape[1] ** 0.5)
                 for _ in range(e)]
        codes.append(torch.stack([p[0] for p in pairs]))
        scales.append(torch.stack([p[1] for p in pairs]))
    return codes[0], scales[0], codes[1], scales[1]


@pytest.mark.parametrize("t", [1, 37])
def test_fp8_fused_moe_matches_the_reference_op(t: int) -> None:
    """The fused kernel (QUANT 3) against `moec.fp8_moe`'s float32 reference, routed the same way, under expert
    parallelism too."""
    h, i, e = 128, 96, 4
    q13, s13, q2, s2 = _fp8_experts(e, h, i, seed=42)
    gen = torch.Generator(device=DEVICE).manual_seed(43)
    x = torch.randn(t, h, generator=gen, device=DEVICE).to(DTYPE)
    router = (torch.randn(e, h, generator=gen, device=DEVICE) / h**0.5).to(DTYPE)  # no near-zero routing weights
    in_scale, mid_scale = float(x.abs().max()) / 448, 0.01
    ids, rw = kernels.route(x, router, 2, "renormalize")
    for lo, hi in ((0, e), (1, 3)):
        ref = _fp8_moe_reference(x, ids, rw, q13[lo:hi], s13[lo:hi], q2[lo:hi], s2[lo:hi], in_scale, mid_scale, lo)
        if not ON_GPU:  # the op itself runs its reference on the CPU: the helper above is its arithmetic
            op = torch.ops.moec.fp8_moe(x, router, q13[lo:hi], s13[lo:hi], q2[lo:hi], s2[lo:hi], 2, "renormalize",
                                        "swiglu", in_scale, mid_scale, lo)
            assert _rel(op, ref) < RTOL[DTYPE]
        out = tm.fused_moe(x, ids, rw, q13[lo:hi], q2[lo:hi], expert_offset=lo, precision="fp8",
                           w13_scales=s13[lo:hi], w2_scales=s2[lo:hi], w13_input_scale=in_scale,
                           w2_input_scale=mid_scale)
        assert out.dtype == DTYPE
        assert _rel(out, ref.float()) < RTOL[DTYPE], f"T={t} experts {lo}:{hi}"


def _fp8_moe_reference(x, ids, rw, q13, s13, q2, s2, in_scale, mid_scale, offset):
    """`moec.fp8_moe`'s arithmetic in float32 with the given routing (the op itself routes, and on CUDA runs the
    fused kernel)."""
    inputs = fp8.fake_quantize(x, in_scale)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    inter = q2.shape[-1]
    for local in range(q13.shape[0]):
        tok, j = torch.where(ids == local + offset)
        if tok.numel():
            gate_up = inputs[tok] @ fp8.dequantize(q13[local], s13[local]).T
            act = fp8.fake_quantize(torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:], mid_scale)
            out.index_add_(0, tok, act @ fp8.dequantize(q2[local], s2[local]).T * rw[tok, j, None])
    return out


def test_fp8_moe_rejects_bad_operands() -> None:
    q13, s13, q2, s2 = _fp8_experts(2, 64, 32, seed=44)
    x = torch.randn(2, 64, device=DEVICE).to(DTYPE)
    ids, rw = _routing(2, 2, 1, seed=45)
    with pytest.raises(ValueError, match=r"fp8 w2 scales \(2, 1\) are not \[2\]"):
        tm.fused_moe(x, ids, rw, q13, q2, precision="fp8", w13_scales=s13, w2_scales=s2[:, None])
    with pytest.raises(TypeError, match="in torch.float32"):
        tm.fused_moe(x, ids, rw, q13, q2, precision="fp8", w13_scales=s13.to(DTYPE), w2_scales=s2)
    with pytest.raises(ValueError, match="must be positive"):
        tm.fused_moe(x, ids, rw, q13, q2, precision="fp8", w13_scales=s13, w2_scales=s2, w13_input_scale=0.0)
    assert "one per expert" in tm.unsupported_reason(x, q13, q2, "fp8", (s13[:1], s2))
    assert tm.unsupported_reason(x, q13, q2, "fp8", (s13, s2)) is None


# --- Mixtral-8x7B shapes (GPU only) -------------------------------------------------------------


def _replayed(step):
    """`step()`'s outputs from one capture and replay of a CUDA graph, and the bytes allocated beyond what was
    allocated before the capture (a float copy of the weights would show here)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    graph.replay()
    torch.cuda.synchronize()
    return outputs, torch.cuda.max_memory_allocated() - before


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("precision,group_size", [("int8", 0), ("int4", 0), ("int4", 128)])
@pytest.mark.parametrize("t", [1, 8, 32, 64, 512])
def test_mixtral_quantized_moe(precision: str, group_size: int, t: int) -> None:
    """Per expert at full size (8 experts would be ~47/23 GB; 2 local experts and EP offsets exercise the same code)."""
    _check_moe(t, 4096, 14336, 2, 2, precision, group_size, seed=100 + t)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("precision,group_size", [("int8", 0), ("int4", 128)])
def test_mixtral_quantized_ops_stay_compact_and_capture(precision: str, group_size: int) -> None:
    """The moec ops on CUDA run the kernels (no reference warning), allocate no float copy of the weights, and a
    decode-shaped call replays from a CUDA graph."""
    h, i, e = 4096, 14336, 2
    (q13, s13), (q2, s2) = _experts(e, h, i, precision, group_size, seed=9)
    router = torch.randn(e, h, device=DEVICE).to(DTYPE)
    x = torch.randn(1, h, device=DEVICE).to(DTYPE)
    qw, sw = quantize(torch.randn(14336, h, device=DEVICE).to(DTYPE), precision, group_size)
    args = (x, router, q13, s13, q2, s2, 2, "renormalize", "swiglu", precision, group_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.ops.moec.quantized_moe(*args)
        torch.ops.moec.quantized_linear(x, qw, sw, None, precision, group_size)
    (moe_out, lin_out), transient = _replayed(lambda: (torch.ops.moec.quantized_moe(*args),
                                                         torch.ops.moec.quantized_linear(x, qw, sw, None, precision,
                                                                                         group_size)))
    # A dequantized copy of one expert's w13 alone would be 2 * 14336 * 4096 * 2 bytes = 235 MB.
    assert transient < 16 << 20
    ref_lin = x.float() @ dequantize(qw, sw, precision, group_size).float().T
    assert _rel(lin_out, ref_lin) < RTOL[DTYPE]
    ids, rw = kernels.route_on_device(x, router, 2, "renormalize")  # the routing the op itself ran
    ref_moe = moe_experts_reference(x.float(), ids, rw, dequantize(q13, s13, precision, group_size).float(),
                                    dequantize(q2, s2, precision, group_size).float())
    assert _rel(moe_out, ref_moe) < RTOL[DTYPE]


def test_float_weights_on_the_same_kernel() -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(21)
    w = torch.randn(40, 192, generator=gen, device=DEVICE).to(DTYPE)
    x = torch.randn(3, 192, generator=gen, device=DEVICE).to(DTYPE)
    bias = torch.randn(40, generator=gen, device=DEVICE).to(DTYPE)
    assert _rel(tq.linear(x, w, bias), x.float() @ w.float().T + bias.float()) < RTOL[DTYPE]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 32, 512])
def test_mixtral_fp8_ops_on_the_tensor_cores(t: int) -> None:
    """`moec.fp8_moe` / `moec.fp8_linear` on CUDA run the FP8 kernels (no reference warning) at full width, match
    their float32 arithmetic, keep the weights e4m3, and replay from a CUDA graph."""
    h, i, e = 4096, 14336, 2
    q13, s13, q2, s2 = _fp8_experts(e, h, i, seed=46)
    gen = torch.Generator(device=DEVICE).manual_seed(47)
    x = torch.randn(t, h, generator=gen, device=DEVICE).to(DTYPE)
    router = torch.randn(e, h, generator=gen, device=DEVICE).to(DTYPE)
    wq, ws = fp8.quantize_tensor(torch.randn(6144, h, generator=gen, device=DEVICE) / h**0.5)
    in_scale, mid_scale = float(x.abs().max()) / 448, 0.05 / 448
    moe_args = (x, router, q13, s13, q2, s2, 2, "renormalize", "swiglu", in_scale, mid_scale)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moe_out = torch.ops.moec.fp8_moe(*moe_args)
        lin_out = torch.ops.moec.fp8_linear(x, wq, ws, in_scale)
    ids, rw = kernels.route(x, router, 2, "renormalize")
    assert _rel(moe_out, _fp8_moe_reference(x, ids, rw, q13, s13, q2, s2, in_scale, mid_scale, 0)) < RTOL[DTYPE]
    ref_lin = fp8.fake_quantize(x, in_scale) @ fp8.dequantize(wq, ws).T
    assert _rel(lin_out, ref_lin) < RTOL[DTYPE]
    if t == 1:
        replayed, transient = _replayed(lambda: torch.ops.moec.fp8_moe(*moe_args))
        assert transient < 16 << 20  # a bf16 copy of one w13 would be 235 MB
        assert torch.equal(replayed, moe_out)


def test_float_gemv_one_row() -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(22)
    w = torch.randn(40, 200, generator=gen, device=DEVICE).to(DTYPE)
    x = torch.randn(1, 1, 200, generator=gen, device=DEVICE).to(DTYPE)
    bias = torch.randn(40, generator=gen, device=DEVICE).to(DTYPE)
    ref = x.float() @ w.float().T + bias.float()
    assert _rel(tq.linear(x, w, bias, kernel="gemv"), ref) < RTOL[DTYPE]
    assert tq.float_gemv_unsupported_reason(x, w, bias) is None
    assert "k-contiguous" in tq.float_gemv_unsupported_reason(x, w.T.contiguous().T, None)
    assert "16-bit" in tq.float_gemv_unsupported_reason(x.float(), w.float(), None)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("precision,group_size", [("int8", 0), ("int4", 0), ("int4", 128)])
def test_ptx_code_conversion_is_bit_identical_to_tritons(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                         precision: str, group_size: int) -> None:
    """The inline-PTX code conversions (triton_support.codes_in_ptx) turn every code into exactly the float Triton's
    own integer ops give: MoE outputs on the one-row GEMV (T = 1) and the swapped tiles (T = 8, 32), and a GEMV and
    a swapped linear, are bit-identical with MOEC_CODE_ASM on and off, every code value present."""
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    h, i = 1024, 2048
    w13 = (torch.randn(2, 2 * i, h, generator=gen, device=DEVICE) / h**0.5).to(dtype)
    w2 = (torch.randn(2, h, i, generator=gen, device=DEVICE) / i**0.5).to(dtype)
    (q13, s13), (q2, s2) = quantize(w13, precision, group_size), quantize(w2, precision, group_size)
    if precision == "int8":
        assert torch.unique(q13).numel() == 255  # -127..127 (symmetric), negative codes included
    else:  # nibbles hold code + 8 for codes -7..7
        assert torch.unique(q13 & 0xF).numel() == 15 and torch.unique(q13 >> 4).numel() == 15
    lw, ls = quantize((torch.randn(512, h, generator=gen, device=DEVICE) / 32).to(dtype), precision, group_size)
    swapped = tm.SwappedConfig(16, 64, 128, 4, 4, 128, 128, 4, 4, 4)

    def outputs() -> list[torch.Tensor]:
        results = []
        for t, cfg in ((1, None), (8, swapped), (32, swapped)):
            x = torch.randn(t, h, generator=torch.Generator(device=DEVICE).manual_seed(t), device=DEVICE).to(dtype)
            ids, rw = _routing(t, 2, 2, seed=t)
            results.append(tm.fused_moe(x, ids, rw, q13, q2, config=cfg, precision=precision, w13_scales=s13,
                                        w2_scales=s2, group_size=group_size))
        for m, kw in ((1, {}), (32, {"kernel": "swapped", "config": tq.LinearConfig(32, 64, 128, 4, 4)})):
            x = torch.randn(m, h, generator=torch.Generator(device=DEVICE).manual_seed(m), device=DEVICE).to(dtype)
            results.append(tq.quantized_matmul(x, lw, ls, precision, group_size, **kw))
        return results

    monkeypatch.setenv("MOEC_CODE_ASM", "1")
    with_ptx = outputs()
    monkeypatch.setenv("MOEC_CODE_ASM", "0")
    for a, b in zip(with_ptx, outputs()):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("group_size", [0, 128])
def test_mixtral_int4_projection_rows_on_the_swapped_tiles(group_size: int) -> None:
    """The compiled swapped tiles at Mixtral's qkv width, 32 and 64 rows (the table's 16x64 K-256 band up to 32 rows
    and its 32x64 band above), against the dequantized weight in float32."""
    w = torch.randn(6144, 4096, device=DEVICE).to(DTYPE) / 64
    q, s = quantize(w, "int4", group_size)
    ref_w = dequantize(q, s, "int4", group_size).float()
    for m in (32, 64):
        assert tq.swapped_linear_config(m, 4096, group_size, "int4") is not None
        x = torch.randn(m, 4096, device=DEVICE).to(DTYPE)
        assert _rel(tq.quantized_matmul(x, q, s, "int4", group_size), x.float() @ ref_w.T) < RTOL[DTYPE]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_moec_linear_decode_row_runs_the_gemv() -> None:
    """On CUDA one row of a bf16 `moec.linear` is the Triton GEMV (bit-identical to calling it); more rows: cuBLAS."""
    w = torch.randn(6144, 4096, device=DEVICE).to(DTYPE) / 64
    x = torch.randn(1, 1, 4096, device=DEVICE).to(DTYPE)
    out = torch.ops.moec.linear(x, w)
    assert torch.equal(out, tq.linear(x, w, kernel="gemv"))
    assert _rel(out, x.float() @ w.float().T) < RTOL[DTYPE]
    rows = torch.randn(4, 1, 4096, device=DEVICE).to(DTYPE)
    assert torch.equal(torch.ops.moec.linear(rows, w), torch.nn.functional.linear(rows, w))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_fp8_linear_with_bias_and_leading_dims() -> None:
    """cuBLASLt's FP8 GEMM through the op: a bias in the activation dtype, [B, S, K] inputs, and a non-row-major
    weight that must fall back to the reference with its reason."""
    gen = torch.Generator(device=DEVICE).manual_seed(48)
    wq, ws = fp8.quantize_tensor(torch.randn(512, 256, generator=gen, device=DEVICE) / 16)
    x = torch.randn(2, 3, 256, generator=gen, device=DEVICE).to(DTYPE)
    bias = torch.randn(512, generator=gen, device=DEVICE).to(DTYPE)
    scale = float(x.abs().max()) / 448
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = torch.ops.moec.fp8_linear(x, wq, ws, scale, bias)
    ref = fp8.fake_quantize(x, scale) @ fp8.dequantize(wq, ws).T + bias.float()
    assert out.shape == (2, 3, 512) and _rel(out, ref) < RTOL[DTYPE]
    strided = wq.T.contiguous().T  # same values, column-major storage
    assert "row-major" in tf.linear_unsupported_reason(x, strided, ws, bias)
    with pytest.warns(RuntimeWarning, match="row-major"):
        fallback = torch.ops.moec.fp8_linear(x, strided, ws, scale, bias)
    assert _rel(fallback, ref) < RTOL[DTYPE]
