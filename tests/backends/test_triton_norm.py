"""The Triton RMSNorm / residual add + RMSNorm kernels against the CPU reference arithmetic.

Without CUDA they run in Triton's interpreter in float16 and float32 (the interpreter truncates float32 -> bfloat16
casts, which the GPU rounds); with CUDA the `gpu` tests run Mixtral's hidden size in bfloat16.
"""

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' @triton.jit decoration, which reads it

triton = pytest.importorskip("triton")

import backends.torch.triton_norm as tn  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and type(tn._rms_norm_kernel).__name__ != "InterpretedFunction":
    tn = importlib.reload(sys.modules["backends.torch.triton_norm"])

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def _reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of b's dtype's epsilon relative to |b| (1 = one rounding step)."""
    eps = torch.finfo(b.dtype).eps
    return ((a.float() - b.float()).abs() / (b.float().abs() * eps + 1e-30)).max().item()


DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 128), (3, 5, 100)])
def test_add_rms_norm_matches_add_then_norm(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
    residual = torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
    weight = (1 + torch.randn(shape[-1], generator=gen, device=DEVICE) / 4).to(dtype)
    total, normed = tn.add_rms_norm(x, residual, weight, 1e-5)
    assert total.shape == normed.shape == x.shape and total.dtype == normed.dtype == dtype
    assert torch.equal(total, x + residual)  # the sum is rounded exactly as the separate add rounds it
    # The normalized row: the float32 mean of squares summed in another order and rsqrt's last bit, then the same
    # two roundings: a few units of the last place, never more.
    assert _ulps(normed, _reference(x + residual, weight, 1e-5)) <= 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_alone(dtype: torch.dtype) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    x = torch.randn(7, 96, generator=gen, device=DEVICE).to(dtype)
    weight = torch.rand(96, generator=gen, device=DEVICE).to(dtype)
    assert _ulps(tn.rms_norm(x, weight, 1e-6), _reference(x, weight, 1e-6)) <= 4


def test_unsupported_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w = torch.zeros(2, 8), torch.zeros(8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "not CUDA" in tn.unsupported_reason(x, None, w)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tn.unsupported_reason(x, x, w) is None
    assert "weight torch.float16" in tn.unsupported_reason(x, None, w.half())
    assert "residual" in tn.unsupported_reason(x, x[:1], w)
    with pytest.raises(TypeError, match="residual"):
        tn.add_rms_norm(x, x[:1], w, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 32, 2048])
def test_mixtral_hidden_bf16(rows: int) -> None:
    x = torch.randn(rows, 4096, device="cuda").bfloat16()
    residual = torch.randn(rows, 4096, device="cuda").bfloat16()
    weight = torch.rand(4096, device="cuda").bfloat16()
    total, normed = tn.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(total, x + residual)
    assert _ulps(normed, _reference(x + residual, weight, 1e-5)) <= 4


def _rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq,heads", [(1, 1, 4), (2, 5, 3)])
def test_rope_of_a_transposed_projection_matches_reference(dtype: torch.dtype, batch: int, seq: int, heads: int) -> None:
    """x is the [B,H,S,D] transposed view of a [B,S,H*D] projection, as canonical graphs hand it over."""
    gen = torch.Generator(device=DEVICE).manual_seed(batch * seq)
    dim = 16
    x = torch.randn(batch, seq, heads * dim, generator=gen, device=DEVICE).to(dtype)
    x = x.view(batch, seq, heads, dim).transpose(1, 2)
    angles = torch.rand(batch, seq, dim // 2, generator=gen, device=DEVICE) * 6
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    out = tn.rope(x, cos, sin)
    assert out.shape == x.shape and out.stride() == x.stride()
    reference = _rope_reference(x, cos, sin)
    if ON_GPU:  # the compiled kernel may contract a product into the sum (one rounding fewer): a unit in the last place
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(out, reference, rtol=2 * eps, atol=2 * eps * x.abs().max().item())
    else:  # the interpreter rounds each product and the sum where the separate ops round
        assert torch.equal(out, reference)


def test_rope_unsupported_reasons() -> None:
    x = torch.zeros(1, 2, 3, 8, device=DEVICE)
    cos = torch.zeros(1, 3, 8, device=DEVICE)
    assert "one dtype" in tn.rope_unsupported_reason(x, cos.half(), cos)
    other = torch.zeros(1, 4, 8, device=DEVICE)
    assert "does not broadcast" in tn.rope_unsupported_reason(x, other, other)
