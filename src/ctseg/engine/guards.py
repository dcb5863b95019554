"""Training guards: what happens on a non-finite loss and on Ctrl-C.

* :class:`NonFiniteGuard` checks every optimizer step: a NaN/Inf loss (any batch accumulated into the
  step) or NaN/Inf gradients. The ``policy`` decides what follows (registry :data:`NONFINITE_POLICIES`):
  ``skip`` drops the step (weights and optimizer state untouched) and counts it, stopping after
  ``max_consecutive`` skips in a row; ``stop`` ends the run at once. A stop saves the weights from
  *before* the bad step and raises :class:`NonFiniteLossError` (one line from the CLI, exit 2) naming
  that file and the last epoch-end checkpoint.
* :class:`InterruptCheckpoint` saves ``checkpoints/interrupted.ckpt`` when training is interrupted
  (``KeyboardInterrupt``, i.e. SIGINT / Ctrl-C) and prints how to resume.
* :class:`AtomicCheckpointIO` writes every checkpoint as temp file + fsync + rename in the target folder.

All are always on in ``ctseg fit`` and ``ctseg demo`` (:mod:`ctseg.engine.runner`).
"""

from __future__ import annotations

import math
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from ctseg.errors import ConfigError, CtsegError, OutputError
from ctseg.utils.io import atomic_open
from ctseg.utils.registry import Registry

INTERRUPTED_NAME = "interrupted.ckpt"
NONFINITE_NAME = "nonfinite-stop.ckpt"


class NonFiniteLossError(CtsegError):
    """Training met a non-finite loss or gradient and the policy says stop."""


def _last_checkpoint(trainer: pl.Trainer) -> Path | None:
    """The epoch-end ``last.ckpt`` of the run (what ``--ckpt_path last`` resumes), if one exists."""
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        for path in (cb.last_model_path, cb.dirpath and Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}.ckpt"):
            if path and Path(path).is_file():
                return Path(path)
    return None


