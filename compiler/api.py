"""`compile()`: trace a Mixtral, run a pass pipeline, bind a backend.

    compiled = compile("tiny")                  # default pipeline: canonicalize,fuse-moe,kv-cache,fuse-qkv,fuse-norm,dce
    logits = compiled(input_ids)                 # runs on the backend
    tokens = compiled.generate(input_ids, 32)    # prefill + cached decode steps (Hugging Face's arguments)
    compiled.graph                               # the final program
    compiled.graph_after("fuse-moe")             # the program after any pass
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compiler.errors import MoecError
from compiler.ir import Program
from compiler.pass_manager import Pass, PassRecord, parse_pipeline, run_pipeline

import passes  # noqa: F401,E402 - the driver fills the pass registry (passes register themselves on import)
from compiler import calibration  # noqa: E402

# Used when `passes` is not given: canonical ops, one `moe` op per layer, attention over KV caches, one q/k/v
# projection and residual add + RMSNorm fused per layer (measured on the H200: decode batch 1 8.80 -> 7.82 ms, see
# BENCHMARKS.md "Fusion passes"), then clean-up.
DEFAULT_PIPELINE = "canonicalize,fuse-moe,kv-cache,fuse-qkv,fuse-norm,dce"
# What `moec build` and `compile(backend="tensorrt")` run when `passes` is not given: stateless engines (input_ids ->
# logits), which the engine loader can run. Decoder engines with past/present caches are built from a pipeline with
# `kv-cache` (`moec build --kv-cache`); the loader cannot run those yet, so they are not the default.
ENGINE_PIPELINE = "canonicalize,fuse-moe,dce"

PassSpec = str | Pass | Iterable[str | Pass]
DEFAULT_EVAL_SEQ_LEN = 256  # perplexity windows; the embedded `tiny` was trained on 256-token sequences
BACKENDS = ("torch", "tensorrt")


def _measure_activation_ranges(program: Program, sequences: torch.Tensor, progress: Callable[[int], None]) -> Any:
    from backends.torch.calibration import measure_activation_ranges

    return measure_activation_ranges(program, sequences, progress)


def _builtin_calibration_text() -> Path:
    from frontends.hf.source import EMBEDDED_MODELS_DIR

    return EMBEDDED_MODELS_DIR / "tiny" / "calibration.txt"


# `calibrate` runs programs on the torch backend and reads the embedded model's calibration text: only the driver may
# reach both, so it hands them down.
calibration.install(calibration.CalibrationSupport(_measure_activation_ranges, _builtin_calibration_text))


def load(
    source: Any, dtype: torch.dtype | str | None = None, seed: int = 0, attention: str = "moec", tokenizer: Any = None
) -> Program:
    """Traces a MixtralForCausalLM, a MixtralConfig, a checkpoint directory or a preset name into a Program.

    `attention="eager"` traces Hugging Face's own eager attention (with its mask) instead of emitting
    `moec.attention` directly; `canonicalize` recognizes it. The program's `tokenize` (what passes that read text,
    like `calibrate`, use) is `resolve_tokenizer(source, tokenizer, ...)`'s tokenizer, or None without one."""
    from frontends.hf.source import resolve
    from frontends.hf.trace import trace

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    program = trace(resolve(source, seed=seed), dtype=dtype, attention=attention)
    resolved = resolve_tokenizer(source, tokenizer, program.config.vocab_size)
    if resolved is not None:
        program.tokenize = lambda text: list(resolved(text, verbose=False)["input_ids"])
    return program


def resolve_tokenizer(model: Any, tokenizer: Any, vocab_size: int) -> Any:
    """The tokenizer to use: `tokenizer` (a directory or an object) if given, else the source directory's own (the
    embedded models and checkpoint directories that have one), else None."""
    from frontends.hf.source import EMBEDDED_MODELS, EMBEDDED_MODELS_DIR
    from frontends.hf.tokenizer import TokenizerError, has_tokenizer, load_tokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        if len(tokenizer) > vocab_size:
            raise TokenizerError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size}")
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(tokenizer, vocab_size)
    if isinstance(model, (str, os.PathLike)):
        directory = EMBEDDED_MODELS_DIR / str(model) if str(model) in EMBEDDED_MODELS else Path(model)
        if directory.is_dir() and has_tokenizer(directory):
            return load_tokenizer(directory, vocab_size)
    return None


