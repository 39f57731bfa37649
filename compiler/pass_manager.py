"""Passes, their registry, pipeline strings, and the pass manager that verifies after every pass.

A pass is a frozen dataclass: its fields are its options, so `"shard{tp=2,moe_ep=2}"` on the command line and
`ShardTensorParallel(tp=2, moe_ep=2)` in Python are the same object. `run` returns a `PassResult` holding a NEW
program; the input program is never mutated.
"""

from __future__ import annotations

import dataclasses
import re
import time
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from compiler.errors import PassOptionError, PreconditionError, VerificationError
from compiler.ir import Program


@dataclass(frozen=True)
class PassResult:
    program: Program
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NumericsBudget:
    """How far one run of a pass may move the logits from those of the program it was given (`--check-numerics`).

    `max_rel_err` bounds max |after - before| / max |before| over the sample's logits (and, with layers, each decoder
    layer's hidden state); `max_perplexity_change` bounds the relative change of the sample's perplexity where it is
    real text (None: not checked). An exact pass only reorders float arithmetic: fp32 rounding (16-bit programs get a
    wider exact bound, see `compiler/numerics.py`).
    """

    kind: str = "exact"
    max_rel_err: float = 1e-5
    max_perplexity_change: float | None = None


EXACT = NumericsBudget()


@dataclass(frozen=True)
class Pass:
    """Base class. Subclasses set `name`, declare options as fields, and implement `run`."""

    name: ClassVar[str] = ""
    # A pass that does not handle sharded programs itself is run on each rank's program by the pass manager.
    handles_ranks: ClassVar[bool] = False

    def requires(self, program: Program) -> None:
        """Raises `PreconditionError` if the program is not in a state this pass can handle."""

    def run(self, program: Program) -> PassResult:
        raise NotImplementedError

    def explain(self, program: Program) -> list[str]:
        """Why the pass would or would not rewrite each region (for `--explain`)."""
        return [f"{self.name}: no explanation available"]

    def numerics_budget(self) -> NumericsBudget:
        """What `--check-numerics` allows one run of this pass: exact unless the pass is lossy by design."""
        return EXACT

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """The pipeline-string form of this pass, with non-default options only."""
        changed = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        }
        if not changed:
            return self.name
        inner = ",".join(f"{k}={_format_option(v)}" for k, v in changed.items())
        return f"{self.name}{{{inner}}}"


