"""The interpreter survives bad input: hypothesis-generated ids, names, intervention replies and
option values go through trace, generate and the analyses, and arguments and damaged files
through the activation datasets, SAEs, tuned lenses, probes and HTML views, in subprocesses
(tests/robustness_worker.py, tests/robustness_files.py), so that a segmentation fault is a
failed test, not a lost test run.

Each call must succeed or raise an MlxterpError; afterwards the model's output must be bitwise
what it was, no probe may be left, and the files that existed before (a dataset, an SAE, a
lens, saved results; damaged only in copies) must be unchanged. Most examples run on a tiny
random Llama, a few on the default real model.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "robustness_worker.py"
CASES = [
    ("ids", 150, False),
    ("names", 150, False),
    ("analyses", 150, False),
    ("ids,names,analyses", 15, True),
    ("files,dataset,saes,lens,probes,views", 100, False),
]


@pytest.mark.parametrize("groups, examples, real", CASES, ids=[f"{g}{'-real' if r else ''}" for g, _, r in CASES])
def test_bad_input_never_kills_the_interpreter(groups, examples, real):
    command = [sys.executable, str(WORKER), groups, str(examples)] + (["real"] if real else [])
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode < 0:
        pytest.fail(f"the worker died with signal {-done.returncode}; last input:\n{lines[-1] if lines else '?'}\n{done.stderr[-2000:]}")
    failures = [line for line in lines if line.startswith(("NOT AN", "FAILED"))]
    assert done.returncode == 0 and lines and lines[-1].startswith("OK"), (
        "\n".join(failures[:5]) + "\n" + done.stdout[-3000:] + done.stderr[-3000:]
    )
    succeeded = int(re.search(r"'succeeded': (\d+)", lines[-1]).group(1))
    assert succeeded >= max(1, examples // 20), f"too few calls got past the checks to test the code behind them: {lines[-1]}"


def test_the_harness_fails_without_the_id_check():
    """With token ids unchecked, the ids group must fail (a crash or a stray exception)."""
    env = {**os.environ, "MLXTERP_ROBUSTNESS_SABOTAGE": "1"}
    done = subprocess.run([sys.executable, str(WORKER), "ids", "150"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode != 0, done.stdout[-2000:]
