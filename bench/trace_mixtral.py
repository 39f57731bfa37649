"""Benchmark: `moec trace mixtral-8x7b` and the default pipeline on the CPU — wall time and peak RSS.

Each repeat runs in a fresh process (imports, trace, format, default pipeline), so peak RSS is that process's own,
read with `os.wait4`. Prints a markdown table of medians; the budget is < 60 s and < 3 GB peak RSS.

    python bench/trace_mixtral.py [--repeats 3] [--source mixtral-8x7b]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUDGET_SECONDS = 60.0
BUDGET_RSS_BYTES = 3 * 1024**3


def _child(source: str) -> None:
    """One repeat: time each phase and print them as one JSON line."""
    started = time.perf_counter()
    from compiler.api import DEFAULT_PIPELINE, load
    from compiler.pass_manager import parse_pipeline, run_pipeline

    imported = time.perf_counter()
    program = load(source)
    traced = time.perf_counter()
    text = program.format()
    formatted = time.perf_counter()
    result = run_pipeline(program, parse_pipeline(DEFAULT_PIPELINE))
    optimized = time.perf_counter()
    print(
        json.dumps(
            {
                "import_s": imported - started,
                "trace_s": traced - imported,
                "format_s": formatted - traced,
                "pipeline_s": optimized - formatted,
                "pipeline": DEFAULT_PIPELINE,
                "attention_nodes": result.program.op_counts()["moec.attention"],
                "weight_bytes": result.program.weight_bytes(),
                "printed_lines": text.count("\n"),
            }
        )
    )


def _repeat(source: str) -> dict[str, float]:
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [sys.executable, __file__, "--child", "--source", source],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"repeat failed with exit status {process.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux reports kilobytes
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="mixtral-8x7b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.source)
        return
    runs = []
    for index in range(args.repeats):
        runs.append(_repeat(args.source))
        print(f"repeat {index + 1}/{args.repeats}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)

    def median(key: str) -> float:
        return statistics.median(run[key] for run in runs)

    rss_gib = median("peak_rss_bytes") / 1024**3
    print(f"source `{args.source}`, default pipeline `{runs[0]['pipeline']}`, median of {args.repeats} fresh processes\n")
    print("| phase | median | budget | ratio to budget |")
    print("|---|---|---|---|")
    print(f"| imports | {median('import_s'):.2f} s | | |")
    print(f"| trace (`load`) | {median('trace_s'):.2f} s | | |")
    print(f"| format (printed graph, {runs[0]['printed_lines']} lines) | {median('format_s'):.2f} s | | |")
    print(f"| default pipeline | {median('pipeline_s'):.2f} s | | |")
    print(f"| whole process | {median('process_s'):.2f} s | {BUDGET_SECONDS:.0f} s | {median('process_s') / BUDGET_SECONDS:.2f} |")
    print(f"| peak RSS | {rss_gib:.2f} GiB | 3 GiB | {median('peak_rss_bytes') / BUDGET_RSS_BYTES:.2f} |")
    print(
        f"\nmoec.attention nodes: {runs[0]['attention_nodes']}, "
        f"weight bytes (lazy, none read): {runs[0]['weight_bytes']:,}"
    )


if __name__ == "__main__":
    main()
