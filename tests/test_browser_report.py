"""The HTML report in a real browser: headless Chromium loads it with no console errors, and plots render.

Chromium is Debian's ``chromium`` (/usr/bin/chromium); when missing, a session fixture runs
``scripts/ensure_chromium.sh`` once (apt-get) and the tests skip, naming the reason, if that fails.
Set ``MDIFF_NO_CHROMIUM_INSTALL=1`` to skip instead of installing.  The browser is driven over the
DevTools protocol by ``tests/browser.py`` (standard library only).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser import BrowserError, find_chromium, open_page  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENSURE = ROOT / "scripts" / "ensure_chromium.sh"
HEADS_FIG = "fig-rq4-heads-result-raw"


@pytest.fixture(scope="session")
def chromium(tmp_path_factory) -> str:
    """A working headless Chromium, installed at most once per session; else skip with the reason."""
    exe = find_chromium()
    if exe is None:
        if os.environ.get("MDIFF_NO_CHROMIUM_INSTALL"):
            pytest.skip("chromium not installed (MDIFF_NO_CHROMIUM_INSTALL set, not installing)")
        try:
            r = subprocess.run(["bash", str(ENSURE)], capture_output=True, text=True, timeout=900)
            said = (r.stdout.strip().splitlines() or [r.stderr.strip() or f"exit {r.returncode}"])[-1]
        except (OSError, subprocess.TimeoutExpired) as e:
            said = f"{ENSURE.name} did not run: {e}"
        exe = find_chromium()
        if exe is None:
            said = said.removeprefix("ensure_chromium: FAILED: ")
            pytest.skip(f"chromium not installed and `apt-get install chromium` failed: {said}")
    # smoke: it must start headless and load a trivial page, else it is the machine, not the report
    page = tmp_path_factory.mktemp("browser-smoke") / "blank.html"
    page.write_text("<!doctype html><html><head><meta charset='utf-8'></head><body>ok</body></html>")
    try:
        with open_page(page, chromium=exe) as p:
            assert p.evaluate("document.body.textContent") == "ok"
    except (BrowserError, OSError) as e:
        pytest.skip(f"chromium at {exe} does not run headless here: {e}")
    return exe


# ------------------------------------------------------------------ checks shared by stand-in and real report

CHECK_JS = """(() => {
  const figs = Array.from(document.querySelectorAll('.mdiff-figure'));
  const plots = Array.from(document.querySelectorAll('.mdiff-figure .js-plotly-plot'));
  const heads = document.querySelector('#HEADS_FIG .js-plotly-plot');
  const img = heads && heads.querySelector('.heatmaplayer image');
  return {
    plotly: typeof window.Plotly === 'object' && typeof window.Plotly.newPlot === 'function',
    figures: figs.map(f => f.id),
    figures_without_plot: figs.filter(f => !f.querySelector('.js-plotly-plot')).map(f => f.id),
    plots: plots.length,
    unrendered: plots.filter(g => !g._fullLayout || !g.querySelector('svg.main-svg'))
                     .map(g => (g.closest('.mdiff-figure') || g).id || g.id),
    heads_found: !!heads,
    heads_type: heads && heads._fullData && heads._fullData.length ? heads._fullData[0].type : null,
    heads_layer: !!(heads && heads.querySelector('.heatmaplayer')),
    heads_image: !!(img && (img.getAttribute('href') || img.getAttribute('xlink:href') || '').startsWith('data:')
                    && parseFloat(img.getAttribute('width')) > 0),
  };
})()""".replace("HEADS_FIG", HEADS_FIG)


def assert_report_page(html: Path, chromium: str) -> dict:
    """Static self-containedness + in-browser checks; returns the JS summary."""
    text = html.read_text(encoding="utf-8")
    assert not re.findall(r"<script[^>]*\bsrc\s*=", text), "report loads an external script (CDN?)"
    assert text.count("* plotly.js v") == 1, "plotly.js should be inlined exactly once"
    with open_page(html, chromium=chromium) as page:
        info = page.evaluate(CHECK_JS)
        errors = page.settle(0.2)
    assert errors == [], "browser reported errors:\n" + "\n".join(errors)
    assert info["plotly"], info
    assert info["figures"] and all(f.startswith("fig-") for f in info["figures"]), info
    assert info["figures_without_plot"] == [], info
    assert info["plots"] >= len(info["figures"]) and info["unrendered"] == [], info
    assert info["heads_found"], f"no #{HEADS_FIG} .js-plotly-plot: {info}"
    assert info["heads_type"] == "heatmap", info
    assert info["heads_layer"] and info["heads_image"], f"heatmap layer not drawn: {info}"
    return info


def _standin_report(path: Path) -> Path:
    """A page shaped like the report contract: plotly.js inlined once, figures in .mdiff-figure divs."""
    import numpy as np
    import plotly.graph_objects as go

    heat = go.Figure(go.Heatmap(z=np.arange(24, dtype=float).reshape(4, 6), colorscale="RdBu"))
    line = go.Figure(go.Scatter(x=[0, 1, 2], y=[1.0, 3.0, 2.0], mode="lines+markers"))
    parts = [heat.to_html(full_html=False, include_plotlyjs=True, div_id="plot-heads"),
             line.to_html(full_html=False, include_plotlyjs=False, div_id="plot-line")]
    body = "".join(f'<div class="mdiff-figure" id="{fid}">{p}</div>'
                   for fid, p in zip([HEADS_FIG, "fig-rq1-cka"], parts, strict=True))
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>stand-in</title></head>"
                    f"<body><h1>stand-in report</h1>{body}</body></html>", encoding="utf-8")
    return path


# ------------------------------------------------------------------ harness tests (no mdiff needed)

def test_harness_accepts_clean_standin_report(chromium, tmp_path):
    info = assert_report_page(_standin_report(tmp_path / "index.html"), chromium)
    assert info["figures"] == [HEADS_FIG, "fig-rq1-cka"] and info["plots"] == 2


_PAGE = "<!doctype html><html><head><meta charset='utf-8'></head><body><p>x</p>{}</body></html>"


@pytest.mark.parametrize("snippet, expect", [
    ("<script>console.error('deliberate console error', 7)</script>", "console.error: deliberate console error 7"),
    ("<script>throw new Error('deliberate exception')</script>", "uncaught exception: Error: deliberate exception"),
    ("<script>setTimeout(() => { undefinedFunction(); }, 50)</script>", "undefinedFunction is not defined"),
    ("<script>Promise.reject(new Error('deliberate rejection'))</script>", "deliberate rejection"),
    ("<script src='missing-bundle.js'></script>", "missing-bundle.js"),
    ("<img src='missing.png'>", "missing.png"),
], ids=["console-error", "exception", "late-exception", "unhandled-rejection", "missing-script", "missing-image"])
def test_harness_reports_console_errors(chromium, tmp_path, snippet, expect):
    html = tmp_path / "bad.html"
    html.write_text(_PAGE.format(snippet), encoding="utf-8")
    with open_page(html, chromium=chromium) as page:
        assert page.evaluate("document.querySelector('p').textContent") == "x"
        errors = page.errors
    assert any(expect in e for e in errors), errors


def test_harness_reports_unrendered_heatmap(chromium, tmp_path):
    """A plot div that never rendered fails the report checks (no false pass)."""
    html = _standin_report(tmp_path / "index.html")
    text = html.read_text(encoding="utf-8").replace('id="fig-rq1-cka">', 'id="fig-empty"><div class="js-plotly-plot"></div></div>'
                                                    '<div class="mdiff-figure" id="fig-rq1-cka">', 1)
    html.write_text(text, encoding="utf-8")
    with pytest.raises(AssertionError, match="fig-empty"):
        assert_report_page(html, chromium)


# ------------------------------------------------------------------ the real report

@pytest.mark.slow
def test_report_renders_without_console_errors(tmp_path_factory, chromium, request):
    try:
        from mdiff.report import build_report
    except ModuleNotFoundError as e:
        if e.name != "mdiff.report":
            raise
        pytest.skip("mdiff.report not written yet (build_report missing)")
    from typer.testing import CliRunner

    from mdiff.cli import app

    request.getfixturevalue("toys")  # the cached offline toy pairs (conftest), built only when needed
    out = tmp_path_factory.mktemp("study")
    r = CliRunner().invoke(app, ["study", "--pair", "toy-lowrank", "--out", str(out), "--n", "60",
                                 "--bootstrap", "100"])
    assert r.exit_code == 0, f"{r.output}\n{r.exception!r}"
    html = build_report(out, "toy-lowrank")
    assert Path(html) == out / "toy-lowrank" / "report" / "index.html" and Path(html).is_file()
    info = assert_report_page(Path(html), chromium)
    assert HEADS_FIG in info["figures"]
