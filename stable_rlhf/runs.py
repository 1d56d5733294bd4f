"""The run layer every trainer (sft, train-rm/am, ppo, rejection-sampling) stands on.

A ``Run`` owns one run directory::

    out_dir/config.yaml             the resolved config
    out_dir/metrics.jsonl           one row per step / eval point (also TensorBoard / wandb)
    out_dir/checkpoints/step-N/     atomic checkpoints, every rank's RNG state, newest kept;
                                    gone once the run finishes (keep_final_checkpoint keeps it)
    out_dir/summary.json            written last, atomically

and the life of a run: ``start`` (fresh: clear what an earlier run left; resume: the latest
complete checkpoint, with the metrics logged after it dropped), ``log``, ``checkpoint``,
``finish``. ``RunSettings`` (and ``GuardedRunSettings``) are this layer's settings, which
every trainer's config extends. ``NonFiniteGuard`` and ``clipped_step`` are the one
non-finite policy: an update whose loss or gradient norm is not finite on any rank is
skipped and counted, and too many bad steps in a row stop the run. ``TrainState`` is the
epoch trainer's state (``sft``, ``train-rm`` / ``train-am``): model, optimiser, scheduler,
step and one guarded update per step. ``fault_point`` SIGKILLs the process where a resume test asks it to."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import time
import typing
from pathlib import Path
from typing import Literal

import torch

from .io import append_jsonl, atomic_dir, atomic_write_json, atomic_write_jsonl, read_jsonl

LogWith = Literal["tensorboard", "wandb", "none"]
LOG_WITH = typing.get_args(LogWith)


@dataclasses.dataclass
class RunSettings:
    """How a run goes, read by ``Run``: every trainer's config extends it, so these fields
    come first in each."""

    keep_final_checkpoint: bool = False
    """keep the last checkpoint (optimiser state, RNG and any value model) once the run has
    finished, so that a later resume=true can extend it; off: a finished run keeps its final
    model, metrics and summary, and checkpoints/ goes (a full fine-tuned PPO run's is gigabytes)"""
    precision: Literal["auto", "fp32", "bf16-mixed"] = "auto"
    """fp32, or bf16-mixed (fp32 master weights and optimiser state, bf16 autocast compute);
    auto: bf16-mixed on a GPU with bf16 support, fp32 elsewhere"""
    log_with: LogWith = "tensorboard"
    """where metrics go besides out_dir/metrics.jsonl: TensorBoard event files in out_dir/tensorboard, wandb, or nowhere"""
    resume: bool = False
    """continue from the latest checkpoint in out_dir/checkpoints (sft and train-rm/am save one
    after every epoch, ppo every save_every steps, rejection-sampling after every iteration)"""


@dataclasses.dataclass
class GuardedRunSettings(RunSettings):
    """``RunSettings`` of a trainer whose ``NonFiniteGuard`` stops the run (``sft``,
    ``train-rm`` / ``train-am``, ``ppo``). A subclass's ``__post_init__`` calls this one's."""

    max_bad_steps: int = 3
    """stop (after a checkpoint) once this many consecutive steps were skipped for a non-finite
    score, loss or gradient"""

    def __post_init__(self):
        if self.max_bad_steps < 1:
            raise ValueError("max_bad_steps must be >= 1")


def trainable_state(module) -> dict:
    """The parameters that train (all of them, or only LoRA adapters / a top of the layers),
    on the CPU: frozen weights never change, so a checkpoint need not carry them."""
    return {k: v.detach().cpu().clone() for k, v in module.named_parameters() if v.requires_grad}


def load_trainable(module, state: dict, what: str) -> None:
    """Copy a ``trainable_state`` back in place; every trainable parameter must be there."""
    params = dict(module.named_parameters())
    missing = [k for k, p in params.items() if p.requires_grad and k not in state]
    if missing:
        raise RuntimeError(f"checkpoint lacks trainable {what} parameters, e.g. {missing[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def fault_point(point: str, step: int) -> None:
    """Fault injection for the resume tests: STABLE_RLHF_FAULT=<point>:<step> SIGKILLs the
    process there (points: 'train' after an optimiser step, 'checkpoint' mid-write)."""
    spec = os.environ.get("STABLE_RLHF_FAULT", "")
    if spec == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (``atomic_dir`` only ever renames finished ones)."""
    root = out / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / "state.pt").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def mean_stats(rows: list[dict]) -> dict:
    """Key-wise mean of minibatch stats (a key averages over the rows that have it)."""
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in sorted(keys)}


@contextlib.contextmanager
def timed(times: dict, key: str):
    """``times[key]``: the wall-clock seconds the block took."""
    t0 = time.time()
    yield
    times[key] = time.time() - t0


def unwrap(model):
    """The model itself, not the DDP wrapper ``accelerator.prepare`` put around it under
    several processes: for sampling, no-grad passes and checkpoints."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def tensorboard_writer(accelerator):
    """accelerate's TensorBoard SummaryWriter, if that tracker is on (for text and tables)."""
    for tracker in getattr(accelerator, "trackers", []):
        if getattr(tracker, "name", "") == "tensorboard":
            return tracker.writer
    return None


def save_policy(model, tokenizer, path: Path) -> None:
    """The final policy (``save_pretrained``-loadable, with its tokenizer), atomically."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


# --------------------------------------------------------------------------- the non-finite policy


class NonFiniteError(RuntimeError):
    """Raised after ``max_bad_steps`` consecutive non-finite steps; a checkpoint is saved first."""


def all_finite(accelerator, *values) -> bool:
    """Whether every value (losses, gradient norms, scores) is finite on every rank: all ranks
    must take the same branch, or DDP's collectives would hang."""
    ok = all(bool(torch.isfinite(torch.as_tensor(v).detach().float()).all()) for v in values)
    flag = torch.tensor([float(ok)], device=accelerator.device)
    return bool(accelerator.gather(flag).min().item())


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel over all tensors: on 2 CPU cores a step over
    SmolLM2's policy and value weights takes 0.18 s instead of 0.69 s with the per-tensor
    loop) where every parameter's device and dtype support it; ``params`` and ``kwargs``
    as for ``torch.optim.AdamW``."""
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = bool(tensors) and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16,
                                                                                 torch.float16) for p in tensors)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def clipped_step(accelerator, optimizer, params, grad_clip: float, loss, scheduler=None) -> float | None:
    """Clip the gradients, then step the optimiser (and scheduler) unless the loss or the
    gradient norm is not finite on some rank; returns the gradient norm, or None for a
    skipped update (its gradients are dropped)."""
    grad_norm = accelerator.clip_grad_norm_(params, grad_clip)
    if not all_finite(accelerator, loss, grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return float(grad_norm)


class NonFiniteGuard:
    """Counts consecutive steps that had to skip something non-finite; ``bad`` says when the
    run must stop. Its count is part of the checkpoint, so a resumed run stops where the
    uninterrupted one would."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps, self.bad_in_row = max_bad_steps, 0

    def end_step(self, bad: bool) -> bool:
        """Record whether this step skipped anything; True when the run must stop."""
        self.bad_in_row = self.bad_in_row + 1 if bad else 0
        return self.bad_in_row >= self.max_bad_steps

    def error(self, step: int, out: Path, what: str = "scores or losses") -> NonFiniteError:
        return NonFiniteError(f"{self.bad_in_row} consecutive steps with non-finite {what}; stopped at step "
                              f"{step}; last checkpoint in {out / 'checkpoints'}")

    def state_dict(self) -> dict:
        return {"bad_in_row": self.bad_in_row}

    def load_state_dict(self, state: dict) -> None:
        self.bad_in_row = int(state["bad_in_row"])


# --------------------------------------------------------------------------- the run


class Run:
    """One run directory and its accelerator (see the module docstring).

    ``cfg`` is the stage's config: it needs ``out_dir``, ``seed`` and the ``RunSettings``
    ``precision`` and ``keep_final_checkpoint``; ``log_with`` is 'tensorboard', 'wandb' (when
    installed) or 'none'. ``fresh_files`` / ``fresh_dirs`` are what else a fresh run must clear (samples,
    kept sets, a final model); ``step_name`` is what a step is called in messages
    (rejection sampling's are iterations)."""

    def __init__(self, cfg, name: str, *, log_with: str = "none", keep_checkpoints: int = 1,
                 fresh_files: tuple[str, ...] = (), fresh_dirs: tuple[str, ...] = (), step_name: str = "step"):
        from .models import make_accelerator, mixed_precision
        from .rng import seed_everything

        _check_log_with(log_with)
        self.started, self.bars = time.time(), []
        self.cfg, self.name, self.log_with, self.keep, self.step_name = cfg, name, log_with, keep_checkpoints, step_name
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.fresh_files = ("metrics.jsonl", "summary.json", *fresh_files)
        self.fresh_dirs = ("checkpoints", *fresh_dirs)
        seed_everything(cfg.seed)
        self.accelerator = make_accelerator(seed=cfg.seed, mixed_precision=mixed_precision(cfg.precision),
                                            log_with=None if log_with == "none" else log_with,
                                            project_dir=str(self.out / "tensorboard"))
        self.device, self.is_main = self.accelerator.device, self.accelerator.is_main_process
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes

    def print(self, message: str) -> None:
        if self.is_main:
            print(f"[{self.name}] {message}")

    def start(self, resume: bool) -> dict | None:
        """The latest complete checkpoint's state when resuming (this rank's RNG restored, the
        metrics logged after it dropped), else None after clearing an earlier run's files.
        Saves the resolved config and starts the trackers either way."""
        from .config import save_config, to_dict
        from .rng import set_rng_state

        ckpt = latest_checkpoint(self.out) if resume else None
        if resume and ckpt is None and (self.out / "summary.json").exists():
            from .config import ConfigError

            raise ConfigError(f"{self.out}: this run finished and dropped its checkpoints "
                              "(keep_final_checkpoint=false), so there is nothing to resume; use another out_dir, "
                              "or resume=false to run it again from the start")
        if self.is_main:
            if ckpt is None:
                self._clear()
            for partial in (self.out / "checkpoints").glob(".step-*"):  # a checkpoint killed mid-write
                shutil.rmtree(partial, ignore_errors=True)
            save_config(self.cfg, self.out / "config.yaml")
        state = None
        if ckpt is not None:
            state = torch.load(ckpt / "state.pt", weights_only=True)
            set_rng_state(state["rng"][self.rank])
            if self.is_main:
                self._drop_metrics_after(state["step"])
            self.print(f"resumed from {ckpt} ({self.step_name} {state['step']})")
        self.accelerator.wait_for_everyone()
        if self.log_with != "none":
            self.accelerator.init_trackers(self.name, config=_flat_hparams(to_dict(self.cfg)))
        return state

    def _clear(self) -> None:
        """A fresh run in an old directory: remove what an earlier run left, so nothing of it
        leaks in (old metrics, the SFT reference answers of another initial policy, checkpoints
        a later resume could pick up)."""
        for name in (*self.fresh_files, *(p.name for p in self.out.glob("eval_reference_*.jsonl"))):
            (self.out / name).unlink(missing_ok=True)
        for name in self.fresh_dirs:
            shutil.rmtree(self.out / name, ignore_errors=True)

    def _drop_metrics_after(self, step: int) -> None:
        """The lines logged after the checkpoint we resume from: they will be logged again."""
        path = self.out / "metrics.jsonl"
        if path.exists():
            atomic_write_jsonl(path, [r for r in read_jsonl(path) if r.get("step", 0) <= step])

    def log(self, stats: dict) -> None:
        """A row of metrics.jsonl, and its numbers to the trackers (main process; ``stats["step"]``)."""
        if self.is_main:
            append_jsonl(self.out / "metrics.jsonl", stats)
            scalars = {k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.accelerator.log(scalars, step=stats["step"])

    def metrics(self) -> list[dict]:
        """The rows of metrics.jsonl so far (read them on the main process)."""
        path = self.out / "metrics.jsonl"
        return read_jsonl(path) if path.exists() else []

    def checkpoint(self, step: int, state: dict) -> None:
        """``checkpoints/step-N/state.pt`` with ``state``, the step and every rank's RNG, written
        atomically; the newest ``keep_checkpoints`` are kept. Every rank calls it (the RNG
        states are gathered)."""
        from .rng import rng_state

        rngs = [None] * self.world
        if self.world > 1:
            torch.distributed.all_gather_object(rngs, rng_state())
        else:
            rngs[0] = rng_state()
        if self.is_main:
            with atomic_dir(self.out / "checkpoints" / f"step-{step:06d}") as tmp:
                torch.save({**state, "step": step, "rng": rngs}, tmp / "state.pt")
                fault_point("checkpoint", step)
            for old in sorted((self.out / "checkpoints").glob("step-*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def progress(self, total: int, initial: int = 0):
        """A progress bar on the main process (closed by ``finish``)."""
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=initial, desc=self.name, disable=not self.is_main)
        self.bars.append(bar)
        return bar

    def seconds(self) -> float:
        """Wall-clock seconds since the run was made."""
        return time.time() - self.started

    def finish(self, summary: dict) -> dict:
        """summary.json (main process), progress bars and trackers closed; returns the summary."""
        for bar in self.bars:
            bar.close()
        if self.is_main:
            atomic_write_json(self.out / "summary.json", summary)
            if not self.cfg.keep_final_checkpoint:  # the final model, metrics and summary are the result
                shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
        self.accelerator.end_training()
        return summary


def _check_log_with(log_with: str) -> None:
    """Before anything trains: a known tracker, and wandb only where it is installed."""
    import importlib.util

    from .config import ConfigError

    if log_with not in LOG_WITH:
        raise ConfigError(f"log_with must be one of {', '.join(LOG_WITH)}, not {log_with!r}")
    if log_with == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log_with=wandb needs the wandb package (pip install wandb); "
                          "or log with tensorboard or none")


def _flat_hparams(d: dict, prefix: str = "") -> dict:
    """A nested config as flat dotted scalars, as TensorBoard's hparams want them."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_hparams(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


class TrainState:
    """What an epoch trainer (``sft``, ``train-rm`` / ``train-am``) carries from step to step
    and saves in every checkpoint: the prepared model and optimiser, the linear warm-up /
    decay scheduler, the step (the epoch follows from it), the non-finite guard, the first
    and latest step's metrics, and the stage's own stateful ``parts`` (the demonstration
    order, the AM's running task moments: anything with ``state_dict`` / ``load_state_dict``).

    Each step's row has ``time/step``: wall seconds from the end of the previous update (or,
    for an epoch's first step, from ``batches_left``, which the trainer calls once the last
    epoch's evaluation and checkpoint are done) to the end of this optimiser step, so it
    covers the step's batch encoding, forward, backward and optimiser step, and nothing else.

    ``cfg`` is the stage's config: its ``epochs``, ``batch_size``, ``warmup_ratio``,
    ``grad_clip`` and ``max_bad_steps`` are read; ``n_items`` is the training set's size."""

    def __init__(self, run: Run, model, optimizer, cfg, n_items: int, **parts):
        from transformers import get_linear_schedule_with_warmup

        self.run, self.cfg, self.parts = run, cfg, parts
        self.steps_per_epoch = math.ceil(n_items / cfg.batch_size)
        self.total = self.steps_per_epoch * cfg.epochs
        self.scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * self.total), self.total)
        self.model, self.optimizer = run.accelerator.prepare(model, optimizer)
        self.guard = NonFiniteGuard(cfg.max_bad_steps)
        self.step, self.skipped = 0, 0
        self.bar = None
        self.first: dict = {}  # the first step's metrics row (SFT reports its NLL against the last one's)
        self.last: dict = {}
        self.step_started = time.time()  # where the next step's time/step is measured from

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to (``cfg.epochs`` once training is done)."""
        return self.step // self.steps_per_epoch

    @property
    def unwrapped(self):
        return self.run.accelerator.unwrap_model(self.model)

    def batches_left(self, epoch: int) -> range:
        """Indices within ``epoch`` of the minibatches still to train: all of them, or the
        rest of an epoch a checkpoint was saved in the middle of. The epoch's first step is
        timed from here."""
        self.step_started = time.time()
        return range(self.step - epoch * self.steps_per_epoch, self.steps_per_epoch)

    def update(self, loss: torch.Tensor, stats: dict) -> None:
        """One optimiser step on ``loss`` (skipped, and counted, when the loss or the gradient
        norm is not finite), the step's metrics row, then the run stops if the guard says so."""
        accelerator, epoch = self.run.accelerator, self.epoch
        self.optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = clipped_step(accelerator, self.optimizer, self.model.parameters(), self.cfg.grad_clip, loss,
                                 self.scheduler)
        seconds = time.time() - self.step_started
        self.step += 1
        self.skipped += grad_norm is None
        grad = {} if grad_norm is None else {"optim/grad_norm": grad_norm}  # a skipped update has none
        self.last = {"step": self.step, "epoch": epoch, **stats, **grad, "optim/lr": self.scheduler.get_last_lr()[0],
                     "skipped_updates": int(grad_norm is None), "time/step": seconds}
        self.first = self.first or self.last
        self.run.log(self.last)
        if self.bar is None:  # made at the first step: a resumed run's bar starts where it stopped
            self.bar = self.run.progress(self.total, self.step - 1)
        self.bar.update(1)
        fault_point("train", self.step)
        if self.guard.end_step(grad_norm is None):
            self.run.checkpoint(self.step, self.state_dict())
            raise self.guard.error(self.step, self.run.out, "losses or gradient norms")
        self.step_started = time.time()

    def state_dict(self) -> dict:
        return {"model": trainable_state(self.unwrapped), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "guard": self.guard.state_dict(), "step": self.step,
                "skipped": self.skipped, "first": self.first, "last": self.last,
                **{name: part.state_dict() for name, part in self.parts.items()}}

    def load_state_dict(self, state: dict) -> None:
        load_trainable(self.unwrapped, state["model"], "model")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.guard.load_state_dict(state["guard"])
        self.step, self.skipped, self.first, self.last = state["step"], state["skipped"], state["first"], state["last"]
        for name, part in self.parts.items():
            part.load_state_dict(state[name])

    def resume(self, state: dict | None) -> None:
        """Continue from ``run.start``'s checkpoint state (None: a fresh run, nothing to load)."""
        if state is not None:
            self.load_state_dict(state)
