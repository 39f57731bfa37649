"""TensorRT backend: one engine per rank, built from the graph's ONNX export; MoE as a plugin or out of the box.

    moec build tiny --output-dir out/tiny-trt --dtype float16 --target sm89 --moe-plugin enable

    from backends.tensorrt import build_engines, build_options, load_engines
    summary = build_engines(program, "out/tiny-trt", build_options(moe_plugin=True, targets="sm89"), dtype="float16")
    model = load_engines("out/tiny-trt")        # on a machine whose TensorRT supports its GPU; else EngineRunError

A backend takes a program and options and returns engines: tracing and running passes is the driver's job
(`moec build` lives in `compiler/build_cli.py`, `compile(..., backend="tensorrt")` in `compiler/api.py`).

Modules: `build.py` (export → per-rank child builds → config.json, atomically), `compiler/segments.py` (a sharded
rank split at its collectives into consecutive engines + runtime steps), `worker.py` (parse + builder config, one
engine), `plugin.py` (the Python IPluginV3 `MoE`, namespace `moec`), `verify.py` (run the parsed ONNX in
onnxruntime; all ranks simulated), `loader.py` (config.json → engines → logits, torch.distributed between
segments), `runtime.py` (which TensorRT, targets, errors, the `libtensorrt_rtx.so` link).
See README.md.

Works with data-center `tensorrt` or `tensorrt_rtx` (`pip install tensorrt-rtx-cu13`), whichever imports
(`MOEC_TENSORRT` picks one). TensorRT-RTX builds on a machine without a GPU for SM75/80/86/89/120/121.

At run time, engines built with `--moe-plugin enable` need `backends.tensorrt.plugin.register_moe_plugin()` called
in the process before deserializing (`load_engines` does it): the plugin is Python code, not part of the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from compiler.errors import MoecError

if TYPE_CHECKING:
    from backends.tensorrt.build import BuildOptions

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

__all__ = sorted([*_EXPORTS, "build_options"])


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