def _format_option(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", cls.name):
        raise ValueError(f"pass name {cls.name!r} is not kebab-case")
    if cls.name in _REGISTRY:
        raise ValueError(f"pass {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name. The registry is filled by whoever uses it: the driver (`compiler.api`,
    `compiler.cli`) imports the `passes` package, and so may any program that defines passes of its own."""
    return dict(sorted(_REGISTRY.items()))


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise PassOptionError(f"unbalanced '}}' in pipeline {text!r}")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise PassOptionError(f"unbalanced '{{' in pipeline {text!r}")
    parts.append("".join(current))
    return [part.strip() for part in parts]


def _convert_option(pass_name: str, key: str, raw: str, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    choices = typing.get_args(annotation) if origin is typing.Literal else None
    try:
        if annotation is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if annotation is int:
            return int(raw)
        if annotation is float:
            return float(raw)
    except ValueError:
        raise PassOptionError(
            f"option {key}={raw!r} of pass {pass_name!r} is not a valid {annotation.__name__}"
        ) from None
    if choices is not None and raw not in choices:
        raise PassOptionError(f"option {key}={raw!r} of pass {pass_name!r} must be one of {', '.join(choices)}")
    return raw


def parse_pass(text: str) -> Pass:
    """`name` or `name{key=value,...}` into a configured pass instance."""
    match = re.fullmatch(r"\s*([A-Za-z0-9_-]+)\s*(?:\{(.*)\})?\s*", text, flags=re.DOTALL)
    if not match:
        raise PassOptionError(f"malformed pass {text!r}; expected name or name{{key=value,...}}")
    name, body = match.group(1), match.group(2)
    passes = registered_passes()
    if name not in passes:
        raise PassOptionError(f"unknown pass {name!r}; known passes: {', '.join(passes)}")
    cls = passes[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    options: dict[str, Any] = {}
    if body is not None and body.strip():
        for item in body.split(","):
            if "=" not in item:
                raise PassOptionError(f"malformed option {item.strip()!r} of pass {name!r}; expected key=value")
            key, raw = (part.strip() for part in item.split("=", 1))
            if key not in fields:
                known = ", ".join(sorted(fields)) or "none"
                raise PassOptionError(f"pass {name!r} has no option {key!r} (options: {known})")
            if key in options:
                raise PassOptionError(f"option {key!r} of pass {name!r} is given twice")
            options[key] = _convert_option(name, key, raw, hints[key])
    instance = cls(**options)
    validate = getattr(instance, "validate_options", None)
    if validate is not None:
        validate()
    return instance


def parse_pipeline(spec: str | Pass | Iterable[str | Pass]) -> list[Pass]:
    """`"dce,cse,shard{tp=2}"` or a list of names/instances into pass instances."""
    if isinstance(spec, Pass):
        return [spec]
    if isinstance(spec, str):
        if not spec.strip():
            return []
        return [parse_pass(part) for part in _split_top_level(spec)]
    result: list[Pass] = []
    for item in spec:
        result.extend(parse_pipeline(item))
    return result


@dataclass(frozen=True)
class PassRecord:
    """What one pass did: kept for the CLI's history, dumps and `graph after` queries."""

    index: int
    name: str
    spec: str
    options: dict[str, Any]
    seconds: float
    changed: bool
    stats: dict[str, Any]
    program: Program
    numerics: NumericsBudget = EXACT  # the pass's `numerics_budget()`


@dataclass(frozen=True)
class PipelineResult:
    program: Program
    history: list[PassRecord]


def run_pipeline(
    program: Program,
    passes: Sequence[Pass],
    verify: bool = True,
    on_pass: Callable[[PassRecord], None] | None = None,
) -> PipelineResult:
    """Runs passes in order, verifying after each; errors name the pass and the passes that ran before it."""
    history: list[PassRecord] = []
    if verify:
        _verify(program, after=None, before=[])
    for index, pass_ in enumerate(passes):
        earlier = [record.spec for record in history]
        targets = program.ranks if program.ranks and not pass_.handles_ranks else (program,)
        try:
            for target in targets:
                pass_.requires(target)
        except PreconditionError as error:
            ran = f" (after {', '.join(earlier)})" if earlier else " (it ran first)"
            raise PreconditionError(f"pass {pass_.spec()!r} cannot run{ran}: {error}") from None
        started = time.perf_counter()
        if targets is program.ranks:
            result = _run_on_ranks(pass_, program)
        else:
            result = pass_.run(program)
        seconds = time.perf_counter() - started
        if result.program is program:
            raise VerificationError(f"pass {pass_.spec()!r} returned its input program instead of a new one")
        if verify:
            _verify(result.program, after=pass_.spec(), before=earlier)
        record = PassRecord(
            index + 1, pass_.name, pass_.spec(), pass_.options(), seconds, result.changed, dict(result.stats),
            result.program, pass_.numerics_budget(),
        )
        history.append(record)
        if on_pass is not None:
            on_pass(record)
        program = result.program
    return PipelineResult(program, history)


def _run_on_ranks(pass_: Pass, program: Program) -> PassResult:
    """Runs a rank-unaware pass on every rank's program; the logical graph is carried over unchanged."""
    results = [pass_.run(rank) for rank in program.ranks]
    for rank, result in zip(program.ranks, results):
        if result.program is rank:
            raise VerificationError(f"pass {pass_.spec()!r} returned its input program instead of a new one")
    sharded = dataclasses.replace(program, ranks=tuple(result.program for result in results))
    stats: dict[str, Any] = {}
    for result in results:
        for key, value in result.stats.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            stats[key] = stats.get(key, 0) + value if numeric else stats.get(key, value)
    return PassResult(sharded, any(result.changed for result in results), stats)


def _verify(program: Program, after: str | None, before: Sequence[str]) -> None:
    """Verifies a program and, when it is sharded, each rank's program (errors name the rank)."""
    from compiler.verifier import verify_program

    verify_program(program, after=after, before=before)
    for index, rank in enumerate(program.ranks):
        try:
            verify_program(rank, after=after, before=before)
        except VerificationError as error:
            raise VerificationError(f"rank {index}: {error}") from None
