"""ONNX export of programs with KV caches from the CLI glue: `--export-onnx-after all` exports every program,
the cached ones as past/present decoders (their numerics: test_onnx_decoder.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx_graphsurgeon")

from backends.onnx import add_onnx_cli_arguments, handle_onnx_cli  # noqa: E402
from compiler.api import CompiledModel  # noqa: E402
from compiler.pass_manager import parse_pipeline, run_pipeline  # noqa: E402
from tests.models import TINY_CONFIGS, traced  # noqa: E402


def _compiled(pipeline: str) -> CompiledModel:
    program = traced(TINY_CONFIGS[1], torch.float32)
    result = run_pipeline(program, parse_pipeline(pipeline))
    return CompiledModel(result.program, program, result.history)


def test_export_after_all_exports_the_cached_programs_as_decoders(tmp_path: Path) -> None:
    model = _compiled("canonicalize,fuse-moe,kv-cache,dce")
    parser = argparse.ArgumentParser()
    add_onnx_cli_arguments(parser)
    args = parser.parse_args(["--export-onnx-after", "all", "--onnx-dir", str(tmp_path), "--moe-export", "ort"])
    exports = handle_onnx_cli(args, model.traced, model.history)
    names = ["00-trace.onnx", "01-canonicalize.onnx", "02-fuse-moe.onnx", "03-kv-cache.onnx", "04-dce.onnx"]
    assert [e.path.name for e in exports] == names
    for export in exports:
        onnx.checker.check_model(str(export.path), full_check=True)
        inputs = [i.name for i in onnx.load(str(export.path), load_external_data=False).graph.input]
        cached = export.path.name in names[3:]
        expected = ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value"]
        assert inputs == (expected if cached else ["input_ids"])
