"""`moec run` with text in and text out on the embedded `tiny`, against Hugging Face's own `generate`."""

from __future__ import annotations

import contextlib
import csv
import io
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from compiler.cli import main
from frontends.hf.source import EMBEDDED_MODELS_DIR

TINY_DIR = EMBEDDED_MODELS_DIR / "tiny"
PROMPTS = ["The list", "Return a new dictionary"]


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


@lru_cache(maxsize=None)
def _hf():
    from transformers import AutoTokenizer, MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(TINY_DIR).eval(), AutoTokenizer.from_pretrained(TINY_DIR)


@torch.no_grad()
def _hf_greedy_text(prompt: str, new_tokens: int) -> tuple[str, list[int]]:
    model, tokenizer = _hf()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    generated = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in generated:
        generated = generated[: generated.index(tokenizer.eos_token_id) + 1]
    return tokenizer.decode(generated, skip_special_tokens=True), generated


def test_text_in_text_out_equals_hugging_face_generate(tmp_path: Path) -> None:
    output_csv = tmp_path / "out.csv"
    status, out, err = _cli(
        "run", "tiny", "--input-text", *PROMPTS, "--max-output-len", "16", "--print-ids", "--output_csv", str(output_csv)
    )
    assert status == 0, err
    lines = out.splitlines()
    rows = list(csv.reader(output_csv.open()))
    for index, prompt in enumerate(PROMPTS):
        text, ids = _hf_greedy_text(prompt, 16)
        assert f"Input [Text {index}]: {prompt!r}" in lines
        assert f"Output [Text {index}]: {text!r}" in lines
        assert [int(t) for t in rows[index]] == ids
        assert "  output ids: " + " ".join(map(str, ids)) in lines
        assert any(line.startswith(f"  [Text {index}] {len(ids)} tokens, time to first token ") for line in lines)


def test_input_file_and_streaming(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The list\n\n")
    status, out, err = _cli("run", "tiny", "--input-file", str(prompts), "--max-output-len", "8", "--streaming")
    assert status == 0, err
    text, _ = _hf_greedy_text("The list", 8)
    assert out.startswith(text + "\n")  # streamed as it came, then the summary
    assert f"Output [Text 0]: {text!r}" in out.splitlines()


def test_seeded_sampling_is_reproducible_and_differs_from_greedy() -> None:
    argv = ["run", "tiny", "--input-text", "The list", "--max-output-len", "24", "--top-k", "50", "--temperature", "1.5"]
    first = _cli(*argv, "--random-seed", "7")
    again = _cli(*argv, "--random-seed", "7")
    assert first[0] == again[0] == 0
    outputs = [line for line in first[1].splitlines() if line.startswith("Output")]
    assert outputs == [line for line in again[1].splitlines() if line.startswith("Output")]
    greedy, _ = _hf_greedy_text("The list", 24)
    assert outputs != [f"Output [Text 0]: {greedy!r}"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tiny", "--input-text", "  "], "--input-text prompt 0 is empty"),
        (["tiny", "--input-ids", "1 2", "--max-new-tokens", "-3"], "--max-output-len must be >= 0, got -3"),
        (["tiny", "--input-text", "a", "--top-p", "1.5"], "--top-p must lie in [0, 1], got 1.5"),
        (["tiny", "--input-text", "a", "--temperature", "-1"], "--temperature must be positive, got -1.0"),
        (["tiny", "--input-text", "a", "--end-id", "5000"], "--end-id 5000 is outside the vocabulary [0, 3072)"),
        (["tiny", "--input-text", "a", "--input-ids", "1"], "give exactly one of --input-text, --input-file or --input-ids"),
        (["tiny", "--input-file", "/nonexistent/prompts.txt"], "input file /nonexistent/prompts.txt does not exist"),
        (["tiny-random", "--input-text", "a"],
         "tiny-random has no tokenizer, so --input-text cannot be read; give --tokenizer-dir DIR or --input-ids"),
        (["tiny", "--input-text", "a", "--max-output-len", "2000"],
         "the longest prompt (2 tokens) + max_new_tokens (2000) = 2002 exceeds the KV cache's max_seq 1024; "
         "compile with kv-cache{max_seq=2002}"),
    ],
)
def test_bad_input_is_one_error(argv: list[str], message: str) -> None:
    status, out, err = _cli("run", *argv)
    assert status == 2
    assert out == ""
    assert [line for line in err.splitlines() if not line.startswith(("tracing ", "traced in ", "weights"))][-1:] == [
        f"moec: error: {message}"
    ]


def test_tokenizer_dir_overrides_the_checkpoints(tmp_path: Path) -> None:
    """A checkpoint directory without a tokenizer reads text through --tokenizer-dir (run.py's --tokenizer_dir)."""
    model, _ = _hf()
    model.save_pretrained(tmp_path)
    status, out, err = _cli("run", str(tmp_path), "--input-text", "The list", "--tokenizer_dir", str(TINY_DIR),
                            "--max-output-len", "6")
    assert status == 0, err
    assert f"Output [Text 0]: {_hf_greedy_text('The list', 6)[0]!r}" in out.splitlines()
