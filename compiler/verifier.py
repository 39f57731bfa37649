"""The verifier run after every pass: graph lint, weight/type agreement, KV cache wiring, and shape/dtype
re-propagation.

Re-propagation runs every node's fake kernel (moec ops check their own operands there) on the recorded fake
inputs and compares the result with the node's recorded `val`, so a pass that wires a wrong tensor, or records
a stale type, is caught at the pass that did it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode

from compiler import ops
from compiler.errors import VerificationError
from compiler.ir import Program, _symbol_names, format_value_type, op_name


def _where(after: str | None, before: Sequence[str]) -> str:
    if after is None:
        return "in the traced program"
    history = f" (passes before it: {', '.join(before)})" if before else " (the first pass)"
    return f"after pass {after!r}{history}"


def _same_type(recorded: Any, computed: Any) -> bool:
    if isinstance(recorded, torch.Tensor) and isinstance(computed, torch.Tensor):
        return recorded.dtype == computed.dtype and recorded.shape == computed.shape
    if isinstance(recorded, (tuple, list)) and isinstance(computed, (tuple, list)):
        return len(recorded) == len(computed) and all(_same_type(a, b) for a, b in zip(recorded, computed))
    return True


def propagate_types(program: Program, check: bool = False) -> None:
    """Recomputes `node.meta["val"]` for every call node (filling it in where a pass left it out).

    With `check`, a disagreement with an already recorded value raises `VerificationError` instead.
    """
    values = [node.meta["val"] for node in program.graph.nodes if "val" in node.meta]
    fake_mode = detect_fake_mode(values)
    if fake_mode is None:
        raise VerificationError("program has no fake values to propagate types from")
    env: dict[torch.fx.Node, Any] = {}
    names = _symbol_names(program)
    with fake_mode:
        for node in program.graph.nodes:
            if node.op == "placeholder":
                if "val" not in node.meta:
                    raise VerificationError(f"placeholder %{node.name} has no recorded type")
                env[node] = node.meta["val"]
                continue
            if node.op == "output":
                continue
            if node.op != "call_function":
                raise VerificationError(f"node %{node.name} has unsupported kind {node.op!r}")
            recorded = node.meta.get("val")
            key = _check_key(node)
            if check and recorded is not None and node.meta.get("verified_key") == key:
                # Same op on the very same input values as when last verified (a pass left it alone).
                env[node] = recorded
                continue
            args = torch.fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
            try:
                computed = node.target(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - any kernel failure is a verification failure of this node
                message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise _NodeError(node, f"its operands are invalid: {message}") from error
            if check and recorded is not None and not _same_type(recorded, computed):
                raise _NodeError(
                    node,
                    f"recorded type {format_value_type(recorded, names)} but its operands give "
                    f"{format_value_type(computed, names)}",
                )
            if (recorded is None or not check) and computed is not None:
                node.meta["val"] = computed
            env[node] = computed if recorded is None else recorded
            if check:
                node.meta["verified_key"] = key


def _check_key(node: torch.fx.Node) -> tuple[Any, ...]:
    """Identity of a node's computation: its target, its own recorded value and its arguments, with input nodes
    replaced by their values' identities (values are shared, not copied, between a program and its clones).

    The node's own value is part of it so that a pass re-recording a node's type gets that node re-checked."""
    def ident(arg: Any) -> Any:
        return ("value", id(arg.meta.get("val")), id(arg.meta.get("weight"))) if isinstance(arg, torch.fx.Node) else arg

    args = torch.fx.node.map_aggregate(node.args, lambda a: ident(a) if isinstance(a, torch.fx.Node) else a)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, lambda a: ident(a) if isinstance(a, torch.fx.Node) else a)
    return (node.target, id(node.meta.get("val")), repr(args), repr(kwargs))


class _NodeError(Exception):
    def __init__(self, node: torch.fx.Node, reason: str) -> None:
        super().__init__(f"node %{node.name} ({op_name(node)}): {reason}")


_CACHE_OPERANDS = {3: "key", 4: "value"}  # positions of k_cache / v_cache in both ops.CACHED_ATTENTIONS


def _check_caches(program: Program) -> None:
    """KV caches are the only operands the IR mutates, so their wiring is checked exactly: each cache placeholder
    has the type its spec describes and is the key (or value) cache of exactly one cached attention, and every cached
    attention reads caches and an int64 [batch] cache_position input."""
    for node in program.cache_nodes():
        spec, value = node.meta["kv_cache"], node.meta.get("val")
        typed = isinstance(value, torch.Tensor) and value.dim() == 4
        if not typed or tuple(value.shape[1:]) != spec.shape_per_sequence or value.dtype != spec.dtype:
            raise _NodeError(node, f"kv cache spec ({spec.describe()}, {spec.dtype}) disagrees with its recorded type")
        uses = [(user, index) for user in node.users for index, arg in enumerate(user.args) if arg is node]
        reader = uses[0][0] if len(uses) == 1 else None
        if reader is None or reader.target not in ops.CACHED_ATTENTIONS or _CACHE_OPERANDS.get(uses[0][1]) != spec.kind:
            raise _NodeError(
                node, f"a {spec.kind} cache must be the {spec.kind} cache operand of exactly one cached_attention"
            )
    for node in program.graph.nodes:
        if node.target not in ops.CACHED_ATTENTIONS:
            continue
        for index, kind in _CACHE_OPERANDS.items():
            operand = node.args[index]
            if not (isinstance(operand, torch.fx.Node) and operand.op == "placeholder" and "kv_cache" in operand.meta):
                raise _NodeError(node, f"its {kind} cache is not a kv cache input (caches are the runtime's state)")
        position = node.args[5]
        value = position.meta.get("val") if isinstance(position, torch.fx.Node) else None
        is_input = isinstance(position, torch.fx.Node) and position.op == "placeholder"
        if not (is_input and isinstance(value, torch.Tensor) and value.dtype == torch.int64 and value.dim() == 1):
            raise _NodeError(node, "its cache_position is not an int64 [batch] input")


def verify_program(program: Program, after: str | None = None, before: Sequence[str] = ()) -> None:
    """Raises `VerificationError` naming the node, the pass that produced the graph and the passes before it."""
    where = _where(after, before)
    try:
        program.graph.lint()
    except Exception as error:  # noqa: BLE001 - fx reports malformed graphs with assorted exception types
        raise VerificationError(f"graph is malformed {where}: {error}") from None
    for node in program.weight_nodes():
        expr = node.meta["weight"]
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and (tuple(value.shape) != tuple(expr.shape) or value.dtype != expr.dtype):
            raise VerificationError(
                f"verification failed {where}: node %{node.name}: weight expression is {expr.type_str} "
                f"but the graph uses it as {format_value_type(value, {})}"
            )
    try:
        _check_caches(program)
    except _NodeError as error:
        raise VerificationError(f"verification failed {where}: {error}") from None
    for node in program.graph.nodes:
        if node.op == "call_function" and node.users and "val" not in node.meta:
            raise VerificationError(f"verification failed {where}: node %{node.name} ({op_name(node)}) has no type")
    try:
        propagate_types(program, check=True)
    except _NodeError as error:
        raise VerificationError(f"verification failed {where}: {error}") from None
