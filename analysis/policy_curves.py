"""Curves of policy runs (PPO, rejection sampling) from their run directories.

    python -m analysis.policy_curves --run NAME=DIR [--run NAME=DIR ...] --out DIR

Writes:
    gold_curve.png        eval gold reward (range-normalised, mean over tasks) against step
    proxy_curve.png       eval proxy score against step (runs with a model score only)
    gold_vs_kl.png        eval gold and proxy against the KL to the reference (over-optimisation)
    forget_win.png        win rate against the SFT policy on the forgetting set over training
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from stable_rlhf.io import read_jsonl  # noqa: E402


def load(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[int, float]]]:
    """Eval series by key, and the training KL per step."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for key in ("eval/gold_norm", "eval/proxy", "forget/win", "eval/win"):
            if key in r and r[key] is not None:
                series.setdefault(key, []).append((r["step"], r[key]))
    kl = [(r["step"], r["objective/kl"]) for r in rows if "objective/kl" in r]
    return series, kl


def _kl_at(kl: list[tuple[int, float]], step: int) -> float:
    """KL of the last training step at or before ``step`` (0 before training)."""
    before = [v for s, v in kl if s <= step]
    return before[-1] if before else 0.0


def plot_runs(runs: dict[str, Path], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    data = {name: load(d) for name, d in runs.items()}
    written = []
    for key, fname, ylabel in (("eval/gold_norm", "gold_curve.png", "eval gold (normalised, mean over tasks)"),
                               ("eval/proxy", "proxy_curve.png", "eval proxy score"),
                               ("forget/win", "forget_win.png", "forgetting-set win rate vs SFT")):
        if not any(key in s for s, _ in data.values()):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, (series, _) in data.items():
            if key in series:
                xs, ys = zip(*series[key])
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(out / fname)
    if any(kl for _, kl in data.values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, (series, kl) in data.items():
            for key, style in (("eval/gold_norm", "-o"), ("eval/proxy", "--s")):
                if key in series:
                    xs = [_kl_at(kl, s) for s, _ in series[key]]
                    ax.plot(xs, [v for _, v in series[key]], style, label=f"{name} {key.split('/')[1]}")
        ax.set_xlabel("KL(π || π_ref) per response (nats)")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "gold_vs_kl.png", dpi=120)
        plt.close(fig)
        written.append(out / "gold_vs_kl.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="NAME=DIR of a run directory")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    runs = {}
    for spec in args.run:
        name, _, path = spec.partition("=")
        runs[name] = Path(path)
    for path in plot_runs(runs, Path(args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
