"""RM vs AM vs per-task-normalised RM on the testbed, over seeds.

    python -m experiments.score_models --config experiments/score_models_cpu.yaml --seeds 0 1 2

For each seed: train-rm and train-am with the same backbone and data, and the
per-task-normalised RM derived from the RM run. Prints and writes (results.md,
results.json) held-out accuracy against the gold order, ECE, the standard deviation
across tasks of the per-task mean score, and the fraction of scores within ±m; draws
the plots with analysis/score_models.py. Finished runs (with a summary.json) are
skipped, so a stopped experiment continues where it was.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from stable_rlhf.config import load_config
from stable_rlhf.io import atomic_write_json, atomic_write_text
from stable_rlhf.reward_model import ScoreTrainConfig, per_task_normalised_run, train

KINDS = ("rm", "am", "rm-pertask")
LABELS = {"rm": "RM", "am": "AM", "rm-pertask": "per-task-normalised RM"}


def run_seed(config: str | None, overrides: list[str], out: Path, seed: int, am_from_rm: bool = False
             ) -> dict[str, dict]:
    """RM then AM for one seed; with ``am_from_rm`` the AM starts from this seed's trained RM
    (its ranking features) and its own terms re-centre and re-scale the scores."""
    results = {}
    for objective in ("rm", "am"):
        run_dir = out / f"{objective}-seed{seed}"
        if not (run_dir / "summary.json").exists():
            init = [f"init_from={out / f'rm-seed{seed}' / 'model'}"] if objective == "am" and am_from_rm else []
            cfg = load_config(ScoreTrainConfig, config,
                              [f"objective={objective}", f"seed={seed}", f"out_dir={run_dir}", *overrides, *init])
            train(cfg)
        results[objective] = json.loads((run_dir / "summary.json").read_text())
    results["rm-pertask"] = per_task_normalised_run(out / f"rm-seed{seed}", out / f"rm-pertask-seed{seed}")
    return results


def pair_correctness(run_dir: Path) -> dict[tuple[int, int, int], bool]:
    """For every held-out response pair with distinct gold: is it ordered like the gold?"""
    from stable_rlhf.io import read_jsonl

    by_comp: dict[int, list[dict]] = {}
    for row in read_jsonl(run_dir / "scores_eval.jsonl"):
        by_comp.setdefault(row["comparison"], []).append(row)
    out = {}
    for c, rows in by_comp.items():
        for a in rows:
            for b in rows:
                if a["response"] < b["response"] and a["gold"] != b["gold"]:
                    out[(c, a["response"], b["response"])] = (a["score"] > b["score"]) == (a["gold"] > b["gold"]) \
                        and a["score"] != b["score"]
    return out


def paired_accuracy_difference(a_dir: Path, b_dir: Path) -> dict:
    """Accuracy of run a minus run b on the same held-out pairs, with its standard error."""
    a, b = pair_correctness(a_dir), pair_correctness(b_dir)
    diffs = np.array([float(a[k]) - float(b[k]) for k in a if k in b])
    se = float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
    return {"diff": float(diffs.mean()) if len(diffs) else float("nan"), "se": se, "pairs": int(len(diffs))}


def table(per_seed: dict[int, dict[str, dict]], out: Path | None = None) -> tuple[str, dict]:
    rows, agg = [], {}
    for kind in KINDS:
        vals = {
            "accuracy": [r[kind]["accuracy"] for r in per_seed.values()],
            "ece": [r[kind]["ece"] for r in per_seed.values()],
            "across_task_std_of_means": [r[kind]["across_task_std_of_means"] for r in per_seed.values()],
            "frac_within_margin": [r[kind]["frac_within_margin"] for r in per_seed.values()],
            "score_std": [r[kind]["score_std"] for r in per_seed.values()],
        }
        agg[kind] = {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                         "values": v} for k, v in vals.items()}
        a = agg[kind]
        rows.append(
            f"| {LABELS[kind]} | {a['accuracy']['mean']:.4f} ± {a['accuracy']['std']:.4f} "
            f"| {100 * a['ece']['mean']:.2f} ± {100 * a['ece']['std']:.2f} "
            f"| {a['across_task_std_of_means']['mean']:.4f} ± {a['across_task_std_of_means']['std']:.4f} "
            f"| {a['score_std']['mean']:.4f} | {a['frac_within_margin']['mean']:.4f} |"
        )
    ratios = [r["am"]["across_task_std_of_means"] / max(r["rm"]["across_task_std_of_means"], 1e-12)
              for r in per_seed.values()]
    agg["am_over_rm_spread"] = ratios
    paired = ""
    if out is not None:
        diffs = {seed: paired_accuracy_difference(out / f"am-seed{seed}", out / f"rm-seed{seed}") for seed in per_seed}
        agg["am_minus_rm_accuracy"] = diffs
        paired = ("AM − RM accuracy on the same held-out pairs (± standard error), per seed: "
                  + ", ".join(f"{d['diff']:+.4f} ± {d['se']:.4f} ({d['pairs']} pairs)" for d in diffs.values()) + "\n")
    head = ("| model | accuracy vs gold | ECE (%) | across-task std of means | score std | within ±m |\n"
            "|---|---|---|---|---|---|\n")
    text = (f"Held-out comparisons, mean ± std over seeds {sorted(per_seed)}.\n\n" + head + "\n".join(rows) + "\n\n"
            f"AM / RM across-task spread of means, per seed: {', '.join(f'{x:.3f}' for x in ratios)}\n" + paired)
    return text, agg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/score_models_cpu.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/score_models")
    parser.add_argument("--am-from-rm", action="store_true",
                        help="initialise each seed's AM from that seed's trained RM")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both trainers")
    args = parser.parse_args(argv)
    out = Path(args.out)
    per_seed = {seed: run_seed(args.config, args.overrides, out, seed, args.am_from_rm) for seed in args.seeds}
    text, agg = table(per_seed, out)
    atomic_write_text(out / "results.md", text)
    atomic_write_json(out / "results.json", {"config": args.config, "overrides": args.overrides,
                                             "am_from_rm": args.am_from_rm,
                                             "seeds": args.seeds, "aggregate": agg})
    from analysis.score_models import main as plots

    seed = args.seeds[0]
    margin = per_seed[seed]["am"]["margin"]
    plots([f"--run=RM={out / f'rm-seed{seed}'}", f"--run=AM={out / f'am-seed{seed}'}",
           f"--run=RM-pertask={out / f'rm-pertask-seed{seed}'}", f"--out={out / 'plots'}", f"--margin={margin}"])
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
