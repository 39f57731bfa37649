"""Correctness of the Triton fused MoE kernel against an fp32 torch reference.

Without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set here before the
kernel module is imported; if something imported it earlier in compiled mode, it is reloaded) on
tiny shapes.  With CUDA, the tests marked ``gpu`` run Mixtral-8x7B shapes.
"""

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the kernels' @triton.jit decoration, which reads it.
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

import backends.torch.triton_moe as tm  # noqa: E402
from backends.torch.moe_tuning import MoeConfig  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and type(tm._gate_up_kernel).__name__ != "InterpretedFunction":
    tm = importlib.reload(sys.modules["backends.torch.triton_moe"])

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

# Tolerances on ||out - ref|| / ||ref||: the intermediate activation and the output are rounded to
# the activation dtype once each (bf16: 8 mantissa bits, fp16: 11).
RTOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def _weights(e: int, h: int, i: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = (torch.randn(e, 2 * i, h, generator=gen, device=DEVICE) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, i, generator=gen, device=DEVICE) / i**0.5).to(dtype)
    return w13, w2


def _routing(t: int, e: int, k: int, gen: torch.Generator, allowed: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax over random logits, top-k, renormalised.  ``allowed`` masks experts out."""
    logits = torch.randn(t, e, generator=gen, device=DEVICE)
    if allowed is not None:
        mask = torch.full((e,), float("-inf"), device=DEVICE)
        mask[allowed] = 0.0
        logits = logits + mask
    probs = torch.softmax(logits, dim=-1)
    w, ids = torch.topk(probs, k, dim=-1)
    return ids, w / w.sum(dim=-1, keepdim=True)


def _reference(x: torch.Tensor, ids: torch.Tensor, rw: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """fp32 reference, one expert at a time (the intermediate stays fp32)."""
    inter = w2.shape[2]
    xf = x.float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tok, j = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        gu = xf[tok] @ w13[e].float().t()
        a = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
        y = a @ w2[e].float().t()
        out.index_add_(0, tok, y * rw[tok, j].float()[:, None])
    return out


def _check(
    t: int,
    h: int,
    i: int,
    e: int,
    k: int,
    dtype: torch.dtype,
    seed: int,
    *,
    allowed: list[int] | None = None,
    fixed_ids: torch.Tensor | None = None,
    ids_dtype: torch.dtype = torch.int64,
    weights_fp32: bool = True,
    config: "MoeConfig | None" = None,
    weights: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    w13, w2 = weights if weights is not None else _weights(e, h, i, dtype, gen)
    x = torch.randn(t, h, generator=gen, device=DEVICE).to(dtype)
    ids, rw = _routing(t, e, k, gen, allowed)
    if fixed_ids is not None:
        ids = fixed_ids.to(DEVICE)
    ids = ids.to(ids_dtype)
    rw = rw if weights_fp32 else rw.to(dtype)
    out = torch.full((t, h), float("nan"), dtype=dtype, device=DEVICE)  # poison: every element must be written
    res = tm.fused_moe(x, ids, rw, w13, w2, config=config, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert res.dtype == dtype and res.shape == (t, h)
    assert not torch.isnan(res).any(), "unwritten or NaN output"
    ref = _reference(x, ids, rw, w13, w2)
    err = ((res.float() - ref).norm() / ref.norm()).item()
    assert err < RTOL[dtype], f"relative error {err:.2e}"
    return err


# --- tiny shapes (CPU interpreter, also run on GPU) -------------------------------------------
H, I, E = 32, 64, 4
DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 37])
def test_tiny_random_routing(t: int, dtype: torch.dtype) -> None:
    _check(t, H, I, E, 2, dtype, seed=100 + t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_tokens_one_expert(dtype: torch.dtype) -> None:
    t = 21
    _check(t, H, I, E, 1, dtype, seed=7, fixed_ids=torch.full((t, 1), 2))


def test_all_tokens_same_pair_int32_act_weights() -> None:
    t = 19
    ids = torch.tensor([[3, 1]]).repeat(t, 1)
    _check(t, H, I, E, 2, torch.bfloat16, seed=8, fixed_ids=ids, ids_dtype=torch.int32, weights_fp32=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_without_tokens(dtype: torch.dtype) -> None:
    _check(23, H, I, E, 2, dtype, seed=9, allowed=[0, 2, 3])


def test_split_k_uneven_k_and_n() -> None:
    # Odd sizes: K of both GEMMs not a multiple of BLOCK_K, N not a multiple of BLOCK_N, 3 K-splits.
    cfg = MoeConfig(16, 32, 16, 2, 4, 2, 16, 16, 3, 2, 4, 2)
    _check(9, 40, 72, 5, 2, torch.bfloat16, seed=10, config=cfg)


def test_align_many_slots() -> None:
    """The routing kernel alone, with several CHUNK iterations: a stable counting sort padded per expert."""
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    t, k, e, bm = 1500, 2, 6, 16
    ids, _ = _routing(t, e, k, gen, allowed=[0, 1, 3, 4, 5])
    flat = ids.reshape(-1).contiguous()
    s = flat.numel()
    nb_max = triton.cdiv(s, bm) + min(s, e)
    sorted_slots = torch.full((nb_max * bm,), -7, dtype=torch.int32, device=DEVICE)
    block_expert = torch.full((nb_max,), -7, dtype=torch.int32, device=DEVICE)
    tm._align_kernel[(1,)](flat, sorted_slots, block_expert, s, nb_max, E=e, E_P=8, BLOCK_M=bm, CHUNK=1024, NB_CHUNK=256)
    sorted_slots, block_expert = sorted_slots.cpu(), block_expert.cpu()
    flat = flat.cpu()
    pos = 0
    for ex in range(e):
        slots = torch.nonzero(flat == ex).flatten().to(torch.int32)  # stable: ascending slot order
        n = slots.numel()
        padded = -(-n // bm) * bm
        assert torch.equal(sorted_slots[pos : pos + n], slots)
        assert torch.all(sorted_slots[pos + n : pos + padded] == s)
        assert torch.all(block_expert[pos // bm : (pos + padded) // bm] == ex)
        pos += padded
    assert torch.all(block_expert[pos // bm :] == -1)


# --- Mixtral-8x7B shapes (GPU only) -------------------------------------------------------------
MIXTRAL = (4096, 14336, 8, 2)


@pytest.fixture(scope="module")
def mixtral_weights() -> dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]]:
    if not ON_GPU:
        pytest.skip("needs CUDA")
    h, i, e, _ = MIXTRAL
    gen = torch.Generator(device="cuda").manual_seed(0)
    return {torch.bfloat16: _weights(e, h, i, torch.bfloat16, gen)}


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 5, 16, 333, 4096])
def test_mixtral_bf16(t: int, mixtral_weights: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]]) -> None:
    h, i, e, k = MIXTRAL
    _check(t, h, i, e, k, torch.bfloat16, seed=1000 + t, weights=mixtral_weights[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("t", [3, 200])
def test_mixtral_fp16(t: int, mixtral_weights: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]]) -> None:
    h, i, e, k = MIXTRAL
    w13, w2 = mixtral_weights[torch.bfloat16]
    _check(t, h, i, e, k, torch.float16, seed=2000 + t, weights=(w13.to(torch.float16), w2.to(torch.float16)))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_mixtral_one_expert_and_empty_experts(mixtral_weights: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]]) -> None:
    h, i, e, k = MIXTRAL
    w = mixtral_weights[torch.bfloat16]
    _check(300, h, i, e, k, torch.bfloat16, seed=3, allowed=[1, 6], weights=w)
    _check(70, h, i, e, 1, torch.bfloat16, seed=4, fixed_ids=torch.full((70, 1), 5), weights=w)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 64])
def test_mixtral_cuda_graph(t: int, mixtral_weights: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Capture once, then replay on new routing written into the captured buffers."""
    h, i, e, k = MIXTRAL
    w13, w2 = mixtral_weights[torch.bfloat16]
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(t, h, generator=gen, device="cuda").to(torch.bfloat16)
    ids, rw = _routing(t, e, k, gen)
    tm.fused_moe(x, ids, rw, w13, w2)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tm.fused_moe(x, ids, rw, w13, w2)
    for _ in range(2):
        x.copy_(torch.randn(t, h, generator=gen, device="cuda").to(torch.bfloat16))
        new_ids, new_rw = _routing(t, e, k, gen)
        ids.copy_(new_ids)
        rw.copy_(new_rw)
        out.fill_(float("nan"))
        graph.replay()
        ref = _reference(x, ids, rw, w13, w2)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err < RTOL[torch.bfloat16], err
