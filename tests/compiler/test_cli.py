"""The `moec` command line, run in-process through `compiler.cli.main` and once as a real subprocess."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from compiler.cli import main
from compiler.pass_manager import registered_passes
from tests.models import TINY_CONFIGS, hf_model

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_EXPERT_SELECTS = 2 * 4 * 2  # gate_up and down, 4 experts, 2 layers of the tiny-random preset


def _cli(*argv: str) -> tuple[int, str, str]:
    """Runs `moec argv...` in this process; returns (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


@lru_cache(maxsize=None)
def _trace_tiny() -> str:
    status, out, _ = _cli("trace", "tiny-random")
    assert status == 0
    return out


def test_trace_prints_op_counts_then_graph() -> None:
    out = _trace_tiny()
    header, graph = out.split("graph:\n")
    assert header.startswith("# preset tiny-random with random weights (seed 0)\n# weights: ")
    assert "\n# op counts:\n" in header
    assert "#   moec.attention: 2\n" in header
    assert f"#   aten.select.int: {TINY_EXPERT_SELECTS}\n" in header
    lines = graph.splitlines()
    assert lines[-1].startswith("  return ")
    assert all(line.startswith("  %") for line in lines[:-1])
    assert sum("= moec.attention(" in line for line in lines) == 2


def test_trace_is_byte_identical_across_processes() -> None:
    """A second run in a fresh process (the installed console script when there is one) prints the same bytes."""
    command = [shutil.which("moec")] if shutil.which("moec") else [sys.executable, "-m", "compiler.cli"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run(
        [*command, "trace", "tiny-random"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == _trace_tiny()


def test_passes_lists_every_pass_with_its_docstring() -> None:
    status, out, _ = _cli("passes")
    assert status == 0
    assert out.startswith("default pipeline: ")
    for name in ("dce", "cse", "fold-weights"):
        summary = registered_passes()[name].__doc__.strip().splitlines()[0]
        assert f"\n{name}  (no options)\n    {summary}\n" in out


def test_compile_dumps_numbered_graphs_and_prints_after_a_pass(tmp_path: Path) -> None:
    dumps = tmp_path / "dumps"
    status, out, err = _cli(
        "compile", "tiny-random", "--passes", "fold-weights,dce", "--dump-dir", str(dumps), "--print-after", "fold-weights"
    )
    assert status == 0, err
    assert sorted(p.name for p in dumps.iterdir()) == ["00-trace.txt", "01-fold-weights.txt", "02-dce.txt"]
    traced, folded = (dumps / "00-trace.txt").read_text(), (dumps / "01-fold-weights.txt").read_text()
    assert traced == _trace_tiny()
    assert f"aten.select.int: {TINY_EXPERT_SELECTS}" in traced and "aten.select.int" not in folded
    assert out.startswith("== after fold-weights (")
    assert folded in out  # --print-after prints exactly the graph that was dumped
    assert "== pipeline\n 1. fold-weights" in out and "\n 2. dce" in out
    assert "== final graph" not in out
    assert f"wrote 3 graph dumps to {dumps}" in err


@torch.no_grad()
def _hugging_face_greedy(prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding with Hugging Face's model loaded with the tiny-random preset's own random weights."""
    from transformers import MixtralForCausalLM

    from frontends.hf.source import preset_config, random_weights

    config = preset_config("tiny-random")
    model = MixtralForCausalLM(config).eval()
    weights = {name: expr.materialize() for name, expr in random_weights(config, seed=0).items()}
    missing, _ = model.load_state_dict(weights, strict=False)
    assert missing == []
    tokens = torch.tensor([prompt])
    for _ in range(steps):
        next_token = model(tokens).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens[0, len(prompt) :].tolist()


def test_run_decodes_like_hugging_face() -> None:
    status, out, err = _cli("run", "tiny-random", "--input-ids", "1 2 3", "--max-new-tokens", "4")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == "input ids:  1 2 3"
    generated = [int(token) for token in lines[1].removeprefix("output ids: ").split()]
    assert len(generated) == 4
    assert generated == _hugging_face_greedy([1, 2, 3], 4)


def _llama_dir(tmp_path: Path) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64).save_pretrained(tmp_path)
    return tmp_path


def _checkpoint_without_a_shard(tmp_path: Path) -> tuple[Path, str]:
    hf_model(TINY_CONFIGS[0]).save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[-1]
    shard.unlink()
    return tmp_path, shard.name


@pytest.mark.parametrize(
    "case",
    ["unknown-pass", "malformed-options", "print-after-missing-pass", "non-mixtral", "missing-shard", "bad-input-ids"],
)
def test_bad_input_is_one_error_line_and_status_2(case: str, tmp_path: Path) -> None:
    known = ", ".join(registered_passes())
    if case == "unknown-pass":
        argv, message = ["compile", "tiny", "--passes", "dce,nope"], f"unknown pass 'nope'; known passes: {known}"
    elif case == "malformed-options":
        argv, message = ["compile", "tiny", "--passes", "dce{"], "unbalanced '{' in pipeline 'dce{'"
    elif case == "print-after-missing-pass":
        argv = ["compile", "tiny", "--passes", "fold-weights,dce", "--print-after", "cse"]
        message = "pass 'cse' is not in the pipeline (fold-weights, dce)"
    elif case == "non-mixtral":
        argv, message = ["trace", str(_llama_dir(tmp_path))], "moec supports Mixtral models only; got model_type 'llama'"
    elif case == "missing-shard":
        directory, shard = _checkpoint_without_a_shard(tmp_path)
        argv = ["trace", str(directory)]
        message = f"checkpoint shard {shard} listed in model.safetensors.index.json is missing from {directory}"
    else:
        argv, message = ["run", "tiny", "--input-ids", "a b"], "--input-ids must be integers separated by spaces, got 'a b'"
    status, out, err = _cli(*argv)
    assert status == 2
    assert out == ""
    assert "Traceback" not in err
    # Progress lines ("tracing ...") may precede it; the error itself is exactly one line.
    assert [line for line in err.splitlines() if not line.startswith("tracing ")] == [f"moec: error: {message}"]


def test_run_refuses_a_model_larger_than_memory_before_reading_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    page_size = os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(os, "sysconf", lambda name: page_size if name == "SC_PAGE_SIZE" else 100)  # 100 pages
    status, _, err = _cli("run", "tiny", "--input-ids", "1 2 3")
    assert status == 2
    assert err.strip().splitlines()[-1].startswith(
        "moec: error: the compiled model needs 0.0 GB of weights but this machine's memory holds 0.0 GB; shard it"
    )
