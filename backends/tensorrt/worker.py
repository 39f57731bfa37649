"""Builds ONE TensorRT engine from one ONNX file, in its own process: `python -m backends.tensorrt.worker JOB.json`.

before: an ONNX file written by `backends.onnx.export_onnx` (the file onnxruntime verifies) and a job description
after:  the serialized engine, and a result JSON (inputs, outputs, profile, seconds) beside it

A child process because (1) TensorRT-RTX's parser only finds plugins when `libtensorrt_rtx.so` is on the
LD_LIBRARY_PATH the process STARTED with, (2) parallel rank builds need processes (the builder holds the GIL in
Python callbacks), and (3) a crash inside TensorRT (it aborts on some bad plugin setups) must not take the
compiler down with it.

The adjustments of the parsed network / builder config, each one named step:
- `strongly_typed`: data-center TensorRT is asked for a strongly typed network, so it keeps the ONNX file's types
  exactly (TensorRT-RTX networks always are);
- `profile`: one optimization profile over the dynamic `batch` and `seq` dims of `input_ids`; a decoder engine
  (past/present inputs, `job["profiles"]`) gets two instead, `context` and `generation` (see `build.decoder_profiles`),
  and the result records what TensorRT's profile objects hold;
- `targets`: the compute capabilities to build for (TensorRT-RTX only);
- `register_moe_plugin`: the Python `MoE` creator is registered before parsing when the graph has plugin nodes.
"""

from __future__ import annotations

import json
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

from backends.tensorrt.runtime import TensorRTBuildError, dtype_name, eval_dim, import_tensorrt


def _dims(dims: Any) -> list[int]:
    return [int(d) for d in dims]


def _profile_shapes(network: Any, job: dict[str, Any]) -> dict[str, dict[str, list[int]]]:
    """min/opt/max of every dynamic network input, from its dims written in `batch`/`seq` (`job["input_dims"]`,
    e.g. ["batch*seq", 4096]) evaluated at the profile's batch/seq limits."""
    limits = {"min": (1, 1), "opt": (job["opt_batch"], job["opt_seq"]), "max": (job["max_batch"], job["max_seq"])}
    shapes: dict[str, dict[str, list[int]]] = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        if -1 not in _dims(tensor.shape):
            continue
        dims = job["input_dims"].get(tensor.name)
        if dims is None:
            raise TensorRTBuildError(f"input {tensor.name}: the build did not describe its dims {_dims(tensor.shape)}")
        shapes[tensor.name] = {
            key: [eval_dim(d, b, s) for d in dims]
            for key, (b, s) in limits.items()
        }
    return shapes


def _size(dim: int | str, sizes: dict[str, int]) -> int:
    """A dim written as an int, or as an expression of the names in `sizes` (`batch`, `seq`, `past_seq`,
    `total_seq`; a collective result of a sharded decoder is e.g. `batch*seq`)."""
    if isinstance(dim, int):
        return dim
    names = set(re.findall(r"[A-Za-z_]+", dim))
    if not names <= set(sizes) or not re.fullmatch(r"[A-Za-z_0-9+*/() -]+", dim):
        raise TensorRTBuildError(f"dim {dim!r} is not an expression of {', '.join(sizes)}")
    return int(eval(dim, {"__builtins__": {}}, dict(sizes)))


def _named_profiles(network: Any, job: dict[str, Any]) -> list[dict[str, dict[str, list[int]]]]:
    """min/opt/max of every dynamic input per profile of `job["profiles"]` (decoder engines: context, generation)."""
    shapes: list[dict[str, dict[str, list[int]]]] = []
    for profile in job["profiles"]:
        inputs: dict[str, dict[str, list[int]]] = {}
        for index in range(network.num_inputs):
            tensor = network.get_input(index)
            dims = job["input_dims"].get(tensor.name)
            if dims is None:
                raise TensorRTBuildError(f"input {tensor.name}: the build did not describe its dims")
            inputs[tensor.name] = {key: [_size(d, profile[key]) for d in dims] for key in ("min", "opt", "max")}
        shapes.append(inputs)
    return shapes


def _recorded(profile: Any, names: list[str]) -> dict[str, dict[str, list[int]]]:
    """What an optimization profile holds, read back from TensorRT (config.json records this, not the request)."""
    return {
        name: dict(zip(("min", "opt", "max"), (_dims(dims) for dims in profile.get_shape(name)))) for name in names
    }


