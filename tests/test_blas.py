"""Which BLAS serves MLX's CPU backend: the import order of a script must not matter, and
without an optimized BLAS mlxterp.load() is never slower than the model as shipped."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import mlxterp
from mlxterp_core import blas
from mlxterp_core.backend import on_cpu

on_linux_cpu = pytest.mark.skipif(
    not on_cpu() or not sys.platform.startswith("linux") or not blas.state.startswith("Intel MKL"),
    reason="the BLAS choice concerns MLX's CPU backend on Linux with MKL",
)

FORWARD = """
import json, time
{imports}
from mlxterp_core import blas
model = mlxterp.load(validate=False)
ids = mx.arange(100, 132)[None]
logits = model.model(ids); mx.eval(logits)
seconds = []
for _ in range(3):
    start = time.process_time(); mx.eval(model.model(ids)); seconds.append(time.process_time() - start)
print(json.dumps({{"blas": blas.state, "weights": model.load_report["weights"],
                  "seconds": min(seconds), "logits": logits[0, -1, :64].tolist()}}))
"""


def _run(imports: str) -> dict:
    done = subprocess.run([sys.executable, "-c", FORWARD.format(imports=imports)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@on_linux_cpu
def test_import_order_does_not_matter():
    mlxterp_first = _run("import mlxterp\nimport mlx.core as mx")
    mlx_first = _run("import mlx.core as mx\nimport mlxterp")
    assert mlx_first["blas"] == mlxterp_first["blas"]
    assert mlx_first["weights"] == mlxterp_first["weights"]
    # the same numbers (MKL may round differently from run to run, never by more than this)
    gap = max(abs(a - b) for a, b in zip(mlx_first["logits"], mlxterp_first["logits"]))
    assert gap <= 1e-4, gap
    # CPU seconds, so other processes count less (not nothing: on 2 busy cores 1.5x was crossed);
    # the reference BLAS would be >10x slower
    assert mlx_first["seconds"] <= 4 * mlxterp_first["seconds"], (mlx_first, mlxterp_first)


def test_without_an_optimized_blas_the_weights_stay_quantized(monkeypatch):
    monkeypatch.setattr(blas, "state", "reference BLAS (MLXTERP_BLAS=reference)")
    model = mlxterp.load(validate=False)
    if not on_cpu():
        assert model.load_report["weights"] == "quantized as stored"
        return
    report = model.load_report
    assert report["weights"].startswith("quantized as stored (MLX runs on reference BLAS")
    assert "faster" in report["weights"] and report["blas"] == blas.state
    assert report["kernels"].startswith("mlx-lm's own")


def test_a_cpu_library_over_the_cuda_one_is_reported_with_the_fix(monkeypatch, tmp_path):
    import importlib.metadata

    from mlxterp_core import backend

    library = tmp_path / "mlx" / "lib" / "libmlx.so"
    library.parent.mkdir(parents=True)
    library.write_bytes(b"x" * 10)  # on disk: mlx-cpu's (10 bytes); mlx-cuda-13's has 99

    class File:
        name = "libmlx.so"

        def __init__(self, size):
            self.size = size

        def locate(self):
            return library

    class Dist:
        def __init__(self, size):
            self.files = [File(size)]

    dists = {"mlx-cpu": Dist(10), "mlx-cuda-13": Dist(99)}

    def distribution(name):
        if name not in dists:
            raise importlib.metadata.PackageNotFoundError(name)
        return dists[name]

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.32.4")
    assert "--force-reinstall --no-deps mlx-cuda-13==0.32.4" in backend.library_conflict()
    dists["mlx-cuda-13"] = Dist(10)  # the CUDA build's library is the one on disk
    assert backend.library_conflict() is None
    del dists["mlx-cpu"]
    assert backend.library_conflict() is None
