"""TensorRT backend: one engine per rank, built from the graph's ONNX export; MoE as a plugin or out of the box.

    moec build tiny --output-dir out/tiny-trt --dtype float16 --target sm89 --moe-plugin enable

    from backends.tensorrt import build_compiled, load_engines
    summary = build_compiled(compiled, "out/tiny-trt", moe_plugin=True, targets="sm89", dtype="float16")
    model = load_engines("out/tiny-trt")        # on a machine whose TensorRT supports its GPU; else EngineRunError

Modules: `build.py` (export → per-rank child builds → config.json, atomically), `compiler/segments.py` (a sharded rank split
at its collectives into consecutive engines + runtime steps), `worker.py` (parse + builder config, one engine),
`plugin.py` (the Python IPluginV3 `MoE`, namespace `moec`), `verify.py` (run the parsed ONNX in onnxruntime; all
ranks simulated), `loader.py` (config.json → engines → logits, torch.distributed between segments),
`runtime.py` (which TensorRT, targets, errors).
See README.md.

Works with data-center `tensorrt` or `tensorrt_rtx` (`pip install tensorrt-rtx-cu13`), whichever imports
(`MOEC_TENSORRT` picks one). TensorRT-RTX builds on a machine without a GPU for SM75/80/86/89/120/121.

At run time, engines built with `--moe-plugin enable` need `backends.tensorrt.plugin.register_moe_plugin()` called
in the process before deserializing (`load_engines` does it): the plugin is Python code, not part of the engine.
"""

from __future__ import annotations

import argparse
import importlib
import os
from typing import TYPE_CHECKING, Any

from compiler.errors import MoecError

if TYPE_CHECKING:
    from backends.tensorrt.build import BuildOptions, BuildSummary

# Names re-exported lazily (PEP 562): the build worker imports `backends.tensorrt.worker`, and importing this package
# eagerly would pull torch into every build process (~4 s each).
_EXPORTS = {
    "BuildOptions": "build",
    "BuildSummary": "build",
    "build_engines": "build",
    "TensorRTExecutable": "loader",
    "load_engines": "loader",
    "read_config": "loader",
    "EngineRunError": "runtime",
    "TargetError": "runtime",
    "TensorRTBuildError": "runtime",
    "TensorRTUnavailableError": "runtime",
    "tensorrt_available": "runtime",
}

__all__ = sorted([*_EXPORTS, "add_build_cli", "build_compiled", "build_options"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"backends.tensorrt.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_options(
    moe_plugin: bool | str = False,
    targets: str | tuple[str, ...] | None = None,
    max_batch: int = 4,
    max_seq: int = 512,
    workers: int = 1,
    keep_onnx: bool = False,
) -> BuildOptions:
    """BuildOptions from CLI-style values (`moe_plugin` "enable"/"disable" or a bool, `targets` "sm89,sm120")."""
    if isinstance(moe_plugin, str):
        if moe_plugin not in ("enable", "disable"):
            raise MoecError(f"--moe-plugin must be enable or disable, got {moe_plugin!r}")
        moe_plugin = moe_plugin == "enable"
    from backends.tensorrt.build import BuildOptions
    from backends.tensorrt.runtime import parse_targets

    if isinstance(targets, tuple):
        targets = ",".join(targets)
    return BuildOptions(
        moe_plugin=moe_plugin,
        targets=parse_targets(targets),
        max_batch=max_batch,
        max_seq=max_seq,
        workers=workers,
        keep_onnx=keep_onnx,
    )


def build_compiled(
    compiled: Any, output_dir: str | os.PathLike[str], dtype: str | None = None, **options: Any
) -> BuildSummary:
    """`compile(..., backend="tensorrt")`'s build step: the engines of a CompiledModel's final program.

    `options` are `build_options`' keywords; `dtype` is only recorded (the program was traced in it).
    """
    from backends.tensorrt.build import build_engines

    passes = [record.spec for record in compiled.history]
    return build_engines(compiled.program, output_dir, build_options(**options), passes=passes, dtype=dtype)


def _cmd_build(args: argparse.Namespace) -> int:
    from backends.tensorrt.build import build_engines
    from compiler.api import DEFAULT_PIPELINE, load
    from compiler.pass_manager import parse_pipeline, run_pipeline

    options = build_options(args.moe_plugin, args.target, args.max_batch, args.max_seq, args.workers, args.keep_onnx)
    pipeline = parse_pipeline(args.passes if args.passes is not None else DEFAULT_PIPELINE)
    print(f"moec build: tracing {args.source} ...", flush=True)
    program = load(args.source, dtype=args.dtype, seed=args.seed)
    result = run_pipeline(program, pipeline)
    passes = [record.spec for record in result.history]
    print(f"moec build: passes {', '.join(passes) or 'none'}", flush=True)
    summary = build_engines(result.program, args.output_dir, options, progress=lambda line: print(line, flush=True),
                            passes=passes, dtype=args.dtype)
    for engine in summary.engines:
        print(f"{engine}  {engine.stat().st_size:,} bytes")
    print(f"{summary.output_dir / 'config.json'}")
    return 0


def add_build_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Adds `moec build SOURCE --output-dir DIR ...` to the `moec` subparsers (call from compiler/cli.py)."""
    parser = subparsers.add_parser("build", help="build TensorRT engines (one per rank) and a config.json")
    parser.add_argument("source", help="checkpoint directory, 'tiny' or 'mixtral-8x7b' (dummy weights)")
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="engines and config.json go here")
    parser.add_argument("--passes", default=None, help="pass pipeline (default: the default pipeline)")
    parser.add_argument("--moe-plugin", choices=["enable", "disable"], default="disable",
                        help="MoE as the Python IPluginV3 'MoE' (enable) or as standard layers (disable, default)")
    parser.add_argument("--workers", type=int, default=1, help="ranks built in parallel processes (default 1)")
    parser.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], default=None, help="trace the model in this dtype"
    )
    parser.add_argument(
        "--target", default=None, metavar="SM,...", help="compute capabilities, e.g. sm89,sm120 (TensorRT-RTX)"
    )
    parser.add_argument("--max-batch", type=int, default=4, help="largest batch of the optimization profile")
    parser.add_argument("--max-seq", type=int, default=512, help="longest sequence of the optimization profile")
    parser.add_argument("--keep-onnx", action="store_true", help="keep the ONNX files TensorRT parsed (DIR/onnx/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of dummy weights (presets)")
    parser.set_defaults(func=_cmd_build)
    return parser
