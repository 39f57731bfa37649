"""Correctness of the Triton fused MoE kernel against an fp32 torch reference.

Without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set here before the
kernel module is imported; if something imported it earlier in compiled mode, it is reloaded) on
tiny shapes.  With CUDA, the tests marked ``gpu`` run Mixtral-8x7B shapes.  Expert parallelism: a
rank's slice of the experts with its ``expert_offset`` must equal the reference restricted to those
experts, and the slices of all ranks must sum to the full MoE.
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
    importlib.reload(sys.modules["backends.torch.triton_moe_swapped"])  # before triton_moe, which imports from it
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


def _reference(
    x: torch.Tensor, ids: torch.Tensor, rw: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, expert_offset: int = 0
) -> torch.Tensor:
    """fp32 reference, one expert at a time (the intermediate stays fp32); w13/w2 hold experts
    [expert_offset, expert_offset + E'), and slots routed to other experts contribute nothing."""
    inter = w2.shape[2]
    xf = x.float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tok, j = torch.where(ids == e + expert_offset)
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
    tm._align_kernel[(1,)](
        flat, sorted_slots, block_expert, s, nb_max, 0, E=e, E_P=8, BLOCK_M=bm, CHUNK=1024, NB_CHUNK=256
    )
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


@pytest.fixture
def poisoned_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels' scratch buffers (intermediate, partial sums) start as NaN, so a read of a row that no
    program wrote (a slot routed to another rank's experts) shows in the output."""
    empty = torch.empty

    def nan_empty(*args: object, **kwargs: object) -> torch.Tensor:
        buffer = empty(*args, **kwargs)
        return buffer.fill_(float("nan")) if buffer.is_floating_point() else buffer

    monkeypatch.setattr(tm.torch, "empty", nan_empty)


def _ep_slices(
    x: torch.Tensor, ids: torch.Tensor, rw: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ep: int
) -> list[torch.Tensor]:
    """Each of `ep` ranks' outputs (fp32): its block of experts and its expert_offset, checked against the
    reference restricted to that block.  The output is poisoned first: every element must be written."""
    e = w13.shape[0]
    per = e // ep
    outs = []
    for rank in range(ep):
        lo = rank * per
        out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)
        res = tm.fused_moe(x, ids, rw, w13[lo : lo + per], w2[lo : lo + per], expert_offset=lo, out=out)
        assert res.data_ptr() == out.data_ptr() and not torch.isnan(res).any(), "unwritten or NaN output"
        ref = _reference(x, ids, rw, w13[lo : lo + per], w2[lo : lo + per], expert_offset=lo)
        untouched = ~torch.isin(ids, torch.arange(lo, lo + per, device=ids.device)).any(dim=1)
        # Tokens with no slot on this rank are exactly zero, not merely small.
        assert torch.all(res[untouched] == 0)
        if ref.norm() > 0:
            err = ((res.float() - ref).norm() / ref.norm()).item()
            assert err < RTOL[x.dtype], f"rank {rank}/{ep}: relative error {err:.2e}"
        outs.append(res.float())
    return outs


def _check_ep(t: int, h: int, i: int, e: int, k: int, dtype: torch.dtype, ep: int, seed: int, *,
              weights: tuple[torch.Tensor, torch.Tensor] | None = None, ids_dtype: torch.dtype = torch.int64) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    w13, w2 = weights if weights is not None else _weights(e, h, i, dtype, gen)
    x = torch.randn(t, h, generator=gen, device=DEVICE).to(dtype)
    ids, rw = _routing(t, e, k, gen)
    ids = ids.to(ids_dtype)
    total = torch.stack(_ep_slices(x, ids, rw, w13, w2, ep)).sum(0)
    ref = _reference(x, ids, rw, w13, w2)
    full = tm.fused_moe(x, ids, rw, w13, w2).float()
    assert ((total - ref).norm() / ref.norm()).item() < RTOL[dtype]
    assert ((total - full).norm() / full.norm()).item() < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,ep", [(1, 2), (37, 2), (37, 4)])
def test_ep_slices_sum_to_full(t: int, ep: int, dtype: torch.dtype, poisoned_buffers: None) -> None:
    _check_ep(t, H, I, E, 2, dtype, ep, seed=300 + t + ep)


def test_ep_slices_int32_ids_uneven_shapes_split_k() -> None:
    """Offsets with int32 ids, K/N not multiples of the tiles and 3 K-splits of the down GEMM: 6 experts, 3 ranks."""
    gen = torch.Generator(device=DEVICE).manual_seed(12)
    h, i, e, t = 40, 72, 6, 9
    w13, w2 = _weights(e, h, i, torch.bfloat16, gen)
    x = torch.randn(t, h, generator=gen, device=DEVICE).to(torch.bfloat16)
    ids, rw = _routing(t, e, 2, gen)
    ids = ids.to(torch.int32)
    cfg = MoeConfig(16, 32, 16, 2, 4, 2, 16, 16, 3, 2, 4, 2)
    outs = []
    for lo in (0, 2, 4):
        out = tm.fused_moe(x, ids, rw, w13[lo : lo + 2], w2[lo : lo + 2], expert_offset=lo, config=cfg).float()
        ref = _reference(x, ids, rw, w13[lo : lo + 2], w2[lo : lo + 2], expert_offset=lo)
        assert ((out - ref).norm() / ref.norm()).item() < RTOL[torch.bfloat16]
        outs.append(out)
    ref = _reference(x, ids, rw, w13, w2)
    assert ((sum(outs) - ref).norm() / ref.norm()).item() < RTOL[torch.bfloat16]


def test_ep_rank_without_local_slots_is_zero(poisoned_buffers: None) -> None:
    """Every slot routed to the other rank's experts: the whole output is 0 (and written: it starts as NaN)."""
    gen = torch.Generator(device=DEVICE).manual_seed(13)
    t = 17
    w13, w2 = _weights(E, H, I, torch.bfloat16, gen)
    x = torch.randn(t, H, generator=gen, device=DEVICE).to(torch.bfloat16)
    ids, rw = _routing(t, E, 2, gen, allowed=[0, 1])
    out = torch.full((t, H), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    tm.fused_moe(x, ids, rw, w13[2:], w2[2:], expert_offset=2, out=out)
    assert torch.all(out == 0)


def test_ep_align_keeps_only_local_slots() -> None:
    """The routing kernel with an offset: only slots of experts [offset, offset + E) are sorted, in local ids."""
    gen = torch.Generator(device=DEVICE).manual_seed(14)
    t, k, e_routed, e_local, offset, bm = 300, 2, 8, 3, 4, 16
    ids, _ = _routing(t, e_routed, k, gen)
    flat = ids.reshape(-1).contiguous()
    s = flat.numel()
    nb_max = triton.cdiv(s, bm) + min(s, e_local)
    sorted_slots = torch.full((nb_max * bm,), -7, dtype=torch.int32, device=DEVICE)
    block_expert = torch.full((nb_max,), -7, dtype=torch.int32, device=DEVICE)
    tm._align_kernel[(1,)](flat, sorted_slots, block_expert, s, nb_max, offset, E=e_local, E_P=4, BLOCK_M=bm,
                           CHUNK=256, NB_CHUNK=64)
    sorted_slots, block_expert, flat = sorted_slots.cpu(), block_expert.cpu(), flat.cpu()
    pos = 0
    for local in range(e_local):
        slots = torch.nonzero(flat == offset + local).flatten().to(torch.int32)
        n, padded = slots.numel(), -(-slots.numel() // bm) * bm
        assert n > 0
        assert torch.equal(sorted_slots[pos : pos + n], slots)
        assert torch.all(sorted_slots[pos + n : pos + padded] == s)
        assert torch.all(block_expert[pos // bm : (pos + padded) // bm] == local)
        pos += padded
    assert torch.all(block_expert[pos // bm :] == -1)


def test_negative_expert_offset_is_rejected() -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(15)
    w13, w2 = _weights(2, H, I, torch.bfloat16, gen)
    x = torch.randn(3, H, generator=gen, device=DEVICE).to(torch.bfloat16)
    ids, rw = _routing(3, 2, 1, gen)
    with pytest.raises(ValueError, match="expert_offset"):
        tm.fused_moe(x, ids, rw, w13, w2, expert_offset=-1)


def test_unsupported_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatch's rule for what stays on the reference kernel, and why."""
    x = torch.zeros(2, H, dtype=torch.bfloat16)
    w13, w2 = torch.zeros(E, 2 * I, H, dtype=torch.bfloat16), torch.zeros(E, H, I, dtype=torch.bfloat16)
    with monkeypatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        assert tm.unsupported_reason(x, w13, w2) is None  # the interpreter runs CPU tensors
        patch.setenv("TRITON_INTERPRET", "0")
        assert "not CUDA" in tm.unsupported_reason(x, w13, w2)
        patch.setenv("TRITON_INTERPRET", "1")
        assert "activation dtype torch.float32" in tm.unsupported_reason(x.float(), w13.float(), w2.float())
        assert "expert weights" in tm.unsupported_reason(x, w13.half(), w2)
        patch.setattr(tm, "_HAVE_TRITON", False)
        assert tm.unsupported_reason(x, w13, w2) == "triton is not installed"


def test_moe_op_on_cpu_runs_the_reference_silently_with_expert_offset() -> None:
    """On the CPU the reference is the kernel (no warning); an EP rank's op equals the restricted reference."""
    import warnings

    import backends.torch.kernels as kernels

    gen = torch.Generator().manual_seed(16)
    x = torch.randn(6, H, generator=gen)
    router = torch.randn(E, H, generator=gen)
    w13, w2 = torch.randn(2, 2 * I, H, generator=gen) / H**0.5, torch.randn(2, H, I, generator=gen) / I**0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = torch.ops.moec.moe(x, router, w13, w2, 2, "renormalize", "swiglu", 2)
    experts, weights = kernels.route(x, router, 2, "renormalize")
    expected = _reference(x, experts, weights, w13, w2, expert_offset=2)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)


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


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("t,ep", [(1, 2), (32, 2), (333, 2), (32, 4), (4096, 8)])
def test_mixtral_ep_slices(
    t: int, ep: int, mixtral_weights: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    h, i, e, k = MIXTRAL
    _check_ep(t, h, i, e, k, torch.bfloat16, ep, seed=4000 + t + ep, weights=mixtral_weights[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 32])
def test_mixtral_ep_cuda_graph(t: int, mixtral_weights: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """An EP rank (experts 4..7 of 8, expert_offset=4) captured once, replayed on new routing."""
    h, i, e, k = MIXTRAL
    w13, w2 = (w[4:] for w in mixtral_weights[torch.bfloat16])
    gen = torch.Generator(device="cuda").manual_seed(6)
    x = torch.randn(t, h, generator=gen, device="cuda").to(torch.bfloat16)
    ids, rw = _routing(t, e, k, gen)
    tm.fused_moe(x, ids, rw, w13, w2, expert_offset=4)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tm.fused_moe(x, ids, rw, w13, w2, expert_offset=4)
    for _ in range(3):
        x.copy_(torch.randn(t, h, generator=gen, device="cuda").to(torch.bfloat16))
        new_ids, new_rw = _routing(t, e, k, gen)
        ids.copy_(new_ids)
        rw.copy_(new_rw)
        out.fill_(float("nan"))
        graph.replay()
        ref = _reference(x, ids, rw, w13, w2, expert_offset=4)
        untouched = (ids < 4).all(dim=1)
        assert torch.all(out[untouched] == 0)
        if ref.norm() > 0:
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert err < RTOL[torch.bfloat16], err


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_moe_op_on_ep_rank_is_capturable(mixtral_weights: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The `moe` op's CUDA dispatch with expert_offset runs the fused kernel: capture succeeds (the reference's
    host sync would break it) and each rank's captured output sums, over the two ranks, to the unsharded op."""
    import backends.torch.kernels  # noqa: F401 - registers the op's kernels

    h, i, e, k = MIXTRAL
    w13, w2 = mixtral_weights[torch.bfloat16]
    gen = torch.Generator(device="cuda").manual_seed(7)
    router = (torch.randn(e, h, generator=gen, device="cuda") / h**0.5).to(torch.bfloat16)
    x = torch.randn(1, 32, h, generator=gen, device="cuda").to(torch.bfloat16)
    args = (k, "renormalize", "swiglu")
    full = torch.ops.moec.moe(x, router, w13, w2, *args)
    halves = [torch.ops.moec.moe(x, router, w13[lo : lo + 4], w2[lo : lo + 4], *args, lo) for lo in (0, 4)]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.moec.moe(x, router, w13[4:], w2[4:], *args, 4)
    x.copy_(torch.randn(1, 32, h, generator=gen, device="cuda").to(torch.bfloat16))
    graph.replay()
    expected = torch.ops.moec.moe(x, router, w13[4:], w2[4:], *args, 4)
    assert torch.equal(captured, expected)  # same kernels, same inputs: bit-identical
    err = ((halves[0].float() + halves[1].float() - full.float()).norm() / full.float().norm()).item()
    assert err < RTOL[torch.bfloat16], err


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_moe_op_float32_on_cuda_says_why_it_runs_the_reference() -> None:
    import backends.torch.kernels as kernels

    gen = torch.Generator(device="cuda").manual_seed(8)
    x = torch.randn(5, 64, generator=gen, device="cuda")
    router = torch.randn(4, 64, generator=gen, device="cuda")
    w13, w2 = torch.randn(2, 96, 64, generator=gen, device="cuda"), torch.randn(2, 64, 48, generator=gen, device="cuda")
    with pytest.warns(RuntimeWarning, match="reference kernel on CUDA.*activation dtype torch.float32"):
        out = torch.ops.moec.moe(x, router, w13, w2, 2, "renormalize", "swiglu", 2)
    experts, weights = kernels.route(x, router, 2, "renormalize")
    expected = _reference(x, experts, weights, w13, w2, expert_offset=2)
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("normalization", ["renormalize", "none"])
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []))
def test_route_kernel_matches_reference_router(normalization: str, dtype: torch.dtype) -> None:
    """The one-launch router: the reference's experts and weights (logits rounded to the activation dtype first).
    Float16 in the interpreter, whose float32 -> bfloat16 cast truncates."""
    import backends.torch.kernels as kernels

    gen = torch.Generator(device=DEVICE).manual_seed(17)
    x = torch.randn(37, 96, generator=gen, device=DEVICE).to(dtype)
    router = torch.randn(6, 96, generator=gen, device=DEVICE).to(dtype)
    ref_ids, ref_weights = kernels.route(x, router, 2, normalization)
    # the whole router in one tile, read before the wait for x (the default here), and 32-wide tiles in a loop
    for block_h in (None, 32):
        ids, weights = tm.route(x, router, 2, normalization, block_h=block_h)
        assert ids.dtype == torch.int64 and weights.dtype == torch.float32
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="top_k=7"):
        tm.route(x, router, 7, normalization)
