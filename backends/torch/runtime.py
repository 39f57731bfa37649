"""Execute any moec program with PyTorch: the numerical ground truth for every pass, and the GPU runtime.

The program's weights are materialized from their expressions (only the bytes this program's expressions cover,
so a rank reads its own slices), the graph's meta-device constants are retargeted to the run device, and the
GraphModule runs eagerly.

A program with KV caches (the `kv-cache` pass) runs statefully: `new_session(batch)` hands out the executable's
caches for that batch size (allocated once, zeroed, reused by every later session of that size) and
`session.step(input_ids, cache_position)` runs prefill (S > 1) and decode (S == 1) steps on them. With
`cuda_graphs=True` decode steps replay one CUDA graph per batch bucket (1, 2, 4, 8, ...: a batch runs padded up to
its bucket) whose caches, token and position buffers are static tensors of the executable, so a step copies only
the [bucket] new tokens and positions in. Calling the executable with input ids alone stays stateless: the logits
of those tokens from cache_position 0, on fresh caches just long enough for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

import backends.torch.kernels  # noqa: F401 - registers the reference kernels of moec's ops
from compiler.errors import MoecError
from compiler.generation import DecodeSession, RecomputeSession
from compiler.ir import KVCacheSpec, Program

ProgressCallback = Callable[[int, int], None]
# Sees one call_function node of the running graph and its evaluated operands (args, kwargs) before it runs.
NodeObserver = Callable[[torch.fx.Node, tuple[Any, ...], dict[str, Any]], None]


def _retarget_devices(graph: torch.fx.Graph, device: torch.device) -> None:
    """Export records `device=meta` on factory ops (arange, zeros...); run them on the real device instead."""
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.kwargs.get("device") == torch.device("meta"):
            node.kwargs = {**node.kwargs, "device": device}


def batch_bucket(batch: int) -> int:
    """The CUDA-graph batch a decode step of `batch` sequences runs at: the next power of two."""
    return 1 << max(batch - 1, 0).bit_length()


@dataclass
class _DecodeGraph:
    """One captured S == 1 step at a bucket's batch, with the static tensors it reads and writes."""

    graph: torch.cuda.CUDAGraph
    caches: tuple[torch.Tensor, ...]  # the caches the graph reads and writes (captured by address)
    input_ids: torch.Tensor  # [bucket, 1]
    cache_position: torch.Tensor  # [bucket]
    logits: torch.Tensor  # [bucket, 1, vocab]

    def uses(self, caches: Sequence[torch.Tensor]) -> bool:
        return len(caches) == len(self.caches) and all(a.data_ptr() == b.data_ptr() for a, b in zip(caches, self.caches))


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
        self.input_names = [n.name for n in program.input_nodes()]
        self.cache_specs: dict[str, KVCacheSpec] = program.cache_specs()
        self.vocab_size = int(program.config.vocab_size)
        if cuda_graphs and self.device.type != "cuda":
            raise MoecError(f"cuda_graphs=True needs a CUDA device, not {self.device}")
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple, tuple] = {}
        self._cache_pools: dict[int, tuple[torch.Tensor, ...]] = {}
        self._decode_graphs: dict[int, _DecodeGraph] = {}

    @property
    def is_cached(self) -> bool:
        """Whether the program attends over KV caches (it went through the `kv-cache` pass)."""
        return bool(self.cache_specs)

    @property
    def max_seq(self) -> int | None:
        """Positions a sequence may reach in this program's caches; None without caches."""
        return min((spec.max_seq for spec in self.cache_specs.values()), default=None)

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.is_cached:
            if len(inputs) != 1:
                raise TypeError(
                    f"a program with KV caches is called with input_ids only (got {len(inputs)} inputs); step it "
                    "through new_session(batch).step(input_ids, cache_position)"
                )
            return self._stateless(inputs[0])
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs ({', '.join(self.input_names)}), got {len(inputs)}")
        if self.cuda_graphs:
            return self._replay(inputs)
        return self._run(inputs, ())

    def _stateless(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of `input_ids` from position 0 on throwaway caches of exactly seq slots (the op reads the cache
        length from its operands), so the call neither allocates max_seq slots nor disturbs any session."""
        batch, seq = input_ids.shape
        caches = self.allocate_caches(batch, length=seq)
        position = torch.zeros(batch, dtype=torch.int64, device=self.device)
        return self.step(input_ids, position, caches)

    def allocate_caches(self, batch: int, length: int | None = None) -> tuple[torch.Tensor, ...]:
        """Zeroed caches for `batch` sequences, in the program's cache input order (`length` slots; default
        max_seq). Zeros, not garbage: masked slots are multiplied by probability 0, and 0 * NaN is NaN."""
        return tuple(
            torch.zeros(
                (batch, spec.kv_heads, spec.max_seq if length is None else length, spec.head_dim),
                dtype=spec.dtype,
                device=self.device,
            )
            for spec in self.cache_specs.values()
        )

    @torch.no_grad()
    def step(
        self, input_ids: torch.Tensor, cache_position: torch.Tensor, caches: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Runs S new tokens per sequence at cache_position[b] + [0, S) eagerly, updating `caches` in place; returns
        logits [batch, S, vocab]. The caller keeps cache_position[b] + S <= max_seq (no host sync checks it here)."""
        if len(caches) != len(self.cache_specs):
            names = ", ".join(self.cache_specs)
            raise MoecError(f"expected {len(self.cache_specs)} caches ({names}), got {len(caches)}")
        return self._run((input_ids, cache_position.to(self.device, torch.int64)), tuple(caches))

    def new_session(self, batch: int) -> DecodeSession:
        """A decoding session for `batch` sequences: on the executable's caches for that batch size with a KV
        cache program (one generation per batch size at a time), else a `RecomputeSession`."""
        if batch < 1:
            raise MoecError(f"a session needs at least one sequence, got batch={batch}")
        if not self.is_cached:
            return RecomputeSession(self, batch, self.device)
        size = batch_bucket(batch) if self.cuda_graphs else batch
        if size not in self._cache_pools:
            self._cache_pools[size] = self.allocate_caches(size)
        return KVCacheSession(self, batch, self._cache_pools[size])

    def decode_graph_step(
        self, input_ids: torch.Tensor, cache_position: torch.Tensor, caches: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """An S == 1 step of `input_ids` [batch, 1] through the CUDA graph of the bucket that `caches` were
        allocated at (their batch, >= `batch`), captured on first use and again when called with other caches.
        Returns a view of the graph's static logits: the next step overwrites it."""
        if self.device.type != "cuda" or input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise MoecError(f"a CUDA-graph decode step takes [batch, 1] input ids on a CUDA device, got "
                            f"{list(input_ids.shape)} on {self.device}")
        batch, bucket = input_ids.shape[0], caches[0].shape[0]
        graph = self._decode_graphs.get(bucket)
        if graph is not None and graph.uses(caches):
            _fill_static(graph, input_ids, cache_position, batch)
            graph.graph.replay()
            return graph.logits[:batch]
        static_ids = torch.zeros((bucket, 1), dtype=torch.int64, device=self.device)
        static_position = torch.zeros(bucket, dtype=torch.int64, device=self.device)
        static_ids[:batch] = input_ids
        static_position[:batch] = cache_position
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            # Warm-up (Triton compiles, allocators settle) runs the real step: it writes the very k/v the replay
            # below writes again, so the caches end up as one step would leave them.
            for _ in range(2):
                self._run((static_ids, static_position), tuple(caches))
        torch.cuda.current_stream(self.device).wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(cuda_graph):
                static_logits = self._run((static_ids, static_position), tuple(caches))
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise MoecError(
                f"the decode step cannot be captured in a CUDA graph ({reason}): an op in it syncs with the host "
                "(the float32 moe reference does); use a float16/bfloat16 model or cuda_graphs=False"
            ) from error
        graph = _DecodeGraph(cuda_graph, tuple(caches), static_ids, static_position, static_logits)
        self._decode_graphs[bucket] = graph
        graph.graph.replay()
        return graph.logits[:batch]

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
                    self._run(static_inputs, ())
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self._run(static_inputs, ())
            self._graphs[key] = (graph, static_inputs, static_output)
        graph, static_inputs, static_output = self._graphs[key]
        for static, value in zip(static_inputs, inputs):
            static.copy_(value)
        graph.replay()
        return static_output

    @torch.no_grad()
    def run_observed(self, input_ids: torch.Tensor, observe: NodeObserver) -> torch.Tensor:
        """The logits a call with `input_ids` alone computes (a cached program: on fresh caches from position 0), run
        node by node through `torch.fx.Interpreter` so that `observe(node, args, kwargs)` sees each call_function
        node's evaluated operands before it runs: how `calibrate` reads activations. Slower than a call."""
        caches: tuple[torch.Tensor, ...] = ()
        inputs: tuple[torch.Tensor, ...] = (input_ids,)
        if self.is_cached:
            batch, seq = input_ids.shape
            caches = self.allocate_caches(batch, length=seq)
            inputs = (input_ids, torch.zeros(batch, dtype=torch.int64, device=self.device))
        return _single(_ObservingInterpreter(self._module, observe).run(*self._arguments(inputs, caches)))

    def _arguments(self, inputs: tuple[torch.Tensor, ...], caches: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        runtime_inputs, cache_inputs = iter(inputs), iter(caches)
        args = []
        for node in self._placeholders:
            if "weight" in node.meta:
                args.append(self.weights[node.name])
            elif "kv_cache" in node.meta:
                args.append(next(cache_inputs))
            else:
                args.append(next(runtime_inputs).to(self.device))
        return args

    def _run(self, inputs: tuple[torch.Tensor, ...], caches: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return _single(self._module(*self._arguments(inputs, caches)))


def _single(outputs: Any) -> Any:
    return outputs[0] if isinstance(outputs, (tuple, list)) and len(outputs) == 1 else outputs


class _ObservingInterpreter(torch.fx.Interpreter):
    """Runs a graph node by node, showing each call's operands to an observer first."""

    def __init__(self, module: torch.fx.GraphModule, observe: NodeObserver) -> None:
        super().__init__(module)
        self.observe = observe

    def run_node(self, node: torch.fx.Node) -> Any:
        if node.op == "call_function":
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            self.observe(node, args, kwargs)
        return super().run_node(node)


def _fill_static(graph: _DecodeGraph, input_ids: torch.Tensor, cache_position: torch.Tensor, batch: int) -> None:
    graph.input_ids[:batch].copy_(input_ids)
    graph.cache_position[:batch].copy_(cache_position)
    if batch < graph.input_ids.shape[0]:
        # Rows past the batch run too (the graph's batch is fixed): position 0 keeps their writes in bounds.
        graph.input_ids[batch:].zero_()
        graph.cache_position[batch:].zero_()


class KVCacheSession:
    """`batch` sequences decoding on caches the executable owns (allocated at the CUDA-graph bucket when replaying
    graphs; the session then uses their first `batch` rows)."""

    def __init__(self, executable: TorchExecutable, batch: int, caches: tuple[torch.Tensor, ...]) -> None:
        self.executable = executable
        self.batch = batch
        self.caches = caches

    def step(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """Logits [batch, S, vocab] of `input_ids` [batch, S] at positions cache_position[b] + [0, S); writes their
        keys and values into the caches. S == 1 with `cuda_graphs` replays the bucket's graph (the result is then a
        view the next step overwrites)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch or tuple(cache_position.shape) != (self.batch,):
            raise MoecError(
                f"session of {self.batch} sequences got input_ids {list(input_ids.shape)} and cache_position "
                f"{list(cache_position.shape)}; expected [{self.batch}, S] and [{self.batch}]"
            )
        executable = self.executable
        if executable.cuda_graphs and input_ids.shape[1] == 1:
            return executable.decode_graph_step(input_ids, cache_position, self.caches)
        rows = self.caches if self.caches[0].shape[0] == self.batch else tuple(c[: self.batch] for c in self.caches)
        return executable.step(input_ids, cache_position, rows)
