"""`shard`: per-rank structure, weight slices (lazy, exact bytes), the moe op's expert offset, pipeline stages,
rank-mapped passes after it, the CLI's per-rank dumps, and one exact error per impossible layout.

Numerics of whole sharded programs across real processes are in tests/backends/test_distributed.py.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch

import backends.torch.kernels  # noqa: F401 - the reference kernels behind ops.moe
from backends.torch.runtime import TorchExecutable
from compiler import ops
from compiler.api import load
from compiler.errors import MoecError, PassOptionError, PreconditionError
from compiler.ir import Program, op_name
from compiler.pass_manager import parse_pipeline, run_pipeline
from passes.shard import Shard
from passes.sharding.layout import ShardingError
from passes.sharding.pipeline import stage_layers
from tests.models import TinyConfig

# Heads, experts and intermediate size divide by 4; 2 kv heads, so tp=4 replicates kv heads; 3 layers, so pp=2
# is uneven; tied embeddings, so embedding and lm_head share one vocabulary-split tensor. tp=8 fits the heads but
# not the 12 experts (moe_ep=8) nor the intermediate size 36 (moe_tp=8).
SHARD_CONFIG = TinyConfig(
    "shard-h8-kv2-e12-i36-l3-tied", heads=8, kv_heads=2, experts=12, intermediate=36, layers=3, tie_embeddings=True
)
HIDDEN, HEAD_DIM, INTERMEDIATE, EXPERTS = 32, 4, 36, 12


@lru_cache(maxsize=None)
def traced_program() -> Program:
    return load(SHARD_CONFIG.hf_config())


@lru_cache(maxsize=None)
def fused_program() -> Program:
    return run_pipeline(traced_program(), parse_pipeline("canonicalize,fuse-moe,dce")).program


def shard(spec: str) -> Program:
    return run_pipeline(fused_program(), parse_pipeline(spec)).program


def weight_of(program: Program, name: str) -> torch.Tensor:
    return program.weights()[name].materialize()


def test_tp2_ranks_structure_and_slices() -> None:
    before = fused_program().format()
    sharded = shard("shard{tp=2}")
    assert fused_program().format() == before  # the input program is untouched
    assert len(sharded.ranks) == 2
    assert sharded.attributes == {"tp": 2, "pp": 1, "moe_tp": 2, "moe_ep": 1}
    for rank, program in enumerate(sharded.ranks):
        attributes = program.attributes
        assert (attributes["rank"], attributes["tp_rank"], attributes["pp_rank"]) == (rank, rank, 0)
        assert attributes["kv_heads"] == "split" and attributes["returns_logits"] is True
        counts = program.op_counts()
        # embedding + (o_proj, moe) per layer reduce; the vocabulary-split logits are gathered.
        assert counts["moec.all_reduce"] == 1 + 2 * 3 and counts["moec.all_gather"] == 1
        shapes = {name: expr.shape for name, expr in program.weights().items()}
        assert shapes["layers_0_self_attn_q_proj_weight"] == (16, HIDDEN)
        assert shapes["layers_0_self_attn_k_proj_weight"] == (4, HIDDEN)  # one of two kv heads
        assert shapes["layers_0_self_attn_o_proj_weight"] == (HIDDEN, 16)
        assert shapes["layers_0_mlp_gate_weight"] == (EXPERTS, HIDDEN)  # router replicated
        assert shapes["layers_0_mlp_experts_w13"] == (EXPERTS, INTERMEDIATE, HIDDEN)
        assert shapes["layers_0_mlp_experts_w2"] == (EXPERTS, HIDDEN, INTERMEDIATE // 2)
        assert shapes["lm_head_weight"] == (48, HIDDEN)
        full_q = weight_of(fused_program(), "layers_0_self_attn_q_proj_weight")
        assert torch.equal(weight_of(program, "layers_0_self_attn_q_proj_weight"), full_q[16 * rank : 16 * (rank + 1)])
        groups = {tuple(n.args[-1]) for n in program.graph.nodes if op_name(n) == "moec.all_reduce"}
        assert groups == {(0, 1)}
    text = sharded.format()
    assert "== rank 0\n" in text and "== rank 1\n" in text
    assert "moec.all_gather(%linear_175, -1, [0, 1])" in text


def test_moe_tp_slices_gate_and_up_rows_of_each_expert() -> None:
    program = shard("shard{tp=4,moe_tp=2,moe_ep=2}").ranks[3]  # tp rank 3: expert block 1, intermediate half 1
    full = weight_of(fused_program(), "layers_1_mlp_experts_w13")
    lo, hi, half = INTERMEDIATE // 2, INTERMEDIATE, INTERMEDIATE // 2
    expected = torch.cat([full[6:12, lo:hi], full[6:12, INTERMEDIATE + lo : INTERMEDIATE + hi]], dim=1)
    assert torch.equal(weight_of(program, "layers_1_mlp_experts_w13"), expected)
    full_w2 = weight_of(fused_program(), "layers_1_mlp_experts_w2")
    assert torch.equal(weight_of(program, "layers_1_mlp_experts_w2"), full_w2[6:12, :, half:])
    moe = next(n for n in program.graph.nodes if n.target == ops.moe)
    assert moe.kwargs == {"expert_offset": 6}
    attributes = program.attributes
    assert (attributes["moe_ep_rank"], attributes["moe_tp_rank"]) == (1, 1)


def test_tp4_replicates_kv_heads() -> None:
    sharded = shard("shard{tp=4,moe_ep=4}")
    full_k = weight_of(fused_program(), "layers_0_self_attn_k_proj_weight")
    for rank, program in enumerate(sharded.ranks):
        assert program.attributes["kv_heads"] == "replicated (4 ranks > 2)"
        kv_head = rank // 2  # query heads 2r, 2r+1 read kv head r // 2 (4 query heads per kv head)
        k = weight_of(program, "layers_0_self_attn_k_proj_weight")
        assert torch.equal(k, full_k[kv_head * HEAD_DIM : (kv_head + 1) * HEAD_DIM])
        assert program.weights()["layers_0_mlp_experts_w13"].shape == (3, 2 * INTERMEDIATE, HIDDEN)


@pytest.mark.parametrize("moe_tp, moe_ep", [(1, 3), (3, 1), (1, 4), (2, 2)])
def test_moe_kernel_shards_sum_to_the_full_block(moe_tp: int, moe_ep: int) -> None:
    """The reference moe kernel with expert blocks and intermediate slices: the partial sums add up exactly."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(10, HIDDEN, generator=generator)
    router = torch.randn(EXPERTS, HIDDEN, generator=generator)
    w13 = torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=generator) * 0.1
    w2 = torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, generator=generator) * 0.1
    full = ops.moe(x, router, w13, w2, 3, "renormalize", "swiglu")
    block, part = EXPERTS // moe_ep, INTERMEDIATE // moe_tp
    total = torch.zeros_like(full)
    for e in range(moe_ep):
        for t in range(moe_tp):
            experts, rows = slice(e * block, (e + 1) * block), slice(t * part, (t + 1) * part)
            up = slice(INTERMEDIATE + t * part, INTERMEDIATE + (t + 1) * part)
            local_w13 = torch.cat([w13[experts, rows], w13[experts, up]], dim=1)
            total += ops.moe(x, router, local_w13, w2[experts, :, rows], 3, "renormalize", "swiglu", e * block)
    assert torch.allclose(total, full, rtol=1e-5, atol=1e-6)


