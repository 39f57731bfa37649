"""Build TensorRT engines from a moec Program: one engine per rank (or, for a rank with collectives, one engine per
stretch between collectives), plus `config.json`.

before: a Program (after `canonicalize,fuse-moe,dce`; sharded programs carry one program per rank in `ranks`)
after:  OUTPUT_DIR/rank{r}.engine (OUTPUT_DIR/rank{r}.seg{k}.engine when rank r is split at collectives, see
        `compiler/segments.py`) and OUTPUT_DIR/config.json describing them and the steps the runtime takes per rank

Lowering goes through ONNX: each rank's program is written by `backends.onnx.export_program` (MoE as `ootb`
standard ops or as the `MoE` plugin node) and TensorRT's own ONNX parser reads that very file, so the graph
TensorRT builds is the graph onnxruntime verifies (`backends.tensorrt.verify`). What ONNX cannot say is adjusted in
named steps: the `attention` op is exported decomposed (TensorRT's ONNX `Attention` importer rejects the
`softmax_precision` attribute moec's export sets, so `decompose_for_tensorrt`), and the network/config steps are in
`worker.py`.

Everything is written into a temporary sibling of OUTPUT_DIR and moved into place only when every rank built, so
a failed build leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from backends.tensorrt.runtime import (
    TensorRTBuildError,
    import_tensorrt,
    parse_targets,
    plugin_environment,
    tensorrt_info,
)
from compiler.errors import MoecError
from compiler.segments import RankPlan, Segment, dim_exprs, split_at_collectives, symbol_names
from compiler.ir import Program, op_name

CONFIG_FORMAT = "moec-tensorrt/1"
CONFIG_NAME = "config.json"
REPO_ROOT = Path(__file__).resolve().parents[2]
# TensorRT's ONNX Attention importer: "Setting softmax precision is not supported in TensorRT Attention."
DECOMPOSE_FOR_TENSORRT = ("attention",)
# What config.json records of each engine, from the build worker's result.
_RESULT_KEYS = (
    "inputs", "outputs", "profiles", "layers", "bytes", "parse_seconds", "build_seconds", "peak_rss_bytes"
)


@dataclass(frozen=True)
class BuildOptions:
    """What `moec build` / `compile(..., backend="tensorrt")` controls."""

    moe_plugin: bool = False
    targets: tuple[str, ...] = ()
    max_batch: int = 4
    max_seq: int = 512
    opt_batch: int = 1
    opt_seq: int = 128
    workers: int = 1
    keep_onnx: bool = False
    decompose: tuple[str, ...] = DECOMPOSE_FOR_TENSORRT

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_seq < 1:
            raise MoecError(f"--max-batch and --max-seq must be >= 1, got {self.max_batch} and {self.max_seq}")
        if self.workers < 1:
            raise MoecError(f"--workers must be >= 1, got {self.workers}")
        object.__setattr__(self, "opt_batch", min(self.opt_batch, self.max_batch))
        object.__setattr__(self, "opt_seq", min(self.opt_seq, self.max_seq))


@dataclass
class BuildSummary:
    output_dir: Path
    config: dict[str, Any]
    engines: list[Path] = field(default_factory=list)

    @property
    def build_seconds(self) -> float:
        return float(self.config["build_seconds"])


Progress = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _provenance(program: Program) -> dict[str, dict[str, str]]:
    """fx node name → its op and the pass that produced it (`trace` = the frontend), for error messages."""
    return {
        node.name: {"node": node.name, "op": op_name(node), "pass": node.meta.get("moec_rule", "trace")}
        for node in program.graph.nodes
        if node.op == "call_function"
    }


def _program_dtype(program: Program) -> str:
    counts = Counter(
        str(node.meta["weight"].dtype).removeprefix("torch.")
        for node in program.weight_nodes()
        if node.meta["weight"].dtype.is_floating_point
    )
    return counts.most_common(1)[0][0] if counts else "float32"


def _rank_plans(program: Program) -> list[RankPlan]:
    """One plan per rank: its engine segments (split at collectives) and the runtime's steps."""
    ranks = list(program.ranks) if program.ranks else [program]
    return [_decoder_plan(rank) if rank.cache_nodes() else split_at_collectives(rank) for rank in ranks]


