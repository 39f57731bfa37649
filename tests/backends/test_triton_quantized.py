"""Weight-only INT8/INT4 Triton kernels (the fused MoE with quantized experts, the quantized linear) against the
CPU reference's dequantized weights.

Without CUDA they run in Triton's interpreter on tiny shapes, in float16: the interpreter casts float32 to bfloat16
by truncation (seen with triton 3.9.0), not round-to-nearest as the GPU does, so its bf16 results carry errors of a
few bf16 ulps that the compiled kernels do not have; float16 casts round properly there. With CUDA, the tests marked
`gpu` run Mixtral-8x7B shapes in bfloat16 and check that the weights stayed compact (no float copy of the experts is
allocated) and that a decode call is CUDA-graph capturable.
"""

import importlib
import os
import sys
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' @triton.jit decoration, which reads it

triton = pytest.importorskip("triton")

import backends.torch.triton_moe as tm  # noqa: E402
import backends.torch.triton_quant as tq  # noqa: E402
from backends.torch.kernels import moe_experts_reference  # noqa: E402
from compiler.quantization import dequantize, quantize  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and type(tq._quantized_matmul_kernel).__name__ != "InterpretedFunction":
    tq = importlib.reload(sys.modules["backends.torch.triton_quant"])
    tm = importlib.reload(sys.modules["backends.torch.triton_moe"])

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float16
# ||out - ref|| / ||ref|| against an fp32 product of the very dequantized weights: only the activation dtype's
# rounding of the intermediate and of the output remains.
RTOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
SCHEMES = [("int8", 0), ("int8", 16), ("int8", 32), ("int4", 0), ("int4", 32), ("int4", 64)]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


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


def test_unsupported_reasons_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    q, s = quantize(torch.randn(8, 64).bfloat16(), "int4", 0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "not CUDA" in tq.unsupported_reason(x, q, s, "int4")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tq.unsupported_reason(x, q, s, "int4") is None
    assert "activation dtype torch.float32" in tq.unsupported_reason(x.float(), q, s.float(), "int4")


# --- Mixtral-8x7B shapes (GPU only) -------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("precision,group_size", [("int8", 0), ("int4", 0), ("int4", 128)])
@pytest.mark.parametrize("t", [1, 32, 512])
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
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_out = torch.ops.moec.quantized_moe(*args)
        lin_out = torch.ops.moec.quantized_linear(x, qw, sw, None, precision, group_size)
    graph.replay()
    torch.cuda.synchronize()
    # A dequantized copy of one expert's w13 alone would be 2 * 14336 * 4096 * 2 bytes = 235 MB.
    assert torch.cuda.max_memory_allocated() - before < 16 << 20
    ref_lin = x.float() @ dequantize(qw, sw, precision, group_size).float().T
    assert _rel(lin_out, ref_lin) < RTOL[DTYPE]
    assert torch.isfinite(moe_out).all()


def test_float_weights_on_the_same_kernel() -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(21)
    w = torch.randn(40, 192, generator=gen, device=DEVICE).to(DTYPE)
    x = torch.randn(3, 192, generator=gen, device=DEVICE).to(DTYPE)
    bias = torch.randn(40, generator=gen, device=DEVICE).to(DTYPE)
    assert _rel(tq.linear(x, w, bias), x.float() @ w.float().T + bias.float()) < RTOL[DTYPE]