def test_pipeline_stages_send_and_receive() -> None:
    assert stage_layers(3, 2) == [(0, 2), (2, 3)]
    assert stage_layers(5, 3) == [(0, 2), (2, 4), (4, 5)]
    first, last = shard("shard{pp=2},dce").ranks
    assert (first.attributes["layers"], last.attributes["layers"]) == ("0..1", "2..2")
    assert (first.attributes["returns_logits"], last.attributes["returns_logits"]) == (False, True)
    first_counts, last_counts = first.op_counts(), last.op_counts()
    assert (first_counts["moec.moe"], last_counts["moec.moe"]) == (2, 1)
    assert (first_counts["aten.embedding"], last_counts["aten.embedding"]) == (1, 0)
    send = next(n for n in first.graph.nodes if op_name(n) == "moec.send")
    recv = next(n for n in last.graph.nodes if op_name(n) == "moec.recv")
    assert send.args[1] == 1 and recv.args[3] == 0
    output = next(n for n in first.graph.nodes if n.op == "output")
    assert output.args[0] == [send]
    assert "layers_2_mlp_experts_w13" not in first.weights() and "layers_0_mlp_experts_w13" not in last.weights()
    # tp x pp: stage 1's tp rank t receives from stage 0's tp rank t, and reduces within its own tp group.
    ranks = shard("shard{tp=2,pp=2}").ranks
    for rank in (2, 3):
        recv = next(n for n in ranks[rank].graph.nodes if op_name(n) == "moec.recv")
        assert recv.args[3] == rank - 2
        groups = {tuple(n.args[-1]) for n in ranks[rank].graph.nodes if op_name(n) == "moec.all_reduce"}
        assert groups == {(2, 3)}


