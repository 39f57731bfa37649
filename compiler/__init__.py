"""moec's public API: trace a Mixtral, rewrite it with verified passes, run it on a backend.

    import compiler
    compiled = compiler.compile("tiny", passes=["canonicalize", "fuse-moe", "dce"])
    logits = compiled(torch.tensor([[1, 2, 3]]))
    program = compiler.load("mixtral-8x7b")     # trace only

Names are resolved on first use (PEP 562): every `compiler.*` module imports this package first, including the
TensorRT build worker, which must not pay for torch, the frontend and the pass registry that `compiler.api` pulls in.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from compiler.errors import MoecError

if TYPE_CHECKING:
    from compiler.api import CompiledModel, compile, load
    from compiler.pass_manager import Pass, PassResult, register_pass

# Public name → the module that defines it.
_LAZY_EXPORTS = {
    "compile": "compiler.api",
    "load": "compiler.api",
    "CompiledModel": "compiler.api",
    "Pass": "compiler.pass_manager",
    "PassResult": "compiler.pass_manager",
    "register_pass": "compiler.pass_manager",
}

__all__ = ["CompiledModel", "MoecError", "Pass", "PassResult", "compile", "load", "register_pass"]


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        value = getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
