"""Compiling and exporting the same model twice gives the same bytes: printed graphs (after every pass, and per
rank), ONNX files and their external data files. Golden files and graph diffs rely on it.

The second compile runs in a fresh interpreter with another string hash seed, so names or orders that come from
object ids or set iteration would differ there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PIPELINE = "canonicalize,fuse-moe,fold-weights,cse,dce"
SHARDED = "canonicalize,fuse-moe,shard{tp=2,moe_ep=2},dce"


def compile_and_export(out: Path) -> None:
    """Writes the printed graphs of three pipelines (per pass, per rank) and two ONNX exports of one tiny model."""
    from backends.onnx import export_onnx
    from compiler.api import DEFAULT_PIPELINE, CompiledModel, load
    from compiler.pass_manager import parse_pipeline, run_pipeline
    from tests.models import TINY_CONFIGS, hf_model

    out.mkdir(parents=True)
    traced = load(hf_model(TINY_CONFIGS[0]))
    (out / "00-trace.txt").write_text(traced.format())
    result = run_pipeline(traced, parse_pipeline(PIPELINE))
    for record in result.history:
        (out / f"{record.index:02d}-{record.name}.txt").write_text(record.program.format())
    compiled = CompiledModel(result.program, traced, result.history)
    export_onnx(compiled, out / "ootb.onnx", moe="ootb")
    export_onnx(compiled, out / "plugin.onnx", after="fuse-moe", moe="plugin")
    sharded = run_pipeline(traced, parse_pipeline(SHARDED)).program
    for rank, program in enumerate(sharded.ranks):
        (out / f"sharded.rank{rank}.txt").write_text(program.format())
    for record in run_pipeline(traced, parse_pipeline(DEFAULT_PIPELINE)).history:
        (out / f"default.{record.index:02d}-{record.name}.txt").write_text(record.program.format())


@pytest.mark.slow
def test_compiling_and_exporting_twice_gives_identical_bytes(tmp_path: Path) -> None:
    compile_and_export(tmp_path / "first")
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from tests.compiler.test_determinism import "
         "compile_and_export; compile_and_export(Path(sys.argv[1]))", str(tmp_path / "second")],
        cwd=REPO, env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}, check=True, timeout=300,
        capture_output=True,
    )
    first = sorted(p.name for p in (tmp_path / "first").iterdir())
    assert first == sorted(p.name for p in (tmp_path / "second").iterdir())
    assert {"ootb.onnx", "ootb.onnx.data", "plugin.onnx", "plugin.onnx.data", "sharded.rank1.txt"} <= set(first)
    different = [
        name for name in first if (tmp_path / "first" / name).read_bytes() != (tmp_path / "second" / name).read_bytes()
    ]
    assert different == []
