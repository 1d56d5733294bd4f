"""Seconds per PPO phase, samples and tokens per second and peak memory of the PPO trainer.

    python -m experiments.benchmark_ppo                       # SmolLM2, batch 8, 32 new tokens
    python -m experiments.benchmark_ppo --model tiny-random --steps 2
    python -m experiments.benchmark_ppo --lora --batch-size 16 --new-tokens 64
    python -m experiments.benchmark_ppo --set value_train_layers=2 --set forward_batch_size=16

It runs ``stable_rlhf.ppo.train``, the trainer ``stable-rlhf ppo`` runs, with the gold
reward for ``--warmup + --steps`` steps into a temporary run directory, and reads the
timings the trainer logs for every step in ``metrics.jsonl``:

    generate   time/generate   sampling the responses (KV cache, left-padded prompts)
    score      time/score      the gold reward
    forward    time/forward    no-grad policy logprobs, reference logprobs and values
    update     time/update     the PPO epochs of minibatch updates; where the trainer does
                               not log it, the rest of the step (advantages, the updates,
                               the KL controller and the step's statistics)
    step       time/step       the whole step, from sampling to the metrics row

The warm-up steps (oneDNN builds its kernels, the allocator grows) are not counted.
Evaluation and checkpoints fall outside ``time/step``; they are kept cheap (one eval
prompt per task, 8 eval tokens, no forgetting set) because the trainer always evaluates
before the first step and after the last. Peak memory is the process's peak resident set
over its whole life (model loading, evaluation and the final save included), and on CUDA
also ``torch.cuda.max_memory_allocated``. Under ``accelerate launch`` pass ``--out-dir``
(one directory for every rank); samples/s and tokens/s are then over all ranks.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("generate", "score", "forward", "update", "step")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="policy: smollm2, tiny-random, a directory or hub id")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per rollout (batch_size)")
    parser.add_argument("--mini-batch-size", type=int, default=4, help="rollout rows per optimiser step")
    parser.add_argument("--new-tokens", type=int, default=32, help="generation.max_new_tokens")
    parser.add_argument("--lora", action="store_true", help="LoRA policy (reference = adapters disabled)")
    return parse_run_flags(parser, argv, 3, "any other PPOConfig override (repeatable), e.g. precision=bf16-mixed")


def parse_run_flags(parser: argparse.ArgumentParser, argv: list[str] | None, steps: int, set_help: str):
    """The flags every trainer benchmark shares (steps, warm-up, overrides, where to keep the
    run and the figures), then the parsed arguments."""
    parser.add_argument("--steps", type=int, default=steps, help="measured optimiser steps")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first and not counted")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    parser.add_argument("--out-dir", default=None, help="keep the run here (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def ppo_overrides(args: argparse.Namespace, out_dir: str) -> list[str]:
    """The PPOConfig of the workload: the trainer's defaults but for batch, tokens, LoRA and a
    near-free evaluation (only at the start and the end), no tracker."""
    total = args.warmup + args.steps
    testbed = ROOT / "data" / "testbed"
    return [
        f"out_dir={out_dir}", f"model.name_or_path={args.model}", f"prompts={testbed / 'prompts_train.jsonl'}",
        f"steps={total}", f"batch_size={args.batch_size}", f"mini_batch_size={args.mini_batch_size}",
        f"generation.max_new_tokens={args.new_tokens}", f"lora.enabled={str(args.lora).lower()}",
        "reward.source=gold", "log_with=none", f"save_every={total}",
        f"eval.every={total + 1}", f"eval.prompts={testbed / 'prompts_eval.jsonl'}", "eval.limit_per_task=1",
        "eval.forget_prompts=null", "eval.generation.max_new_tokens=8", "eval.n_samples_logged=1",
        *args.set,
    ]


def spread(values: list[float]) -> dict:
    """Mean, min and max of a phase's seconds over the measured steps."""
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


def measured_rows(rows: list[dict], warmup: int) -> list[dict]:
    """The metrics rows of the optimiser / PPO steps after the warm-up (eval rows and skipped
    steps have no ``time/step``)."""
    measured = [r for r in rows if "time/step" in r and r["step"] > warmup]
    if not measured:
        raise RuntimeError("no measured step in metrics.jsonl (every step skipped?)")
    return measured


