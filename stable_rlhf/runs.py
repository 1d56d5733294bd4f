"""Run-directory plumbing shared by the policy trainers (PPO, rejection sampling):
checkpoints of the trainable state, resume bookkeeping, fault injection for the resume
tests, and logging helpers."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch

from .io import atomic_write_jsonl, read_jsonl


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


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be redone)."""
    if path.exists():
        atomic_write_jsonl(path, [r for r in read_jsonl(path) if r.get("step", 0) <= step])


def mean_stats(rows: list[dict]) -> dict:
    """Key-wise mean of minibatch stats (a key averages over the rows that have it)."""
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in sorted(keys)}


def flat_hparams(d: dict, prefix: str = "") -> dict:
    """A nested config as flat dotted scalars, as TensorBoard's hparams want them."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_hparams(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def tensorboard_writer(accelerator):
    """accelerate's TensorBoard SummaryWriter, if that tracker is on (for text and tables)."""
    for tracker in getattr(accelerator, "trackers", []):
        if getattr(tracker, "name", "") == "tensorboard":
            return tracker.writer
    return None
