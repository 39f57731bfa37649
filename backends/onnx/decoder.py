"""Generate from an exported decoder (`cached.py`'s past/present form) in onnxruntime, and describe it for
onnxruntime-genai.

    decoder = OnnxDecoder("out/model.onnx")
    result = greedy_generate(decoder, [[1, 2, 3], [4, 5]], max_new_tokens=16)   # prompts of different lengths
    result.sequences        # each prompt + its greedy tokens (up to its EOS)
    write_genai_config(program, "out/model.onnx", tokenizer)                    # out/genai_config.json (+ tokenizer)

The loop follows onnxruntime-genai's and Hugging Face's convention: prompts are LEFT-padded to the longest,
attention_mask [batch, past + seq] is 0 on padding slots, position_ids count real tokens from 0 (padding gets 0),
the caches start empty ([batch, kv_heads, 0, head_dim]) and every step's present becomes the next step's past. A
sequence that has emitted EOS keeps stepping on the pad token (its tokens are dropped). The file's `moec.max_seq`
metadata (the kv-cache pass's max_seq) bounds prompt + generated tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends.onnx.cached import ATTENTION_MASK, POSITION_IDS
from backends.onnx.export import MAX_SEQ_METADATA, session_options
from compiler.errors import MoecError
from compiler.ir import Program

_NUMPY = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}
GENAI_CONFIG = "genai_config.json"
# onnxruntime-genai has no `mixtral` model type; `mistral` describes the same decoder interface (past/present,
# attention_mask, position_ids; Mixtral is Mistral with MoE MLPs, which the graph holds, not the type).
GENAI_MODEL_TYPE = "mistral"


class OnnxDecoderError(MoecError):
    """An ONNX file cannot be generated from (not a decoder export, a plugin-mode graph, a too long generation)."""


@dataclass(frozen=True)
class _Cache:
    name: str  # past_key_values.{i}.key / .value
    kv_heads: int
    head_dim: int
    dtype: Any


class OnnxDecoder:
    """One onnxruntime session over a decoder export; `step` runs it once."""

    def __init__(
        self, path: str | os.PathLike[str], providers: Sequence[str] = ("CPUExecutionProvider",), run: bool = True
    ) -> None:
        import onnxruntime

        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxDecoderError(f"{self.path} does not exist")
        model = onnx.load(str(self.path), load_external_data=False)
        names = [graph_input.name for graph_input in model.graph.input]
        if names[:3] != ["input_ids", ATTENTION_MASK, POSITION_IDS] or not names[3:]:
            raise OnnxDecoderError(
                f"{self.path} is not a decoder export (inputs {', '.join(names)}); export a program after kv-cache"
            )
        plugins = [node for node in model.graph.node if node.domain == "trt.plugins"]
        if plugins:
            raise OnnxDecoderError(
                f"{self.path} holds {len(plugins)} trt.plugins::MoE nodes (moe='plugin', for TensorRT's parser), "
                "which onnxruntime cannot run; export with moe='ootb' or moe='ort'"
            )
        metadata = {entry.key: entry.value for entry in model.metadata_props}
        if MAX_SEQ_METADATA not in metadata:
            raise OnnxDecoderError(f"{self.path} has no {MAX_SEQ_METADATA} metadata: it was not written by moec")
        self.max_seq = int(metadata[MAX_SEQ_METADATA])
        self.caches: list[_Cache] = []
        for graph_input in model.graph.input:
            if not graph_input.name.startswith("past_key_values."):
                continue  # input_ids, attention_mask, position_ids; a rank's segment also takes collective results
            tensor_type = graph_input.type.tensor_type
            dims = [d.dim_value for d in tensor_type.shape.dim]
            if tensor_type.elem_type not in _NUMPY:
                raise OnnxDecoderError(f"{graph_input.name}: cache dtype {tensor_type.elem_type} is not float32/16")
            self.caches.append(_Cache(graph_input.name, dims[1], dims[3], _NUMPY[tensor_type.elem_type]))
        (logits,) = [output for output in model.graph.output if output.name == "logits"]
        self.vocab_size = int(logits.type.tensor_type.shape.dim[-1].dim_value)
        self.session = (
            onnxruntime.InferenceSession(str(self.path), session_options(), providers=list(providers)) if run else None
        )

    @classmethod
    def describe(cls, path: str | os.PathLike[str]) -> OnnxDecoder:
        """The file's caches and max_seq, without an onnxruntime session (a sharded rank's segment)."""
        return cls(path, run=False)

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {c.name: np.zeros((batch, c.kv_heads, 0, c.head_dim), dtype=c.dtype) for c in self.caches}

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(logits [batch, seq, vocab], the next step's past: this step's presents under the past names)."""
        feeds = {"input_ids": input_ids, ATTENTION_MASK: attention_mask, POSITION_IDS: position_ids, **past}
        logits, *presents = self.session.run(None, feeds)
        return logits, {cache.name: present for cache, present in zip(self.caches, presents)}


