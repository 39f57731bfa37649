"""TensorRT-LLM / ModelOpt recipe flags expanded into passes, on `moec compile`, `run` and `eval` (run.py /
convert_checkpoint.py / hf_ptq.py's underscore spellings accepted):

    moec eval tiny --use-weight-only --weight-only-precision int4 --group-size 128
    pipeline: canonicalize,fuse-moe,kv-cache,fuse-qkv,quantize-weights{precision=int4,group_size=128},fuse-norm,dce
    moec eval tiny --qformat fp8 --kv-cache-dtype fp8 --calib-size 64
    pipeline: canonicalize,fuse-moe,kv-cache,fuse-qkv,calibrate{samples=64},quantize-fp8{kv_cache=true},fuse-norm,dce

`quantize-weights` is placed right after the last of the pipeline's `fuse-moe`, `shard` (each rank quantizes its own
slices) and `fuse-qkv` (the fused projection is quantized as one); `quantize-fp8` after the last of those and
`kv-cache` (an FP8 cache needs the caches), with `calibrate` right before it, or right before `shard` in a sharded
pipeline (calibrate measures the unsharded program). The chosen pipeline is printed to stderr.
"""

from __future__ import annotations

import argparse
import sys

from compiler.errors import MoecError
from compiler.pass_manager import parse_pipeline
from compiler.quantization import PRECISIONS

QUANTIZE_PASS = "quantize-weights"
FP8_PASS = "quantize-fp8"
CALIBRATE_PASS = "calibrate"
QFORMATS = ("fp8",)
KV_CACHE_DTYPES = ("fp8",)


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("weight-only quantization (TensorRT-LLM's recipe flags)")
    group.add_argument("--use-weight-only", "--use_weight_only", dest="use_weight_only", action="store_true",
                       help=f"quantize the linears and MoE experts (adds {QUANTIZE_PASS} to the pipeline)")
    group.add_argument("--weight-only-precision", "--weight_only_precision", dest="weight_only_precision",
                       choices=PRECISIONS, default=None, help="int8 (default) or int4")
    group.add_argument("--group-size", "--group_size", dest="group_size", type=int, default=None,
                       help="input columns per scale: 0 (default) = one scale per output channel; 32, 64, 128...")
    group = parser.add_argument_group("FP8 post-training quantization (ModelOpt's recipe flags)")
    group.add_argument("--qformat", dest="qformat", choices=QFORMATS, default=None,
                       help=f"fp8: FP8 weights and static activation scales (adds {CALIBRATE_PASS} and {FP8_PASS})")
    group.add_argument("--kv-cache-dtype", "--kv_cache_dtype", dest="kv_cache_dtype", choices=KV_CACHE_DTYPES,
                       default=None, help="fp8: FP8 KV caches with per-layer scales (needs --qformat fp8)")
    group.add_argument("--calib-size", "--calib_size", dest="calib_size", type=int, default=None,
                       help="calibration sequences of the builtin text (default 512, clipped to what it holds)")


def _given(args: argparse.Namespace, flags: tuple[tuple[str, str], ...]) -> list[str]:
    return [flag for flag, key in flags if getattr(args, key, None) is not None]


def pipeline_with_quantization(spec: str, args: argparse.Namespace) -> str:
    """`spec` with the passes the recipe flags in `args` ask for inserted (unchanged without them)."""
    fp8_given = _given(args, (("--kv-cache-dtype", "kv_cache_dtype"), ("--calib-size", "calib_size")))
    if getattr(args, "qformat", None) is not None:
        if getattr(args, "use_weight_only", False):
            raise MoecError("give --use-weight-only or --qformat fp8, not both: a model is quantized once")
        return _pipeline_with_fp8(spec, args)
    if fp8_given:
        raise MoecError(f"{' and '.join(fp8_given)} need --qformat fp8")
    if not getattr(args, "use_weight_only", False):
        given = _given(args, (("--weight-only-precision", "weight_only_precision"), ("--group-size", "group_size")))
        if given:
            raise MoecError(f"{' and '.join(given)} need --use-weight-only")
        return spec
    passes = parse_pipeline(spec)
    if any(p.name in (QUANTIZE_PASS, FP8_PASS) for p in passes):
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


def _pipeline_with_fp8(spec: str, args: argparse.Namespace) -> str:
    """`spec` with `calibrate` and `quantize-fp8` placed as the module docstring says."""
    passes = parse_pipeline(spec)
    ran = [p.name for p in passes if p.name in (QUANTIZE_PASS, FP8_PASS, CALIBRATE_PASS)]
    if ran:
        raise MoecError(f"the pipeline already has {', '.join(ran)}; drop --qformat fp8 or the pass")
    names = [p.name for p in passes]
    if "fuse-moe" not in names:
        raise MoecError(f"--qformat fp8 needs fuse-moe in the pipeline ({spec})")
    kv_cache = args.kv_cache_dtype == "fp8"
    if kv_cache and "kv-cache" not in names:
        raise MoecError(f"--kv-cache-dtype fp8 needs kv-cache in the pipeline ({spec})")
    calibrate = CALIBRATE_PASS if args.calib_size is None else f"{CALIBRATE_PASS}{{samples={args.calib_size}}}"
    quantize = f"{FP8_PASS}{{kv_cache=true}}" if kv_cache else FP8_PASS
    parse_pipeline(f"{calibrate},{quantize}")  # a bad --calib-size fails here, naming the option
    specs = [p.spec() for p in passes]
    position = max(index for index, name in enumerate(names) if name in ("fuse-moe", "shard", "fuse-qkv", "kv-cache"))
    specs.insert(position + 1, quantize)
    specs.insert(names.index("shard") if "shard" in names else position + 1, calibrate)
    chosen = ",".join(specs)
    print(f"pipeline: {chosen}", file=sys.stderr, flush=True)
    return chosen
