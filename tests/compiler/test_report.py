"""`--report`: one self-contained HTML page per pipeline, read back with an HTML parser (and rendered by headless
Chromium where it is installed); Mixtral-8x7B's report stays small and quick."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from compiler import cli
from compiler.api import compile
from compiler.pass_manager import parse_pipeline, run_pipeline
from compiler.report import render_report
from compiler.weights import CheckpointTensor, RandomTensor
from tests.compiler.test_numerics import BROKEN, _cli, checked, history, tiny_traced

SHARDED = "canonicalize,fuse-moe,shard{tp=2},kv-cache,dce"


class _Page(HTMLParser):
    """What the tests look at: every element's tag and attributes in order, and the text inside each <pre>."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.pre: list[str] = []
        self._in_pre = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))
        if tag == "pre":
            self._in_pre, self.pre = True, [*self.pre, ""]

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self._in_pre = False

    def handle_data(self, data: str) -> None:
        if self._in_pre:
            self.pre[-1] += data

    def find(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def _report(spec: str, with_numerics: bool = True) -> str:
    return render_report(tiny_traced(), history(spec), checked(spec) if with_numerics else None)


def test_sharded_report_has_a_section_per_pass_pictures_and_a_rank_selector() -> None:
    text = _report(SHARDED)
    page = _Page(text)
    sections = [a["id"] for a in page.find("section", **{"class": "pass"})]
    assert sections == [f"pass-{i}" for i in range(6)]  # the trace and five passes
    assert [a["id"] for a in page.find("svg")] == ["layer-before-r0", "layer-after-r0", "layer-before-r1", "layer-after-r1"]
    assert [a["value"] for a in page.find("option")] == ["0", "1"] and page.find("select", id="rank")
    ranked = [a for _, a in page.elements if "data-rank" in a]
    assert {a["data-rank"] for a in ranked} == {"0", "1"}
    assert all(("hidden" in a) == (a["data-rank"] == "1") for a in ranked)  # rank 0 shows without JavaScript
    # One diff per pass before shard, one per rank from shard on; dce changed nothing, so it has none.
    assert len(page.find("tr")) == 1 + 6 and len(page.find("details")) == 2 + 2 * 2
    # Diffs are unified hunks, not graphs twice: kv-cache's diff is shorter than the one program it changes.
    kv_cache = next(p for p in page.pre if "moec.cached_attention" in p)
    assert kv_cache.startswith("@@ ") and kv_cache.count("\n") < len(history(SHARDED)[3].program.ranks[0].format().splitlines())
    assert re.search(r"^-  %attention: .* = moec\.attention\(", kv_cache, flags=re.M)
    assert re.search(r"^\+  %cached_attention: .* = moec\.cached_attention\(", kv_cache, flags=re.M)
    assert "numerics: every pass is within its budget" in text
    # Self-contained: no script, style, font or image from anywhere else.
    assert not [a for _, a in page.elements if "src" in a or (a.get("href") or "#").split("#")[0]]
    assert not page.find("link") and "@import" not in text and "url(http" not in text


def test_the_broken_pass_row_is_marked_over_budget() -> None:
    spec = f"canonicalize,fuse-moe,{BROKEN},kv-cache,dce"
    page = _Page(_report(spec))
    assert len(page.find("tr", **{"class": "over"})) == 1
    text = _report(spec)
    row = text[text.index('<tr class="over">') :].split("</tr>")[0]
    assert BROKEN in row and "first diverging layer 2" in row and not page.find("select")


def test_the_report_is_deterministic_apart_from_timings() -> None:
    spec = "canonicalize,fuse-moe,dce"
    first = render_report(tiny_traced(), history(spec))
    again = render_report(tiny_traced(), run_pipeline(tiny_traced(), parse_pipeline(spec)).history)
    timings = re.compile(r'<td class="num">\d+\.\d+</td>|\d+\.\d+s')
    assert first != again and timings.sub("T", first) == timings.sub("T", again)


def test_cli_writes_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "load_traced", lambda args: tiny_traced())
    path = tmp_path / "r.html"
    status, _, err = _cli("compile", "tiny", "--passes", "canonicalize,dce", "--report", str(path), "--no-weights")
    assert status == 0 and f"wrote the pass report to {path} (" in err
    assert [a["id"] for a in _Page(path.read_text()).find("section", **{"class": "pass"})] == ["pass-0", "pass-1", "pass-2"]
    status, _, err = _cli("compile", "tiny", "--report", str(tmp_path / "missing" / "r.html"))
    assert status == 2 and err == f"moec: error: cannot write the report {tmp_path / 'missing' / 'r.html'}: its directory does not exist\n"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs headless Chromium (apt-get install chromium)")
def test_headless_chromium_renders_the_report(tmp_path: Path) -> None:
    page, shot = tmp_path / "report.html", tmp_path / "report.png"
    page.write_text(_report(SHARDED))
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,2400",
         f"--screenshot={shot}", page.as_uri()],
        capture_output=True, timeout=120, check=True,
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a blank page compresses to a few KB
    # The rank selector's script: choosing rank 1 hides rank 0's blocks and shows rank 1's.
    switched = tmp_path / "rank1.html"
    choose = '<script>const s = document.getElementById("rank"); s.value = "1"; s.dispatchEvent(new Event("change"));'
    switched.write_text(page.read_text().replace("</body>", choose + "</script></body>"))
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", switched.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    ranked = [a for _, a in _Page(dom).elements if "data-rank" in a]
    assert ranked and all(("hidden" in a) == (a["data-rank"] == "0") for a in ranked)


@pytest.mark.slow
def test_mixtral_8x7b_report_is_small_quick_and_reads_no_weight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the report read a weight")

    monkeypatch.setattr(RandomTensor, "read", refuse)
    monkeypatch.setattr(CheckpointTensor, "read", refuse)
    compiled = compile("mixtral-8x7b")
    started = time.perf_counter()
    path = compiled.report(tmp_path / "r.html")
    seconds = time.perf_counter() - started
    assert seconds < 5 and path.stat().st_size < 5_000_000, (seconds, path.stat().st_size)
    page = _Page(path.read_text())
    # One section per pass of the default pipeline (canonicalize, fuse-moe, kv-cache, fuse-qkv, fuse-norm, dce) and
    # one for the traced program.
    assert len(page.find("section", **{"class": "pass"})) == 7 and len(page.find("svg")) == 2
