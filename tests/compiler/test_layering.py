"""Imports point down moec's three floors (STYLE.md, "Layers"), read from the source with `ast`.

    IR core  (compiler/*: ir, weights, ops, pass_manager, verifier, errors, collectives, segments, rewrite)
      ^  frontends/, passes/, backends/     each knows only the core (a backend's subpackages may share code)
      ^  driver (compiler/api.py, compiler/cli.py, the `moec build`/`moec run` modules compiler/build_cli.py and
         compiler/run_cli.py, `--check-numerics`' compiler/numerics.py and compiler/rank_processes.py, and the
         `compiler` package's facade)

Every import counts: module level, inside functions, under `if TYPE_CHECKING:`, and `importlib.import_module`
with a literal name. `from compiler import ops` imports the module `compiler.ops`; `from compiler import compile`
imports the facade `compiler`, which re-exports the driver.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The driver: the only modules that may import everything. `compiler` is the package's `__init__`, whose lazy
# re-exports (`compiler.compile`, ...) resolve to `compiler.api`.
DRIVER_MODULES = frozenset(
    {
        "compiler", "compiler.api", "compiler.cli", "compiler.build_cli", "compiler.run_cli", "compiler.numerics",
        "compiler.rank_processes",
    }
)
MIDDLE_PACKAGES = ("frontends", "passes", "backends")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_repo_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, wherever it sits, each once."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((node.lineno, submodule if _is_repo_module(submodule) else base))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return list(dict.fromkeys(found))  # `from compiler.api import a, b` is one import of compiler.api


def _sources(*packages: str) -> list[Path]:
    return sorted(path for package in packages for path in (REPO / package).rglob("*.py"))


def layering_violations() -> list[str]:
    """One line (`path:line: what`) per import that points up a floor, or sideways between middle packages."""
    violations = []
    for path in _sources("compiler", *MIDDLE_PACKAGES):
        module = _module_name(path)
        where = path.relative_to(REPO)
        for line, imported in imports_of(path):
            top = _top(imported)
            if _top(module) == "compiler":
                if module in DRIVER_MODULES:
                    continue
                if top in MIDDLE_PACKAGES:
                    violations.append(f"{where}:{line}: the IR core imports {imported}")
                elif imported in DRIVER_MODULES:
                    violations.append(f"{where}:{line}: the IR core imports the driver ({imported})")
            elif imported in DRIVER_MODULES:
                violations.append(f"{where}:{line}: {_top(module)}/ imports the driver ({imported})")
            elif top in MIDDLE_PACKAGES and top != _top(module):
                violations.append(f"{where}:{line}: {_top(module)}/ imports {imported}, a package of its own floor")
    return violations


def test_imports_point_down_the_floors() -> None:
    assert layering_violations() == []


def test_every_package_is_on_a_floor() -> None:
    # A new top-level package must be placed on a floor here, or the test above would not look at it.
    packages = sorted(p.name for p in REPO.iterdir() if (p / "__init__.py").is_file() and p.name != "tests")
    assert packages == sorted(["compiler", *MIDDLE_PACKAGES])
    assert all(_is_repo_module(module) for module in DRIVER_MODULES)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from compiler.api import load\n", "1: backends/ imports the driver (compiler.api)"),
        ("def f():\n    from compiler import cli\n", "2: backends/ imports the driver (compiler.cli)"),
        ("def f():\n    from compiler import compile\n", "2: backends/ imports the driver (compiler)"),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import compiler.build_cli\n",
         "3: backends/ imports the driver (compiler.build_cli)"),
        ("from passes.shard import Shard\n", "1: backends/ imports passes.shard, a package of its own floor"),
        ("import importlib\nimportlib.import_module('frontends.hf.trace')\n",
         "2: backends/ imports frontends.hf.trace, a package of its own floor"),
    ],
)
def test_a_backend_importing_upward_or_sideways_is_caught(
    source: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _plant(tmp_path, monkeypatch, "backends/planted.py", source)
    assert layering_violations() == [f"backends/planted.py:{expected}"]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def f():\n    from backends.torch.runtime import TorchExecutable\n",
         "2: the IR core imports backends.torch.runtime"),
        ("import passes\n", "1: the IR core imports passes"),
        ("from frontends.hf import trace\n", "1: the IR core imports frontends.hf.trace"),
        ("from compiler import compile\n", "1: the IR core imports the driver (compiler)"),
        ("from . import api\n", "1: the IR core imports the driver (compiler.api)"),
    ],
)
def test_the_core_importing_upward_is_caught(
    source: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _plant(tmp_path, monkeypatch, "compiler/planted.py", source)
    assert layering_violations() == [f"compiler/planted.py:{expected}"]


def test_core_and_same_package_imports_are_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = "from compiler import ops\nimport compiler.errors\nfrom backends.torch import kernels\n"
    _plant(tmp_path, monkeypatch, "backends/planted.py", source)
    _plant(tmp_path, monkeypatch, "compiler/build_cli.py", "from backends.tensorrt import build_engines\n")
    assert layering_violations() == []


def _plant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relative: str, source: str) -> None:
    """Points the checks at a copy of the repository's packages in `tmp_path`, with `relative` written as `source`."""
    if not (tmp_path / "compiler").exists():
        for package in ("compiler", *MIDDLE_PACKAGES):
            shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / relative).write_text(source)
    monkeypatch.setitem(globals(), "REPO", tmp_path)
