"""Run every rank of sharded programs on this machine: one forked process per rank, over gloo on 127.0.0.1.

before: sharded programs (all of one world size) and input-id batches
after:  per program, per rank, per batch: the rank's outputs as float64 numpy arrays

For checks that compare whole sharded programs in one command (`--check-numerics`), not for serving: `moec run` under
torchrun or mpirun is that. The processes are forked, so they inherit the programs instead of re-tracing; one set of
processes runs every program in turn (each binds its own weight slices with `DistributedExecutable`), and the
caller's copies of the programs decide what each rank returns.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queues
import socket
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from compiler.errors import MoecError
from compiler.ir import Program

RANK_TIMEOUT_S = 300.0
RankOutputs = list[list[list[np.ndarray]]]  # [program][batch][output]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_list(outputs: Any) -> list[torch.Tensor]:
    if outputs is None:  # a rank of an earlier pipeline stage: no logits
        return []
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _rank_main(programs: list[Program], batches: list[torch.Tensor], rank: int, world: int, port: int, queue: Any) -> None:
    """One rank (environment as torchrun sets it) running every program in turn; reports through `queue`."""
    try:
        torch.set_num_threads(1)  # a forked child has no OpenMP pool of its parent's size; the cores are shared
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
        )
        from backends.torch.distributed import DistributedExecutable, init_distributed

        init_distributed("cpu")
        results = []
        for program in programs:
            executable = DistributedExecutable(program, "cpu")
            # float64: numpy has no bfloat16, and every float type fits.
            results.append([[t.double().numpy() for t in _as_list(executable(batch))] for batch in batches])
        queue.put((rank, results, None))
        torch.distributed.destroy_process_group()
    except BaseException:  # noqa: BLE001 - a failing rank must report, not leave its parent waiting
        queue.put((rank, None, traceback.format_exc()))


def run_ranks(programs: Sequence[Program], batches: Sequence[torch.Tensor]) -> dict[int, RankOutputs]:
    """{rank: outputs of each program on each batch}; every program must have the same number of ranks. A rank of
    an earlier pipeline stage returns no output unless its program's attributes say `returns_logits`."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise MoecError("sharded programs are checked in processes of their own; run this in one process, not under "
                        "torchrun or mpirun")
    world = len(programs[0].ranks)
    if any(len(program.ranks) != world for program in programs):
        raise MoecError("run_ranks takes programs sharded over the same number of ranks")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    port = _free_port()
    args = (list(programs), list(batches))
    processes = [context.Process(target=_rank_main, args=(*args, r, world, port, queue)) for r in range(world)]
    for process in processes:
        process.start()
    by_rank: dict[int, RankOutputs] = {}
    try:
        for _ in processes:
            try:
                rank, results, error = queue.get(timeout=RANK_TIMEOUT_S)
            except queues.Empty:
                raise MoecError(f"a rank process gave no result within {RANK_TIMEOUT_S:.0f}s") from None
            if error is not None:
                raise MoecError(f"rank {rank} failed:\n{error}")
            by_rank[rank] = results
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return by_rank
