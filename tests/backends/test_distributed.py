"""The distributed runtime: every layout of `shard` run as real processes (gloo on CPU, NCCL on 2 GPUs) must give
the single-rank logits, and each rank must materialize exactly its share of the weights.

The model is traced once in the test process; rank processes are forked from it (so they inherit the traced
program instead of re-tracing for ~20 s each) and talk over gloo on a free 127.0.0.1 port.
"""

from __future__ import annotations

import multiprocessing
import shutil
import subprocess
import sys
import os
import socket
import traceback
from functools import lru_cache
from typing import Any

import pytest
import torch

from backends.torch.runtime import TorchExecutable
from compiler.ir import Program
from compiler.pass_manager import parse_pipeline, run_pipeline
from tests.models import input_ids, max_rel_err
from tests.passes.test_shard import SHARD_CONFIG, fused_program  # one trace of the sharding config per session

CASES = [
    "shard{tp=2}",
    "shard{tp=2,moe_ep=2}",
    "shard{tp=4,moe_tp=2,moe_ep=2}",
    "shard{tp=4,moe_ep=4}",
    "shard{pp=2}",
    "shard{tp=2,pp=2}",
]


@lru_cache(maxsize=None)
def reference_logits() -> torch.Tensor:
    return TorchExecutable(fused_program())(_ids())


def _ids() -> torch.Tensor:
    return input_ids(SHARD_CONFIG, batch=2, seq=7)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(program: Program, ids: torch.Tensor, rank: int, world: int, port: int, queue: Any) -> None:
    """One rank, as torchrun would start it (environment variables), reporting back through `queue`."""
    try:
        torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork; 2 cores are shared anyway
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
        )
        from backends.torch.distributed import DistributedExecutable, init_distributed

        init_distributed("cpu")
        executable = DistributedExecutable(program, "cpu")
        logits = executable(ids)
        queue.put((rank, None if logits is None else logits.numpy(), executable.materialized_bytes, None))
        torch.distributed.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report any failure to the parent instead of hanging it
        queue.put((rank, None, 0, traceback.format_exc()))


def run_ranks(program: Program, ids: torch.Tensor, timeout: float = 120.0) -> dict[int, tuple[Any, int]]:
    """Forks one process per rank; returns {rank: (logits or None, materialized bytes)}."""
    world = len(program.ranks)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_rank_main, args=(program, ids, r, world, port, queue)) for r in range(world)]
    for process in processes:
        process.start()
    results: dict[int, tuple[Any, int]] = {}
    try:
        for _ in processes:
            rank, logits, nbytes, error = queue.get(timeout=timeout)
            if error is not None:
                raise AssertionError(f"rank {rank} failed:\n{error}")
            results[rank] = (logits, nbytes)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return results


def expected_rank_bytes(unsharded: Program, rank: Program, tp: int) -> int:
    """The bytes of the weights `rank` holds (by name), each taken from the unsharded program: bytes / tp, except
    what every rank holds whole: norms, router, rotary frequencies, and the one kv head per rank when tp exceeds
    the kv heads. Tied weights count once (one expression)."""
    kv_heads, head_dim, hidden = SHARD_CONFIG.kv_heads, SHARD_CONFIG.hidden // SHARD_CONFIG.heads, SHARD_CONFIG.hidden
    held = set(rank.weights())
    total, seen = 0, set()
    for name, expr in unsharded.weights().items():
        if name not in held or id(expr) in seen:
            continue
        seen.add(id(expr))
        if "norm" in name or name.endswith("mlp_gate_weight") or "inv_freq" in name:
            total += expr.nbytes
        elif name.endswith(("k_proj_weight", "v_proj_weight")) and tp > kv_heads:
            total += head_dim * hidden * expr.dtype.itemsize
        else:
            assert expr.nbytes % tp == 0
            total += expr.nbytes // tp
    return total


@pytest.mark.slow
@pytest.mark.parametrize("spec", CASES)
def test_ranks_match_single_rank_logits(spec: str) -> None:
    program = run_pipeline(fused_program(), parse_pipeline(f"{spec},dce")).program
    expected = reference_logits()
    results = run_ranks(program, _ids())
    tp, pp = program.attributes["tp"], program.attributes["pp"]
    returning = sorted(rank for rank, (logits, _) in results.items() if logits is not None)
    assert returning == list(range((pp - 1) * tp, pp * tp))  # every rank of the last stage, no other
    for rank in returning:
        assert max_rel_err(torch.from_numpy(results[rank][0]), expected) <= 1e-5, f"rank {rank}"
    for rank, (_, nbytes) in results.items():
        assert nbytes == expected_rank_bytes(fused_program(), program.ranks[rank], tp), f"rank {rank}"
    if pp == 1:
        assert set(program.ranks[0].weights()) == set(fused_program().weights())
    else:  # stages hold disjoint layers; only the rotary frequencies and the tied embedding/lm_head are shared
        stage_weights = [set(program.ranks[stage * tp].weights()) for stage in range(pp)]
        assert set.union(*stage_weights) == set(fused_program().weights())
        assert set.intersection(*stage_weights) == {"rotary_emb_inv_freq", "lm_head_weight"}


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_count() < 2, reason="needs 2 CUDA GPUs")
def test_nccl_two_gpus_match_single_gpu() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "bench.shard_gpu", "--cases", "shard{tp=2}", "shard{tp=2,moe_ep=2}", "--dtypes", "float32"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs OpenMPI's mpirun")
def test_mpirun_launch_decodes_like_one_process() -> None:
    """The CLI under mpirun (ranks from OMPI_COMM_WORLD_*) prints the tokens a single process decodes."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    command = [sys.executable, "-m", "compiler.cli", "run", "tiny", "--input-ids", "1 2 3", "--max-new-tokens", "4"]
    single = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=True)
    sharded = subprocess.run(
        ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "2", *command,
         "--passes", "canonicalize,fuse-moe,shard{tp=2},dce"],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    )
    assert "ranks: 2 (mpirun)" in sharded.stdout
    expected = [line for line in single.stdout.splitlines() if line.startswith("output ids:")]
    assert expected and [line for line in sharded.stdout.splitlines() if line.startswith("output ids:")] == expected
