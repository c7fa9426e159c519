"""Figures as a notebook shows them: once, whatever line of the cell draws them, and with no
missing-glyph warnings for tokens that the fonts cannot draw."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mlxterp_analyses import LogitLensResult, PatchingResult
from mlxterp_core.figures import figure_text, token_label
from mlxterp_lenses.results import TunedLensResult

TOKENS = ["你好", " 🙂", " world", "\u200b", " café", "$x$"]


def lens_result(tokens=TOKENS, cls=LogitLensResult, **extra) -> LogitLensResult:
    layers = [0, 1]
    predictions = {layer: [[(7, 0.5, tokens[(t + 1) % len(tokens)]), (8, 0.25, "🙂")] for t in range(len(tokens))]
                   for layer in layers}
    return cls(text="".join(tokens), tokens=list(tokens), token_ids=list(range(len(tokens))), layers=layers,
               predictions=predictions, top_k=2, **extra)


SHELL = """
import json, sys
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

class Shell(InteractiveShell):  # a kernel's shell, without the kernel
    def enable_gui(self, gui=None):
        pass

shell = Shell.instance()
shell.enable_matplotlib("inline")
images = ("image/png", "image/jpeg", "image/svg+xml", "application/pdf")
shown = []
write = shell.displayhook.write_format_data
shell.displayhook.write_format_data = lambda data, md=None: (shown.append(sorted(data)), write(data, md))[1]

def run(cell):
    shown.clear()
    with capture_output() as captured:
        assert shell.run_cell(cell).success, cell
    drawn = [o.data for o in captured.outputs] + [dict.fromkeys(d) for d in shown]
    return sum(any(m in d for m in images) for d in drawn)

shell.run_cell({setup!r})
print(json.dumps({{cell: run(cell) for cell in {cells!r}}}))
"""


def test_a_plot_shows_once_wherever_the_cell_draws_it(tmp_path):
    """matplotlib's inline backend draws every open figure when the cell ends, and IPython
    draws a cell's last value: a returned Figure was drawn twice. Now it is drawn once as the
    last line, once when assigned, once per plot in a loop; with a path, written and drawn once."""
    pytest.importorskip("IPython", reason="IPython is not installed")
    pytest.importorskip("matplotlib_inline", reason="matplotlib-inline is not installed")
    setup = f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nfrom test_figures import lens_result\nlens = lens_result()"
    cells = ["lens.plot()", "figure = lens.plot()", "for _ in range(3):\n    lens.plot()",
             f"lens.plot({str(tmp_path / 'lens.png')!r})", "figure", "figure = lens.plot()\nfigure"]
    done = subprocess.run([sys.executable, "-c", SHELL.format(setup=setup, cells=cells)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    drawn = json.loads(done.stdout.strip().splitlines()[-1])
    assert drawn == {"lens.plot()": 1, "figure = lens.plot()": 1, "for _ in range(3):\n    lens.plot()": 3,
                     cells[3]: 1, "figure": 1, "figure = lens.plot()\nfigure": 1}
    assert (tmp_path / "lens.png").stat().st_size > 10_000


@pytest.mark.parametrize("name", ["lens", "patching", "tuned lens"])
def test_tokens_the_fonts_lack_draw_without_glyph_warnings(name, tmp_path):
    """CJK and emoji tokens (and prompts): each character no font draws is written as its
    escape, so neither drawing inline nor writing the file warns of missing glyphs."""
    if name == "lens":
        result = lens_result()
    elif name == "tuned lens":
        rows = {layer: [0.5] * len(TOKENS) for layer in (0, 1)}
        result = lens_result(cls=TunedLensResult, kl=rows, entropy=rows, final_rank={0: [3] * len(TOKENS), 1: [0] * len(TOKENS)})
    else:
        result = PatchingResult(clean_text="你好 🙂", corrupted_text="你们 🙃", component="resid", axis="position",
                                layers=[0, 1], labels=TOKENS, recovery=[[10.0] * len(TOKENS), [90.0] * len(TOKENS)],
                                clean_answer=" 巴黎", corrupted_answer=" 🙂", clean_metric=1.0, corrupted_metric=0.0,
                                metric="logit_diff")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure = result.plot()
        figure.canvas.draw()
        result.plot(tmp_path / "plot.png")
    glyphs = [str(w.message) for w in caught if "Glyph" in str(w.message)]
    assert glyphs == []
    texts = [t.get_text() for t in figure.findobj(lambda a: hasattr(a, "get_text"))]
    assert any("\\u4f60" in text for text in texts)  # 你, written as its escape


def test_figure_text_keeps_what_the_fonts_draw_and_escapes_the_rest():
    assert figure_text(" café — ✓ ↵") == " café — ✓ ↵"
    assert figure_text("你 🙂") == "\\u4f60 \\U0001f642"
    assert figure_text("costs $5") == "costs \\$5"
    assert token_label("\n") == "'\\n'" and token_label(" 你好", 4) == " \\u…"