class _Progress:
    """Prints the builder's top-level phases (one line each) so a long build shows it is alive."""

    def __init__(self, trt: Any, prefix: str) -> None:
        base = trt.IProgressMonitor

        class Monitor(base):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                base.__init__(self)
                self.depth = 0
                self.started: dict[str, float] = {}

            def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
                self.started[phase_name] = time.perf_counter()
                if parent_phase is None:
                    print(f"{prefix}{phase_name} ...", flush=True)

            def step_complete(self, phase_name: str, step: int) -> bool:
                return True

            def phase_finish(self, phase_name: str) -> None:
                started = self.started.pop(phase_name, None)
                if started is not None and not self.started:
                    print(f"{prefix}{phase_name} done in {time.perf_counter() - started:.1f}s", flush=True)

        self.monitor = Monitor()


def _parse_error(parser: Any, provenance: dict[str, dict[str, str]]) -> TensorRTBuildError:
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node_name = error.node_name()
        origin = provenance.get(node_name.split("/", 1)[0])
        where = f"ONNX node {node_name} ({error.node_operator()})"
        if origin is not None:
            where += f" from fx node {origin['node']} ({origin['op']}, produced by {origin['pass']})"
        lines.append(f"{where}: {error.desc()}")
    return TensorRTBuildError("TensorRT cannot parse the graph: " + "; ".join(lines or ["no details"]))


def build_engine(job: dict[str, Any]) -> dict[str, Any]:
    """Parses `job["onnx"]`, builds, writes `job["engine"]`; returns what config.json records of the engine."""
    trt = import_tensorrt()
    started = time.perf_counter()
    prefix = job.get("prefix", "")
    if job["moe_plugin"]:
        from backends.tensorrt.plugin import register_moe_plugin

        register_moe_plugin()
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flags = 0
    if trt.__name__ == "tensorrt":
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(job["onnx"]):
        raise _parse_error(parser, job.get("provenance", {}))
    parse_seconds = time.perf_counter() - started
    print(f"{prefix}parsed {network.num_layers} layers in {parse_seconds:.1f}s", flush=True)

    config = builder.create_builder_config()
    targets = job["targets"]
    if targets:
        config.num_compute_capabilities = len(targets)
        for index, target in enumerate(targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, target.upper()), index)
    if job.get("profiles"):
        recorded = []
        for shapes in _named_profiles(network, job):
            profile = builder.create_optimization_profile()
            for name, limits in shapes.items():
                profile.set_shape(name, limits["min"], limits["opt"], limits["max"])
            config.add_optimization_profile(profile)
            recorded.append(_recorded(profile, list(shapes)))
    else:
        profile = builder.create_optimization_profile()
        shapes = _profile_shapes(network, job)
        for name, limits in shapes.items():
            profile.set_shape(name, limits["min"], limits["opt"], limits["max"])
        config.add_optimization_profile(profile)
        recorded = [shapes]
    if hasattr(trt, "IProgressMonitor"):
        config.progress_monitor = _Progress(trt, prefix).monitor

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT failed to build {Path(job['onnx']).name} (see the TensorRT errors above)")
    Path(job["engine"]).write_bytes(memoryview(serialized))

    def describe(tensor: Any) -> dict[str, Any]:
        return {"name": tensor.name, "dtype": dtype_name(tensor.dtype), "shape": _dims(tensor.shape)}

    return {
        "inputs": [describe(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [describe(network.get_output(i)) for i in range(network.num_outputs)],
        "profiles": recorded,
        "layers": network.num_layers,
        "bytes": Path(job["engine"]).stat().st_size,
        "parse_seconds": round(parse_seconds, 3),
        "build_seconds": round(time.perf_counter() - started, 3),
        # this build process's peak resident memory (Linux reports KiB)
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main(argv: list[str]) -> int:
    job_path = Path(argv[0])
    job = json.loads(job_path.read_text())
    result_path = Path(job["result"])
    try:
        result: dict[str, Any] = {"ok": True, **build_engine(job)}
    except Exception as error:  # reported to the parent, which raises it there with the rank named
        message = str(error) if isinstance(error, TensorRTBuildError) else f"{type(error).__name__}: {error}"
        result = {"ok": False, "error": message}
    result_path.write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
