"""Execute any moec program with PyTorch: the numerical ground truth for every pass, and the GPU runtime.

The program's weights are materialized from their expressions (only the bytes this program's expressions cover,
so a rank reads its own slices), the graph's meta-device constants are retargeted to the run device, and the
GraphModule runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx

import backends.torch.kernels  # noqa: F401 - registers the reference kernels of moec's ops
from compiler.errors import MoecError
from compiler.ir import Program

ProgressCallback = Callable[[int, int], None]


def _retarget_devices(graph: torch.fx.Graph, device: torch.device) -> None:
    """Export records `device=meta` on factory ops (arange, zeros...); run them on the real device instead."""
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.kwargs.get("device") == torch.device("meta"):
            node.kwargs = {**node.kwargs, "device": device}


class TorchExecutable:
    """A program bound to materialized weights on one device; call it with input ids to get logits."""

    def __init__(
        self,
        program: Program,
        device: torch.device | str = "cpu",
        progress: ProgressCallback | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        if program.ranks:
            raise MoecError(
                f"program is sharded over {len(program.ranks)} ranks; run it with backends.torch.distributed "
                "(e.g. torchrun --nproc-per-node N -m compiler.cli run ...)"
            )
        self.program = program
        self.device = torch.device(device)
        runnable = program.clone()
        _retarget_devices(runnable.graph, self.device)
        runnable.graph_module.recompile()
        self._module = runnable.graph_module
        self._placeholders = [n for n in runnable.graph.nodes if n.op == "placeholder"]
        weight_nodes = [n for n in self._placeholders if "weight" in n.meta]
        self.weights: dict[str, torch.Tensor] = {}
        # Expressions shared by several placeholders (tied embeddings) are materialized once.
        by_expr: dict[int, torch.Tensor] = {}
        for index, node in enumerate(weight_nodes):
            expr = node.meta["weight"]
            if id(expr) not in by_expr:
                by_expr[id(expr)] = expr.materialize(self.device)
            self.weights[node.name] = by_expr[id(expr)]
            if progress is not None:
                progress(index + 1, len(weight_nodes))
        self.materialized_bytes = sum(t.numel() * t.element_size() for t in by_expr.values())
        self.input_names = [n.name for n in self._placeholders if "weight" not in n.meta]
        if cuda_graphs and self.device.type != "cuda":
            raise MoecError(f"cuda_graphs=True needs a CUDA device, not {self.device}")
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple, tuple] = {}

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs ({', '.join(self.input_names)}), got {len(inputs)}")
        if self.cuda_graphs:
            return self._replay(inputs)
        return self._run(inputs)

    def _replay(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Runs through a CUDA graph captured once per input shape: one launch instead of hundreds of Python-issued
        kernels, which is what decode-sized steps are bound by.

        The returned logits live in the graph's static output buffer: the next call with the same shape overwrites
        them, so clone what must outlive it."""
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        if key not in self._graphs:
            static_inputs = tuple(t.to(self.device).clone() for t in inputs)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm up: Triton compiles and caching allocators settle outside the capture
                    self._run(static_inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self._run(static_inputs)
            self._graphs[key] = (graph, static_inputs, static_output)
        graph, static_inputs, static_output = self._graphs[key]
        for static, value in zip(static_inputs, inputs):
            static.copy_(value)
        graph.replay()
        return static_output

    def _run(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        runtime_inputs = iter(inputs)
        args = [
            self.weights[node.name] if "weight" in node.meta else next(runtime_inputs).to(self.device)
            for node in self._placeholders
        ]
        outputs = self._module(*args)
        if isinstance(outputs, (tuple, list)) and len(outputs) == 1:
            return outputs[0]
        return outputs
