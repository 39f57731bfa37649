"""Decoder export (a program after kv-cache): exact genai input/output names and shapes, the full ONNX check, and
prefill + 16 greedy decode steps in onnxruntime equal to the torch backend's `generate` (same tokens, per-step
logits within 1e-4), batch 2 with prompts of different lengths, for every onnxruntime-runnable MoE mode, both
attention forms, a float16 cache and three sharded layouts; `moec run --onnx`; onnxruntime-genai generates from the
exported directory; bad input is one clear error."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_graphsurgeon")

from backends.onnx import export_onnx  # noqa: E402
from backends.onnx.decoder import OnnxDecoder, OnnxDecoderError, greedy_generate, write_genai_config  # noqa: E402
from backends.torch.runtime import TorchExecutable  # noqa: E402
from compiler.generation import generate  # noqa: E402
from compiler.ir import Program  # noqa: E402
from compiler.pass_manager import parse_pipeline, run_pipeline  # noqa: E402
from tests.models import TINY_CONFIGS, TinyConfig, input_ids, max_rel_err, traced  # noqa: E402

PIPELINE = "canonicalize,fuse-moe,kv-cache{max_seq=64},dce"
STEPS = 16
TOLERANCE = 1e-4


@lru_cache(maxsize=None)
def cached_program(config: TinyConfig) -> Program:
    return run_pipeline(traced(config), parse_pipeline(PIPELINE)).program


def _prompts(config: TinyConfig) -> list[list[int]]:
    return [input_ids(config, 1, 7)[0].tolist(), input_ids(config, 1, 3, seed=2)[0].tolist()]


class _Recording:
    """The torch executable as a `Decoder` that keeps every step's logits."""

    def __init__(self, executable: TorchExecutable) -> None:
        self.executable = executable
        self.vocab_size = executable.vocab_size
        self.device = torch.device("cpu")
        self.max_seq = executable.max_seq
        self.steps: list[torch.Tensor] = []

    def new_session(self, batch: int) -> Any:
        inner = self.executable.new_session(batch)
        recording = self

        class Session:
            def step(self, ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
                logits = inner.step(ids, cache_position)
                recording.steps.append(logits)
                return logits

        return Session()


def torch_reference(
    program: Program, prompts: list[list[int]], steps: int = STEPS
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """torch `generate`'s sequences and the logits each generated token was chosen from."""
    recorder = _Recording(TorchExecutable(program))
    sequences = generate(recorder, prompts, steps)
    prefill, *decodes = recorder.steps
    last = torch.tensor([len(p) - 1 for p in prompts])
    chosen_from = [prefill[torch.arange(len(prompts)), last]] + [logits[:, -1] for logits in decodes]
    return sequences, chosen_from


DECODER_CASES = [
    (TINY_CONFIGS[0], "ootb", ()),
    (TINY_CONFIGS[0], "ort", ()),
    (TINY_CONFIGS[0], "ootb", ("attention", "rms_norm", "rope")),
    (TINY_CONFIGS[2], "ort", ()),  # sliding window 3, top-3 of 6 experts, 3 layers
    (TINY_CONFIGS[2], "ootb", ("attention",)),
    (TINY_CONFIGS[3], "ort", ("attention",)),  # MQA, tied embeddings
]


@pytest.mark.parametrize(
    "config,moe,decompose", DECODER_CASES, ids=[f"{c.id}-{m}-{'dec' if d else 'fused'}" for c, m, d in DECODER_CASES]
)
def test_greedy_decoding_in_onnxruntime_equals_torch_generate(
    config: TinyConfig, moe: str, decompose: tuple[str, ...], tmp_path: Path
) -> None:
    exported = export_onnx(cached_program(config), tmp_path / "model.onnx", moe=moe, decompose=decompose)
    onnx.checker.check_model(str(exported.path), full_check=True)
    prompts = _prompts(config)
    expected_sequences, expected_logits = torch_reference(cached_program(config), prompts)
    result = greedy_generate(OnnxDecoder(exported.path), prompts, STEPS)
    assert result.sequences == expected_sequences
    assert len(result.logits) == len(expected_logits) == STEPS
    for step, (actual, expected) in enumerate(zip(result.logits, expected_logits)):
        assert max_rel_err(torch.from_numpy(actual), expected) <= TOLERANCE, f"step {step}"


def _dims(value: Any) -> list[Any]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_decoder_inputs_and_outputs_have_genai_names_and_shapes(tmp_path: Path) -> None:
    config = TINY_CONFIGS[0]
    exported = export_onnx(cached_program(config), tmp_path / "model.onnx", moe="ort")
    model = onnx.load(str(exported.path), load_external_data=False)
    kv, head = config.kv_heads, config.hidden // config.heads
    expected_inputs = [("input_ids", ["batch", "seq"]), ("attention_mask", ["batch", "total_seq"]),
                       ("position_ids", ["batch", "seq"])]
    expected_outputs = [("logits", ["batch", "seq", config.vocab])]
    for layer in range(config.layers):
        for kind in ("key", "value"):
            expected_inputs.append((f"past_key_values.{layer}.{kind}", ["batch", kv, "past_seq", head]))
            expected_outputs.append((f"present.{layer}.{kind}", ["batch", kv, "total_seq", head]))
    assert [(i.name, _dims(i)) for i in model.graph.input] == expected_inputs
    assert [(o.name, _dims(o)) for o in model.graph.output] == expected_outputs
    int64, f32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [int64] * 3 + [f32] * 2 * config.layers
    assert {entry.key: entry.value for entry in model.metadata_props} == {"moec.max_seq": "64"}
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 23), ("com.microsoft", 1)}
    assert exported.op_types["Attention"] == config.layers  # opset-23 Attention with past/present


