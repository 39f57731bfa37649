"""`logits-for`: the narrowed lm_head's exact structure, logits equal to the last row of the program before the pass
(stateless, and prefill/decode with kv-cache after it), `all` as the identity, idempotence, sharded ranks, options."""

from __future__ import annotations

import pytest
import torch

from backends.torch.runtime import TorchExecutable
from compiler import ops
from compiler.errors import PassOptionError
from compiler.pass_manager import parse_pass, parse_pipeline, run_pipeline
from passes.logits_for import LogitsFor
from tests.models import TINY_CONFIGS, TinyConfig, input_ids, max_rel_err
from tests.passes.test_canonicalize import compiled

FUSED = "canonicalize,fuse-moe,dce"
CONFIGS = [TINY_CONFIGS[0], TINY_CONFIGS[3]]  # GQA untied, MQA with tied embeddings


@pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
def test_the_lm_head_reads_the_last_position_only(config: TinyConfig) -> None:
    before = compiled(config, FUSED)
    result = run_pipeline(before, parse_pipeline("logits-for"))
    assert result.history[0].changed is True and result.history[0].stats == {"narrowed": 1}
    program = result.program
    counts, counts_before = program.op_counts(), before.op_counts()
    assert counts["aten.select.int"] == counts_before["aten.select.int"] + 1
    assert counts["aten.unsqueeze"] == counts_before["aten.unsqueeze"] + 1
    assert sum(counts.values()) == sum(counts_before.values()) + 2
    (output,) = [n for n in program.graph.nodes if n.op == "output"]
    lm_head = output.args[0][0]
    assert lm_head.target == ops.linear
    unsqueeze = lm_head.args[0]
    select = unsqueeze.args[0]
    assert (select.target, select.args[1:]) == (torch.ops.aten.select.int, (1, -1))
    assert select.args[0].target == ops.rms_norm and unsqueeze.args[1] == 1
    assert {select.meta["moec_rule"], unsqueeze.meta["moec_rule"]} == {"logits-for"}
    text = program.format(weights=False)
    assert f"= moec.linear(%{unsqueeze.name}, %lm_head_weight)\n" in text
    assert f"  %{lm_head.name}: f32[batch,1,{config.vocab}] = moec.linear(" in text
    assert f"  %{unsqueeze.name}: f32[batch,1,{config.hidden}] = aten.unsqueeze(%{select.name}, 1)\n" in text


@pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
def test_logits_are_the_last_row_with_and_without_kv_cache(config: TinyConfig) -> None:
    reference = TorchExecutable(compiled(config, "canonicalize"))
    ids = input_ids(config, 2, 9)
    expected = reference(ids)
    narrowed = run_pipeline(compiled(config, FUSED), parse_pipeline("fuse-qkv,logits-for")).program
    logits = TorchExecutable(narrowed)(ids)
    assert logits.shape == (2, 1, config.vocab)
    assert max_rel_err(logits[:, 0], expected[:, -1]) <= 1e-5
    cached = run_pipeline(narrowed, parse_pipeline("kv-cache,dce")).program
    session = TorchExecutable(cached).new_session(2)
    prefill = session.step(ids[:, :6], torch.tensor([0, 0]))
    assert prefill.shape == (2, 1, config.vocab)
    assert max_rel_err(prefill[:, 0], expected[:, 5]) <= 1e-5
    for position in range(6, 9):
        step = session.step(ids[:, position : position + 1], torch.tensor([position, position]))
        assert max_rel_err(step[:, 0], expected[:, position]) <= 1e-5


def test_all_is_the_identity_and_a_second_run_changes_nothing() -> None:
    before = compiled(TINY_CONFIGS[0], FUSED)
    text = before.format()
    identity = run_pipeline(before, parse_pipeline("logits-for{positions=all}"))
    assert identity.history[0].changed is False and identity.program.format() == text
    once = run_pipeline(before, parse_pipeline("logits-for"))
    assert before.format() == text  # functional: the input program is untouched
    twice = run_pipeline(once.program, parse_pipeline("logits-for"))
    assert twice.history[0].changed is False
    assert twice.history[0].stats == {"narrowed": 0, "skipped": "the lm_head already reads only the last position"}
    assert twice.program.format() == once.program.format()
    assert LogitsFor().explain(before) == [f"logits-for: %{before.graph.output_node().args[0][0].name} computes "
                                           "the logits of the last position only"]
    assert LogitsFor().explain(once.program) == ["logits-for: the lm_head already reads only the last position"]
    assert LogitsFor(positions="all").explain(before) == [
        "logits-for: positions=all: logits for every position (unchanged)"
    ]


def test_only_the_ranks_that_return_logits_are_narrowed() -> None:
    sharded = run_pipeline(compiled(TINY_CONFIGS[0], FUSED), parse_pipeline("shard{tp=2,pp=2},logits-for"))
    assert sharded.history[1].changed is True
    ranks = sharded.program.ranks
    narrowed = [any(n.meta.get("moec_rule") == "logits-for" for n in rank.graph.nodes) for rank in ranks]
    assert narrowed == [False, False, True, True]  # stage 0 sends hidden states; stage 1 computes the logits
    assert LogitsFor().explain(ranks[0]) == [
        "logits-for: not applied: the program's output is not computed by an lm_head moec.linear"
    ]
    for rank in ranks[2:]:
        lm_head = next(n for n in rank.graph.nodes if n.target == ops.linear and n.args[1].name == "lm_head_weight")
        assert tuple(lm_head.meta["val"].shape[1:]) == (1, TINY_CONFIGS[0].vocab // 2)  # this rank's vocab half


def test_options() -> None:
    assert parse_pass("logits-for") == LogitsFor(positions="last")
    assert parse_pass("logits-for{positions=all}") == LogitsFor(positions="all")
    with pytest.raises(PassOptionError, match=r"^option positions='first' of pass 'logits-for' must be one of last, all$"):
        parse_pass("logits-for{positions=first}")


def test_generation_on_a_narrowed_program() -> None:
    """Equal-length prompts generate exactly as with every position; different lengths are one clear error."""
    from compiler.api import CompiledModel
    from compiler.generation import GenerationError
    from tests.models import traced

    config = TINY_CONFIGS[0]
    program = traced(config)
    outputs = {}
    for positions in ("all", "last"):
        pipeline = parse_pipeline(f"canonicalize,fuse-moe,logits-for{{positions={positions}}},kv-cache,dce")
        result = run_pipeline(program, pipeline)
        outputs[positions] = CompiledModel(result.program, program, result.history)
    prompts = input_ids(config, 2, 5).tolist()
    assert outputs["last"].generate(prompts, 6) == outputs["all"].generate(prompts, 6)
    with pytest.raises(GenerationError) as error:
        outputs["last"].generate([prompts[0], prompts[1][:3]], 6)
    assert str(error.value) == (
        "this program returns logits for the last position only (logits-for{positions=last}); prompts of different "
        "lengths need every position: compile with logits-for{positions=all}"
    )


def test_check_numerics_compares_the_positions_a_narrowed_program_computes() -> None:
    from compiler.api import compile

    compiled = compile("tiny", passes="canonicalize,fuse-moe,logits-for,kv-cache,dce")
    report = compiled.check_numerics()
    row = next(r for r in report.rows if r.spec == "logits-for")
    assert row.step.max_rel_err <= 1e-5 and row.step.top1 == 1.0
    assert row.perplexity is None  # no per-token likelihoods left to score
