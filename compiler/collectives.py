"""Canonical collective ops of sharded programs, in the `moec` torch.library namespace.

Schemas and fake kernels live here (so sharded graphs verify and print like any other); the real kernels call
`torch.distributed` and live in the runtime (`backends/torch/distributed.py`). Ranks are global ranks
(`rank = pp_rank * tp + tp_rank`); a group is the sorted list of global ranks taking part.

- `all_reduce(x, group) -> x'`: elementwise sum over `group` (functional: returns a new tensor).
- `all_gather(x, dim, group) -> y`: the group's tensors concatenated on `dim`, in group order.
- `send(x, dst) -> token`: sends `x` to rank `dst`; returns an empty token so the send has a user and an order.
- `recv(device_like, shape, dtype, src) -> y`: receives a `shape`/`dtype` tensor from rank `src`, on the device of
  `device_like` (a runtime input; it also orders the receive after the program's inputs).

All four are side-effecting for torch.fx (`has_side_effect`), so `dce` and `cse` never drop or merge them.
"""

from __future__ import annotations

import torch
import torch.fx

import compiler.ops  # noqa: F401 - defines the `moec` namespace this fragment extends

_library = torch.library.Library("moec", "FRAGMENT")
_library.define("all_reduce(Tensor x, int[] group) -> Tensor")
_library.define("all_gather(Tensor x, int dim, int[] group) -> Tensor")
_library.define("send(Tensor x, int dst) -> Tensor")
_library.define("recv(Tensor device_like, SymInt[] shape, ScalarType dtype, int src) -> Tensor")


@torch.library.register_fake("moec::all_reduce")
def _all_reduce_fake(x: torch.Tensor, group: list[int]) -> torch.Tensor:
    torch._check(len(group) >= 1, lambda: "all_reduce: empty group")
    return x.new_empty(x.shape)


@torch.library.register_fake("moec::all_gather")
def _all_gather_fake(x: torch.Tensor, dim: int, group: list[int]) -> torch.Tensor:
    torch._check(-x.dim() <= dim < x.dim(), lambda: f"all_gather: dim {dim} out of range for a {x.dim()}-d tensor")
    shape = list(x.shape)
    shape[dim] = shape[dim] * len(group)
    return x.new_empty(shape)


@torch.library.register_fake("moec::send")
def _send_fake(x: torch.Tensor, dst: int) -> torch.Tensor:
    return x.new_empty((0,))


@torch.library.register_fake("moec::recv")
def _recv_fake(device_like: torch.Tensor, shape: list[int], dtype: torch.dtype, src: int) -> torch.Tensor:
    return device_like.new_empty(shape, dtype=dtype)


all_reduce = torch.ops.moec.all_reduce.default
all_gather = torch.ops.moec.all_gather.default
send = torch.ops.moec.send.default
recv = torch.ops.moec.recv.default

COLLECTIVE_OPS = (all_reduce, all_gather, send, recv)
GROUP_COLLECTIVES = (all_reduce, all_gather)

for _op in COLLECTIVE_OPS:
    torch.fx.node.has_side_effect(_op)
