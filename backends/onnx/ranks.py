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
from backends.onnx.export import OnnxExport, export_program, session_options, unexportable_reason
from compiler.segments import split_at_collectives
from compiler.ir import Program


@dataclass
class RankExport:
    """One rank's ONNX segments and the steps that run them (the `steps` format of `segments.RankPlan`)."""

    rank: int
    segments: list[OnnxExport]  # (what is read of each: its `.path`, so a TensorRT build's parsed files serve too)
    steps: list[dict[str, Any]]
    output: str
    _sessions: list[Any] = field(default_factory=list, repr=False)

    def run_segment(self, index: int, values: dict[str, np.ndarray]) -> np.ndarray:
        if not self._sessions:
            import onnxruntime

            self._sessions = [
                onnxruntime.InferenceSession(str(segment.path), session_options(), providers=["CPUExecutionProvider"])
                for segment in self.segments
            ]
        session = self._sessions[index]
        result, *presents = session.run(None, {inp.name: values[inp.name] for inp in session.get_inputs()})
        for output, present in zip(session.get_outputs()[1:], presents):
            values[output.name] = present  # a decoder segment's present.{i}.key/value
        return result


def export_ranks(
    program: Program, directory: str | os.PathLike[str], moe: str = "ootb", decompose: tuple[str, ...] = ()
) -> list[RankExport]:
    """Writes every rank's segments into `directory`; a Program without ranks is exported as rank 0."""
    reason = unexportable_reason(program, moe)
    if reason is not None:
        raise OnnxExportError(reason)
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
    values = _simulate(exports, [{"input_ids": input_ids} for _ in exports])
    return [values[r][export.output] for r, export in enumerate(exports)]


def _simulate(exports: list[RankExport], feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """`simulate_ranks` from each rank's graph inputs; returns every rank's values (outputs, presents)."""
    values: list[dict[str, np.ndarray]] = [dict(feed) for feed in feeds]
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
    return values


class RankDecoder:
    """The ranks of a sharded decoder export (a program after `shard` and `kv-cache`) stepped together, with the
    interface of `backends.onnx.decoder.OnnxDecoder`, so `greedy_generate` runs them: its past holds every rank's
    caches (`rank{r}/past_key_values.{i}.key`: each rank's own kv heads or layers)."""

    def __init__(self, exports: list[RankExport], vocab_size: int) -> None:
        from backends.onnx.decoder import OnnxDecoder

        self.exports = exports
        self.vocab_size = vocab_size
        self.caches: list[tuple[int, Any]] = []
        max_seqs = []
        for rank, export in enumerate(exports):
            for segment in export.segments:
                names = [i.name for i in onnx_inputs(segment.path)]
                if "attention_mask" not in names:
                    continue  # a segment without attention (embedding, MoE, lm_head)
                decoder = OnnxDecoder.describe(segment.path)
                max_seqs.append(decoder.max_seq)
                self.caches += [(rank, cache) for cache in decoder.caches]
        if not self.caches:
            raise OnnxExportError("these ranks hold no KV caches: export a program after kv-cache")
        self.max_seq = min(max_seqs)

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {
            f"rank{rank}/{c.name}": np.zeros((batch, c.kv_heads, 0, c.head_dim), dtype=c.dtype)
            for rank, c in self.caches
        }

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        shared = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feeds = [dict(shared) for _ in self.exports]
        for name, value in past.items():
            rank, cache = name.split("/", 1)
            feeds[int(rank.removeprefix("rank"))][cache] = value
        values = _simulate(self.exports, feeds)
        outputs = [values[r][export.output] for r, export in enumerate(self.exports)]
        logits = next(output for output in outputs if output.ndim == 3)  # a pipeline's last stage holds them
        presents = {
            f"rank{rank}/{c.name}": values[rank][c.name.replace("past_key_values", "present", 1)]
            for rank, c in self.caches
        }
        return logits, presents


def onnx_inputs(path: Path) -> list[Any]:
    import onnx

    return list(onnx.load(str(path), load_external_data=False).graph.input)
