"""The demo shows only results that mean something (no tuned lens trained for a few steps, which
predicts noise), and prints each line as it comes when its output is a pipe or a log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from helpers import tiny_llama, train_tokenizer
from mlx_lm.tokenizer_utils import TokenizerWrapper
import mlxterp
from mlxterp_tools import demo

model = mlxterp.InterpretableModel(tiny_llama(), tokenizer=TokenizerWrapper(train_tokenizer()))
model.load_report = {{"quantization": "none", "weights": "float32", "backend": "cpu"}}
demo.load = lambda: model
demo.STEER_LAYER = 2
demo.CLEAN, demo.CORRUPTED = "the cat sat on the mat", "the mat sat on the cat"  # equal token counts here
patching = model.activation_patching
model.activation_patching = lambda *a, **k: patching(*a, answers=(11, 12), **k)  # a random model's answers tie
demo.main({out!r})
print("line buffered:", sys.stdout.line_buffering, file=sys.stderr)
"""


def test_the_demo_prints_line_by_line_and_trains_no_lens(tmp_path):
    script = SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "demo"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "line buffered: True" in done.stderr  # stdout is a pipe here: lines must still go out one by one
    assert "tuned lens" not in done.stdout.lower() and not (tmp_path / "demo" / "tuned_lens").exists()
    assert "1. Logit lens" in done.stdout and "plots written to" in done.stdout