def test_plugin_mode_exports_but_onnxruntime_refuses_it(tmp_path: Path) -> None:
    exported = export_onnx(cached_program(TINY_CONFIGS[0]), tmp_path / "model.onnx", moe="plugin")
    onnx.checker.check_model(str(exported.path), full_check=True)
    with pytest.raises(OnnxDecoderError, match=r"holds 2 trt.plugins::MoE nodes .*with moe='ootb' or moe='ort'$"):
        OnnxDecoder(exported.path)


def test_generation_past_max_seq_and_bad_files_are_clear_errors(tmp_path: Path) -> None:
    config = TINY_CONFIGS[1]
    exported = export_onnx(cached_program(config), tmp_path / "model.onnx", moe="ootb")
    decoder = OnnxDecoder(exported.path)
    with pytest.raises(OnnxDecoderError) as error:
        greedy_generate(decoder, [[1] * 60, [2]], 5)
    assert str(error.value) == (
        "the longest prompt (60 tokens) + max_new_tokens (5) = 65 exceeds the export's max_seq 64 (its kv-cache "
        "pass's max_seq)"
    )
    stateless = export_onnx(traced(config), tmp_path / "stateless.onnx")
    with pytest.raises(OnnxDecoderError, match=r"is not a decoder export \(inputs input_ids\); export a program after"):
        OnnxDecoder(stateless.path)
    with pytest.raises(OnnxDecoderError, match=r"prompt token ids must lie in \[0, 96\)"):
        greedy_generate(decoder, [[config.vocab]], 1)


def test_unknown_moe_mode_of_a_cached_program_is_an_error(tmp_path: Path) -> None:
    from backends.onnx.context import OnnxExportError

    with pytest.raises(OnnxExportError, match=r"^unknown MoE export mode 'trt'; choose one of ootb, plugin, ort$"):
        export_onnx(cached_program(TINY_CONFIGS[0]), tmp_path / "model.onnx", moe="trt")
    assert not (tmp_path / "model.onnx").exists()


def _genai_search(og: Any, model: Any, prompts: list[list[int]]) -> list[list[int]]:
    import numpy as np

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompts[0]) + STEPS, do_sample=False, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompts, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [[int(token) for token in generator.get_sequence(index)] for index in range(len(prompts))]


def test_onnxruntime_genai_generates_the_torch_tokens(tmp_path: Path) -> None:
    """The exported directory loads in onnxruntime-genai (model type `mistral`) and its greedy search gives torch
    `generate`'s tokens: each prompt alone (two lengths), and a batch of two prompts of one length. (onnxruntime-genai
    0.18 does not mask left padding of a batch given as token ids: README.)"""
    og = pytest.importorskip("onnxruntime_genai")
    config = TINY_CONFIGS[0]
    program = cached_program(config)
    eos = config.vocab - 1
    exported = export_onnx(program, tmp_path / "model.onnx", moe="ort")
    written = json.loads(write_genai_config(program, exported.path, eos_token_id=eos).read_text())
    assert (written["model"]["type"], written["model"]["context_length"]) == ("mistral", 64)
    assert written["model"]["eos_token_id"] == written["model"]["pad_token_id"] == eos
    assert written["model"]["decoder"]["num_hidden_layers"] == config.layers
    model = og.Model(str(tmp_path))
    reference = TorchExecutable(program)
    short, long = _prompts(config)
    for batch in ([short], [long], [long, input_ids(config, 1, len(long), seed=3)[0].tolist()]):
        expected = generate(reference, batch, STEPS)
        assert _genai_search(og, model, batch) == expected


def test_onnxruntime_genai_continues_tiny_text_like_moec(tmp_path: Path) -> None:
    """`tiny` (a trained model with a tokenizer) exported with genai=True: the directory holds the config and the
    tokenizer, and onnxruntime-genai's greedy text equals moec's. Its tokenizer drops the `<s>` that Hugging Face's
    post-processor prepends (README), so the prompt gets it here."""
    og = pytest.importorskip("onnxruntime_genai")
    from compiler.api import compile

    compiled = compile("tiny", passes="canonicalize,fuse-moe,kv-cache{max_seq=64},dce")
    export_onnx(compiled, tmp_path / "model.onnx", moe="ort", genai=True)
    written = {p.name for p in tmp_path.iterdir()}
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"} <= written
    model = og.Model(str(tmp_path))
    tokenizer = og.Tokenizer(model)
    prompt = [compiled.tokenizer.bos_token_id] + [int(t) for t in tokenizer.encode("The list")]
    assert prompt == compiled.tokenizer("The list")["input_ids"]
    (sequence,) = _genai_search(og, model, [prompt])
    expected = compiled.generate_text(["The list"], STEPS)[0]
    produced = sequence[len(prompt):]
    eos = compiled.tokenizer.eos_token_id
    assert tokenizer.decode(produced[: produced.index(eos)] if eos in produced else produced) == expected


