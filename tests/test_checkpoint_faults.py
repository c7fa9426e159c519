"""A full disk while a trainer writes a checkpoint (through the public train_sae /
train_tuned_lens with checkpoint_dir=): the run stops with an MlxterpError naming the file, and
the folder still holds the previous checkpoint, byte for byte and current, so a later run
resumes from it (never from a checkpoint half made of newer files). The fault is simulated as
MLX and Python meet it: the write gets half its bytes onto the disk, then fails (MLX raises
RuntimeError '[write] Unable to write ...', Python OSError ENOSPC)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import CORPUS, tiny_llama, train_tokenizer

from mlxterp import InterpretableModel, MlxterpError
from mlxterp_saes import train_sae

SAE = dict(architecture="topk", k=4, d_sae=32, n_tokens=8 * 64, batch_size=64, buffer_tokens=128,
           checkpoint_every=4, progress=False)  # 8 steps: checkpoints after steps 4 and 8
LENS = dict(num_steps=4, tokens_per_step=16, context_size=16, batch_size=2, checkpoint_every=2, progress=False)
TRAINERS = {  # (train, the step of the first checkpoint)
    "sae": (lambda model, folder: train_sae(model, "layers.2.output", CORPUS * 4, **SAE, checkpoint_dir=folder), 4),
    "tuned lens": (lambda model, folder: model.train_tuned_lens(CORPUS * 4, **LENS, checkpoint_dir=folder), 2),
}
STATE = "checkpoint.json"


@pytest.fixture(scope="module")
def model():
    return InterpretableModel(tiny_llama(), tokenizer=train_tokenizer(bos=True))


class FullDisk:
    """Counts the checkpoint writes (MLX's tensors, Python's bytes); the ``fail_at``-th gets half
    its bytes written, then fails as on a full disk. ``before(n)`` runs before write n."""

    def __init__(self, monkeypatch, fail_at: int | None = None, before=None):
        self.count, self.fail_at, self.before = 0, fail_at, before or (lambda n: None)
        real_save, self.real_write = mx.save_safetensors, Path.write_bytes

        def save(file, arrays, metadata=None):
            if self.next():
                real_save(file, arrays, metadata=metadata)
                self.cut(Path(file if str(file).endswith(".safetensors") else f"{file}.safetensors"))
                raise RuntimeError("[write] Unable to write 38090 bytes to file.")
            return real_save(file, arrays, metadata=metadata)

        def write_bytes(path, data):
            if self.next():
                self.real_write(path, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.real_write(path, data)

        monkeypatch.setattr(mx, "save_safetensors", save)
        monkeypatch.setattr(Path, "write_bytes", write_bytes)

    def next(self) -> bool:
        self.count += 1
        self.before(self.count)
        return self.count == self.fail_at

    def cut(self, path: Path) -> None:
        self.real_write(path, path.read_bytes()[: path.stat().st_size // 2])


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_full_disk_during_a_checkpoint_is_an_error_and_keeps_the_previous_checkpoint(model, tmp_path, monkeypatch, trainer):
    train, first_step = TRAINERS[trainer]
    with monkeypatch.context() as patch:
        counted = FullDisk(patch)
        finished = train(model, tmp_path / "count")
    per_checkpoint = counted.count // 2  # two checkpoints per run
    assert per_checkpoint >= 2
    for k in range(1, per_checkpoint + 1):  # each write of the second checkpoint fails in turn
        folder = tmp_path / f"fail-{k}"
        last_complete = {}

        def before(n):
            if n == per_checkpoint + 1:  # the second checkpoint starts: the first is complete
                last_complete.update(files(folder))

        with monkeypatch.context() as patch:
            FullDisk(patch, fail_at=per_checkpoint + k, before=before)
            with pytest.raises(MlxterpError, match=rf"writing {folder}/.* failed \((No space left on device|\[write\] Unable to write)"):
                train(model, folder)
        assert json.loads(last_complete[STATE])["step"] == first_step
        assert files(folder) == last_complete, f"write {k} of the checkpoint failed and changed the previous one"
        resumed = train(model, folder)  # a later run goes on from the previous checkpoint
        assert json.loads((folder / STATE).read_text())["step"] == 2 * first_step
        # resumed from the first checkpoint: the weights of the run that never failed
        weights = (lambda r: {"W_dec": r.W_dec, "W_enc": r.W_enc}) if trainer == "sae" else (lambda r: r.state())
        for name, value in weights(finished).items():
            assert mx.array_equal(weights(resumed)[name], value).item(), name
