"""`moec build`: trace a model, run the engine pipeline, build TensorRT engines (one per rank) and a config.json.

    moec build tiny --output-dir engines/ --dtype float16 --target sm89 --moe-plugin enable

The driver's half of the TensorRT backend: tracing and running passes need the frontend and the pass registry,
which only the driver may reach, so this module does both and hands the final program to
`backends.tensorrt.build_engines`, which knows nothing of where the program came from.
"""

from __future__ import annotations

import argparse
from typing import Any

from compiler.errors import MoecError


def decoder_pipeline(max_seq: int) -> str:
    """What `moec build --kv-cache` runs: the engine pipeline with KV caches as long as the engines' --max-seq."""
    return f"canonicalize,fuse-moe,kv-cache{{max_seq={max_seq}}},dce"


def _cmd_build(args: argparse.Namespace) -> int:
    from backends.tensorrt import build_engines, build_options
    from compiler.api import ENGINE_PIPELINE, load
    from compiler.pass_manager import parse_pipeline, run_pipeline
    from compiler.recipe import pipeline_with_quantization

    options = build_options(args.moe_plugin, args.target, args.max_batch, args.max_seq, args.workers, args.keep_onnx)
    if args.kv_cache and args.passes is not None:
        raise MoecError("give --kv-cache or --passes (with kv-cache in it), not both")
    default = decoder_pipeline(args.max_seq) if args.kv_cache else ENGINE_PIPELINE
    # The recipe's quantization flags (--use-weight-only ...) expand into passes here too (printed to stderr).
    pipeline = parse_pipeline(pipeline_with_quantization(args.passes if args.passes is not None else default, args))
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
    from compiler.recipe import add_quantization_arguments
    """Adds `moec build SOURCE --output-dir DIR ...` to the `moec` subparsers (called by compiler/cli.py)."""
    from compiler.api import ENGINE_PIPELINE

    parser = subparsers.add_parser("build", help="build TensorRT engines (one per rank) and a config.json")
    parser.add_argument("source", help="checkpoint directory, 'tiny' or 'mixtral-8x7b' (dummy weights)")
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="engines and config.json go here")
    parser.add_argument("--passes", default=None, help=f"pass pipeline (default: {ENGINE_PIPELINE})")
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
    parser.add_argument("--kv-cache", action="store_true",
                        help="decoder engines (past/present KV cache inputs, context and generation profiles): "
                        "pipeline " + decoder_pipeline(512).replace("512", "--max-seq"))
    parser.add_argument("--seed", type=int, default=0, help="seed of dummy weights (presets)")
    add_quantization_arguments(parser)
    parser.set_defaults(func=_cmd_build)
    return parser
