"""A policy trainer (PPO or rejection sampling) over seeds, with its eval curves.

    python -m experiments.policy_seeds --config experiments/ppo_gold_cpu.yaml --seeds 0 1 2
    python -m experiments.policy_seeds --stage rejection-sampling --config experiments/rs_gold_cpu.yaml

Each seed is a run directory out/seed<N>; a finished one (summary.json) is skipped and an
interrupted one resumes from its checkpoint. Prints the eval curve of every seed (the mean
over tasks of the range-normalised gold reward, the share of answers flagged degenerate,
and the proxy score when the score is a model), then the change from the first eval point to the last: its mean over seeds, the
seed standard deviation, and whether the mean change exceeds three standard deviations.
Writes results.md / results.json and the curve plot (analysis/policy_curves.py).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from stable_rlhf.config import load_config
from stable_rlhf.io import atomic_write_json, atomic_write_text, read_jsonl

STAGES = {"ppo": ("stable_rlhf.ppo", "PPOConfig"), "rejection-sampling": ("stable_rlhf.rejection_sampling",
                                                                          "RejectionSamplingConfig")}


def run_seed(stage: str, config: str | None, overrides: list[str], run_dir: Path, seed: int) -> float:
    import importlib

    if (run_dir / "summary.json").exists():
        return 0.0
    module_name, cfg_name = STAGES[stage]
    module = importlib.import_module(module_name)
    resume = ["resume=true"] if (run_dir / "checkpoints").is_dir() else []
    cfg = load_config(getattr(module, cfg_name), config, [*overrides, f"seed={seed}", f"out_dir={run_dir}", *resume])
    t0 = time.time()
    module.train(cfg)
    return time.time() - t0


def eval_curve(run_dir: Path, key: str = "eval/gold_norm") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_jsonl(run_dir / "metrics.jsonl") if key in r]


def summarise(runs: dict[int, Path]) -> tuple[str, dict]:
    curves = {seed: eval_curve(d) for seed, d in runs.items()}
    proxies = {seed: eval_curve(d, "eval/proxy") for seed, d in runs.items()}
    degenerate = {seed: eval_curve(d, "eval/degenerate") for seed, d in runs.items()}
    steps = sorted({s for c in curves.values() for s, _ in c})
    lines = ["Eval gold reward (mean over tasks of the range-normalised gold) at each eval point:", "",
             "| step | " + " | ".join(f"seed {s}" for s in runs) + " | mean | std |",
             "|---|" + "---|" * (len(runs) + 2)]
    for step in steps:
        vals = [dict(curves[s]).get(step) for s in runs]
        got = [v for v in vals if v is not None]
        lines.append(f"| {step} | " + " | ".join("" if v is None else f"{v:.4f}" for v in vals)
                     + f" | {np.mean(got):.4f} | {np.std(got, ddof=1) if len(got) > 1 else 0.0:.4f} |")
    first = np.array([curves[s][0][1] for s in runs])
    last = np.array([curves[s][-1][1] for s in runs])
    change = last - first
    std = float(np.std(change, ddof=1)) if len(change) > 1 else float("nan")
    result = {
        "seeds": list(runs), "first": first.tolist(), "last": last.tolist(), "change": change.tolist(),
        "change_mean": float(change.mean()), "change_std": std,
        "last_std": float(np.std(last, ddof=1)) if len(last) > 1 else float("nan"),
        "exceeds_3_std": bool(change.mean() > 3 * std) if len(change) > 1 else None,
        "curves": {str(s): c for s, c in curves.items()},
        "proxy_curves": {str(s): c for s, c in proxies.items() if c},
        "degenerate_curves": {str(s): c for s, c in degenerate.items() if c},
    }
    lines += ["", f"Change first → last eval: {change.mean():+.4f} (seed std {std:.4f}; per seed "
              + ", ".join(f"{c:+.4f}" for c in change) + f"); more than 3 std: {result['exceeds_3_std']}"]
    if any(degenerate.values()):
        lines.append("Share of eval answers the gold reward's gate flags degenerate, first → last: " + ", ".join(
            f"seed {s}: {c[0][1]:.4f} → {c[-1][1]:.4f}" for s, c in degenerate.items() if c))
    if any(proxies.values()):
        lines.append("Proxy score first → last: " + ", ".join(
            f"seed {s}: {c[0][1]:+.4f} → {c[-1][1]:+.4f}" for s, c in proxies.items() if c))
    return "\n".join(lines) + "\n", result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=sorted(STAGES), default="ppo")
    parser.add_argument("--config", default="experiments/ppo_gold_cpu.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/ppo_gold")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every seed")
    args = parser.parse_args(argv)
    args.config = args.config or None  # --config '': the stage's defaults and the overrides only
    out = Path(args.out)
    runs = {seed: out / f"seed{seed}" for seed in args.seeds}
    seconds = {}
    for seed, run_dir in runs.items():
        seconds[seed] = run_seed(args.stage, args.config, args.overrides, run_dir, seed)
    text, result = summarise(runs)
    import json

    result["seconds"] = {s: json.loads((d / "summary.json").read_text())["seconds"] for s, d in runs.items()}
    text += "Seconds per seed (as recorded in each summary.json): " + ", ".join(
        f"{s}: {v:.0f}" for s, v in result["seconds"].items()) + "\n"
    atomic_write_text(out / "results.md", text)
    atomic_write_json(out / "results.json", {"stage": args.stage, "config": args.config,
                                             "overrides": args.overrides, **result})
    from analysis.policy_curves import main as plot

    plot([f"--run=seed{s}={d}" for s, d in runs.items()] + [f"--out={out / 'plots'}"])
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