@dataclass
class GreedyResult:
    sequences: list[list[int]]  # each prompt followed by its generated tokens (up to and including its EOS)
    tokens: np.ndarray  # [batch, steps] int64: the token chosen at every step (pad after a sequence's EOS)
    logits: list[np.ndarray] = field(default_factory=list)  # per step [batch, vocab]: what each token came from


def greedy_generate(
    decoder: OnnxDecoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    streamer: Any = None,
) -> GreedyResult:
    """Prefill the left-padded prompts once, then one decode step per token, choosing the argmax each time.

    `streamer` (Hugging Face's protocol) gets `put(prompts [batch, longest])`, `put(tokens [batch])` per step and
    `end()`."""
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise OnnxDecoderError("give at least one prompt, each with at least one token")
    if max_new_tokens < 0:
        raise OnnxDecoderError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    vocab = decoder.vocab_size
    if any(not 0 <= token < vocab for prompt in prompts for token in prompt):
        raise OnnxDecoderError(f"prompt token ids must lie in [0, {vocab})")
    longest = max(len(prompt) for prompt in prompts)
    if longest + max_new_tokens > decoder.max_seq:
        raise OnnxDecoderError(
            f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {longest + max_new_tokens} "
            f"exceeds the export's max_seq {decoder.max_seq} (its kv-cache pass's max_seq)"
        )
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    batch = len(prompts)
    ids = np.array([[pad] * (longest - len(p)) + list(p) for p in prompts], dtype=np.int64)
    mask = np.array([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    past = decoder.empty_past(batch)
    if streamer is not None:
        streamer.put(ids.copy())
    finished = np.zeros(batch, dtype=bool)
    chosen: list[np.ndarray] = []
    step_logits: list[np.ndarray] = []
    for step in range(max_new_tokens):
        logits, past = decoder.step(ids, mask, positions, past)
        last = logits[:, -1].astype(np.float32)
        tokens = np.where(finished, pad, last.argmax(axis=-1)).astype(np.int64)
        chosen.append(tokens)
        step_logits.append(last)
        if streamer is not None:
            streamer.put(tokens.copy())
        if eos_token_id is not None:
            finished |= tokens == eos_token_id
            if finished.all():
                break
        ids = tokens[:, None]
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
    if streamer is not None:
        streamer.end()
    generated = np.stack(chosen, axis=1) if chosen else np.zeros((batch, 0), dtype=np.int64)
    sequences = []
    for prompt, row in zip(prompts, generated.tolist()):
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        sequences.append(list(prompt) + row)
    return GreedyResult(sequences, generated, step_logits)


def genai_config(program: Program, onnx_path: Path, eos_token_id: int, bos_token_id: int, pad_token_id: int) -> dict:
    """onnxruntime-genai's description (genai_config.json) of a decoder export of `program`."""
    config = program.config
    specs = list(program.cache_specs().values())
    if not specs:
        raise OnnxDecoderError("genai_config.json describes a decoder: export a program after kv-cache")
    max_seq = min(spec.max_seq for spec in specs)
    layers = sorted({spec.layer for spec in specs})
    return {
        "model": {
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "context_length": max_seq,
            "vocab_size": int(config.vocab_size),
            "type": GENAI_MODEL_TYPE,
            "decoder": {
                "filename": onnx_path.name,
                "head_size": specs[0].head_dim,
                "hidden_size": int(config.hidden_size),
                "num_attention_heads": int(config.num_attention_heads),
                "num_key_value_heads": specs[0].kv_heads,
                "num_hidden_layers": len(layers),
                "session_options": {"log_id": "moec", "provider_options": []},
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": ATTENTION_MASK,
                    "position_ids": POSITION_IDS,
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "max_length": max_seq,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
            "length_penalty": 1.0,
            "early_stopping": True,
        },
    }


def write_genai_config(
    program: Program,
    onnx_path: str | os.PathLike[str],
    tokenizer: Any = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> Path:
    """Writes genai_config.json beside `onnx_path` (and the tokenizer's files, when given); returns its path.

    The token ids come from the tokenizer (else the arguments, else the model config's; pad falls back to EOS).
    onnxruntime-genai marks a prompt slot as padding when it holds `pad_token_id`; with pad == EOS (0.18) it did not
    mask left padding in our tests, so batches of different lengths want a pad id of their own."""
    onnx_path = Path(onnx_path)
    config = program.config

    def token(name: str, fallback: int | None) -> int:
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        value = value if value is not None else fallback
        value = value if value is not None else getattr(config, name, None)
        return int(value) if value is not None else 0

    eos = token("eos_token_id", eos_token_id)
    pad = token("pad_token_id", pad_token_id if pad_token_id is not None else eos)
    described = genai_config(program, onnx_path, eos, token("bos_token_id", None), pad)
    path = onnx_path.with_name(GENAI_CONFIG)
    path.write_text(json.dumps(described, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(onnx_path.parent))
    return path
