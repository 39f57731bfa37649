"""Benchmark: `moec build` (TensorRT) of a model, both MoE lowerings: build seconds, peak RSS, engine size.

Each lowering runs in a fresh process (trace, `canonicalize,fuse-moe,dce`, ONNX export, TensorRT build in the
backend's own child process), so peak RSS figures are per process: `prepare+export` = the moec process (os.wait4),
`TensorRT build` = the builder child (its own getrusage, recorded in config.json). The engines are deleted after
measuring (a full-width 2-layer engine is ~6 GB).

Models:
- `full` (default): 2-layer Mixtral-8x7B shapes (H=4096, I=14336, E=8, vocab 32000), float16 dummy weights drawn
  per expert (the layout a real checkpoint has, so the exporter streams one expert matrix at a time);
- `tiny`: the `tiny` preset.

    PYTHONPATH=. python bench/tensorrt_build.py [--model full|tiny] [--lowerings ootb,plugin] [--target sm89]
        [--repeats 1] [--markdown FILE]

`--moe-cost`: what the out-of-the-box MoE form costs at run time, measured where something can run here: the ONNX
files both builds PARSED (ootb; plugin with its node swapped for onnxruntime's routed `com.microsoft::MoE`) timed in
onnxruntime on the CPU, for a 2-layer Mixtral of H=512, I=1792, E=8, top-2 (float32), batch 1 x seq 256. A CPU
proxy for the E/top_k extra expert FLOPs, not a TensorRT number (no GPU here can run TensorRT-RTX engines).

    PYTHONPATH=. python bench/tensorrt_build.py --moe-cost [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYERS = 2


def _full_source() -> Any:
    """2-layer Mixtral-8x7B shapes with float16 dummy weights; experts are per-expert random leaves (a checkpoint's
    layout, which `random_weights` produces), so no [8, 28672, 4096] tensor is ever generated whole."""
    from frontends.hf.source import ModelSource, preset_config, random_weights

    config = preset_config("mixtral-8x7b")
    config.num_hidden_layers = LAYERS
    config.dtype = "float16"
    return ModelSource(config, random_weights(config, seed=0), "2-layer mixtral-8x7b shapes, per-expert random weights")


def _child(model: str, lowering: str, target: str, out_dir: str) -> None:
    """One repeat: trace, passes, build; prints one JSON line."""
    started = time.perf_counter()
    from backends.tensorrt import build_options
    from backends.tensorrt.build import build_engines
    from compiler.api import load
    from compiler.pass_manager import parse_pipeline, run_pipeline
    from frontends.hf.trace import trace

    traced = trace(_full_source()) if model == "full" else load("tiny", dtype="float16")
    program = run_pipeline(traced, parse_pipeline("canonicalize,fuse-moe,dce")).program
    prepared = time.perf_counter()
    options = build_options(moe_plugin=lowering == "plugin", targets=target, max_batch=1, max_seq=512)
    summary = build_engines(
        program, Path(out_dir) / "engines", options, progress=lambda line: print(line, file=sys.stderr, flush=True)
    )
    (entry,) = summary.config["ranks"][0]["engines"]
    print(
        json.dumps(
            {
                "prepare_s": prepared - started,
                "export_s": entry["export_seconds"],
                "trt_build_s": entry["build_seconds"],
                "trt_parse_s": entry["parse_seconds"],
                "build_total_s": summary.build_seconds,
                "trt_peak_rss": entry["peak_rss_bytes"],
                "engine_bytes": entry["bytes"],
                "layers": entry["layers"],
                "weight_bytes": program.weight_bytes(),
                "tensorrt": summary.config["tensorrt"],
            }
        )
    )


def _run(model: str, lowering: str, target: str) -> dict[str, Any]:
    out_dir = tempfile.mkdtemp(prefix=f"moec-trt-{lowering}-", dir=os.environ.get("MOEC_BENCH_DIR"))
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        process = subprocess.Popen(
            [sys.executable, __file__, "--child", lowering, "--model", model, "--target", target, "--out", out_dir],
            stdout=subprocess.PIPE,
            env=env,
            cwd=REPO_ROOT,
        )
        stdout = process.stdout.read() if process.stdout else b""
        _, status, usage = os.wait4(process.pid, 0)
        if status != 0:
            raise SystemExit(f"child for {lowering} failed with status {status}")
        result = json.loads(stdout.decode().strip().splitlines()[-1])
        result["moec_peak_rss"] = usage.ru_maxrss * 1024  # the largest of the moec process and its children
        return result
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _moe_cost(target: str, repeats: int) -> list[str]:
    import numpy as np
    from transformers import MixtralConfig

    from backends.tensorrt import build_options
    from backends.tensorrt.build import build_engines
    from backends.tensorrt.verify import onnxruntime_session
    from compiler.api import load
    from compiler.pass_manager import parse_pipeline, run_pipeline

    config = MixtralConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1792, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
    )
    program = run_pipeline(load(config, dtype="float32"), parse_pipeline("canonicalize,fuse-moe,dce")).program
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(1, 256), dtype=np.int64)
    medians = {}
    with tempfile.TemporaryDirectory(prefix="moec-moe-cost-") as directory:
        for lowering in ("ootb", "plugin"):
            out = Path(directory) / lowering
            options = build_options(
                moe_plugin=lowering == "plugin", targets=target, max_batch=1, max_seq=256, keep_onnx=True
            )
            build_engines(program, out, options, progress=lambda line: None)
            session = onnxruntime_session(out / "onnx" / "rank0.onnx")
            session.run(None, {"input_ids": ids})
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                session.run(None, {"input_ids": ids})
                times.append(time.perf_counter() - started)
            medians[lowering] = statistics.median(times)
    return [
        f"- Command: `PYTHONPATH=. python bench/tensorrt_build.py --moe-cost --repeats {repeats}` "
        f"(median of {repeats})",
        "",
        "| MoE form (ONNX parsed by the build) | onnxruntime CPU ms, batch 1 x seq 256 | ratio to routed |",
        "|---|---|---|",
        f"| ootb (all 8 experts on every token) | {medians['ootb'] * 1e3:.1f} | "
        f"{medians['ootb'] / medians['plugin']:.2f} |",
        f"| plugin node → com.microsoft::MoE (routed, top-2) | {medians['plugin'] * 1e3:.1f} | 1.00 |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["full", "tiny"], default="full")
    parser.add_argument("--lowerings", default="ootb,plugin")
    parser.add_argument("--target", default="sm89")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--markdown", metavar="FILE", help="append the table to FILE")
    parser.add_argument("--moe-cost", action="store_true", help="time the two MoE forms in onnxruntime instead")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.model, args.child, args.target, args.out)
        return
    if args.moe_cost:
        print("\n".join(_moe_cost(args.target, args.repeats)))
        return
    gib = 1024**3
    rows = []
    for lowering in args.lowerings.split(","):
        runs = [_run(args.model, lowering, args.target) for _ in range(args.repeats)]
        print(json.dumps({"lowering": lowering, "runs": runs}), flush=True)

        def median(key: str) -> float:
            return statistics.median(float(run[key]) for run in runs)

        rows.append(
            f"| {lowering} | {median('prepare_s'):.1f} | {median('export_s'):.1f} | {median('trt_parse_s'):.1f} | "
            f"{median('trt_build_s'):.1f} | {median('trt_peak_rss') / gib:.2f} | {median('moec_peak_rss') / gib:.2f} | "
            f"{int(median('engine_bytes')):,} | {int(median('layers'))} |"
        )
    trt = runs[0]["tensorrt"]
    lines = [
        f"- Machine: {platform.machine()} CPU, {os.cpu_count()} cores (shared), no GPU, "
        f"Python {platform.python_version()}, "
        f"{trt['flavour']} {trt['version']}",
        "- Date: 2026-11-27",
        f"- Command: `PYTHONPATH=. python bench/tensorrt_build.py --model {args.model} --lowerings {args.lowerings} "
        f"--target {args.target} --repeats {args.repeats}`",
        f"- Medians of {args.repeats} fresh process(es); weight bytes {runs[0]['weight_bytes']:,}",
        "",
        "| MoE lowering | trace+passes s | ONNX export s | TRT parse s | TRT parse+build s | TRT peak RSS GiB "
        "| moec peak RSS GiB | engine bytes | network layers |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