@dataclass
class CompiledModel:
    """The result of `compile`: the final program, every intermediate one, and a runnable backend."""

    program: Program
    traced: Program
    history: list[PassRecord]
    backend: str = "torch"
    device: str = "cpu"
    cuda_graphs: bool = False  # replay one captured CUDA graph per input shape (see backends/torch/runtime.py)
    engine_dir: str | None = None  # backend="tensorrt": where the engines and config.json were written
    build: Any = None  # backend="tensorrt": the BuildSummary (config.json's contents, seconds, sizes)
    # A Hugging Face tokenizer: the checkpoint directory's own, or `compile(..., tokenizer=DIR)`'s; None without one.
    tokenizer: Any = None
    numerics: Any = None  # the last `check_numerics` result (a `compiler.numerics.NumericsReport`)
    _executable: Any = field(default=None, repr=False)

    @property
    def graph(self) -> Program:
        return self.program

    def graph_after(self, pass_name: str) -> Program:
        """The program right after the last run of `pass_name` (name or full spec); `"trace"` is the input."""
        if pass_name == "trace":
            return self.traced
        for record in reversed(self.history):
            if pass_name in (record.name, record.spec):
                return record.program
        ran = ", ".join(record.spec for record in self.history) or "none"
        raise MoecError(f"pass {pass_name!r} is not in this pipeline (passes run: {ran})")

    def executable(self, progress: Callable[[int, int], None] | None = None) -> Any:
        if self._executable is None:
            if self.backend == "tensorrt":
                # Raises EngineRunError saying why where no TensorRT here supports this machine's GPU.
                from backends.tensorrt import load_engines

                self._executable = load_engines(self.engine_dir)
                return self._executable
            if self.program.ranks:
                # A sharded program: this process's rank, under torchrun/mpirun (see backends/torch/distributed.py).
                from backends.torch.distributed import DistributedExecutable

                self._executable = DistributedExecutable(self.program, self.device, progress=progress)
                return self._executable
            from backends.torch.runtime import TorchExecutable

            self._executable = TorchExecutable(
                self.program, self.device, progress=progress, cuda_graphs=self.cuda_graphs
            )
        return self._executable

    def export_onnx(self, path: str, after: str | None = None, moe: str = "ootb", decompose: tuple[str, ...] = ()) -> Any:
        """Writes the program after pass `after` (default: the final one; "trace": as traced) as ONNX with its
        weights in one external data file; `moe` is "ootb", "plugin" or "ort" (see backends/onnx)."""
        from backends.onnx import export_onnx

        return export_onnx(self, path, moe=moe, after=after, decompose=decompose)

    def perplexity(self, texts_or_token_ids: str | Sequence[str] | Sequence[Sequence[int]], **options: Any) -> float:
        """Perplexity of texts (tokenized with `self.tokenizer`) or token-id lists, each token scored once in
        windows of `seq_len` (default 256); `options` are `score`'s."""
        return self.score(texts_or_token_ids, **options).perplexity

    def score(
        self,
        texts_or_token_ids: str | Sequence[str] | Sequence[Sequence[int]],
        seq_len: int = DEFAULT_EVAL_SEQ_LEN,
        stride: int | None = None,
        batch_size: int = 8,
        max_tokens: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Any:
        """Like `perplexity`, with the count of scored tokens and the mean NLL (`compiler.evaluation.Perplexity`)."""
        from compiler.evaluation import score

        items = [texts_or_token_ids] if isinstance(texts_or_token_ids, str) else list(texts_or_token_ids)
        if not items:
            raise MoecError("nothing to score: no texts given")
        if all(isinstance(item, str) for item in items):
            if self.tokenizer is None:
                raise MoecError("this model has no tokenizer: pass token ids, or compile with tokenizer=DIR")
            token_ids = [self.tokenizer(text, verbose=False)["input_ids"] for text in items]
        elif any(isinstance(item, str) for item in items):
            raise MoecError("pass either texts or token-id lists, not a mix")
        else:
            token_ids = [list(item) for item in items]
        vocab = self.traced.config.vocab_size
        if any(not 0 <= int(t) < vocab for ids in token_ids for t in ids):
            raise MoecError(f"token ids must lie in [0, {vocab}) for this model's vocabulary")
        return score(self, token_ids, seq_len, stride, batch_size, max_tokens, progress)

    def check_numerics(
        self, input_ids: Sequence[Sequence[int]] | None = None, layers: bool = False
    ) -> Any:
        """Runs the trace and every pass's program on the torch backend (sharded ones as forked gloo ranks) over a
        small sample (default: 2 prompts x 64 tokens of the bundled text) and names the first pass whose own step
        exceeds its budget; `layers` also names the first diverging decoder layer. Kept as `self.numerics`."""
        from compiler.numerics import check_numerics

        self.numerics = check_numerics(self.traced, self.history, self.tokenizer, input_ids=input_ids, layers=layers)
        return self.numerics

    def report(self, path: str | os.PathLike[str]) -> Path:
        """Writes a self-contained HTML report of the pipeline (with `self.numerics` when checked) to `path`."""
        from compiler.report import write_report

        return write_report(path, self.traced, self.history, self.numerics)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.executable()(input_ids)

    def generate(
        self,
        input_ids: torch.Tensor | Sequence[Sequence[int]],
        max_new_tokens: int = 20,
        *,
        attention_mask: torch.Tensor | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        streamer: Any = None,
    ) -> torch.Tensor | list[list[int]]:
        """Hugging Face's `generate` for this model (see `compiler.generation.generate` for every argument).

        A program with KV caches (the default pipeline) prefills once and decodes one position per step; one
        without them recomputes every sequence at every step, through the same sampling code. A tensor gives a
        tensor [batch, prompt + generated] (left padding marked by `attention_mask` kept as given); a list of
        token-id lists gives lists. `eos_token_id=None` never stops early. Bad arguments raise `MoecError` before
        anything runs; a sharded program generates on every rank alike (under torchrun/mpirun).
        """
        options = dict(
            attention_mask=attention_mask, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, eos_token_id=eos_token_id, pad_token_id=pad_token_id, streamer=streamer,
        )
        from compiler.generation import RecomputeDecoder, generate

        executable = self.executable()
        if self.program.ranks:
            return executable.generate(input_ids, max_new_tokens, **options)  # every rank steps, tokens broadcast
        if not hasattr(executable, "new_session"):  # a backend that only maps input ids to logits (TensorRT)
            executable = RecomputeDecoder(executable, int(self.program.config.vocab_size))
        return generate(executable, input_ids, max_new_tokens, **options)

    def generate_text(self, prompts: Sequence[str], max_new_tokens: int = 20, **sampling: Any) -> list[str]:
        """Each prompt's continuation as text, through `generate` with `self.tokenizer` (its EOS id ends a
        sequence unless `eos_token_id` is given); `sampling` takes `generate`'s keyword arguments."""
        if self.tokenizer is None:
            raise MoecError("this model has no tokenizer: compile with tokenizer=DIR, or call generate with token ids")
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise MoecError("generate_text takes a non-empty list of strings")
        sampling.setdefault("eos_token_id", getattr(self.tokenizer, "eos_token_id", None))
        token_ids = [list(self.tokenizer(prompt)["input_ids"]) for prompt in prompts]
        outputs = self.generate(token_ids, max_new_tokens, **sampling)
        return [
            self.tokenizer.decode(output[len(prompt) :], skip_special_tokens=True)
            for prompt, output in zip(token_ids, outputs)
        ]


def compile(  # noqa: A001 - the public name users expect
    model: Any,
    passes: PassSpec | None = None,
    backend: str = "torch",
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    seed: int = 0,
    verify: bool = True,
    on_pass: Callable[[PassRecord], None] | None = None,
    cuda_graphs: bool = False,
    attention: str = "moec",
    backend_options: dict[str, Any] | None = None,
    tokenizer: Any = None,
    check_numerics: bool = False,
) -> CompiledModel:
    """Traces `model`, runs `passes` (default `DEFAULT_PIPELINE`; `ENGINE_PIPELINE` for tensorrt), binds `backend`.

    `backend="tensorrt"` also builds one engine per rank into `backend_options["output_dir"]`; the other
    `backend_options` are `backends.tensorrt.build_options`' (`moe_plugin`, `targets`, `max_batch`, `max_seq`,
    `workers`, `keep_onnx`).

    `tokenizer`: a directory holding a Hugging Face tokenizer, or a tokenizer object; by default a checkpoint
    directory's (or the embedded model's) own tokenizer is used when it has one.

    `check_numerics=True` runs `CompiledModel.check_numerics()` (every pass's program on the torch backend) and keeps
    its result as `compiled.numerics`.
    """
    if backend not in BACKENDS:
        raise MoecError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    backend_options = dict(backend_options or {})
    if backend == "tensorrt" and "output_dir" not in backend_options:
        raise MoecError("backend='tensorrt' needs backend_options={'output_dir': DIR} for the engines")
    default_pipeline = ENGINE_PIPELINE if backend == "tensorrt" else DEFAULT_PIPELINE
    pipeline = parse_pipeline(default_pipeline if passes is None else passes)
    traced = load(model, dtype=dtype, seed=seed, attention=attention, tokenizer=tokenizer)
    result = run_pipeline(traced, pipeline, verify=verify, on_pass=on_pass)
    compiled = CompiledModel(
        result.program,
        traced,
        result.history,
        backend=backend,
        device=device,
        cuda_graphs=cuda_graphs,
        tokenizer=resolve_tokenizer(model, tokenizer, traced.config.vocab_size),
    )
    if backend == "tensorrt":
        from backends.tensorrt import build_engines, build_options

        output_dir = backend_options.pop("output_dir")
        logits = next(n for n in traced.graph.nodes if n.op == "output").args[0][0].meta["val"]
        dtype_name = str(logits.dtype).removeprefix("torch.")  # the dtype the model was traced in
        passes_run = [record.spec for record in result.history]
        compiled.build = build_engines(
            result.program, output_dir, build_options(**backend_options), passes=passes_run, dtype=dtype_name
        )
        compiled.engine_dir = str(output_dir)
    if check_numerics:
        compiled.check_numerics()
    return compiled
