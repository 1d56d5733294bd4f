"""Seconds per optimiser step, comparisons and pairs per second and peak memory of the
score-model trainer (``stable-rlhf train-rm`` / ``train-am``).

    python -m experiments.benchmark_rm --model smollm2 --batch-size 8 --max-length 128
    python -m experiments.benchmark_rm --model minilm --objective am
    python -m experiments.benchmark_rm --model tiny-random --steps 2 --data-dir data/testbed

It runs ``stable_rlhf.reward_model.train`` for one epoch over ``(--warmup + --steps) ×
--batch-size`` comparisons of the shipped preferences (a task-stratified draw, so every step
holds the tasks in proportion) into a temporary run directory, and reads the ``time/step``
the trainer logs for every optimiser step in ``metrics.jsonl``: the step's collation and
tokenisation, the forward of every response of its comparisons, the loss, backward and
optimiser step. The warm-up steps are not counted; the end-of-epoch evaluation (on
``--batch-size`` held-out comparisons), the checkpoint and the final scoring of the
training comparisons fall outside ``time/step``.

comparisons/s is comparisons per step over s/step; pairs/s counts the K(K-1)/2 ordered
pairs of each K-ranked comparison (the ranking loss's terms); both are over all ranks under
``accelerate launch`` (then pass ``--out-dir``, one directory for every rank). Peak memory
is the process's peak resident set over its whole life, and on CUDA also
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from experiments.benchmark_ppo import (
    ROOT,
    measured_rows,
    parse_run_flags,
    peak_memory,
    print_phases,
    spread,
    world_size,
    write_json,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="backbone: smollm2, minilm, tiny-random, a directory")
    parser.add_argument("--objective", choices=("rm", "am"), default="rm", help="train-rm or train-am")
    parser.add_argument("--data-dir", default=str(ROOT / "data" / "testbed_large"),
                        help="holds preferences_train.jsonl and preferences_eval.jsonl")
    parser.add_argument("--batch-size", type=int, default=8, help="comparisons per optimiser step")
    parser.add_argument("--max-length", type=int, default=384, help="tokens per (prompt, response)")
    return parse_run_flags(parser, argv, 5, "any other ScoreTrainConfig override (repeatable), e.g. train_layers=4")


def draw(path: Path, n: int, seed: int = 0) -> list[dict]:
    """``n`` comparisons of a file, task-stratified (the trainer's own epoch order)."""
    from stable_rlhf.io import read_jsonl
    from stable_rlhf.reward_model import epoch_order

    rows = read_jsonl(path)
    if len(rows) < n:
        raise SystemExit(f"{path} has {len(rows)} comparisons; the benchmark needs {n} (fewer --steps?)")
    return [rows[i] for i in epoch_order([r.get("task", "default") for r in rows], seed, stratify=True)[:n]]


def rm_overrides(args: argparse.Namespace, out_dir: Path, train: Path, held_out: Path) -> list[str]:
    """The ScoreTrainConfig of the workload: the trainer's defaults but for the data, one
    epoch, the batch, the length and no tracker."""
    return [f"objective={args.objective}", f"out_dir={out_dir}", f"model.name_or_path={args.model}",
            f"train_data={train}", f"eval_data={held_out}", "data_kind=ranked", "epochs=1",
            f"batch_size={args.batch_size}", f"max_length={args.max_length}", "log_with=none", *args.set]


def rm_figures(rows: list[dict], batch_size: int, pairs_per_comparison: float, world: int) -> dict:
    """Seconds per step (mean, min, max), comparisons/s and pairs/s."""
    step = spread([r["time/step"] for r in rows])
    comparisons = batch_size * world  # every step is a full batch: the draw is a multiple of it
    return {"seconds": {"step": step}, "seconds_per_step": step["mean"],
            "comparisons_per_step": comparisons, "pairs_per_step": comparisons * pairs_per_comparison,
            "comparisons_per_s": comparisons / step["mean"],
            "pairs_per_s": comparisons * pairs_per_comparison / step["mean"]}


def report(args: argparse.Namespace, rows: list[dict], pairs_per_comparison: float, world: int) -> dict:
    """The benchmark's figures from the run's metrics rows, printed and returned."""
    from stable_rlhf.models import default_device

    figures = rm_figures(measured_rows(rows, args.warmup), args.batch_size, pairs_per_comparison, world)
    result = {
        "trainer": "stable_rlhf.reward_model.train", "objective": args.objective, "model": args.model,
        "device": str(default_device()), "data_dir": args.data_dir, "batch_size": args.batch_size,
        "max_length": args.max_length, "world": world, "warmup_steps": args.warmup, "measured_steps": args.steps,
        "overrides": args.set, **figures, **peak_memory(), "torch_threads": torch.get_num_threads(),
    }
    print_phases(f"train-{args.objective} benchmark (stable_rlhf.reward_model.train): {args.model} on "
                 f"{result['device']}, batch {args.batch_size} comparisons, max_length {args.max_length}, "
                 f"{args.steps} steps after {args.warmup} warm-up", figures["seconds"],
                 [f"{figures['seconds_per_step']:.3f} s/step", f"{figures['comparisons_per_s']:.3f} comparisons/s",
                  f"{figures['pairs_per_s']:.3f} pairs/s", f"peak RSS {result['peak_rss_mb']:.0f} MB",
                  f"{result['torch_threads']} torch threads"])
    return result


def main(argv: list[str] | None = None) -> dict:
    from stable_rlhf import reward_model
    from stable_rlhf.config import load_config
    from stable_rlhf.io import atomic_write_jsonl, read_jsonl

    args = parse_args(argv)
    data = Path(args.data_dir)
    train = draw(data / "preferences_train.jsonl", (args.warmup + args.steps) * args.batch_size)
    held_out = draw(data / "preferences_eval.jsonl", args.batch_size)
    pairs_per_comparison = statistics.mean(len(c["responses"]) * (len(c["responses"]) - 1) / 2 for c in train)
    with tempfile.TemporaryDirectory(prefix="benchmark_rm_") as tmp:
        out_dir = Path(args.out_dir or tmp)
        drawn = out_dir / "benchmark_data"  # kept with a kept run: its config.yaml names these files
        drawn.mkdir(parents=True, exist_ok=True)
        atomic_write_jsonl(drawn / "train.jsonl", train)
        atomic_write_jsonl(drawn / "eval.jsonl", held_out)
        overrides = rm_overrides(args, out_dir, drawn / "train.jsonl", drawn / "eval.jsonl")
        reward_model.train(load_config(reward_model.ScoreTrainConfig, None, overrides))
        world, is_main = world_size()
        if not is_main:  # metrics.jsonl is the main process's
            return {}
        result = report(args, read_jsonl(out_dir / "metrics.jsonl"), pairs_per_comparison, world)
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
