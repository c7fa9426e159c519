"""The loop every trainer runs: steps over a stream of batches, a progress bar, checkpoints and
resume. A trainer writes its loss and its state, nothing else::

    class MyTrainer:
        def start(self, first):        # build parameters from the first batch (fresh or resumed run)
        def step(self, batch):         # one optimiser step
        def state(self):               # (tensors, JSON info): everything that decides the next steps
        def load_state(self, tensors, info):
        def status(self) -> str:       # a few numbers for the progress bar ("" for none)

    done = train_steps(MyTrainer(), batches, steps=1000, checkpoint_dir="ckpt", settings={...})

``batches`` is an iterator of training batches with ``state()`` / ``restore()`` (a
:class:`~mlxterp_core.stream.Batches` stream, or anything with those two methods), so that a
checkpoint holds where the data was too.

A checkpoint is two files in ``checkpoint_dir``: ``checkpoint-{step}.safetensors`` (the
trainer's tensors and the stream's buffered rows) and ``checkpoint.json`` (the step, the
settings, the trainer's and the stream's JSON state, the name and checksum of the tensors
file). The tensors of a new checkpoint go to a file of their own, then ``checkpoint.json`` is
replaced in one rename: that rename makes the new checkpoint current, and only then is the
previous one's tensors file removed. So a crash or a failed write (a full disk) at any moment
leaves the previous checkpoint whole and current. Resuming checks the settings and the
checksum, then restores everything: a resumed run
equals an uninterrupted one bitwise (same shapes, same operations, same order). So a trainer
draws its randomness from generators it owns and saves (an ``mx.random.key`` it splits, a
numpy Generator), never from MLX's global state, which cannot be restored; and it restores
its trees in a fresh run's key order (a checkpoint's keys come back sorted, and a reduction
over a tree, such as a gradient norm, rounds differently in another order).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

import attrs
import mlx.core as mx

from .errors import FileFormatError, InputError, MlxterpError
from .files import read_json, read_safetensors, sha256_file, write_atomic, write_json
from .progress import progress_bar

TENSORS = "checkpoint-{step:08d}.safetensors"
TENSORS_GLOB = "checkpoint-*.safetensors"
STATE = "checkpoint.json"
FORMAT = "mlxterp-checkpoint"


class Trainer(Protocol):
    def start(self, first: Any) -> None: ...
    def step(self, batch: Any) -> None: ...
    def state(self) -> tuple[dict[str, mx.array], dict[str, Any]]: ...
    def load_state(self, tensors: dict[str, mx.array], info: dict[str, Any]) -> None: ...
    def status(self) -> str: ...


@attrs.frozen
class Run:
    """What one call of :func:`train_steps` did: the step it started from (0, or the
    checkpoint's), the step it ended at, and its wall time."""

    start: int
    end: int
    seconds: float

    @property
    def steps(self) -> int:
        return self.end - self.start


def train_steps(
    trainer: Trainer,
    batches: Any,
    steps: int,
    *,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 500,
    settings: dict[str, Any] | None = None,
    progress: bool | None = None,
    desc: str = "training",
    what: str = "training",
    error: type[MlxterpError] = InputError,
) -> Run:
    """Run ``trainer`` for ``steps`` steps over ``batches`` (see the module doc), resuming
    from the checkpoint in ``checkpoint_dir`` if there is one (made with the same
    ``settings``) and writing one every ``checkpoint_every`` steps and at the end.
    ``what`` names the run in messages ("train_sae"); ``error`` is the class of the errors
    about the run's input (the plugin's own, e.g. SAEError)."""
    if not isinstance(steps, int) or steps < 1:
        raise error(f"{what}: steps must be a positive integer, got {steps!r}.")
    folder = Path(checkpoint_dir).expanduser() if checkpoint_dir is not None else None
    settings = settings or {}
    found = load_checkpoint(folder, settings, what, error) if folder is not None else None
    step = 0
    if found is not None:
        step, tensors, info = found
        batches.restore(_part(tensors, "stream"), info["stream"])
    started = time.perf_counter()
    first = step
    if step >= steps:
        if found is not None:  # finished already: the trainer is what the checkpoint holds
            trainer.start(None)
            trainer.load_state(_part(tensors, "trainer"), info["trainer"])
        return Run(first, step, 0.0)
    bar = progress_bar(steps, desc, progress is not False, unit="step")
    bar.update(step)
    try:
        started_trainer = False
        for batch in batches:
            if not started_trainer:
                trainer.start(batch)
                if found is not None:
                    trainer.load_state(_part(tensors, "trainer"), info["trainer"])
                started_trainer = True
            trainer.step(batch)
            step += 1
            bar.update(1)
            status = trainer.status()
            if status:
                bar.set_postfix_str(status, refresh=False)
            if folder is not None and (step % checkpoint_every == 0 or step == steps):
                save_checkpoint(folder, step, settings, trainer, batches)
            if step >= steps:
                break
        if not started_trainer:
            raise error(f"{what}: the training data gave no batches (padding, BOS and window starts are never trained on).")
    finally:
        bar.close()
    return Run(first, step, time.perf_counter() - started)


def save_checkpoint(folder: Path, step: int, settings: dict[str, Any], trainer: Trainer, batches: Any) -> None:
    """Write the checkpoint of ``step`` (see the module doc)."""
    folder.mkdir(parents=True, exist_ok=True)
    trainer_tensors, trainer_info = trainer.state()
    stream_tensors, stream_info = batches.state()
    tensors = {**{f"trainer/{k}": v for k, v in trainer_tensors.items()},
               **{f"stream/{k}": v for k, v in stream_tensors.items()}}
    mx.eval(tensors)
    tensors_path = folder / TENSORS.format(step=step)
    write_atomic(tensors_path, lambda tmp: mx.save_safetensors(str(tmp), tensors))
    try:
        write_json(folder / STATE, {"format": FORMAT, "step": step, "settings": settings, "trainer": trainer_info,
                                    "stream": stream_info, "tensors": tensors_path.name,
                                    "tensors_sha256": sha256_file(tensors_path)})
    except BaseException:
        tensors_path.unlink(missing_ok=True)  # the previous checkpoint stays current
        raise
    for old in folder.glob(TENSORS_GLOB):
        if old != tensors_path:  # the previous checkpoint's, or a crashed write's
            old.unlink(missing_ok=True)


def load_checkpoint(folder: Path, settings: dict[str, Any], what: str = "training",
                    error: type[MlxterpError] = InputError):
    """``(step, tensors, info)`` of the checkpoint in ``folder``, or None when there is none;
    a checkpoint made with other settings (an ``error``), or damaged (a FileFormatError), is
    an error that says what to do."""
    state_path = folder / STATE
    if not state_path.is_file():
        return None
    info = read_json(state_path, f"a checkpoint of {what}", advice=f"Delete {folder} to start over.")
    if info.get("format") != FORMAT or not isinstance(info.get("step"), int) or not isinstance(info.get("settings", {}), dict):
        raise FileFormatError(f"{state_path} is not an mlxterp checkpoint; delete {folder} to start over.")
    saved = info.get("settings", {})
    differ = sorted(k for k in {*saved, *settings} if saved.get(k) != settings.get(k))
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in differ[:4])
        raise error(
            f"the checkpoint in {folder} was made with other settings ({shown}): use another "
            f"checkpoint_dir, or the same settings to resume {what}."
        )
    name = info.get("tensors", "checkpoint.safetensors")  # the name before checkpoints had one per step
    if not isinstance(name, str) or Path(name).name != name:
        raise FileFormatError(f"{state_path} names no tensors file of the checkpoint; delete {folder} to start over.")
    tensors_path = folder / name
    if not tensors_path.is_file() or sha256_file(tensors_path) != info.get("tensors_sha256"):
        raise FileFormatError(
            f"{tensors_path} is missing or does not match {STATE} (damaged?); delete {folder} to "
            "start over, or restore the folder from a copy."
        )
    tensors = read_safetensors(tensors_path, f"the tensors of a checkpoint of {what}",
                               advice=f"Delete {folder} to start over.")
    return int(info["step"]), tensors, info


def _part(tensors: dict[str, mx.array], prefix: str) -> dict[str, mx.array]:
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
