"""TensorRT-LLM recipe flags expanded into passes: `--use-weight-only --weight-only-precision int8|int4
[--group-size N]` (run.py / convert_checkpoint.py's underscore spellings accepted) on `moec compile`, `run` and
`eval`.

    moec eval tiny --use-weight-only --weight-only-precision int4 --group-size 128
    pipeline: canonicalize,fuse-moe,kv-cache,fuse-qkv,quantize-weights{precision=int4,group_size=128},fuse-norm,dce

`quantize-weights` is placed right after the last of the pipeline's `fuse-moe`, `shard` (each rank quantizes its own
slices) and `fuse-qkv` (the fused projection is quantized as one). The chosen pipeline is printed to stderr.
"""

from __future__ import annotations

import argparse
import sys

from compiler.errors import MoecError
from compiler.pass_manager import parse_pipeline
from compiler.quantization import PRECISIONS

QUANTIZE_PASS = "quantize-weights"


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("weight-only quantization (TensorRT-LLM's recipe flags)")
    group.add_argument("--use-weight-only", "--use_weight_only", dest="use_weight_only", action="store_true",
                       help=f"quantize the linears and MoE experts (adds {QUANTIZE_PASS} to the pipeline)")
    group.add_argument("--weight-only-precision", "--weight_only_precision", dest="weight_only_precision",
                       choices=PRECISIONS, default=None, help="int8 (default) or int4")
    group.add_argument("--group-size", "--group_size", dest="group_size", type=int, default=None,
                       help="input columns per scale: 0 (default) = one scale per output channel; 32, 64, 128...")


def pipeline_with_quantization(spec: str, args: argparse.Namespace) -> str:
    """`spec` with `quantize-weights` inserted as the recipe flags in `args` ask (unchanged without them)."""
    if not getattr(args, "use_weight_only", False):
        flags = (("--weight-only-precision", "weight_only_precision"), ("--group-size", "group_size"))
        given = [flag for flag, key in flags if getattr(args, key, None) is not None]
        if given:
            raise MoecError(f"{' and '.join(given)} need --use-weight-only")
        return spec
    passes = parse_pipeline(spec)
    if any(p.name == QUANTIZE_PASS for p in passes):
        raise MoecError(f"the pipeline already quantizes ({QUANTIZE_PASS}); drop --use-weight-only or the pass")
    # After the last of these: quantizing a fused q/k/v projection keeps it one launch (fuse-qkv matches float
    # linears only), and a sharded pipeline quantizes each rank's own slices.
    anchors = [index for index, p in enumerate(passes) if p.name in ("fuse-moe", "shard", "fuse-qkv")]
    if not anchors:
        raise MoecError(f"--use-weight-only needs fuse-moe in the pipeline ({spec})")
    options = [f"precision={args.weight_only_precision or 'int8'}"]
    if args.group_size:
        options.append(f"group_size={args.group_size}")
    quantize = f"{QUANTIZE_PASS}{{{','.join(options)}}}"
    parse_pipeline(quantize)  # a bad --group-size fails here, naming the option
    position = anchors[-1] + 1
    chosen = ",".join([*(p.spec() for p in passes[:position]), quantize, *(p.spec() for p in passes[position:])])
    print(f"pipeline: {chosen}", file=sys.stderr, flush=True)
    return chosen
