"""The package `compiler` is the public API: `import compiler; compiler.compile(...)`, `from compiler import load`,
each name the very object its module defines, resolved on first use so that `import compiler` stays cheap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compiler
from tests.models import TINY_CONFIGS, hf_model, input_ids, max_rel_err

REPO = Path(__file__).resolve().parents[2]
PUBLIC = ["CompiledModel", "MoecError", "Pass", "PassResult", "compile", "load", "register_pass"]


def test_public_names_are_the_defining_modules_objects() -> None:
    import compiler.api
    import compiler.errors
    import compiler.pass_manager

    assert sorted(compiler.__all__) == PUBLIC
    defined_in = {
        "compile": compiler.api, "load": compiler.api, "CompiledModel": compiler.api, "MoecError": compiler.errors,
        "Pass": compiler.pass_manager, "PassResult": compiler.pass_manager, "register_pass": compiler.pass_manager,
    }
    for name, module in defined_in.items():
        assert getattr(compiler, name) is getattr(module, name), name
    assert set(PUBLIC) <= set(dir(compiler))
    with pytest.raises(AttributeError, match="module 'compiler' has no attribute 'compiled'"):
        compiler.compiled  # noqa: B018 - a typo must not resolve to anything


def test_import_compiler_loads_neither_torch_nor_the_driver() -> None:
    # Every `compiler.*` import runs the package first, the TensorRT build worker's included.
    script = "import sys, compiler; print(sorted(m for m in ('torch', 'compiler.api', 'passes') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_compile_through_the_package_matches_hugging_face() -> None:
    config = TINY_CONFIGS[1]
    compiled = compiler.compile(hf_model(config), passes=["canonicalize", "fuse-moe", "dce"])
    assert isinstance(compiled, compiler.CompiledModel)
    ids = input_ids(config, batch=1, seq=3)
    with torch.no_grad():
        expected = hf_model(config)(ids).logits
    logits = compiled(ids)
    assert logits.shape == (1, 3, config.vocab)
    assert max_rel_err(logits, expected) <= 1e-5
    with pytest.raises(compiler.MoecError, match="unknown backend 'onnx'; available: torch, tensorrt"):
        compiler.compile("tiny", backend="onnx")
