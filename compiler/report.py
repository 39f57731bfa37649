"""`--report report.html`: one self-contained HTML page describing what a pipeline did, pass by pass.

before: the traced program, the pipeline's history (one program per pass) and, when checked, its `NumericsReport`
after:  an HTML file with no external resource (inline CSS, a few lines of inline JS, SVG drawn by
        `compiler.layer_svg`): the pipeline as a table (pass, options, seconds, changed, stats, op counts before and
        after, weight bytes per rank, numerics), one section per pass with the change of its printed graph as a
        unified diff (collapsed in a <details>), and one decoder layer's ops before and after the whole pipeline.
        A sharded program gets a rank selector: diffs, op counts and pictures follow the selected rank.

Deterministic apart from timings. Diffs are unified with 3 lines of context, so a pass that touches few lines stays
small even on Mixtral-8x7B's ~6,500-line programs.
"""

from __future__ import annotations

import difflib
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compiler.errors import MoecError
from compiler.ir import Program
from compiler.layer_svg import layer_svg, layers_of
from compiler.pass_manager import PassRecord

CONTEXT_LINES = 3

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.5em; margin: 0 0 .2em; } h2 { font-size: 1.15em; margin: 1.4em 0 .4em; }
header p { margin: .2em 0; color: #555; }
code, pre, td.mono { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
table { border-collapse: collapse; width: 100%; }
th, td { border: 1px solid #d8d8de; padding: 3px 6px; vertical-align: top; text-align: left; }
th { background: #f3f3f6; position: sticky; top: 0; }
td.num { text-align: right; white-space: nowrap; }
td.numerics { min-width: 17em; }
tr.over td { background: #fde8e8; }
.ok { color: #17743a; } .bad { color: #b3261e; font-weight: 600; }
.delta-add { color: #17743a; } .delta-del { color: #b3261e; }
section.pass { border-top: 1px solid #e3e3e8; }
details > summary { cursor: pointer; color: #2452a6; }
pre.diff { background: #fafafa; border: 1px solid #e3e3e8; padding: 6px; overflow: auto; max-height: 70vh; }
pre.diff span { display: block; }
pre.diff .add { color: #17743a; background: #eafbea; }
pre.diff .del { color: #b3261e; background: #fdeeee; }
pre.diff .hunk { color: #6a3fb0; }
.pictures { display: flex; gap: 1.5em; align-items: flex-start; }
.pictures figure { flex: 1 1 0; margin: 0; min-width: 0; overflow: auto; max-height: 90vh; border: 1px solid #e3e3e8; }
.pictures figcaption { font-weight: 600; padding: 4px 8px; background: #f3f3f6; }
svg.layer { max-width: 100%; height: auto; display: block; cursor: zoom-in; }
svg.layer.full { max-width: none; cursor: zoom-out; }
svg.layer .edge { fill: none; stroke: #9a9aa5; stroke-width: 1; }
svg.layer .arrowhead { fill: #9a9aa5; }
svg.layer text { font: 12px ui-monospace, Menlo, Consolas, monospace; text-anchor: middle; fill: #1d1d1f; }
svg.layer .node rect { stroke-width: 1.2; }
svg.layer .aten rect { fill: #eef0f4; stroke: #8a90a0; }
svg.layer .moec rect { fill: #dbe8ff; stroke: #2452a6; }
svg.layer .collective rect { fill: #ffe7c7; stroke: #b86e00; }
svg.layer .outside rect { fill: #fff; stroke: #8a90a0; stroke-dasharray: 4 3; }
.legend span { display: inline-block; padding: 0 6px; margin-right: 6px; border: 1px solid #8a90a0; border-radius: 4px; }
.note { color: #666; }
"""

SCRIPT = """
const select = document.getElementById("rank");
function showRank(rank) {
  document.querySelectorAll("[data-rank]").forEach(e => { e.hidden = e.dataset.rank !== rank; });
}
if (select) { select.addEventListener("change", () => showRank(select.value)); showRank(select.value); }
document.querySelectorAll("svg.layer").forEach(svg => svg.addEventListener("click", () => svg.classList.toggle("full")));
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _ranks(program: Program) -> Sequence[Program]:
    return program.ranks or (program,)


def _per_rank(values: Sequence[str], sharded: bool) -> str:
    """One block per rank, shown when its rank is selected; a single block as is."""
    if not sharded:
        return values[0]
    return "".join(
        f'<div data-rank="{r}"{"" if r == 0 else " hidden"}>{value}</div>' for r, value in enumerate(values)
    )


def _rank_programs(program: Program, world: int) -> list[Program]:
    """The program each rank ran at this point: its own once sharded, the one unsharded program before."""
    return list(program.ranks) if program.ranks else [program] * world


def _op_delta(before: Program, after: Program) -> str:
    old, new = before.op_counts(), after.op_counts()
    rows = []
    for name in sorted(set(old) | set(new)):
        if old[name] != new[name]:
            css = "delta-add" if new[name] > old[name] else "delta-del"
            rows.append(f'<span class="{css}">{_e(name)} {old[name]}&rarr;{new[name]}</span>')
    total_old, total_new = sum(old.values()), sum(new.values())
    head = f"{total_old}&rarr;{total_new} ops"
    return head + ("<br>" + "<br>".join(rows) if rows else " (same counts)")


def _diff(before: str, after: str, label: str) -> str:
    if before == after:
        return '<p class="note">the printed graph did not change</p>'
    lines = list(difflib.unified_diff(
        before.splitlines(), after.splitlines(), "before", "after", n=CONTEXT_LINES, lineterm=""
    ))
    added = sum(1 for line in lines if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in lines if line.startswith("-") and not line.startswith("---"))
    # One block per line, its newline inside (copying the text keeps the lines apart; no blank line between blocks).
    body = "".join(
        f'<span class="{ {"+": "add", "-": "del", "@": "hunk"}.get(line[:1], "ctx") }">{_e(line)}\n</span>'
        for line in lines[2:]
    )
    return (
        f"<details><summary>diff of the printed graph{_e(label)}: +{added} &minus;{removed} lines</summary>"
        f'<pre class="diff">{body}</pre></details>'
    )


def _numerics_cells(row: Any) -> str:
    if row is None:
        return "<td></td>"
    state = '<span class="bad">over budget</span>' if row.over_budget else '<span class="ok">ok</span>'
    if row.index == 0:
        state = "reference"
    parts = [state]
    if row.index:
        parts.append(f"step {row.step.max_rel_err:.1e}, vs trace {row.vs_trace.max_rel_err:.1e}")
        parts.append(f"top-1 vs trace {100 * (row.vs_trace.top1 or 0):.1f}%")
    if row.perplexity is not None:
        parts.append(f"perplexity {row.perplexity:.3f}")
    if row.index and row.first_layer is not None:
        parts.append(f"first diverging layer {row.first_layer}")
    if row.budget is not None:
        parts.append(_e(row.budget_text()))
    if row.over_budget:
        parts.append(_e(row.over_budget))
    return f'<td class="mono numerics">{"<br>".join(parts)}</td>'


def render_report(traced: Program, history: Sequence[PassRecord], numerics: Any = None) -> str:
    """The report's HTML text (see the module docstring)."""
    world = max([len(traced.ranks), *(len(record.program.ranks) for record in history)])
    sharded = world > 0
    world = max(world, 1)
    programs = [traced, *(record.program for record in history)]
    texts: dict[int, list[str]] = {}  # per program (by position): each rank's printed graph, formatted once
    for index, program in enumerate(programs):
        formatted: dict[int, str] = {}
        texts[index] = []
        for each in _rank_programs(program, world):
            if id(each) not in formatted:
                formatted[id(each)] = each.format()
            texts[index].append(formatted[id(each)])
    rows_by_index = {row.index: row for row in numerics.rows} if numerics is not None else {}

    final = history[-1].spec if history else "trace"
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>moec pass report: {_e(traced.source_description or 'program')}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<header><h1>moec pass report</h1>",
        f"<p>{_e(traced.source_description or 'program')}</p>",
        f"<p>pipeline: <code>{_e(','.join(r.spec for r in history) or '(none)')}</code>; traced in "
        f"{traced.trace_seconds:.1f}s</p>",
    ]
    if sharded:
        options = "".join(f'<option value="{r}">rank {r}</option>' for r in range(world))
        out.append(f'<p><label>rank <select id="rank">{options}</select></label> '
                   f'<span class="note">(diffs, op counts and pictures of the selected rank)</span></p>')
    out.append("</header>")
    if numerics is not None:
        css = "bad" if numerics.first_diverging is not None else "ok"
        out.append(f'<section id="numerics"><h2>Numerics</h2><p class="{css}">{_e(numerics.summary())}</p>'
                   f'<p class="note">{_e(numerics.sample.description)}; reference: the traced program</p></section>')

    out.append('<section id="pipeline"><h2>Pipeline</h2><table><thead><tr><th>#</th><th>pass</th><th>options</th>'
               '<th>seconds</th><th>changed</th><th>stats</th><th>op counts before&rarr;after</th>'
               '<th>weight bytes per rank</th><th>numerics</th></tr></thead><tbody>')
    out.append(f'<tr><td class="num">0</td><td><a href="#pass-0">trace</a></td><td></td>'
               f'<td class="num">{traced.trace_seconds:.2f}</td><td></td><td></td>'
               f'<td>{sum(traced.op_counts().values())} ops</td><td class="num">{traced.weight_bytes():,}</td>'
               f'{_numerics_cells(rows_by_index.get(0))}</tr>')
    for position, record in enumerate(history, start=1):
        before, after = programs[position - 1], programs[position]
        row = rows_by_index.get(position)
        css = ' class="over"' if row is not None and row.over_budget else ""
        options = ", ".join(f"{k}={v}" for k, v in record.options.items()) or "&ndash;"
        stats = "<br>".join(f"{_e(k)}={_e(v)}" for k, v in record.stats.items()) or "&ndash;"
        ranked = bool(before.ranks or after.ranks)
        deltas = [
            _op_delta(b, a) for b, a in zip(_rank_programs(before, world), _rank_programs(after, world))
        ]
        weights = "<br>".join(
            f"r{r}: {p.weight_bytes():,}" if after.ranks else f"{p.weight_bytes():,}"
            for r, p in enumerate(_ranks(after))
        )
        out.append(
            f'<tr{css}><td class="num">{position}</td><td><a href="#pass-{position}">{_e(record.spec)}</a></td>'
            f'<td class="mono">{_e(options) if record.options else options}</td>'
            f'<td class="num">{record.seconds:.3f}</td><td>{"yes" if record.changed else "no"}</td>'
            f'<td class="mono">{stats}</td><td class="mono">{_per_rank(deltas, ranked)}</td>'
            f'<td class="num mono">{weights}</td>{_numerics_cells(row)}</tr>'
        )
    out.append("</tbody></table></section>")

    out.append(_pictures(traced, programs[-1], final, world, sharded))

    out.append('<section class="pass" id="pass-0"><h2>0. trace</h2>'
               f'<p>{len(texts[0][0].splitlines())} lines printed; every later section diffs against the program '
               'before it.</p></section>')
    for position, record in enumerate(history, start=1):
        stats = ", ".join(f"{k}={v}" for k, v in record.stats.items())
        # Before `shard`, every rank runs the same program: one diff, shown whatever rank is selected.
        ranked = bool(programs[position - 1].ranks or programs[position].ranks)
        diffs = [
            _diff(texts[position - 1][r], texts[position][r], f" (rank {r})" if ranked else "")
            for r in range(world if ranked else 1)
        ]
        out.append(
            f'<section class="pass" id="pass-{position}"><h2>{position}. {_e(record.spec)}</h2>'
            f'<p>{record.seconds:.3f}s, changed={"yes" if record.changed else "no"}'
            f'{"; " + _e(stats) if stats else ""}</p>{_per_rank(diffs, ranked)}</section>'
        )
    out.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(out) + "\n"


def _pictures(traced: Program, final: Program, final_spec: str, world: int, sharded: bool) -> str:
    """One decoder layer before (the trace) and after the pipeline: layer 0, or the first a pipeline stage holds."""
    figures = []
    for r, program in enumerate(_rank_programs(final, world)):
        layers = layers_of(program)
        if not layers:
            figures.append('<p class="note">this program has no decoder layer</p>')
            continue
        layer = layers[0]
        before = layer_svg(traced, layer, f"layer-before-r{r}")
        after = layer_svg(program, layer, f"layer-after-r{r}")
        figures.append(
            f'<div class="pictures"><figure><figcaption>layer {layer} as traced</figcaption>{before}</figure>'
            f'<figure><figcaption>layer {layer} after {_e(final_spec)}'
            f'{f" (rank {r})" if sharded else ""}</figcaption>{after}</figure></div>'
        )
    legend = ('<p class="legend"><span style="background:#dbe8ff">moec op</span><span style="background:#eef0f4">aten '
              'op</span><span style="background:#ffe7c7">collective</span><span style="border-style:dashed">value '
              'from outside the layer</span> hover an op for its printed line and weights; click a picture for its '
              'full size</p>')
    return f'<section id="layer"><h2>One decoder layer, before and after</h2>{legend}{_per_rank(figures, sharded)}</section>'


def write_report(path: str | Path, traced: Program, history: Sequence[PassRecord], numerics: Any = None) -> Path:
    """Writes the report to `path` (its directory must exist); returns the path."""
    target = Path(path)
    text = render_report(traced, history, numerics)
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as error:
        raise MoecError(f"cannot write the report {target}: {error.strerror}") from None
    return target
