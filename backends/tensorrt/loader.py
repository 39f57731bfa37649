"""Load a `moec build` output directory and run its engines.

    from backends.tensorrt.loader import load_engines
    model = load_engines("out/mixtral-trt")        # checks config.json, the TensorRT and the GPU first
    logits = model(input_ids)                       # torch int64 [batch, seq] → logits [batch, seq, vocab]

Before deserializing anything, `load_engines` checks that this machine can run the engines: a CUDA GPU visible to
torch, the same TensorRT flavour (`tensorrt` / `tensorrt_rtx`) and version that built them, and, for
TensorRT-RTX engines, that the GPU's compute capability is one the engines were built for (and one TensorRT-RTX
supports at all: not Hopper SM90). Where any of these fails it raises `EngineRunError` saying which, and stops.
Engines built with `--moe-plugin enable` need the Python `MoE` plugin registered; the loader does it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.tensorrt.build import CONFIG_FORMAT, CONFIG_NAME
from backends.tensorrt.runtime import EngineRunError, TensorRTUnavailableError, dtype_name, eval_dim, import_tensorrt
from compiler.errors import MoecError


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise MoecError(f"{directory} is not a moec TensorRT build: {CONFIG_NAME} is missing") from None
    except json.JSONDecodeError as error:
        raise MoecError(f"{path} is not valid JSON: {error}") from None
    if config.get("format") != CONFIG_FORMAT:
        raise MoecError(f"{path} has format {config.get('format')!r}; this moec reads {CONFIG_FORMAT!r}")
    return config


def check_can_run(config: dict[str, Any]) -> tuple[Any, Any]:
    """(the TensorRT module, the torch CUDA device) to run `config`'s engines with; EngineRunError where none."""
    built = config["tensorrt"]
    what = f"engines built by {built['flavour']} {built['version']}"
    try:
        trt = import_tensorrt()
    except TensorRTUnavailableError as error:
        raise EngineRunError(f"cannot run {what}: {error}") from None
    if trt.__name__ != built["flavour"] or trt.__version__ != built["version"]:
        raise EngineRunError(
            f"cannot run {what} with {trt.__name__} {trt.__version__}: an engine only deserializes in the TensorRT "
            "flavour and version that built it; rebuild with `moec build`"
        )
    import torch

    if not torch.cuda.is_available():
        raise EngineRunError(f"cannot run {what}: no CUDA GPU is visible here (torch.cuda.is_available() is False)")
    device = torch.device("cuda", torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability(device)
    gpu = f"sm{major}{minor}"
    name = torch.cuda.get_device_name(device)
    if built["flavour"] == "tensorrt_rtx":
        supported = {member.lower() for member in trt.ComputeCapability.__members__ if member.startswith("SM")}
        if gpu not in supported:
            raise EngineRunError(
                f"cannot run {what} on this {name} ({gpu}): TensorRT-RTX {trt.__version__} supports only "
                f"{', '.join(sorted(supported))}"
            )
        if config["targets"] and gpu not in config["targets"]:
            raise EngineRunError(
                f"cannot run {what} on this {name} ({gpu}): they were built for {', '.join(config['targets'])}; "
                f"rebuild with --target {gpu}"
            )
    return trt, device


@dataclass
class _Engine:
    engine: Any
    context: Any
    inputs: list[str]
    outputs: list[str]


class TensorRTExecutable:
    """Runs one rank's engines and the collectives between them (config.json's `steps`);
    `__call__(input_ids) -> logits` like `backends.torch.TorchExecutable` (on a rank that does not return logits,
    its last value, e.g. a send token).

    A sharded build runs one process per rank under torchrun/mpirun (`RANK` picks the rank) with torch.distributed
    initialized (`backends.torch.distributed.init_distributed`); the loader creates the process groups.
    """

    def __init__(self, directory: str | os.PathLike[str], rank: int | None = None) -> None:
        self.directory = Path(directory)
        self.config = read_config(self.directory)
        ranks = self.config["ranks"]
        if rank is None:
            rank = int(os.environ.get("RANK", "0"))
        if not 0 <= rank < len(ranks):
            raise MoecError(f"rank {rank} out of range: {self.directory} holds {len(ranks)} rank(s)")
        trt, self.device = check_can_run(self.config)
        self.rank = rank
        self.plan = ranks[rank]
        self._groups = _process_groups(ranks) if len(ranks) > 1 else {}
        if self.config["plugin"]:
            from backends.tensorrt.plugin import register_moe_plugin

            register_moe_plugin()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines: list[_Engine] = []
        for entry in self.plan["engines"]:
            engine = runtime.deserialize_cuda_engine((self.directory / entry["file"]).read_bytes())
            if engine is None:
                raise EngineRunError(f"TensorRT could not deserialize {self.directory / entry['file']}")
            self.engines.append(
                _Engine(
                    engine,
                    engine.create_execution_context(),
                    [item["name"] for item in entry["inputs"]],
                    [item["name"] for item in entry["outputs"]],
                )
            )

    def _run_engine(self, engine: _Engine, feeds: dict[str, Any]) -> Any:
        import torch

        context = engine.context
        for name in engine.inputs:
            tensor = feeds[name].contiguous()
            feeds[name] = tensor
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        (name,) = engine.outputs
        shape = tuple(context.get_tensor_shape(name))
        dtype = getattr(torch, dtype_name(engine.engine.get_tensor_dtype(name)))
        out = torch.empty(shape, dtype=dtype, device=self.device)
        context.set_tensor_address(name, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not context.execute_async_v3(stream.cuda_stream):
            raise EngineRunError("TensorRT execution failed (see the TensorRT log above)")
        return out

    def __call__(self, input_ids: Any) -> Any:
        import torch
        import torch.distributed as dist

        if self.config.get("kv_cache"):
            raise EngineRunError(
                f"{self.directory} holds decoder engines (past/present KV cache inputs, two profiles): this loader "
                "runs stateless engines only; their ONNX (--keep-onnx) runs in onnxruntime through "
                "backends.onnx.decoder"
            )
        ids = input_ids.to(self.device, torch.int64).contiguous()
        batch, seq = ids.shape
        values: dict[str, Any] = {"input_ids": ids}
        for step in self.plan["steps"]:
            if "engine" in step:
                feeds = {name: values[name] for name in step["inputs"]}
                values[step["output"]] = self._run_engine(self.engines[step["engine"]], feeds)
                continue
            kind = step["collective"]
            if kind == "all_reduce":
                result = values[step["input"]].clone()
                dist.all_reduce(result, group=self._groups[tuple(step["group"])])
            elif kind == "all_gather":
                part = values[step["input"]].contiguous()
                parts = [torch.empty_like(part) for _ in step["group"]]
                dist.all_gather(parts, part, group=self._groups[tuple(step["group"])])
                result = torch.cat(parts, dim=step["dim"])
            elif kind == "send":
                dist.send(values[step["input"]].contiguous(), step["dst"])
                result = ids.new_empty((0,))
            else:
                shape = [eval_dim(d, batch, seq) for d in step["shape"]]
                result = torch.empty(shape, dtype=getattr(torch, step["dtype"]), device=self.device)
                dist.recv(result, step["src"])
            values[step["output"]] = result
        torch.cuda.current_stream(self.device).synchronize()
        return values[self.plan["output"]]


def _process_groups(ranks: list[dict[str, Any]]) -> dict[tuple[int, ...], Any]:
    """Every group any rank uses, created in the same order on every process (new_group is collective)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise EngineRunError(
            f"this build has {len(ranks)} ranks: launch one process per rank (torchrun --nproc-per-node {len(ranks)}) "
            "and call backends.torch.distributed.init_distributed() before load_engines"
        )
    if dist.get_world_size() != len(ranks):
        raise EngineRunError(f"this build has {len(ranks)} ranks but {dist.get_world_size()} processes were launched")
    wanted = sorted({tuple(step["group"]) for rank in ranks for step in rank["steps"] if "group" in step})
    return {group: dist.new_group(list(group)) for group in wanted}


def load_engines(directory: str | os.PathLike[str], rank: int | None = None) -> TensorRTExecutable:
    """Reads `directory/config.json` and its engines; raises `EngineRunError` where this machine cannot run them."""
    return TensorRTExecutable(directory, rank)
