"""A picture of one decoder layer's ops as SVG, laid out by moec itself (no Graphviz): for the pass report.

before: a program and a layer index
after:  `<svg>` text: one box per op of the layer (colored by namespace: moec, aten, collectives), dashed boxes for
        the values it reads from outside (the residual stream, rotary cos/sin, caches; weights are left out and
        named in each op's tooltip), arrows for data flow, top to bottom.

Layout: an op's row is one more than the deepest op it reads (longest path); an outside value sits just above its
first reader. Within a row, ops are ordered by the mean position of what they read and of what reads them (a few
barycenter sweeps), then packed and centered. Deterministic: the same program draws the same picture.
"""

from __future__ import annotations

import html
import re

import torch.fx

from compiler import collectives
from compiler.ir import Program, _symbol_names, format_node, op_name
from compiler.rewrite import layer_of

ROW_HEIGHT, BOX_HEIGHT, GAP, CHAR_WIDTH, MARGIN = 54, 24, 14, 7.2, 16
SWEEPS = 4


def layer_nodes(program: Program, layer: int) -> list[torch.fx.Node]:
    """The call nodes of `layers.{layer}`, plus unattributed ones wedged inside it (a shard pass's all_reduce reads
    the layer's o_proj and feeds its residual add), in graph order."""
    name = f"layers.{layer}"
    inside = {
        n for n in program.graph.nodes if n.op == "call_function" and layer_of(n) == name and not _is_weight(n)
    }
    changed = True
    while changed:
        changed = False
        for node in program.graph.nodes:
            if node in inside or node.op != "call_function" or layer_of(node) != "?":
                continue
            tensor_inputs = [a for a in node.all_input_nodes if not _is_weight(a)]
            if tensor_inputs and all(a in inside for a in tensor_inputs) and any(u in inside for u in node.users):
                inside.add(node)
                changed = True
    return [n for n in program.graph.nodes if n in inside]


def layers_of(program: Program) -> list[int]:
    found = set()
    for node in program.graph.nodes:
        match = re.fullmatch(r"layers\.(\d+)", layer_of(node)) if node.op == "call_function" else None
        if match:
            found.add(int(match.group(1)))
    return sorted(found)


def _is_weight(node: torch.fx.Node) -> bool:
    """A weight, or an op computed from weights only (the trace's `select` of one expert's slice): not drawn."""
    if node.op == "placeholder":
        return "weight" in node.meta
    return node.op == "call_function" and bool(node.all_input_nodes) and all(_is_weight(a) for a in node.all_input_nodes)


def _label(node: torch.fx.Node, inside: bool) -> str:
    if not inside:
        return "%" + (node.name if len(node.name) <= 22 else node.name[:21] + "…")
    return op_name(node).split(".")[1] if "." in op_name(node) else op_name(node)


def _kind(node: torch.fx.Node) -> str:
    if node.target in collectives.COLLECTIVE_OPS:
        return "collective"
    return "moec" if op_name(node).startswith("moec.") else "aten"


def layer_svg(program: Program, layer: int, element_id: str) -> str:
    """The SVG of `layers.{layer}` of `program` (a single-rank program); `element_id` keeps its marker ids unique."""
    nodes = layer_nodes(program, layer)
    if not nodes:
        return f'<p class="note">layer {layer} has no ops in this program</p>'
    inside = set(nodes)
    outside: list[torch.fx.Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and not _is_weight(arg) and arg not in outside:
                outside.append(arg)
    row: dict[torch.fx.Node, int] = {}
    for node in nodes:
        row[node] = 1 + max((row[a] for a in node.all_input_nodes if a in inside), default=0)
    for value in outside:
        row[value] = min(row[u] for u in value.users if u in inside) - 1
    rows: dict[int, list[torch.fx.Node]] = {}
    for node in [*outside, *nodes]:
        rows.setdefault(row[node], []).append(node)
    order = _order(rows, inside)
    width_of = {n: CHAR_WIDTH * len(_label(n, n in inside)) + 16 for n in row}
    row_widths = {r: sum(width_of[n] for n in members) + GAP * (len(members) - 1) for r, members in order.items()}
    total_width = max(row_widths.values()) + 2 * MARGIN
    first_row = min(order)
    x: dict[torch.fx.Node, float] = {}
    y: dict[torch.fx.Node, float] = {}
    for r, members in order.items():
        cursor = MARGIN + (total_width - 2 * MARGIN - row_widths[r]) / 2
        for node in members:
            x[node], y[node] = cursor + width_of[node] / 2, MARGIN + (r - first_row) * ROW_HEIGHT
            cursor += width_of[node] + GAP
    height = MARGIN * 2 + (max(order) - first_row) * ROW_HEIGHT + BOX_HEIGHT
    names = _symbol_names(program)
    marker = f"{element_id}-arrow"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="{element_id}" class="layer" width="{total_width:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {total_width:.0f} {height:.0f}" role="img" '
        f'aria-label="decoder layer {layer}: {len(nodes)} ops">',
        f'<defs><marker id="{marker}" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L8,4 L0,8 z" class="arrowhead"/></marker></defs>',
    ]
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg in x:
                x1, y1, x2, y2 = x[arg], y[arg] + BOX_HEIGHT, x[node], y[node]
                bend = (y2 - y1) / 2
                parts.append(
                    f'<path class="edge" d="M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} {x2:.1f},{y2 - bend:.1f} '
                    f'{x2:.1f},{y2:.1f}" marker-end="url(#{marker})"/>'
                )
    for node in [*outside, *nodes]:
        is_inside = node in inside
        kind = _kind(node) if is_inside else "outside"
        weights = [a.name for a in node.all_input_nodes if _is_weight(a)] if is_inside else []
        tooltip = format_node(node, names) + ("".join(f"\n  weight %{w}" for w in weights))
        left, top = x[node] - width_of[node] / 2, y[node]
        parts.append(
            f'<g class="node {kind}"><title>{html.escape(tooltip)}</title>'
            f'<rect x="{left:.1f}" y="{top:.1f}" width="{width_of[node]:.1f}" height="{BOX_HEIGHT}" rx="5"/>'
            f'<text x="{x[node]:.1f}" y="{top + BOX_HEIGHT / 2 + 4:.1f}">{html.escape(_label(node, is_inside))}</text></g>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _order(rows: dict[int, list[torch.fx.Node]], inside: set[torch.fx.Node]) -> dict[int, list[torch.fx.Node]]:
    """Rows reordered by barycenters of neighbors in the rows above (downward sweeps) and below (upward sweeps)."""
    order = {r: list(members) for r, members in sorted(rows.items())}
    position = {n: i for members in order.values() for i, n in enumerate(members)}
    for sweep in range(SWEEPS):
        downward = sweep % 2 == 0
        for r in sorted(order) if downward else sorted(order, reverse=True):
            def key(node: torch.fx.Node) -> float:
                if downward:
                    neighbors = [a for a in node.all_input_nodes if a in position]
                else:
                    neighbors = [u for u in node.users if u in inside and u in position]
                return sum(position[n] for n in neighbors) / len(neighbors) if neighbors else position[node]

            order[r].sort(key=key)
            for i, node in enumerate(order[r]):
                position[node] = i
    return order
