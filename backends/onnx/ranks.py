"""Export every rank of a sharded Program to ONNX and run all ranks in one process on onnxruntime (CPU), with the
collectives done in numpy: a check of a sharded export against `backends/torch` on a machine without GPUs.

before: a Program from `shard{...}` (`program.ranks`: one program per rank, with moec collectives), or any Program
after:  DIR/rank{r}.seg{k}.onnx, one file per stretch of rank r between collectives (ONNX has no collectives; the
        split is `compiler.segments.split_at_collectives`, the one the TensorRT backend builds from), and a
        `RankExport` per rank listing its steps: `{"engine": k, ...}` (run segment k) or a collective step
            all_reduce = elementwise sum over the group; all_gather = concatenation on `dim` in group order;
            send/recv = a mailbox keyed by (src, dst)

    exports = export_ranks(shard_program, "out/ranks", moe="ootb")
    logits_per_rank = simulate_ranks(exports, input_ids)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backends.onnx.context import OnnxExportError
from backends.onnx.export import OnnxExport, export_program
from compiler.segments import split_at_collectives
from compiler.ir import Program


@dataclass
class RankExport:
    """One rank's ONNX segments and the steps that run them (the `steps` format of `segments.RankPlan`)."""

    rank: int
    segments: list[OnnxExport]
    steps: list[dict[str, Any]]
    output: str
    _sessions: list[Any] = field(default_factory=list, repr=False)

    def run_segment(self, index: int, values: dict[str, np.ndarray]) -> np.ndarray:
        if not self._sessions:
            import onnxruntime

            self._sessions = [
                onnxruntime.InferenceSession(str(segment.path), providers=["CPUExecutionProvider"])
                for segment in self.segments
            ]
        session = self._sessions[index]
        (result,) = session.run(None, {inp.name: values[inp.name] for inp in session.get_inputs()})
        return result


def export_ranks(
    program: Program, directory: str | os.PathLike[str], moe: str = "ootb", decompose: tuple[str, ...] = ()
) -> list[RankExport]:
    """Writes every rank's segments into `directory`; a Program without ranks is exported as rank 0."""
    directory = Path(directory)
    exports = []
    for rank, rank_program in enumerate(program.ranks or [program]):
        plan = split_at_collectives(rank_program)
        segments = [
            export_program(segment.program, directory / f"rank{rank}.seg{index}.onnx", moe=moe, decompose=decompose)
            for index, segment in enumerate(plan.segments)
        ]
        exports.append(RankExport(rank, segments, plan.steps, plan.output))
    return exports


def _group_ready(exports: list[RankExport], position: list[int], step: dict[str, Any]) -> bool:
    """Every member of `step`'s group has reached a collective of the same kind over the same group."""
    key = (step["collective"], step["group"], step.get("dim"))
    for member in step["group"]:
        if position[member] >= len(exports[member].steps):
            return False
        theirs = exports[member].steps[position[member]]
        if (theirs.get("collective"), theirs.get("group"), theirs.get("dim")) != key:
            return False
    return True


def simulate_ranks(exports: list[RankExport], input_ids: np.ndarray) -> list[np.ndarray]:
    """Runs all ranks in lockstep (one step each per round; a collective waits for its whole group, a recv for its
    send); returns each rank's final value (the logits where the rank computes them, a send's empty token else)."""
    values: list[dict[str, np.ndarray]] = [{"input_ids": input_ids} for _ in exports]
    position = [0] * len(exports)
    mailbox: dict[tuple[int, int], np.ndarray] = {}
    while any(position[r] < len(export.steps) for r, export in enumerate(exports)):
        progressed = False
        for r, export in enumerate(exports):
            if position[r] >= len(export.steps):
                continue
            step = export.steps[position[r]]
            kind = step.get("collective")
            if kind is None:
                values[r][step["output"]] = export.run_segment(step["engine"], values[r])
            elif kind in ("all_reduce", "all_gather"):
                if not _group_ready(exports, position, step):
                    continue
                parts = [values[member][step["input"]] for member in step["group"]]
                if kind == "all_reduce":
                    total = np.sum(np.stack([part.astype(np.float32) for part in parts]), axis=0)
                    result = total.astype(parts[0].dtype)
                else:
                    result = np.concatenate(parts, axis=step["dim"])
                for member in step["group"]:
                    values[member][exports[member].steps[position[member]]["output"]] = result
                    position[member] += 1
                progressed = True
                continue
            elif kind == "send":
                mailbox[(r, step["dst"])] = values[r][step["input"]]
                values[r][step["output"]] = np.zeros((0,), dtype=np.float32)
            elif kind == "recv":
                if (step["src"], r) not in mailbox:
                    continue
                values[r][step["output"]] = mailbox.pop((step["src"], r))
            else:
                raise OnnxExportError(f"rank {r}: cannot simulate collective {kind!r}")
            position[r] += 1
            progressed = True
        if not progressed:
            raise OnnxExportError("simulated ranks deadlocked: the ranks' collective steps do not match")
    return [values[r][export.output] for r, export in enumerate(exports)]
