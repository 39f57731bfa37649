"""`kv-cache`: the rewritten graph's exact structure and printed cache, idempotence, clear errors, and numerics of
prefill, chunked prefill and decode steps against the graph before the pass.

Generation on top of it (Hugging Face equality, batching, sampling) is in tests/compiler/test_generation.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from functools import lru_cache
from types import SimpleNamespace

import pytest
import torch

from backends.torch.runtime import TorchExecutable
from compiler import ops
from compiler.api import load
from compiler.cli import main
from compiler.errors import PassOptionError, PreconditionError, VerificationError
from compiler.ir import KVCacheSpec, Program, op_name
from compiler.pass_manager import parse_pass, parse_pipeline, run_pipeline
from compiler.rewrite import create_node
from compiler.verifier import verify_program
from frontends.hf.source import resolve
from passes.kv_cache import MAX_SEQ_CAP, KVCache
from tests.models import TINY_CONFIGS, TinyConfig, hf_model, input_ids, max_rel_err
from tests.passes.test_canonicalize import compiled, traced

FUSED = "canonicalize,fuse-moe,dce"
# GQA without a window, MHA with one layer and top-1, GQA with a window of 3 over 3 layers.
CONFIGS = [TINY_CONFIGS[0], TINY_CONFIGS[1], TINY_CONFIGS[2]]


@lru_cache(maxsize=None)
def cached(config: TinyConfig) -> Program:
    """The default pipeline's program (canonicalize,fuse-moe,kv-cache,dce), reusing the fused one."""
    return run_pipeline(compiled(config, FUSED), parse_pipeline("kv-cache,dce")).program


