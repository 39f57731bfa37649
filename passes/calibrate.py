"""`calibrate`: run the program over calibration text and record each op's activation ranges on it.

before: a float program (after canonicalize and fuse-moe; before or after kv-cache and fuse-qkv)
after:  the same graph, with `program.calibration` (printed under the program's header): per op, by module path, the
        absolute maximum over the calibration tokens of
        - `moec.linear`: its input                                             `input`
        - `moec.moe`: its input (w13's) and its experts' silu(gate) * up (w2's input, over the tokens routed to each)
                                                                               `input`, `intermediate`
        - `moec.attention` / `moec.cached_attention`: its keys (after rope) and values, what a KV cache holds
                                                                               `key`, `value`

The text is tokenized as one document with the program's tokenizer (`Program.tokenize`) and cut into consecutive
sequences of `seq_len` tokens, `samples` of them, or as many as the text holds (the stats then say so). The builtin
text is `frontends/hf/models/tiny/calibration.txt`, the validation split of the corpus `tiny` was trained on (neither
trained on nor the held-out `eval.txt`), English and Python prose that any Mixtral's tokenizer reads.

Unlike every other pass this one computes: the program runs on the torch backend's reference kernels (the numerical
ground truth), with its weights materialized on the CPU (it needs the memory of the whole float model), for one
forward pass over samples x seq_len tokens. The pass reaches the backend and the builtin text only through
`compiler.calibration`, which the driver fills (passes know only the IR core).

Order: before `fuse-rope` (which it refuses: the fused op's key operand is not yet rotated).
Sharding: calibrate measures the unsharded program, so it runs before `shard` (a rank inherits the ranges: its
activation is a slice of, or equal to, the unsharded one, so a scale from the whole covers it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from compiler import calibration, ops
from compiler.errors import MoecError, PassOptionError, PreconditionError
from compiler.ir import Calibration, Program
from compiler.pass_manager import Pass, PassResult, register_pass
from passes.quantize import module_path

BUILTIN = "builtin"


def builtin_text_path() -> Path:
    return calibration.support().builtin_text()


@register_pass
@dataclass(frozen=True)
class Calibrate(Pass):
    """Run the program on the torch backend (CPU) over calibration text; record each op's activation amax.

    before: a float program (canonical, MoE fused)
    after:  the same graph plus `program.calibration`: per linear its input's amax, per moe its input's and its
            experts' intermediate's, per attention its keys' and values' (printed under the header)
    dataset=builtin (the bundled calibration text: tiny's validation split, not the held-out eval.txt) or a UTF-8
    text file; samples sequences of seq_len tokens of it (clipped to what the text holds, with a note). Needs the
    program's tokenizer. It materializes the float weights on the CPU and runs one forward pass over the samples.
    Runs before shard (ranks inherit the ranges), before any quantization and before fuse-rope; quantize-fp8 reads
    the ranges.
    """

    name: ClassVar[str] = "calibrate"
    handles_ranks: ClassVar[bool] = True  # so that it sees, and refuses, a sharded program as a whole
    dataset: str = BUILTIN
    samples: int = 512
    seq_len: int = 256

    def __post_init__(self) -> None:
        self.validate_options()

    def validate_options(self) -> None:
        for key in ("samples", "seq_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PassOptionError(f"calibrate: {key}={value!r} must be a positive integer")
        if self.dataset != BUILTIN and not Path(self.dataset).is_file():
            raise PassOptionError(f"calibrate: dataset={self.dataset!r} is neither 'builtin' nor a text file")

    @property
    def text_path(self) -> Path:
        return builtin_text_path() if self.dataset == BUILTIN else Path(self.dataset)

    def _describe_dataset(self) -> str:
        return "the builtin calibration text" if self.dataset == BUILTIN else self.dataset

    def requires(self, program: Program) -> None:
        if program.ranks:
            raise PreconditionError(
                f"calibrate measures the unsharded program, and this one is sharded over {len(program.ranks)} ranks: "
                "run calibrate before shard (the ranks inherit its ranges)"
            )
        counts = program.op_counts()
        quantized = sum(1 for node in program.graph.nodes if node.target in ops.QUANTIZED_OPS)
        if quantized:
            raise PreconditionError(
                f"calibrate measures the float program, and this one has {quantized} quantized ops: run it before "
                "quantize-weights / quantize-fp8"
            )
        if counts.get("aten.linear"):
            raise PreconditionError("needs canonicalize first: the graph has ATen linears, not moec.linear")
        if counts.get("aten.topk"):
            raise PreconditionError("needs fuse-moe first: a router (softmax -> topk) is not fused into moec.moe")
        if counts.get("moec.rope_cached_attention"):
            raise PreconditionError(
                "calibrate must run before fuse-rope: it records each attention's keys after rope (what the KV cache "
                "holds), and moec.rope_cached_attention rotates them inside the op"
            )
        try:
            calibration.support()
        except MoecError as error:
            raise PreconditionError(str(error)) from None
        if program.tokenize is None:
            raise PreconditionError(
                f"calibrate reads {self._describe_dataset()} as text, but the program has no tokenizer (its source "
                "has none): compile with tokenizer=DIR (--tokenizer-dir DIR)"
            )

    def token_sequences(self, program: Program) -> tuple[torch.Tensor, str]:
        """The [sequences, seq_len] token ids to run and a note when the text holds fewer than `samples`."""
        path = self.text_path
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise PreconditionError(f"calibrate: cannot read {path}: {error}") from None
        assert program.tokenize is not None
        ids = program.tokenize(text)
        available = len(ids) // self.seq_len
        if available == 0:
            raise PreconditionError(
                f"calibrate: {self._describe_dataset()} has {len(ids)} tokens, fewer than one sequence of "
                f"seq_len={self.seq_len}"
            )
        count = min(self.samples, available)
        note = ""
        if count < self.samples:
            note = (
                f"the text holds {len(ids)} tokens: {count} sequences of {self.seq_len}, not the {self.samples} asked"
            )
        vocab = int(program.config.vocab_size)
        sequences = torch.tensor(ids[: count * self.seq_len], dtype=torch.int64).view(count, self.seq_len)
        if bool((sequences < 0).any() or (sequences >= vocab).any()):
            raise PreconditionError(f"calibrate: the tokenizer gives ids outside the model's vocabulary [0, {vocab})")
        return sequences, note

    def run(self, program: Program) -> PassResult:
        from tqdm import tqdm

        sequences, note = self.token_sequences(program)
        # Shown on a terminal only (disable=None), and cleared when done: the pipeline's own bar stays.
        bar = tqdm(total=len(sequences), desc="calibrate", unit="seq", file=sys.stderr, disable=None, leave=False)
        with bar:
            measured = calibration.support().measure(program, sequences, lambda done: bar.update(done - bar.n))
        nodes = {node.name: node for node in program.graph.nodes}
        ranges: dict[str, dict[str, float]] = {}
        for name, roles in measured.items():
            # Two ops of one module path (none in Mixtral) share their ranges: the larger covers both.
            merged = ranges.setdefault(module_path(nodes[name]), {})
            for role, amax in roles.items():
                merged[role] = max(merged.get(role, 0.0), amax)
        description = f"{len(sequences)} sequences x {self.seq_len} tokens of {self._describe_dataset()}"
        table = Calibration(description, ranges)
        result = program.clone()
        result.calibration = table
        stats: dict[str, Any] = {"sequences": len(sequences), "tokens": sequences.numel(), "ops": len(ranges)}
        if note:
            stats["note"] = note
        return PassResult(result, table != program.calibration, stats)

    def explain(self, program: Program) -> list[str]:
        lines = [
            f"{module_path(node)}: records the amax of its {', '.join(calibration.ROLES[node.target])}"
            for node in program.graph.nodes
            if node.target in calibration.ROLES
        ]
        return lines or ["calibrate: no linear, moe or attention op to calibrate"]
