"""Generation over a sharded program with KV caches (`shard{...},kv-cache,dce`), one forked process per rank on
gloo: every rank returns the tokens one process generates, greedy over prompts of different lengths and sampled
with a seed (the logits rank's choice is broadcast, so ranks agree whatever they would have drawn)."""

from __future__ import annotations

import multiprocessing
import os
import traceback
from functools import lru_cache
from typing import Any

import pytest
import torch

from backends.torch.runtime import TorchExecutable
from compiler.generation import generate
from compiler.ir import Program
from compiler.pass_manager import parse_pipeline, run_pipeline
from tests.backends.test_distributed import _free_port
from tests.passes.test_shard import SHARD_CONFIG, fused_program

PROMPTS = [[3, 1, 4, 1, 5, 9], [2, 7], [1, 8, 2, 8]]
SAMPLED_IDS = torch.tensor([[5, 6, 7], [9, 8, 7]])
SAMPLING = dict(do_sample=True, temperature=1.2, top_k=20, top_p=0.9, seed=11)


def _generations(decoder: Any) -> tuple[list[list[int]], list[list[int]]]:
    greedy = generate(decoder, PROMPTS, 8, share_tokens=getattr(decoder, "share_tokens", None))
    sampled = generate(decoder, SAMPLED_IDS, 6, share_tokens=getattr(decoder, "share_tokens", None), **SAMPLING)
    return greedy, sampled.tolist()


@lru_cache(maxsize=None)
def single_rank() -> tuple[list[list[int]], list[list[int]]]:
    program = run_pipeline(fused_program(), parse_pipeline("kv-cache,dce")).program
    return _generations(TorchExecutable(program))


def _rank_main(program: Program, rank: int, world: int, port: int, queue: Any) -> None:
    try:
        torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork; 2 cores are shared anyway
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
        )
        from backends.torch.distributed import DistributedExecutable, init_distributed

        init_distributed("cpu")
        executable = DistributedExecutable(program, "cpu")
        greedy = executable.generate(PROMPTS, 8)
        sampled = executable.generate(SAMPLED_IDS, 6, **SAMPLING)
        queue.put((rank, (greedy, sampled.tolist()), None))
        torch.distributed.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report any failure to the parent instead of hanging it
        queue.put((rank, None, traceback.format_exc()))


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["shard{tp=2}", "shard{tp=2,moe_ep=2}", "shard{pp=2}", "shard{tp=2,pp=2}"])
def test_every_rank_generates_the_single_rank_tokens(spec: str) -> None:
    program = run_pipeline(fused_program(), parse_pipeline(f"{spec},kv-cache,dce")).program
    assert all(rank.cache_nodes() for rank in program.ranks)
    world = len(program.ranks)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_rank_main, args=(program, r, world, port, queue)) for r in range(world)]
    for process in processes:
        process.start()
    results = {}
    try:
        for _ in processes:
            rank, tokens, error = queue.get(timeout=120)
            if error is not None:
                raise AssertionError(f"rank {rank} failed:\n{error}")
            results[rank] = tokens
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    expected = single_rank()
    assert [len(row) for row in expected[0]] == [len(p) + 8 for p in PROMPTS]
    assert results == {rank: expected for rank in range(world)}
