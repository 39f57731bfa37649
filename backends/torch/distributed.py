"""Run a sharded program (one graph per rank, from the `shard` pass) with torch.distributed: one process per rank.

Launch with torchrun (RANK / WORLD_SIZE / LOCAL_RANK) or mpirun (OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK;
MASTER_ADDR and MASTER_PORT default to 127.0.0.1:29500 there). The backend is NCCL on CUDA devices, gloo on CPU.

    torchrun --nproc-per-node 2 -m compiler.cli run tiny --passes canonicalize,fuse-moe,shard{tp=2},dce \\
        --input-ids "1 2 3"

Each process binds its own rank's program with `TorchExecutable`, so it materializes only that rank's weight
slices; after `kv-cache` (run after `shard`) it also holds only its own kv heads' and layers' caches. `generate`
runs `compiler.generation` on every rank with the same arguments: every rank steps (the steps hold the collectives),
the logits rank chooses each token and broadcasts it, so all ranks return the same tokens. The collective ops' real kernels (registered here) call torch.distributed: `all_reduce` / `all_gather`
on the process group of their `group` ranks (created once, in the same order on every process), `send` / `recv`
point to point on the world group.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

import compiler.collectives as collectives
from backends.torch.runtime import ProgressCallback, TorchExecutable
from compiler.errors import MoecError
from compiler.generation import DecodeSession, RecomputeSession, generate
from compiler.ir import Program

# Process groups by their sorted global ranks; filled by `DistributedExecutable` before anything runs.
_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


@dataclass(frozen=True)
class LaunchEnvironment:
    rank: int
    world_size: int
    local_rank: int
    launcher: str


_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
)


def launch_environment() -> LaunchEnvironment | None:
    """The rank, world size and local rank a torchrun or mpirun launch set, or None outside such a launch."""
    for launcher, rank_key, size_key, local_key in _LAUNCHERS:
        rank, size = os.environ.get(rank_key), os.environ.get(size_key)
        if rank is None or size is None:
            continue
        try:
            return LaunchEnvironment(int(rank), int(size), int(os.environ.get(local_key, "0")), launcher)
        except ValueError:
            raise MoecError(f"{launcher} set a non-integer {rank_key}={rank!r} or {size_key}={size!r}") from None
    return None


def init_distributed(device: torch.device | str = "cpu") -> LaunchEnvironment:
    """Initializes the default process group from the launch environment (idempotent)."""
    env = launch_environment()
    if env is None:
        raise MoecError("not launched by torchrun or mpirun: RANK/WORLD_SIZE (or OMPI_COMM_WORLD_*) are not set")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
    return env


def rank_device(device: str, local_rank: int) -> torch.device:
    """`cuda` means this process's GPU (`cuda:LOCAL_RANK`); other devices are taken as given."""
    if device == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(device)


def _groups_of(program: Program) -> list[tuple[int, ...]]:
    groups = set()
    for rank in program.ranks:
        for node in rank.graph.nodes:
            if node.op == "call_function" and node.target in collectives.GROUP_COLLECTIVES:
                groups.add(tuple(node.args[-1]))
    return sorted(groups)