def _cache_bytes(config: TinyConfig, max_seq: int, itemsize: int = 4) -> int:
    return config.layers * 2 * config.kv_heads * max_seq * (config.hidden // config.heads) * itemsize


@pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
def test_every_attention_becomes_cached_with_its_layer_caches(config: TinyConfig) -> None:
    before = compiled(config, FUSED)
    program = cached(config)
    counts, counts_before = program.op_counts(), before.op_counts()
    assert counts["moec.cached_attention"] == config.layers and counts["moec.attention"] == 0
    # The positions gain `cache_position[:, None] +`: one unsqueeze and one add more, nothing else changes.
    assert counts["aten.add.Tensor"] == counts_before["aten.add.Tensor"] + 1
    assert counts["aten.unsqueeze"] == counts_before["aten.unsqueeze"]  # [None] of arange replaced by [:, None]
    assert sum(counts.values()) == sum(counts_before.values()) + 1
    assert [n.name for n in program.input_nodes()] == ["input_ids", "cache_position"]
    head_dim = config.hidden // config.heads
    expected_specs = {
        f"kv_cache_{layer}_{kind}": KVCacheSpec(layer, kind, config.kv_heads, 128, head_dim, torch.float32)
        for layer in range(config.layers)
        for kind in ("key", "value")
    }
    assert program.cache_specs() == expected_specs  # graph order: layer by layer, key before value
    assert program.cache_bytes_per_sequence() == _cache_bytes(config, 128)
    window = config.sliding_window or 0
    for layer, node in enumerate(n for n in program.graph.nodes if n.target == ops.cached_attention):
        q, k, v, key_cache, value_cache, position, scale, sliding_window = node.args
        assert (key_cache.name, value_cache.name, position.name) == (
            f"kv_cache_{layer}_key", f"kv_cache_{layer}_value", "cache_position"
        )
        assert op_name(q) == op_name(k) == "moec.rope" and sliding_window == window
        assert scale == pytest.approx(head_dim**-0.5)
        assert node.meta["moec_rule"] == "kv-cache"
    text = program.format(weights=False)
    assert f"  %cache_position: i64[batch] = input\n" in text
    assert (
        f"  %kv_cache_0_key: f32[batch,{config.kv_heads},128,{head_dim}] = kv cache (layer 0 key, max_seq 128)\n"
        in text
    )
    header = f"# kv cache: {2 * config.layers} tensors, {_cache_bytes(config, 128):,} bytes per sequence"
    assert f"{header} (max_seq 128, f32)\n" in text
    # cos/sin are per sequence now: [batch, seq, head_dim].
    assert f"%cos: f32[batch,seq,{head_dim}] = aten.cos(" in text


@pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
def test_prefill_decode_and_chunks_match_the_graph_before_the_pass(config: TinyConfig) -> None:
    reference = TorchExecutable(compiled(config, "canonicalize"))  # unfused, uncached
    executable = TorchExecutable(cached(config))
    ids = input_ids(config, 2, 12)
    expected = reference(ids)
    assert max_rel_err(executable(ids), expected) <= 1e-5  # the stateless call: fresh caches from position 0
    session = executable.new_session(2)
    # A prefill of 5, a chunk of 4 continuing it, then three single-token decode steps.
    logits = [session.step(ids[:, :5], torch.tensor([0, 0]))]
    logits.append(session.step(ids[:, 5:9], torch.tensor([5, 5])))
    for position in range(9, 12):
        logits.append(session.step(ids[:, position : position + 1], torch.tensor([position, position])))
    assert max_rel_err(torch.cat(logits, dim=1), expected) <= 1e-5


def test_sequences_of_a_batch_sit_at_their_own_positions() -> None:
    config = TINY_CONFIGS[2]
    reference = TorchExecutable(compiled(config, FUSED))
    session = TorchExecutable(cached(config)).new_session(2)
    ids = input_ids(config, 2, 8)
    # Sequence 0 prefills 6 tokens, sequence 1 only 3 (its slots 3..5 hold padding that decode overwrites).
    session.step(ids[:, :6], torch.tensor([0, 0]))
    step = torch.stack([ids[0, 6], ids[1, 3]])[:, None]
    logits = session.step(step, torch.tensor([6, 3]))
    assert max_rel_err(logits[0, 0], reference(ids[:1, :7])[0, -1]) <= 1e-5
    assert max_rel_err(logits[1, 0], reference(ids[1:, :4])[0, -1]) <= 1e-5


def test_cache_options_and_their_defaults() -> None:
    config = TINY_CONFIGS[0]
    program = run_pipeline(compiled(config, FUSED), parse_pipeline("kv-cache{max_seq=16,dtype=bfloat16}")).program
    specs = list(program.cache_specs().values())
    assert {(spec.max_seq, spec.dtype) for spec in specs} == {(16, torch.bfloat16)}
    assert program.cache_bytes_per_sequence() == _cache_bytes(config, 16, itemsize=2)
    ids = input_ids(config, 2, 6)
    expected = TorchExecutable(compiled(config, FUSED))(ids)
    assert max_rel_err(TorchExecutable(program)(ids), expected) <= 2e-2  # keys and values rounded to bf16
    long_context = dataclasses.replace(compiled(config, FUSED), config=SimpleNamespace(max_position_embeddings=32768))
    assert KVCache().cache_length(long_context) == MAX_SEQ_CAP
    assert KVCache().cache_length(compiled(config, FUSED)) == 128
    assert parse_pass("kv-cache{max_seq=64}") == KVCache(max_seq=64)
    with pytest.raises(PassOptionError, match=r"^kv-cache: max_seq=-1 must be a positive integer \(0 = the default\)$"):
        parse_pass("kv-cache{max_seq=-1}")
    with pytest.raises(PassOptionError, match=r"^option dtype='int8' of pass 'kv-cache' must be one of auto, float32"):
        parse_pass("kv-cache{dtype=int8}")


def test_running_twice_changes_nothing_and_leaves_the_input_alone() -> None:
    fused = compiled(TINY_CONFIGS[0], FUSED)
    text = fused.format()
    once = run_pipeline(fused, parse_pipeline("kv-cache"))
    assert fused.format() == text  # functional: the input program is untouched
    assert once.history[0].changed is True
    assert once.history[0].stats == {
        "cached_layers": 2, "cache_bytes_per_sequence": _cache_bytes(TINY_CONFIGS[0], 128), "max_seq": "128",
        "dtype": "float32",
    }
    twice = run_pipeline(once.program, parse_pipeline("kv-cache"))
    assert twice.history[0].changed is False
    assert twice.program.format() == once.program.format()


def test_before_canonicalize_is_a_precondition_error() -> None:
    with pytest.raises(PreconditionError) as error:
        run_pipeline(traced(TINY_CONFIGS[0], torch.float32), parse_pipeline("kv-cache"))
    assert str(error.value) == (
        "pass 'kv-cache' cannot run (it ran first): needs canonicalize first: the queries and keys of attention "
        "%attention (layers.0) are not moec.rope outputs"
    )


def _without_attention(program: Program) -> Program:
    """`program` with every attention replaced by its queries (same shape): a graph with nothing to cache."""
    result = program.clone()
    for node in [n for n in result.graph.nodes if n.target == ops.attention]:
        with result.graph.inserting_before(node):
            replacement = create_node(result.graph, torch.ops.aten.transpose.int, (node.args[0], 1, 2), None, "test")
        replacement.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(replacement)
        result.graph.erase_node(node)
    result.graph.eliminate_dead_code()
    result.graph_module.recompile()
    return result


def test_a_graph_without_attention_is_left_unchanged() -> None:
    program = _without_attention(compiled(TINY_CONFIGS[0], FUSED))
    result = run_pipeline(program, parse_pipeline("kv-cache"))
    assert result.history[0].changed is False
    assert result.history[0].stats == {"cached_layers": 0, "skipped": "no attention"}
    assert result.program.cache_nodes() == [] and result.program.format() == program.format()
    assert KVCache().explain(program) == ["kv-cache: no moec.attention to cache"]


def test_explain_names_each_layer() -> None:
    config = TINY_CONFIGS[2]
    assert KVCache(max_seq=32).explain(compiled(config, FUSED)) == [
        f"layers.{layer}: cached (2 kv heads x 8, max_seq 32, sliding window 3)" for layer in range(3)
    ]
    assert KVCache().explain(cached(config)) == ["kv-cache: the program already attends over KV caches"]


def test_each_rank_caches_its_own_kv_heads_and_layers() -> None:
    config = TINY_CONFIGS[2]  # 2 kv heads, 3 layers
    sharded = run_pipeline(compiled(config, FUSED), parse_pipeline("shard{tp=2,pp=2},kv-cache,dce")).program
    layers_per_rank = [sorted({spec.layer for spec in rank.cache_specs().values()}) for rank in sharded.ranks]
    assert layers_per_rank == [[0, 1], [0, 1], [2], [2]]  # stage 0 takes the extra layer
    assert {spec.kv_heads for rank in sharded.ranks for spec in rank.cache_specs().values()} == {1}
    assert sharded.cache_nodes() == []  # the logical graph stays the unsharded, stateless one


def test_cli_prints_the_caches_after_the_pass() -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["compile", "tiny", "--no-weights", "--print-after", "kv-cache"])
    assert status == 0, err.getvalue()
    text = out.getvalue()
    config = resolve("tiny").config  # reads config.json only
    kv_heads, layers = config.num_key_value_heads, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    max_seq = min(config.max_position_embeddings, MAX_SEQ_CAP)
    per_sequence = layers * 2 * kv_heads * max_seq * head_dim * 4
    assert text.startswith("== after kv-cache (")
    assert f"# kv cache: {2 * layers} tensors, {per_sequence:,} bytes per sequence (max_seq {max_seq}, f32)\n" in text
    assert (
        f"  %kv_cache_1_value: f32[batch,{kv_heads},{max_seq},{head_dim}] = "
        f"kv cache (layer 1 value, max_seq {max_seq})\n" in text
    )
    assert "\n 3. kv-cache " in text and "\n 6. dce " in text  # the default pipeline runs it after fuse-moe