def _decoder_io(program: Program) -> tuple[dict[str, list[int | str]], list[str]]:
    """A decoder engine's input dims (named as `backends/onnx/cached.py` declares them) and output names."""
    from backends.onnx.cached import ATTENTION_MASK, POSITION_IDS, past_name, present_name

    dims: dict[str, list[int | str]] = {
        "input_ids": ["batch", "seq"], ATTENTION_MASK: ["batch", "total_seq"], POSITION_IDS: ["batch", "seq"]
    }
    specs = list(program.cache_specs().values())
    for spec in specs:
        dims[past_name(spec)] = ["batch", spec.kv_heads, "past_seq", spec.head_dim]
    return dims, ["logits", *(present_name(spec) for spec in specs)]


def _kv_cache_entry(program: Program, options: BuildOptions) -> dict[str, Any] | None:
    """config.json's description of decoder engines (None for stateless ones): what bounds the caches and which
    optimization profile serves which phase (profile index = position in `profiles`)."""
    specs = [spec for rank in (program.ranks or (program,)) for spec in rank.cache_specs().values()]
    if not specs:
        return None
    max_seq = min(spec.max_seq for spec in specs)
    return {
        "max_seq": max_seq,
        "dtype": str(specs[0].dtype).removeprefix("torch."),
        "layout": "[batch, kv_heads, past_seq, head_dim]",
        "profiles": decoder_profiles(options, max_seq),
    }


def _decoder_plan(program: Program) -> RankPlan:
    """A rank with KV caches, split at its collectives like any rank; each engine that holds attention takes the
    decoder's past/present inputs and outputs (for its own layers) besides the collective results it reads."""
    plan = split_at_collectives(program)
    for step in plan.steps:
        if "engine" not in step:
            continue
        segment = plan.segments[step["engine"]]
        if segment.program.cache_nodes():
            dims, outputs = _decoder_io(segment.program)
            step["inputs"] = [*dims, *_collective_inputs(segment)]
            step["outputs"] = outputs
    return plan


def _collective_inputs(segment: Segment) -> list[str]:
    """The inputs of a decoder segment that are collective results (neither decoder state nor input_ids)."""
    state = {"input_ids", "cache_position", *(node.name for node in segment.program.cache_nodes())}
    return [name for name in segment.inputs if name not in state]


def decoder_profiles(options: BuildOptions, max_seq: int) -> list[dict[str, Any]]:
    """The decoder engines' two optimization profiles, as sizes of batch/seq/past_seq (total_seq = past_seq + seq):
    `context` (prefill: up to max_seq tokens, empty past) and `generation` (one token per sequence, a past of up to
    max_seq - 1 slots)."""
    if options.max_seq > max_seq:
        raise MoecError(
            f"--max-seq {options.max_seq} exceeds the program's KV cache length (kv-cache max_seq {max_seq}): "
            "past_seq + seq may not pass it; lower --max-seq or raise kv-cache{max_seq=N}"
        )
    if options.max_seq < 2:
        raise MoecError(
            f"decoder engines need --max-seq >= 2 (a prompt token and a generated one), got {options.max_seq}"
        )
    batches = {"min": 1, "opt": options.opt_batch, "max": options.max_batch}
    context = {"seq": {"min": 1, "opt": options.opt_seq, "max": options.max_seq}, "past_seq": dict.fromkeys(batches, 0)}
    past_opt = min(options.opt_seq, options.max_seq - 1)
    generation = {"seq": dict.fromkeys(batches, 1), "past_seq": {"min": 1, "opt": past_opt, "max": options.max_seq - 1}}
    profiles = []
    for name, sizes in (("context", context), ("generation", generation)):
        profile: dict[str, Any] = {"name": name}
        for key in batches:
            values = {"batch": batches[key], "seq": sizes["seq"][key], "past_seq": sizes["past_seq"][key]}
            profile[key] = {**values, "total_seq": values["seq"] + values["past_seq"]}
        profiles.append(profile)
    return profiles