def _checkpoint_dir(trainer: pl.Trainer) -> Path:
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return Path(cb.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


def _save_now(trainer: pl.Trainer, path: Path) -> Path | None:
    """Write the trainer's current state to ``path`` from rank 0, without a collective (other ranks may be
    gone after an interrupt). Returns ``None`` when it could not be written (the reason goes to stderr)."""
    try:
        ckpt = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        trainer.strategy.save_checkpoint(ckpt, str(path))
    except Exception as exc:  # saving is best effort here: the run is already ending
        _eprint(f"ctseg: could not save {path}: {exc}")
        return None
    return path


@rank_zero_only
def _eprint(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def resume_command(ckpt: str | Path, argv: Sequence[str] | None = None) -> str:
    """``ctseg fit ... --ckpt_path <ckpt>``: the command line of this process with its ``--ckpt_path`` replaced."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "fit" not in argv:
        return f"ctseg fit <same arguments> --ckpt_path {ckpt}"
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        if arg.startswith("--ckpt_path="):
            continue
        out.append(arg)
    return "ctseg " + shlex.join([*out, "--ckpt_path", str(ckpt)])


# ---------------------------------------------------------------------------------------- non-finite
#: ``policy(guard, trainer, optimizer, reason)``: called on a bad step; must leave the step skipped or raise.
NonFinitePolicy = Callable[["NonFiniteGuard", pl.Trainer, torch.optim.Optimizer, str], None]
NONFINITE_POLICIES: Registry[NonFinitePolicy] = Registry("non-finite policy")


def register_nonfinite_policy(name: str) -> Callable[[NonFinitePolicy], NonFinitePolicy]:
    """Register ``policy(guard, trainer, optimizer, reason)`` as the ``--nonfinite`` value ``name``."""
    return NONFINITE_POLICIES.register(name)


@register_nonfinite_policy("skip")
def _skip(guard: NonFiniteGuard, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, reason: str) -> None:
    guard.consecutive += 1
    if guard.consecutive > guard.max_consecutive:
        guard.stop(trainer, f"{reason}; {guard.consecutive} steps in a row were non-finite")
    guard.skipped += 1
    guard.skipped_this_epoch += 1
    if not guard.uses_scaler(trainer):
        # Optimizers skip parameters without a gradient: weights, moments and step counts stay as they
        # were. Under a GradScaler the scaler itself skips the step (and needs the grads to see the Inf).
        optimizer.zero_grad(set_to_none=True)


@register_nonfinite_policy("stop")
def _stop(guard: NonFiniteGuard, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, reason: str) -> None:
    guard.stop(trainer, reason)


class NonFiniteGuard(Callback):
    """Detect non-finite losses / gradients before the optimizer step and apply a policy.

    Args:
        policy: a name in :data:`NONFINITE_POLICIES` (``skip`` or ``stop``).
        max_consecutive: ``skip`` stops the run after this many non-finite steps in a row (diverged
            weights or a broken data source do not heal by skipping).

    The number of skipped steps is added to the epoch record (``nonfinite_skipped``, so ``metrics.json``
    has it) and travels in checkpoints. Under DDP the decision is reduced over processes, so every rank
    skips or stops together.
    """

    def __init__(self, policy: str = "skip", max_consecutive: int = 10) -> None:
        if policy not in NONFINITE_POLICIES:
            raise NONFINITE_POLICIES.unknown(policy)
        if max_consecutive < 0:
            raise ConfigError(f"max_consecutive must be >= 0, got {max_consecutive}")
        self.policy = policy
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0
        self.skipped_this_epoch = 0
        self.consecutive = 0
        self._loss_finite: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None

    @staticmethod
    def uses_scaler(trainer: pl.Trainer) -> bool:
        return getattr(trainer.precision_plugin, "scaler", None) is not None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.skipped_this_epoch = 0

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        # Kept as a tensor: no host sync per micro-batch; several micro-batches AND into one step.
        ok = torch.isfinite(loss.detach()).all()
        if self._loss_finite is None:
            self._loss_finite, self._loss = ok, loss.detach()
        else:
            self._loss_finite = self._loss_finite & ok
            self._loss = torch.where(ok, self._loss, loss.detach())  # keep a bad value to report

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss_ok = True if self._loss_finite is None else bool(self._loss_finite)
        self._loss_finite = None
        grads_ok = True
        if not self.uses_scaler(trainer):  # scaled grads may be Inf by design; the scaler handles them
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                grads_ok = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        bad = trainer.strategy.reduce_boolean_decision(not (loss_ok and grads_ok), all=False)
        if not bad:
            self.consecutive = 0
            return
        if not loss_ok:
            reason = f"non-finite loss ({float(self._loss.float().flatten()[0])})"
        elif grads_ok:
            reason = "non-finite loss on another process"
        else:
            reason = "non-finite gradients"
        where = f"at epoch {trainer.current_epoch}, step {trainer.global_step}"
        NONFINITE_POLICIES[self.policy](self, trainer, optimizer, f"{reason} {where}")

    def stop(self, trainer: pl.Trainer, reason: str) -> None:
        """Save the pre-step weights and raise :class:`NonFiniteLossError`."""
        saved = _save_now(trainer, _checkpoint_dir(trainer) / NONFINITE_NAME)
        last = _last_checkpoint(trainer)
        parts = [f"training stopped: {reason} (non-finite policy {self.policy!r})"]
        if saved is not None:
            parts.append(f"weights before this step saved in {saved}")
        parts.append(
            f"last epoch-end checkpoint: {last} (resume exactly with --ckpt_path last)"
            if last is not None
            else "no epoch-end checkpoint yet"
        )
        parts.append("lower the learning rate or check the data; `--nonfinite skip` skips such steps")
        raise NonFiniteLossError("; ".join(parts))

    def on_ctseg_epoch_record(
        self, trainer: pl.Trainer, module: pl.LightningModule, record: dict[str, Any]
    ) -> None:
        record["nonfinite_skipped"] = self.skipped_this_epoch
        if self.skipped_this_epoch:
            _eprint(
                f"ctseg: warning: skipped {self.skipped_this_epoch} non-finite step(s) in epoch "
                f"{record.get('epoch')} ({self.skipped} in this run)"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


# ---------------------------------------------------------------------------------------- Ctrl-C
class InterruptCheckpoint(Callback):
    """On ``KeyboardInterrupt`` during ``fit``: save ``<checkpoints>/interrupted.ckpt`` and print how to resume.

    The file holds the weights of the interrupted epoch (resuming from it repeats that epoch's data, so
    it is not bit-exact); ``--ckpt_path last`` resumes exactly from the end of the last completed
    epoch. Lightning then exits; ``ctseg fit`` turns that into exit status 130.
    """

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, KeyboardInterrupt) or trainer.state.fn != "fit":
            return
        if getattr(pl_module, "model", True) is None:  # interrupted before the network was built
            return
        folder = _checkpoint_dir(trainer)
        last = _last_checkpoint(trainer)
        saved = _save_now(trainer, folder / INTERRUPTED_NAME) if trainer.is_global_zero else None
        lines = [f"ctseg: interrupted at epoch {trainer.current_epoch}, step {trainer.global_step}"]
        if saved is not None:
            lines[0] += f"; saved {saved}"
        if last is not None:
            lines.append(
                f"  resume exactly from the end of the last completed epoch: {resume_command('last')}"
            )
        if saved is not None:
            lines.append(
                f"  resume from the interrupted step (repeats part of the epoch's data): {resume_command(saved)}"
            )
        if saved is None and last is None:
            lines.append("  no checkpoint could be saved; start the run again")
        _eprint("\n".join(lines))


def guard_callbacks(nonfinite: str = "skip", max_consecutive: int = 10) -> list[Callback]:
    """The guards every ``ctseg fit`` runs with."""
    if not math.isfinite(max_consecutive):
        raise ConfigError("nonfinite_max_skips must be finite")
    return [NonFiniteGuard(nonfinite, int(max_consecutive)), InterruptCheckpoint()]


# ---------------------------------------------------------------------------------------- atomic saves
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes through :func:`ctseg.utils.io.atomic_open`.

    Lightning's own save writes a temporary file in the *system* temp folder and then moves it
    (``shutil.move``): across file systems that is a copy, so a kill or a full disk during it can leave
    a truncated ``last.ckpt``. Here the temporary file is a sibling of the target, fsynced, then renamed,
    so the previous good checkpoint survives any failure. A failed write raises :class:`OutputError`.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        try:
            with atomic_open(path, "wb") as fh:
                torch.save(checkpoint, fh)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write checkpoint ({exc.strerror or exc})") from exc


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """``plugins`` (None, one or a list) plus :class:`AtomicCheckpointIO` unless a CheckpointIO is given."""
    if plugins is None:
        plugins = []
    elif not isinstance(plugins, (list, tuple)):
        plugins = [plugins]
    from lightning.fabric.plugins import CheckpointIO

    if any(isinstance(p, CheckpointIO) for p in plugins):
        return list(plugins)
    return [*plugins, AtomicCheckpointIO()]