def test_the_verifier_checks_how_caches_are_wired() -> None:
    program = cached(TINY_CONFIGS[0]).clone()
    attention = next(n for n in program.graph.nodes if n.target == ops.cached_attention)
    key, value = attention.args[3], attention.args[4]
    attention.args = (*attention.args[:3], value, key, *attention.args[5:])  # key and value caches swapped
    with pytest.raises(VerificationError) as error:
        verify_program(program, after="test")
    assert str(error.value) == (
        "verification failed after pass 'test' (the first pass): node %kv_cache_0_key (kv_cache_0_key): a key cache "
        "must be the key cache operand of exactly one cached_attention"
    )


def test_an_eager_attention_trace_is_cached_once_canonical() -> None:
    config = TINY_CONFIGS[2]
    eager = load(hf_model(config), attention="eager")
    with pytest.raises(PreconditionError, match="needs canonicalize first: attention is still Hugging Face's eager"):
        run_pipeline(eager, parse_pipeline("kv-cache"))
    program = run_pipeline(eager, parse_pipeline("canonicalize,fuse-moe,kv-cache,dce")).program
    assert program.op_counts()["moec.cached_attention"] == config.layers
    ids = input_ids(config, 2, 6)
    reference = TorchExecutable(compiled(config, FUSED))
    session = TorchExecutable(program).new_session(2)
    logits = [session.step(ids[:, :4], torch.tensor([0, 0]))]
    logits += [session.step(ids[:, i : i + 1], torch.tensor([i, i])) for i in (4, 5)]
    assert max_rel_err(torch.cat(logits, dim=1), reference(ids)) <= 1e-5
