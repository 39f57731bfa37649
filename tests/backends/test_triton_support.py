"""Launch rules of the torch backend's Triton kernels (backends/torch/triton_support.py): PDL, PTX codes."""

import pytest
import torch

from backends.torch import triton_support


def test_pdl_launch_only_on_cuda_hopper_and_not_when_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_support, "_TRITON_HAS_PDL", True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_support.pdl_launch(torch.zeros(1)) == {}  # a CPU tensor: an ordinary launch
    if torch.cuda.is_available():
        x = torch.zeros(1, device="cuda")
        expected = {"USE_PDL": True, "launch_pdl": True} if torch.cuda.get_device_capability() >= (9, 0) else {}
        assert triton_support.pdl_launch(x) == expected
        monkeypatch.setenv("MOEC_PDL", "0")
        assert triton_support.pdl_launch(x) == {}
        monkeypatch.setenv("MOEC_PDL", "1")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert triton_support.pdl_launch(x) == {}
        monkeypatch.setattr(triton_support, "_TRITON_HAS_PDL", False)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert triton_support.pdl_launch(x) == {}


def test_code_conversion_in_ptx_on_compiled_kernels_unless_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PTX code conversion is on for compiled kernels, off with MOEC_CODE_ASM=0 and under the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("MOEC_CODE_ASM", raising=False)
    assert triton_support.codes_in_ptx()
    monkeypatch.setenv("MOEC_CODE_ASM", "0")
    assert not triton_support.codes_in_ptx()
    monkeypatch.setenv("MOEC_CODE_ASM", "1")
    assert triton_support.codes_in_ptx()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs no PTX
    assert not triton_support.codes_in_ptx()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_captured_decode_chain_is_bit_identical_with_pdl_on_and_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Norm -> int4 group GEMV -> router -> int8 MoE decode path -> split-K attention, captured in one CUDA graph:
    with PDL every kernel may be scheduled while its predecessor runs, so each must still read only what that
    predecessor finished writing. A kernel that skipped `wait_for_producers` would read stale or half-written
    outputs and differ here."""
    from backends.torch import triton_attention, triton_moe, triton_norm, triton_quant
    from compiler.quantization import quantize

    gen = torch.Generator(device="cuda").manual_seed(5)
    h, i, e, hq, hkv, d, ctx = 1024, 2048, 8, 4, 2, 128, 700
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(1, h, device=dev, generator=gen).to(dt)
    norm_w = torch.rand(h, device=dev, generator=gen).to(dt) + 0.5
    qw, qs = quantize((torch.randn(h, h, device=dev, generator=gen) / h**0.5).to(dt), "int4", 128)
    router = (torch.randn(e, h, device=dev, generator=gen) / h**0.5).to(dt)
    q13, s13 = quantize((torch.randn(e, 2 * i, h, device=dev, generator=gen) / h**0.5).to(dt), "int8", 0)
    q2, s2 = quantize((torch.randn(e, h, i, device=dev, generator=gen) / i**0.5).to(dt), "int8", 0)
    caches = [torch.randn(1, hkv, 1024, d, device=dev, generator=gen).to(dt) for _ in range(2)]
    position = torch.full((1,), ctx, dtype=torch.int64, device=dev)

    def step() -> torch.Tensor:
        hidden = triton_quant.quantized_matmul(triton_norm.rms_norm(x, norm_w, 1e-5), qw, qs, "int4", 128)
        ids, weights = triton_moe.route(hidden, router, 2, "renormalize")
        hidden = triton_moe.fused_moe(hidden, ids, weights, q13, q2, precision="int8", w13_scales=s13,
                                      w2_scales=s2)
        q = hidden[:, : hq * d].reshape(1, hq, 1, d)
        kv = hidden[:, hq * d : hq * d + hkv * d].reshape(1, hkv, 1, d)
        return triton_attention.cached_attention(q, kv, kv, caches[0].clone(), caches[1].clone(), position,
                                                 d**-0.5).reshape(-1)

    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MOEC_PDL", flag)
        expect_pdl = flag == "1" and triton_support._TRITON_HAS_PDL and torch.cuda.get_device_capability() >= (9, 0)
        assert bool(triton_support.pdl_launch(x)) == expect_pdl
        step()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        outs[flag] = out.clone()
        assert torch.equal(outs[flag], step()), "replay differs from an eager step"
    assert torch.isfinite(outs["1"]).all() and outs["1"].abs().sum() > 0
    assert torch.equal(outs["1"], outs["0"])
