"""ONNX export of any moec program (as traced, canonical, fused), verified with onnxruntime.

    from backends.onnx import export_onnx
    export_onnx(compiled, "out/model.onnx", after="fuse-moe", moe="ootb")   # one .onnx + model.onnx.data
    export_onnx(program, "out/raw.onnx")                                     # a Program directly

Opset 23 (the first with `Attention`, `RMSNormalization` and `RotaryEmbedding`); `com.microsoft` opset 1 is
imported only for `moe="ort"`, `trt.plugins` only for `moe="plugin"`. See `export.py` (files, streaming),
`converters.py` (the converter registry), `aten_ops.py` and `canonical_ops.py` (op mapping), `moe.py` (the three
MoE modes), `quantized.py` (the weight-only quantized ops, weights kept compact), `fp8.py` (the FP8 ops as Q/DQ) and `ranks.py` (every rank of a
sharded program, split at its collectives, exported and simulated together on onnxruntime).

CLI glue (`moec compile SOURCE --passes ... --export-onnx-after NAME|all --onnx-dir DIR [--moe-export MODE]`):
`add_onnx_cli_arguments(parser)` adds the flags, `handle_onnx_cli(args, traced, history)` writes the files (with
`all`, programs the MoE mode cannot take, e.g. FP8 experts with `ort`, are named on stderr and skipped). A
program with KV caches exports as a past/present decoder (`cached.py`), which `decoder.py` generates from in
onnxruntime and describes for onnxruntime-genai.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backends.onnx.context import OnnxExportError
from backends.onnx.export import DECOMPOSABLE, OPSET, OnnxExport, export_program, unexportable_reason
from backends.onnx.moe import MOE_MODES
from compiler.errors import MoecError
from compiler.ir import Program

__all__ = [
    "DECOMPOSABLE",
    "MOE_MODES",
    "OPSET",
    "OnnxExport",
    "OnnxExportError",
    "add_onnx_cli_arguments",
    "export_onnx",
    "handle_onnx_cli",
]


def _select_program(source: Any, after: str | None) -> Program:
    if isinstance(source, Program):
        if after is not None:
            raise OnnxExportError(f"after={after!r} needs a compiled model; a Program is exported as it is")
        return source
    if hasattr(source, "graph_after"):
        return source.program if after is None else source.graph_after(after)
    raise OnnxExportError(f"cannot export a {type(source).__name__}; pass a Program or a CompiledModel")


def export_onnx(
    source: Any,
    path: str | os.PathLike[str],
    moe: str = "ootb",
    after: str | None = None,
    decompose: Sequence[str] = (),
    genai: bool = False,
) -> OnnxExport:
    """Exports a Program, or a CompiledModel's program after pass `after` (`"trace"` = as traced; None = final).

    A program with KV caches becomes a past/present decoder (`cached.py`); `genai=True` also writes onnxruntime-genai's
    `genai_config.json` beside it, and a CompiledModel's tokenizer files (`decoder.write_genai_config`).

    Raises `MoecError` naming the cause: a pass not in the pipeline, an unknown MoE mode, an op without a
    converter, an unwritable path, or `genai=True` for a program without KV caches or with moe="plugin".
    """
    program = _select_program(source, after)
    if genai and not program.cache_nodes():
        raise OnnxExportError("genai=True describes a decoder: export a program after kv-cache")
    if genai and moe == "plugin":
        raise OnnxExportError(
            "genai=True: onnxruntime-genai cannot run trt.plugins::MoE; export with moe='ootb' or 'ort'"
        )
    exported = export_program(program, path, moe=moe, decompose=tuple(decompose))
    if genai:
        from backends.onnx.decoder import write_genai_config

        write_genai_config(program, exported.path, getattr(source, "tokenizer", None))
    return exported


def add_onnx_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `--export-onnx-after NAME|all`, `--onnx-dir DIR` and `--moe-export MODE` to `moec compile`."""
    group = parser.add_argument_group("ONNX export")
    group.add_argument(
        "--export-onnx-after",
        metavar="NAME",
        action="append",
        help="write the graph after pass NAME ('trace' = as traced, 'all' = after every pass) as ONNX; repeatable",
    )
    group.add_argument("--onnx-dir", metavar="DIR", help="where the .onnx files go (needed by --export-onnx-after)")
    group.add_argument("--moe-export", choices=MOE_MODES, default="ootb", help="how moec.moe is exported")


def _file_name(index: int, spec: str) -> str:
    return f"{index:02d}-{re.sub(r'[^A-Za-z0-9_.=-]+', '_', spec).strip('_')}.onnx"


def handle_onnx_cli(args: argparse.Namespace, traced: Program, history: Sequence[Any]) -> list[OnnxExport]:
    """Writes the ONNX files `args` asks for; `history` is `run_pipeline(...).history` (PassRecords)."""
    wanted = args.export_onnx_after or []
    if not wanted:
        return []
    if not args.onnx_dir:
        raise MoecError("--export-onnx-after needs --onnx-dir DIR")
    stages: list[tuple[int, str, Program]] = [(0, "trace", traced)]
    stages += [(record.index, record.spec, record.program) for record in history]
    if "all" in wanted:
        selected = stages
    else:
        selected = []
        for name in wanted:
            matches = [stage for stage in stages if name in (stage[1], stage[1].split("{")[0])]
            if not matches:
                ran = ", ".join(spec for _, spec, _ in stages[1:]) or "none"
                raise MoecError(f"--export-onnx-after {name!r}: no such pass in the pipeline (passes run: {ran})")
            selected.append(matches[-1])
    if "all" in wanted:
        # "all" means every program that can be exported; the rest are named, not silently dropped.
        exportable = []
        for index, spec, program in selected:
            reason = unexportable_reason(program, args.moe_export)
            if reason is None:
                exportable.append((index, spec, program))
            else:
                print(f"skipped ONNX export of {_file_name(index, spec)}: {reason}", file=sys.stderr)
        selected = exportable
    directory = Path(args.onnx_dir)
    return [
        export_program(program, directory / _file_name(index, spec), moe=args.moe_export)
        for index, spec, program in selected
    ]
