"""Benchmark: ONNX export of a 2-layer full-width Mixtral (H=4096, I=14336, E=8, vocab 32000, bf16 dummy weights).

Each repeat runs in a fresh process (trace, `canonicalize,fuse-moe,dce`, export), so its peak RSS is its own (read
with `os.wait4`). The baseline is the same process without the export (trace + passes only): the difference is
what exporting costs in memory. The budget is < 8 GB peak RSS.

Dummy weights are per-expert random leaves stacked lazily, i.e. the layout a real checkpoint produces
(`block_sparse_moe.experts.N.w1/w2/w3`), so the exporter streams one expert's matrix at a time. (The `mixtral-8x7b`
preset draws each layer's stacked [8, 28672, 4096] expert tensor as ONE random leaf, whose generation alone needs
~9 GB in float32 before any export code runs.)

    PYTHONPATH=. python bench/onnx_export.py [--repeats 3] [--modes ootb,ort] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import datetime
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

REPO_ROOT = Path(__file__).resolve().parents[1]
BUDGET_RSS_BYTES = 8 * 1024**3
LAYERS = 2


def _source():  # noqa: ANN202 - a frontends.hf.source.ModelSource
    """2-layer Mixtral-8x7B shapes with bfloat16 dummy weights; experts are per-expert random leaves (a checkpoint's
    layout, which `random_weights` produces), so no [8, 28672, 4096] tensor is ever generated whole."""
    from frontends.hf.source import ModelSource, preset_config, random_weights

    config = preset_config("mixtral-8x7b")
    config.num_hidden_layers = LAYERS
    config.dtype = "bfloat16"
    return ModelSource(config, random_weights(config, seed=0), "2-layer mixtral-8x7b shapes, per-expert random weights")


def _child(mode: str, out_dir: str) -> None:
    """One repeat: trace, passes, and (unless mode == 'none') export; prints one JSON line."""
    started = time.perf_counter()
    import passes  # noqa: F401 - fills the pass registry, as the driver does
    from compiler.pass_manager import parse_pipeline, run_pipeline
    from frontends.hf.trace import trace

    program = run_pipeline(trace(_source()), parse_pipeline("canonicalize,fuse-moe,dce")).program
    prepared = time.perf_counter()
    result: dict[str, object] = {"prepare_s": prepared - started, "weight_bytes": program.weight_bytes()}
    if mode != "none":
        from backends.onnx import export_onnx

        exported = export_onnx(program, Path(out_dir) / "model.onnx", moe=mode)
        result.update(
            export_s=time.perf_counter() - prepared,
            onnx_bytes=exported.path.stat().st_size,
            data_bytes=exported.data_path.stat().st_size,
            files=sorted(p.name for p in Path(out_dir).iterdir()),
        )
    print(json.dumps(result))


def _run(mode: str) -> dict[str, object]:
    out_dir = tempfile.mkdtemp(prefix=f"moec-onnx-{mode}-")
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        process = subprocess.Popen(
            [sys.executable, __file__, "--child", mode, "--out", out_dir], stdout=subprocess.PIPE, env=env, cwd=REPO_ROOT
        )
        stdout = process.stdout.read() if process.stdout else b""
        _, status, usage = os.wait4(process.pid, 0)
        if status != 0:
            raise SystemExit(f"child for mode {mode} failed with status {status}")
        result = json.loads(stdout.decode().strip().splitlines()[-1])
        result["peak_rss"] = usage.ru_maxrss * 1024
        return result
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="ootb,ort,plugin")
    parser.add_argument("--markdown", metavar="FILE")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.out)
        return
    runs = {mode: [_run(mode) for _ in range(args.repeats)] for mode in ["none", *args.modes.split(",")]}
    baseline_rss = statistics.median(r["peak_rss"] for r in runs["none"])
    gib = 1024**3
    lines = [
        f"- Machine: {platform.machine()} CPU, {os.cpu_count()} cores (shared), Python {platform.python_version()}",
        f"- Date: {datetime.date(2026, 11, 27).isoformat()}",
        f"- Command: `PYTHONPATH=. python bench/onnx_export.py --repeats {args.repeats} --modes {args.modes}`",
        f"- Model: {LAYERS}-layer Mixtral-8x7B shapes (H=4096, I=14336, E=8, vocab 32000), bf16 dummy weights, "
        f"{runs['none'][0]['weight_bytes']:,} weight bytes; graph after `canonicalize,fuse-moe,dce`",
        f"- Medians of {args.repeats} fresh processes; baseline = trace + passes without export "
        f"(peak RSS {baseline_rss / gib:.2f} GiB, {statistics.median(r['prepare_s'] for r in runs['none']):.1f} s)",
        "",
        "| MoE mode | export s | peak RSS GiB | RSS / baseline | .onnx bytes | .data bytes | files | < 8 GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in args.modes.split(","):
        results = runs[mode]
        rss = statistics.median(r["peak_rss"] for r in results)
        lines.append(
            f"| {mode} | {statistics.median(r['export_s'] for r in results):.1f} | {rss / gib:.2f} | "
            f"{rss / baseline_rss:.2f} | {results[0]['onnx_bytes']:,} | {results[0]['data_bytes']:,} | "
            f"{', '.join(results[0]['files'])} | {'yes' if rss < BUDGET_RSS_BYTES else 'NO'} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