def peak_memory() -> dict:
    """Peak resident set of this process in MB (Linux reports KiB), and on CUDA the peak
    allocated GPU memory."""
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def world_size() -> tuple[int, bool]:
    """Processes in the run and whether this is the main one (accelerate's shared state)."""
    from accelerate import PartialState

    state = PartialState()
    return state.num_processes, state.is_main_process


def ppo_figures(rows: list[dict], batch_size: int, world: int) -> dict:
    """Per-phase seconds (mean, min, max), s/step, samples/s and generated tokens/s."""
    seconds = {}
    for name in ("generate", "score", "forward"):
        seconds[name] = [r[f"time/{name}"] for r in rows]
    seconds["update"] = [r["time/update"] if "time/update" in r
                         else r["time/step"] - r["time/generate"] - r["time/score"] - r["time/forward"] for r in rows]
    seconds["step"] = [r["time/step"] for r in rows]
    phases = {k: spread(v) for k, v in seconds.items()}
    tokens = [r["policy/response_tokens"] * batch_size * world for r in rows]  # generated tokens per step
    return {
        "seconds": phases,
        "update_is_rest_of_step": not all("time/update" in r for r in rows),
        "seconds_per_step": phases["step"]["mean"],
        "samples_per_s": batch_size * world / phases["step"]["mean"],
        "generated_tokens_per_step": statistics.mean(tokens),
        "generated_tokens_per_s": sum(tokens) / sum(seconds["generate"]),
    }


def print_phases(title: str, seconds: dict, notes: list[str]) -> None:
    """The figures as a Markdown table with a heading line and a line of notes."""
    print(title)
    print("| phase | mean s | min s | max s |\n|---|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s['mean']:.3f} | {s['min']:.3f} | {s['max']:.3f} |")
    print("; ".join(notes))


def write_json(result: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def report(args: argparse.Namespace, rows: list[dict], world: int) -> dict:
    """The benchmark's figures from the run's metrics rows, printed and returned."""
    from stable_rlhf.models import default_device

    figures = ppo_figures(measured_rows(rows, args.warmup), args.batch_size, world)
    result = {
        "trainer": "stable_rlhf.ppo.train", "model": args.model, "device": str(default_device()),
        "lora": args.lora, "batch_size": args.batch_size, "mini_batch_size": args.mini_batch_size,
        "new_tokens": args.new_tokens, "world": world, "warmup_steps": args.warmup, "measured_steps": args.steps,
        "overrides": args.set, **figures, **peak_memory(), "torch_threads": torch.get_num_threads(),
    }
    update = "update (rest of the step)" if figures["update_is_rest_of_step"] else "update"
    print_phases(f"PPO benchmark (stable_rlhf.ppo.train): {args.model} on {result['device']}, "
                 f"{'LoRA' if args.lora else 'full fine-tuning'}, batch {args.batch_size} (minibatch "
                 f"{args.mini_batch_size}), {args.new_tokens} new tokens, {args.steps} steps after {args.warmup} "
                 f"warm-up; {update}", figures["seconds"],
                 [f"{figures['seconds_per_step']:.3f} s/step", f"{figures['samples_per_s']:.3f} samples/s",
                  f"{figures['generated_tokens_per_step']:.0f} generated tokens/step",
                  f"{figures['generated_tokens_per_s']:.1f} generated tokens/s",
                  f"peak RSS {result['peak_rss_mb']:.0f} MB", f"{result['torch_threads']} torch threads"])
    return result


def main(argv: list[str] | None = None) -> dict:
    from stable_rlhf import ppo
    from stable_rlhf.config import load_config
    from stable_rlhf.io import read_jsonl

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="benchmark_ppo_") as tmp:
        out_dir = args.out_dir or tmp
        ppo.train(load_config(ppo.PPOConfig, None, ppo_overrides(args, out_dir)))
        world, is_main = world_size()
        if not is_main:  # metrics.jsonl is the main process's
            return {}
        result = report(args, read_jsonl(Path(out_dir) / "metrics.jsonl"), world)
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