def test_genai_export_of_a_stateless_program_is_an_error(tmp_path: Path) -> None:
    from backends.onnx.context import OnnxExportError

    with pytest.raises(OnnxExportError, match=r"^genai=True describes a decoder: export a program after kv-cache$"):
        export_onnx(traced(TINY_CONFIGS[0]), tmp_path / "model.onnx", genai=True)
    with pytest.raises(OnnxExportError, match=r"^genai=True: onnxruntime-genai cannot run trt.plugins::MoE"):
        export_onnx(cached_program(TINY_CONFIGS[0]), tmp_path / "model.onnx", moe="plugin", genai=True)


SHARDED_CASES = [("shard{tp=2,moe_ep=2}", "ootb"), ("shard{tp=2}", "ort"), ("shard{tp=1,pp=2}", "ort")]


@pytest.mark.parametrize("spec,moe", SHARDED_CASES)
def test_sharded_decoder_ranks_generate_the_unsharded_tokens(spec: str, moe: str, tmp_path: Path) -> None:
    """Every rank's segments exported as decoders (each rank caches its own kv heads or layers), simulated together
    in onnxruntime with numpy collectives: prefill + 16 greedy steps equal the unsharded torch `generate`."""
    from backends.onnx.ranks import RankDecoder, export_ranks

    config = TINY_CONFIGS[0]
    pipeline = PIPELINE.replace("kv-cache", f"{spec},kv-cache")
    sharded = run_pipeline(traced(config), parse_pipeline(pipeline)).program
    exports = export_ranks(sharded, tmp_path, moe=moe)
    decoder = RankDecoder(exports, config.vocab)
    assert len({rank for rank, _ in decoder.caches}) == 2 and decoder.max_seq == 64
    prompts = _prompts(config)
    expected_sequences, expected_logits = torch_reference(cached_program(config), prompts)
    result = greedy_generate(decoder, prompts, STEPS)
    assert result.sequences == expected_sequences
    for step, (actual, expected) in enumerate(zip(result.logits, expected_logits)):
        assert max_rel_err(torch.from_numpy(actual), expected) <= TOLERANCE, f"step {step}"


def test_moec_run_onnx_generates_the_torch_tokens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from compiler import cli
    from compiler.api import compile

    compiled = compile("tiny-random", passes=PIPELINE)
    exported = export_onnx(compiled, tmp_path / "model.onnx", moe="ort")
    prompts = [[1, 2, 3], [4, 5]]
    assert cli.main(["run", "tiny-random", "--onnx", str(exported.path), "--input-ids", "1 2 3; 4 5",
                     "--max-new-tokens", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"onnxruntime: {exported.path}"
    outputs = [[int(t) for t in line.removeprefix("output ids: ").split()] for line in lines if "output ids" in line]
    assert outputs == [sequence[len(prompt):] for prompt, sequence in zip(prompts, compiled.generate(prompts, 8))]
    argv = ["run", "tiny-random", "--onnx", str(exported.path), "--input-ids", "1 2", "--top-k", "4"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "moec: error: --onnx generates greedily: leave --top-k at 1 and --top-p at 0\n"
    argv = ["run", "tiny-random", "--onnx", str(exported.path), "--input-ids", "1 2", "--max-new-tokens", "70"]
    assert cli.main(argv) == 2
    assert "exceeds the export's max_seq 64" in capsys.readouterr().err


@pytest.mark.parametrize("decompose", [(), ("attention",)], ids=["fused", "decomposed"])
def test_a_float16_cache_of_a_float32_model_rounds_like_torch(decompose: tuple[str, ...], tmp_path: Path) -> None:
    config = TINY_CONFIGS[1]
    pipeline = PIPELINE.replace("kv-cache{max_seq=64}", "kv-cache{max_seq=64,dtype=float16}")
    program = run_pipeline(traced(config), parse_pipeline(pipeline)).program
    exported = export_onnx(program, tmp_path / "model.onnx", moe="ootb", decompose=decompose)
    model = onnx.load(str(exported.path), load_external_data=False)
    f16 = onnx.TensorProto.FLOAT16
    assert [i.type.tensor_type.elem_type for i in model.graph.input[3:]] == [f16, f16]
    assert [o.type.tensor_type.elem_type for o in model.graph.output[1:]] == [f16, f16]
    prompts = _prompts(config)
    expected_sequences, expected_logits = torch_reference(program, prompts)
    result = greedy_generate(OnnxDecoder(exported.path), prompts, STEPS)
    assert result.sequences == expected_sequences
    for step, (actual, expected) in enumerate(zip(result.logits, expected_logits)):
        assert max_rel_err(torch.from_numpy(actual), expected) <= TOLERANCE, f"step {step}"
