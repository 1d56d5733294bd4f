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


def clear_run_dir(out: Path, files: tuple[str, ...] = (), dirs: tuple[str, ...] = ()) -> None:
    """A fresh run in an old directory: remove what an earlier run left, so nothing of it
    leaks in (old metrics, the SFT reference answers of another initial policy, checkpoints
    a later resume could pick up)."""
    import shutil

    for name in (*files, *(p.name for p in out.glob("eval_reference_*.jsonl"))):
        (out / name).unlink(missing_ok=True)
    for name in dirs:
        shutil.rmtree(out / name, ignore_errors=True)


class RunLog:
    """metrics.jsonl plus accelerate's trackers (TensorBoard), written by the main process."""

    def __init__(self, accelerator, out: Path):
        self.accelerator, self.out = accelerator, out

    def __call__(self, stats: dict) -> None:
        if self.accelerator.is_main_process:
            from .io import append_jsonl

            append_jsonl(self.out / "metrics.jsonl", stats)
            scalars = {k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.accelerator.log(scalars, step=stats["step"])


def save_checkpoint(accelerator, out: Path, step: int, state: dict, keep: int) -> None:
    """Write ``checkpoints/step-N/state.pt`` atomically with every rank's RNG state, and keep
    the newest ``keep`` checkpoints. Called by every rank (the RNG states are gathered)."""
    import shutil

    from .io import atomic_dir
    from .rng import rng_state

    rngs = [None] * accelerator.num_processes
    if accelerator.num_processes > 1:
        torch.distributed.all_gather_object(rngs, rng_state())
    else:
        rngs[0] = rng_state()
    if accelerator.is_main_process:
        with atomic_dir(out / "checkpoints" / f"step-{step:06d}") as tmp:
            torch.save({**state, "rng": rngs}, tmp / "state.pt")
            fault_point("checkpoint", step)
        for old in sorted((out / "checkpoints").glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def remove_partial_checkpoints(out: Path) -> None:
    """A checkpoint killed mid-write leaves only its hidden temporary directory."""
    import shutil

    for partial in (out / "checkpoints").glob(".step-*"):
        shutil.rmtree(partial, ignore_errors=True)


def save_policy(model, tokenizer, path: Path) -> None:
    """The final policy (``save_pretrained``-loadable, with its tokenizer), atomically."""
    from .io import atomic_dir

    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