class DistributedExecutable:
    """This process's rank of a sharded program, bound to its own weight slices; call it on every rank."""

    def __init__(
        self,
        program: Program,
        device: torch.device | str = "cpu",
        progress: ProgressCallback | None = None,
    ) -> None:
        if not program.ranks:
            raise MoecError("program is not sharded; run it with TorchExecutable (or add a shard pass)")
        if not dist.is_initialized():
            raise MoecError("torch.distributed is not initialized; call init_distributed() first")
        world = dist.get_world_size()
        if world != len(program.ranks):
            raise MoecError(f"program is sharded over {len(program.ranks)} ranks but {world} processes were launched")
        self.rank = dist.get_rank()
        self.program = program.ranks[self.rank]
        # Every process creates every group, in the same order (new_group is collective over the world).
        for group in _groups_of(program):
            created = dist.new_group(list(group))
            if self.rank in group:
                _GROUPS[group] = created
        self.returns_logits = bool(self.program.attributes.get("returns_logits", True))
        # The first rank of the last stage answers for the whole program (e.g. broadcast of generated tokens).
        self.logits_rank = next(i for i, r in enumerate(program.ranks) if r.attributes.get("returns_logits", True))
        self._executable = TorchExecutable(self.program, device, progress=progress)
        self.device = self._executable.device
        self.materialized_bytes = self._executable.materialized_bytes
        logits_output = next(n for n in reversed(program.ranks[self.logits_rank].graph.nodes) if n.op == "output")
        self._logits_dtype = logits_output.args[0][0].meta["val"].dtype
        self._vocab = program.config.vocab_size
        self.vocab_size = int(self._vocab)

    def __call__(self, input_ids: torch.Tensor, broadcast: bool = False) -> torch.Tensor | None:
        """Logits on ranks of the last stage (None elsewhere); with `broadcast`, every rank gets them."""
        outputs = self._executable(input_ids)
        logits = outputs if self.returns_logits else None
        if not broadcast:
            return logits
        if logits is None:
            logits = torch.empty((*input_ids.shape, self._vocab), dtype=self._logits_dtype, device=self.device)
        dist.broadcast(logits, src=self.logits_rank)
        return logits

    @property
    def max_seq(self) -> int | None:
        """This rank's cache length (the same on every rank: one kv-cache pass ran on all); None without caches."""
        return self._executable.max_seq

    def new_session(self, batch: int) -> DecodeSession:
        """This rank's session: its own caches (its kv heads and layers); steps return logits on the last stage's
        ranks and None elsewhere. Every rank must step its session in the same order (the steps hold collectives)."""
        if not self._executable.is_cached:
            return RecomputeSession(self, batch, self.device)
        return _RankSession(self._executable.new_session(batch), self.returns_logits)

    def share_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokens the logits rank chose, on every rank (whatever the others sampled, or did not)."""
        shared = tokens.contiguous()
        dist.broadcast(shared, src=self.logits_rank)
        return shared

    def generate(
        self, input_ids: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int = 20, **options: Any
    ) -> torch.Tensor | list[list[int]]:
        """`compiler.generation.generate` over this rank (same arguments); call it on every rank with the same
        arguments: every rank runs every step, and the logits rank's tokens are broadcast, so all return the same."""
        return generate(self, input_ids, max_new_tokens, share_tokens=self.share_tokens, **options)


class _RankSession:
    """A rank's KV-cache session; the logits of a rank that does not produce them (an earlier stage) are None."""

    def __init__(self, session: DecodeSession, returns_logits: bool) -> None:
        self._session = session
        self._returns_logits = returns_logits

    def step(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor | None:
        outputs = self._session.step(input_ids, cache_position)
        return outputs if self._returns_logits else None


def _group(ranks: list[int]) -> dist.ProcessGroup:
    key = tuple(ranks)
    if key not in _GROUPS:
        raise MoecError(f"no process group for ranks {list(key)} on this rank; bind the program with DistributedExecutable")
    return _GROUPS[key]


@torch.library.impl("moec::all_reduce", "CompositeExplicitAutograd")
def all_reduce(x: torch.Tensor, group: list[int]) -> torch.Tensor:
    result = x.contiguous().clone()
    dist.all_reduce(result, op=dist.ReduceOp.SUM, group=_group(group))
    return result


@torch.library.impl("moec::all_gather", "CompositeExplicitAutograd")
def all_gather(x: torch.Tensor, dim: int, group: list[int]) -> torch.Tensor:
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in group]
    dist.all_gather(parts, x.contiguous(), group=_group(group))
    return torch.cat(parts, dim=dim)


@torch.library.impl("moec::send", "CompositeExplicitAutograd")
def send(x: torch.Tensor, dst: int) -> torch.Tensor:
    dist.send(x.contiguous(), dst)
    return x.new_empty((0,))


@torch.library.impl("moec::recv", "CompositeExplicitAutograd")
def recv(device_like: torch.Tensor, shape: list[int], dtype: torch.dtype, src: int) -> torch.Tensor:
    result = torch.empty(shape, dtype=dtype, device=device_like.device)
    dist.recv(result, src)
    return result
