"""`compile()`: trace a Mixtral, run a pass pipeline, bind a backend.

    compiled = compile("tiny")                  # default pipeline: canonicalize,fuse-moe,dce
    logits = compiled(input_ids)                 # runs on the backend
    compiled.graph                               # the final program
    compiled.graph_after("fuse-moe")             # the program after any pass
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from compiler.errors import MoecError
from compiler.ir import Program
from compiler.pass_manager import Pass, PassRecord, parse_pipeline, run_pipeline

import passes  # noqa: F401,E402 - the driver fills the pass registry (passes register themselves on import)

# Used when `passes` is not given: canonical ops, one `moe` op per layer, then clean-up.
DEFAULT_PIPELINE = "canonicalize,fuse-moe,dce"

PassSpec = str | Pass | Iterable[str | Pass]
BACKENDS = ("torch", "tensorrt")


def load(source: Any, dtype: torch.dtype | str | None = None, seed: int = 0, attention: str = "moec") -> Program:
    """Traces a MixtralForCausalLM, a MixtralConfig, a checkpoint directory or a preset name into a Program.

    `attention="eager"` traces Hugging Face's own eager attention (with its mask) instead of emitting
    `moec.attention` directly; `canonicalize` recognizes it."""
    from frontends.hf.source import resolve
    from frontends.hf.trace import trace

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return trace(resolve(source, seed=seed), dtype=dtype, attention=attention)


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

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.executable()(input_ids)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding without a KV cache (each step recomputes the whole sequence)."""
        if self.program.ranks:
            return self.executable().generate(input_ids, max_new_tokens)  # every rank steps, tokens broadcast
        tokens = input_ids
        for _ in range(max_new_tokens):
            next_token = self(tokens)[:, -1, :].argmax(dim=-1, keepdim=True)
            tokens = torch.cat([tokens, next_token.to(tokens.device)], dim=1)
        return tokens


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
) -> CompiledModel:
    """Traces `model`, runs `passes` (default `DEFAULT_PIPELINE`), and binds `backend`.

    `backend="tensorrt"` also builds one engine per rank into `backend_options["output_dir"]`; the other
    `backend_options` are `backends.tensorrt.build_options`' (`moe_plugin`, `targets`, `max_batch`, `max_seq`,
    `workers`, `keep_onnx`).
    """
    if backend not in BACKENDS:
        raise MoecError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    backend_options = dict(backend_options or {})
    if backend == "tensorrt" and "output_dir" not in backend_options:
        raise MoecError("backend='tensorrt' needs backend_options={'output_dir': DIR} for the engines")
    pipeline = parse_pipeline(DEFAULT_PIPELINE if passes is None else passes)
    traced = load(model, dtype=dtype, seed=seed, attention=attention)
    result = run_pipeline(traced, pipeline, verify=verify, on_pass=on_pass)
    compiled = CompiledModel(
        result.program, traced, result.history, backend=backend, device=device, cuda_graphs=cuda_graphs
    )
    if backend == "tensorrt":
        from backends.tensorrt import build_compiled

        output_dir = backend_options.pop("output_dir")
        logits = next(n for n in traced.graph.nodes if n.op == "output").args[0][0].meta["val"]
        dtype_name = str(logits.dtype).removeprefix("torch.")  # the dtype the model was traced in
        compiled.build = build_compiled(compiled, output_dir, dtype=dtype_name, **backend_options)
        compiled.engine_dir = str(output_dir)
    return compiled
