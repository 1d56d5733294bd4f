"""PPO side by side with TRL's, one workload, one machine, one command: the ratio of samples/s.

    python -m experiments.benchmark_vs_trl                      # TRL, then ours, 3 steps each after 1 warm-up
    python -m experiments.benchmark_vs_trl --repeats 2 --json runs/bench_vs_trl.json
    python -m experiments.benchmark_vs_trl --ours-set precision=bf16-mixed --ours-set value_train_layers=2

TRL's PPO is ``trl.experimental.ppo`` of TRL 1.12.0 (``pip install -e '.[trl]'``; the last
TRL with PPO). The workload is the one both trainers can run with equal settings: SmolLM2-135M
as policy, reference, value model and reward model, all float32 and fully trained (policy and
value), the same 32 testbed prompts (chat-formatted, batch 8), 32 new tokens at temperature
0.7, one PPO epoch of one minibatch per rollout. The reward and value model start from
SmolLM2 with a new scalar head (the same backbone on both sides; the heads' random
initialisations differ, which changes what is learnt, not what is computed). TRL always
generates all 32 tokens (its generation config has no stop token); ours stops a batch once every
row has ended: generated tokens per step are printed beside the times.

Each side runs in its own process, in turn (TRL first), ``--repeats`` times, so that peak
resident memory is each process's own and a slow spell of the machine hits both. Ours is
``stable_rlhf.ppo.train`` (via ``experiments.benchmark_ppo``); TRL's step times are taken at
its ``on_step_end`` callback. The ratio is TRL's seconds per step over ours in the same
repeat. ``--ours-set KEY=VALUE`` changes our side only (a faster preset); the table says so.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_VERSION = "1.12.0"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=("both", "trl", "ours"), default="both",
                        help="both: each side in a subprocess, in turn; trl / ours: this process runs one side")
    parser.add_argument("--steps", type=int, default=3, help="measured PPO steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first and not counted")
    parser.add_argument("--repeats", type=int, default=1, help="TRL-then-ours rounds")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a PPOConfig override for our side only (repeatable)")
    parser.add_argument("--work-dir", default=None, help="shared files (prompts, score model); default: temporary")
    parser.add_argument("--json", default=None, help="write the figures here")
    return parser.parse_args(argv)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def prepare(work: Path, n_prompts: int) -> dict:
    """The shared inputs: ``n_prompts`` testbed prompts spread over the tasks, and SmolLM2 with a
    new scalar head saved as a score model (ours reads it as the reward and the value model's
    init; TRL builds its sequence-classification twins from the same backbone)."""
    from stable_rlhf.config import ModelConfig
    from stable_rlhf.io import atomic_write_jsonl, read_jsonl
    from stable_rlhf.models import load_score_model, resolve_model_path

    records = read_jsonl(ROOT / "data" / "testbed" / "prompts_train.jsonl")
    step = max(1, len(records) // n_prompts)
    prompts = work / "prompts.jsonl"
    atomic_write_jsonl(prompts, records[::step][:n_prompts])
    score_dir = work / "score_model"
    if not (score_dir / "score_model.json").exists():
        import torch

        torch.manual_seed(0)
        model, _ = load_score_model(ModelConfig(), device="cpu")
        model.save_pretrained(score_dir, extra={"objective": "rm"})
    return {"prompts": str(prompts), "score_model": str(score_dir), "policy": resolve_model_path(ModelConfig())}


def run_trl(args: argparse.Namespace, shared: dict) -> dict:
    """TRL 1.12.0's PPOTrainer on the workload; seconds per step from its callbacks."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from stable_rlhf.io import read_jsonl
    from stable_rlhf.models import chat_prompt

    if trl.__version__ != TRL_VERSION:
        raise SystemExit(f"TRL {trl.__version__} installed; the comparison pins {TRL_VERSION} (pip install -e '.[trl]')")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(shared["policy"], padding_side="left")
    records = read_jsonl(shared["prompts"])
    ids = [tok(chat_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"] for r in records]
    data = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(shared["policy"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(shared["policy"], dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(shared["policy"], num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(shared["policy"], num_labels=1, dtype=torch.float32)
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="trl_ppo_") as out:
        cfg = PPOConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            num_mini_batches=1, num_ppo_epochs=1, total_episodes=total * args.batch_size,
            response_length=args.new_tokens, temperature=0.7, stop_token="eos", learning_rate=1e-5,
            local_rollout_forward_batch_size=args.batch_size, report_to=[], save_strategy="no",
            num_sample_generations=0, seed=0, bf16=False, fp16=False, use_cpu=True, logging_steps=1,
            disable_tqdm=True,
        )
        ends: list[float] = []

        class StepTimes(TrainerCallback):
            def on_train_begin(self, *a, **k):
                ends.append(time.time())

            def on_step_end(self, *a, **k):
                ends.append(time.time())

        trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                             value_model=value, train_dataset=data, eval_dataset=data, callbacks=[StepTimes()])
        trainer.train()
    steps = [b - a for a, b in zip(ends, ends[1:])][args.warmup:]
    return {"side": "trl", "trl_version": trl.__version__, "seconds_per_step": statistics.mean(steps),
            "step_seconds": steps, "generated_tokens_per_step": args.batch_size * args.new_tokens,
            "peak_rss_mb": peak_rss_mb()}


def run_ours(args: argparse.Namespace, shared: dict) -> dict:
    """``stable_rlhf.ppo.train`` on the workload, through experiments.benchmark_ppo."""
    from experiments import benchmark_ppo

    flags = ["--batch-size", str(args.batch_size), "--mini-batch-size", str(args.batch_size),
             "--new-tokens", str(args.new_tokens), "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--set", f"prompts={shared['prompts']}", "--set", "reward.source=rm",
             "--set", f"reward.path={shared['score_model']}", "--set", "lr=1e-5", "--set", "value_lr=1e-5",
             "--set", "precision=fp32", "--set", "ppo_epochs=1"]
    for item in args.ours_set:
        flags += ["--set", item]
    result = benchmark_ppo.main(flags)
    return {"side": "ours", "seconds_per_step": result["seconds_per_step"],
            "step_seconds": None, "phases": result["seconds"],
            "generated_tokens_per_step": result["generated_tokens_per_step"], "peak_rss_mb": peak_rss_mb(),
            "overrides": args.ours_set}


def side_by_side(args: argparse.Namespace, argv: list[str]) -> dict:
    """Each side in its own process, TRL then ours, ``repeats`` times; the ratios."""
    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        prepare(work, 4 * args.batch_size)
        rounds = []
        for repeat in range(args.repeats):
            pair = {}
            for side in ("trl", "ours"):
                out = work / f"{side}-{repeat}.json"
                cmd = [sys.executable, "-m", "experiments.benchmark_vs_trl", *argv, "--side", side,
                       "--work-dir", str(work), "--json", str(out)]
                subprocess.run(cmd, cwd=ROOT, check=True)
                pair[side] = json.loads(out.read_text())
            pair["speedup"] = pair["trl"]["seconds_per_step"] / pair["ours"]["seconds_per_step"]
            pair["memory_ratio"] = pair["ours"]["peak_rss_mb"] / pair["trl"]["peak_rss_mb"]
            rounds.append(pair)
    result = {"workload": {"batch_size": args.batch_size, "new_tokens": args.new_tokens, "steps": args.steps,
                           "warmup": args.warmup, "ours_overrides": args.ours_set}, "rounds": rounds}
    print_table(result)
    return result


def print_table(result: dict) -> None:
    w = result["workload"]
    ours = "ours" + (f" ({', '.join(w['ours_overrides'])})" if w["ours_overrides"] else " (equal settings)")
    print(f"PPO side by side: SmolLM2-135M fp32 x4 roles, batch {w['batch_size']}, {w['new_tokens']} new tokens, "
          f"{w['steps']} steps after {w['warmup']} warm-up, one process per side")
    print("| round | side | s/step | samples/s | generated tokens/step | peak RSS MB | ours vs TRL samples/s |")
    print("|---|---|---|---|---|---|---|")
    for i, pair in enumerate(result["rounds"]):
        for side, label in (("trl", f"TRL {pair['trl'].get('trl_version', '')}"), ("ours", ours)):
            r = pair[side]
            ratio = f"{pair['speedup']:.2f}x" if side == "ours" else ""
            print(f"| {i} | {label} | {r['seconds_per_step']:.2f} | {w['batch_size'] / r['seconds_per_step']:.3f} "
                  f"| {r['generated_tokens_per_step']:.0f} | {r['peak_rss_mb']:.0f} | {ratio} |")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.side == "both":
        own = [a for a in argv if not a.startswith("--json=")]
        if "--json" in own:
            i = own.index("--json")
            del own[i : i + 2]
        result = side_by_side(args, own)
    else:
        shared = prepare(Path(args.work_dir), 4 * args.batch_size) if args.work_dir else None
        if shared is None:
            raise SystemExit("--side trl|ours needs --work-dir (the shared prompts and score model)")
        result = run_trl(args, shared) if args.side == "trl" else run_ours(args, shared)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