def test_passes_after_shard_map_over_ranks() -> None:
    result = run_pipeline(fused_program(), parse_pipeline("shard{pp=2},cse,dce"))
    shard_record, cse_record, dce_record = result.history
    assert shard_record.changed and len(shard_record.program.ranks) == 2
    # The receiving stage's own batch/seq sizes duplicate the traced ones; cse merges them on that rank only.
    assert cse_record.changed and cse_record.stats["nodes_merged"] == 2
    assert len(result.program.ranks) == 2
    assert not dce_record.changed
    assert result.program.ranks[1].op_counts()["aten.sym_size.int"] == 2


def test_sharded_program_is_not_run_by_the_single_device_runtime() -> None:
    with pytest.raises(MoecError) as error:
        TorchExecutable(shard("shard{tp=2}"))
    assert str(error.value) == (
        "program is sharded over 2 ranks; run it with backends.torch.distributed "
        "(e.g. torchrun --nproc-per-node N -m compiler.cli run ...)"
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        ("shard{tp=3}", "shard: tp=3 does not divide the 8 attention heads"),
        ("shard{tp=8,moe_ep=8}", "shard: moe_ep=8 does not divide the 12 experts"),
        ("shard{tp=8}", "shard: moe_tp=8 does not divide the expert intermediate size 36"),
        ("shard{pp=4}", "shard: pp=4 is larger than the 3 layers"),
    ],
)
def test_impossible_layouts(spec: str, message: str) -> None:
    with pytest.raises(ShardingError) as error:
        shard(spec)
    assert str(error.value) == message


def test_moe_split_must_multiply_to_tp() -> None:
    with pytest.raises(PassOptionError) as error:
        parse_pipeline("shard{tp=2,moe_tp=2,moe_ep=2}")
    assert str(error.value) == "shard: moe_tp * moe_ep must equal tp, got moe_tp=2 * moe_ep=2 != tp=2"
    assert Shard(tp=4, moe_ep=2).moe_split() == (2, 2)


def test_shard_needs_fuse_moe_first() -> None:
    with pytest.raises(PreconditionError) as error:
        run_pipeline(traced_program(), parse_pipeline("canonicalize,shard{tp=2}"))
    assert str(error.value) == (
        "pass 'shard{tp=2}' cannot run (after canonicalize): needs fuse-moe first: "
        "the graph has no fused moec.moe op per layer"
    )
    with pytest.raises(PreconditionError) as error:
        run_pipeline(shard("shard{tp=2}"), parse_pipeline("shard{tp=2}"))
    assert str(error.value) == "pass 'shard{tp=2}' cannot run (it ran first): the program is already sharded over 2 ranks"


def test_shard_refuses_a_program_that_already_attends_over_kv_caches() -> None:
    # The smallest graph `kv-cache` could leave: one moec.cached_attention over its caches.
    graph = torch.fx.Graph()
    q, k, v, k_cache, v_cache, cache_position = (
        graph.placeholder(name) for name in ("q", "k", "v", "k_cache", "v_cache", "cache_position")
    )
    graph.output(graph.call_function(ops.cached_attention, (q, k, v, k_cache, v_cache, cache_position, 0.5)))
    cached = Program(torch.fx.GraphModule(torch.nn.Module(), graph), config=None)
    with pytest.raises(PreconditionError) as error:
        Shard(tp=2).requires(cached)
    assert str(error.value) == (
        "shard must run before kv-cache: the graph already attends over KV caches (moec.cached_attention), "
        "whose heads and layers a rank could not split"
    )
    Shard(tp=2).requires(fused_program())  # the same check passes the graph kv-cache has not run on
    with pytest.raises(PreconditionError) as error:
        run_pipeline(fused_program(), parse_pipeline("kv-cache,shard{tp=2}"))
    assert str(error.value).startswith("pass 'shard{tp=2}' cannot run (after kv-cache): shard must run before kv-cache")


def test_cli_compile_dumps_one_graph_per_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import compiler.api
    from compiler import cli

    monkeypatch.setattr(compiler.api, "load", lambda *args, **kwargs: fused_program())
    status = cli.main(["compile", "tiny", "--passes", "shard{tp=2},dce", "--dump-dir", str(tmp_path), "--no-weights"])
    assert status == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "00-trace.txt", "01-shard_tp=2.rank0.txt", "01-shard_tp=2.rank1.txt", "02-dce.rank0.txt", "02-dce.rank1.txt"
    ]
    assert (tmp_path / "02-dce.rank1.txt").read_text() == shard("shard{tp=2},dce").ranks[1].format()
    assert "== rank 1" in capsys.readouterr().out
    status = cli.main(["run", "tiny", "--passes", "shard{tp=2}", "--input-ids", "1 2 3"])
    assert status == 2
    assert capsys.readouterr().err.strip().endswith(
        "moec: error: the pipeline shards the model over 2 ranks; launch it with "
        "torchrun --nproc-per-node 2 -m compiler.cli run ... (or mpirun -n 2)"
    )