def _name_input_dims(onnx_path: Path, input_dims: dict[str, list[int | str]]) -> None:
    """Named step `name_input_dims`: writes each graph input's dynamic dims as `batch`, `seq` or an expression of them
    (`batch*seq`), so a segment input such as [batch*seq, H] is not declared with a dim named `batch`."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for graph_input in model.graph.input:
        dims = input_dims.get(graph_input.name)
        if dims is None:
            continue
        for dim, expr in zip(graph_input.type.tensor_type.shape.dim, dims):
            if isinstance(expr, str):
                dim.dim_param = expr
    onnx_path.write_bytes(model.SerializeToString())


def _parallelism(program: Program) -> dict[str, int]:
    keys = ("tp", "pp", "moe_tp", "moe_ep")
    layout = {key: int(program.attributes[key]) for key in keys if key in program.attributes}
    return {"world_size": max(1, len(program.ranks)), **layout}


def _run_worker(job_path: Path, environment: dict[str, str], progress: Progress, prefix: str) -> dict[str, Any]:
    process = subprocess.Popen(
        [sys.executable, "-m", "backends.tensorrt.worker", str(job_path)],
        cwd=REPO_ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    tail: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip()
        if line.startswith(prefix):
            progress(line)
        elif line:
            tail = (tail + [line])[-20:]
    process.wait()
    result_path = job_path.with_suffix(".result.json")
    if not result_path.exists():
        raise TensorRTBuildError(
            f"{prefix}the TensorRT build process died (exit status {process.returncode}): " + " | ".join(tail[-5:])
        )
    result = json.loads(result_path.read_text())
    if not result["ok"]:
        detail = " | ".join(line for line in tail if "[E]" in line or "Error" in line)[-800:]
        raise TensorRTBuildError(f"{prefix}{result['error']}" + (f" [TensorRT: {detail}]" if detail else ""))
    return result


def _install(staging: Path, output_dir: Path) -> None:
    """Moves the finished build into place; an existing moec build there is replaced, anything else refused."""
    if output_dir.exists():
        if not output_dir.is_dir() or (any(output_dir.iterdir()) and not (output_dir / CONFIG_NAME).exists()):
            raise MoecError(f"output directory {output_dir} exists and is not empty (and not a moec TensorRT build)")
        retired = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        output_dir.rename(retired)
        staging.rename(output_dir)
        shutil.rmtree(retired)
    else:
        staging.rename(output_dir)


def build_engines(
    program: Program,
    output_dir: str | os.PathLike[str],
    options: BuildOptions = BuildOptions(),
    progress: Progress = _stderr,
    passes: list[str] | None = None,
    dtype: str | None = None,
) -> BuildSummary:
    """Builds one engine per rank of `program` into `output_dir`; returns the written config."""
    from backends.onnx.export import export_program

    started = time.perf_counter()
    import_tensorrt()
    info = tensorrt_info()
    if options.targets:
        parse_targets(",".join(options.targets))
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    plans = _rank_plans(program)
    moe_mode = "plugin" if options.moe_plugin else "ootb"
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.building-", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        onnx_dir = staging / "onnx"
        units: list[tuple[int, int, str, str]] = []  # (rank, segment, file stem, progress prefix)
        jobs: list[Path] = []
        exports = []
        for rank_index, plan in enumerate(plans):
            for segment_index, segment in enumerate(plan.segments):
                stem = f"rank{rank_index}" if len(plan.segments) == 1 else f"rank{rank_index}.seg{segment_index}"
                prefix = f"[rank {rank_index + 1}/{len(plans)}] " if len(plan.segments) == 1 else (
                    f"[rank {rank_index + 1}/{len(plans)} engine {segment_index + 1}/{len(plan.segments)}] "
                )
                exported = export_program(
                    segment.program, onnx_dir / f"{stem}.onnx", moe=moe_mode, decompose=tuple(options.decompose)
                )
                profiles = None
                names = symbol_names(segment.program)
                inputs = segment.program.input_nodes()
                input_dims = {node.name: dim_exprs(node.meta["val"], names) for node in inputs}
                if segment.program.cache_nodes():
                    collective = set(_collective_inputs(segment))
                    input_dims = {name: dims for name, dims in input_dims.items() if name in collective}
                    _name_input_dims(exported.path, input_dims)
                    decoder_dims, _ = _decoder_io(segment.program)  # the export names these dims itself
                    input_dims = {**decoder_dims, **input_dims}
                    max_seq = min(spec.max_seq for spec in segment.program.cache_specs().values())
                    profiles = decoder_profiles(options, max_seq)
                else:
                    _name_input_dims(exported.path, input_dims)
                exports.append(exported)
                progress(
                    f"{prefix}exported ONNX: {exported.node_count} nodes, {exported.data_bytes / 2**20:.1f} MiB "
                    f"in {exported.seconds:.1f}s"
                )
                job = {
                    "onnx": str(exported.path),
                    "engine": str(staging / f"{stem}.engine"),
                    "result": str(onnx_dir / f"{stem}.result.json"),
                    "moe_plugin": options.moe_plugin,
                    "targets": list(options.targets),
                    "max_batch": options.max_batch,
                    "max_seq": options.max_seq,
                    "opt_batch": options.opt_batch,
                    "opt_seq": options.opt_seq,
                    "input_dims": input_dims,
                    "profiles": profiles,
                    "prefix": prefix,
                    "provenance": _provenance(segment.program),
                }
                job_path = onnx_dir / f"{stem}.json"
                job_path.write_text(json.dumps(job))
                jobs.append(job_path)
                units.append((rank_index, segment_index, stem, prefix))

        environment = plugin_environment() if options.moe_plugin else dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH", "")]))
        lock = threading.Lock()

        def locked_progress(line: str) -> None:
            with lock:
                progress(line)

        def build_one(index: int) -> dict[str, Any]:
            prefix = units[index][3]
            targets = ", ".join(options.targets) or "default target"
            locked_progress(f"{prefix}building {moe_mode} engine ({targets}) ...")
            result = _run_worker(jobs[index], environment, locked_progress, prefix)
            locked_progress(f"{prefix}engine {result['bytes'] / 2**20:.1f} MiB in {result['build_seconds']:.1f}s")
            return result

        with ThreadPoolExecutor(max_workers=min(options.workers, len(units))) as pool:
            results = list(pool.map(build_one, range(len(units))))

        rank_entries: list[dict[str, Any]] = [
            {"rank": index, "engines": [], "steps": plan.steps, "output": plan.output}
            for index, plan in enumerate(plans)
        ]
        for (rank_index, segment_index, stem, _), result, exported in zip(units, results, exports):
            segment = plans[rank_index].segments[segment_index]
            rank_entries[rank_index]["engines"].append(
                {
                    "file": f"{stem}.engine",
                    "onnx": f"onnx/{stem}.onnx" if options.keep_onnx else None,
                    "computes": segment.output,
                    "onnx_nodes": exported.node_count,
                    "export_seconds": round(exported.seconds, 3),
                    **{key: result[key] for key in _RESULT_KEYS},
                }
            )
        config = {
            "format": CONFIG_FORMAT,
            "source": program.source_description,
            "passes": list(passes or []),
            "dtype": dtype or _program_dtype(program),
            "parallelism": _parallelism(program),
            "kv_cache": _kv_cache_entry(program, options),
            "moe_lowering": moe_mode,
            "plugin": {
                "name": "MoE",
                "version": "1",
                "namespace": "moec",
                "register": "backends.tensorrt.plugin:register_moe_plugin",
            }
            if options.moe_plugin
            else None,
            "tensorrt": {"flavour": info.flavour, "version": info.version},
            "targets": list(options.targets),
            "options": asdict(options),
            "ranks": rank_entries,
            "build_seconds": round(time.perf_counter() - started, 3),
        }
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if not options.keep_onnx:
            shutil.rmtree(onnx_dir)
        else:
            for stale in list(onnx_dir.glob("rank*.json")):
                stale.unlink()
        _install(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    engines = [output_dir / entry["file"] for rank in config["ranks"] for entry in rank["engines"]]
    progress(f"built {len(engines)} engine(s) into {output_dir} in {config['build_seconds']:.1f}s")
    return BuildSummary(output_dir, config, engines)
