"""Properties that hold for every small Mixtral and every valid pipeline, drawn by Hypothesis.

For a drawn config (heads, kv heads, head size, experts, top-k, intermediate size, vocabulary, sliding window, tied
embeddings, layers; hidden <= 64, vocab <= 128, layers <= 3) and drawn pipelines:
- the default pipeline, and `canonicalize,fuse-moe` + a drawn order of `fold-weights`/`cse` + `dce`, give Hugging
  Face's float32 logits (max rel err <= 1e-5);
- `shard{tp,pp,moe_ep}` with a layout the config allows splits the model, and every rank of the last stage (real
  processes over gloo, as in tests/backends/test_distributed.py) gives those logits too; with any layout of at most
  4 ranks, either the same holds or, when an option does not divide the config, `shard` fails with an error naming a
  size it does not divide.

Each example traces one config (the costly step, 2-4 s) and checks four pipelines on it (two shard layouts), so
8 examples check 32 pipelines in about a minute on 2 cores. A fixed seed (`derandomize`) makes every CI run draw
the same examples.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from backends.torch.runtime import TorchExecutable
from compiler.api import DEFAULT_PIPELINE, CompiledModel
from compiler.ir import Program
from compiler.pass_manager import parse_pipeline, run_pipeline
from passes.sharding.layout import ShardingError
from tests.backends.test_distributed import run_ranks
from tests.models import TinyConfig, hf_model, input_ids, max_rel_err, traced

TOLERANCE = 1e-5
BATCH, SEQ = 2, 7  # longer than every drawn sliding window, so the window changes the logits


@st.composite
def mixtral_configs(draw: Any) -> TinyConfig:
    heads = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    # Rope needs an even head size; Hugging Face's grouped expert matmul needs rows of a multiple of 16 bytes.
    head_dim = draw(st.sampled_from([d for d in (2, 4, 8) if heads * d <= 64 and heads * d % 4 == 0]))
    kv_heads = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
    experts = draw(st.integers(2, 8))
    return TinyConfig(
        id="drawn",
        layers=draw(st.integers(1, 3)),
        heads=heads,
        kv_heads=kv_heads,
        experts=experts,
        top_k=draw(st.integers(1, min(3, experts))),
        sliding_window=draw(st.one_of(st.none(), st.integers(2, SEQ - 1))),
        tie_embeddings=draw(st.booleans()),
        hidden=heads * head_dim,
        intermediate=draw(st.sampled_from([8, 12, 16, 24, 36])),
        vocab=draw(st.sampled_from([30, 64, 96, 100, 128])),
    )


# Every layout of at most 4 rank processes (a 2-core machine), whether or not it divides a given config.
LAYOUTS = [
    {"tp": tp, "pp": pp, "moe_ep": moe_ep}
    for tp in range(1, 5)
    for pp in range(1, 4 // tp + 1)
    for moe_ep in range(1, tp + 1)
    if tp % moe_ep == 0
]


def dividing_layouts(config: TinyConfig) -> st.SearchStrategy[dict[str, int]]:
    """The layouts of more than one rank that `config` allows (one rank when it allows none)."""
    allowed = [layout for layout in LAYOUTS if layout != LAYOUTS[0] and not causes_of(config, **layout)]
    return st.sampled_from(allowed or LAYOUTS[:1])


def causes_of(config: TinyConfig, tp: int, pp: int, moe_ep: int) -> set[str]:
    """Every size the options do not divide, in the words `shard` must use; empty when the layout is possible."""
    moe_tp = tp // moe_ep
    causes = set()
    if config.heads % tp:
        causes.add(f"shard: tp={tp} does not divide the {config.heads} attention heads")
    if config.kv_heads % tp and tp % config.kv_heads:
        causes.add(f"shard: tp={tp} neither divides nor is a multiple of the {config.kv_heads} kv heads")
    if config.vocab % tp:
        causes.add(f"shard: tp={tp} does not divide the vocabulary size {config.vocab}")
    if config.experts % moe_ep:
        causes.add(f"shard: moe_ep={moe_ep} does not divide the {config.experts} experts")
    if config.intermediate % moe_tp:
        causes.add(f"shard: moe_tp={moe_tp} does not divide the expert intermediate size {config.intermediate}")
    if pp > config.layers:
        causes.add(f"shard: pp={pp} is larger than the {config.layers} layers")
    return causes


@pytest.mark.slow
@settings(
    max_examples=8,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(config=mixtral_configs(), data=st.data())
def test_every_valid_pipeline_gives_hugging_face_logits(config: TinyConfig, data: st.DataObject) -> None:
    order = data.draw(st.permutations(["fold-weights", "cse"]), label="fold-weights/cse order")
    cleanups = data.draw(st.sampled_from([order[:1], order]), label="cleanups")
    # One layout the config allows (the ranks must compute its logits), one drawn from all (often refused).
    layouts = [
        data.draw(dividing_layouts(config), label="dividing layout"),
        data.draw(st.sampled_from(LAYOUTS), label="any layout"),
    ]
    ids = input_ids(config, BATCH, SEQ)
    with torch.no_grad():
        expected = hf_model(config)(ids).logits
    program = traced(config)

    default = run_pipeline(program, parse_pipeline(DEFAULT_PIPELINE))
    logits = CompiledModel(default.program, program, default.history)(ids)
    assert max_rel_err(logits, expected) <= TOLERANCE, DEFAULT_PIPELINE

    fused = run_pipeline(program, parse_pipeline("canonicalize,fuse-moe")).program
    cleaned = run_pipeline(fused, parse_pipeline(",".join([*cleanups, "dce"]))).program
    assert max_rel_err(TorchExecutable(cleaned)(ids), expected) <= TOLERANCE, cleanups

    for layout in layouts:
        _check_shard(config, fused, layout, ids, expected)


def _check_shard(
    config: TinyConfig, fused: Program, layout: dict[str, int], ids: torch.Tensor, expected: torch.Tensor
) -> None:
    spec = "shard{" + ",".join(f"{key}={value}" for key, value in layout.items()) + "},dce"
    causes = causes_of(config, **layout)
    if causes:
        event("shard refused")  # `--hypothesis-show-statistics` shows how often each branch ran
        with pytest.raises(ShardingError) as error:
            run_pipeline(fused, parse_pipeline(spec))
        assert str(error.value) in causes
        return
    event("shard ran")
    sharded = run_pipeline(fused, parse_pipeline(spec)).program
    results = run_ranks(sharded, ids)
    last_stage = range((layout["pp"] - 1) * layout["tp"], layout["pp"] * layout["tp"])
    assert sorted(rank for rank, (rank_logits, _) in results.items() if rank_logits is not None) == list(last_stage)
    for rank in last_stage:
        assert max_rel_err(torch.from_numpy(results[rank][0]), expected) <= TOLERANCE, f"{spec}: rank {rank}"
