"""Compare trained score models (RM, AM, per-task-normalised RM) from their run directories.

    python -m analysis.score_models --run RM=runs/rm --run AM=runs/am --out plots/score_models --margin 2.5

Each run directory holds summary.json (accuracy, ECE, per-task score statistics,
reliability bins) and scores_eval.jsonl (one held-out response per row: task, score,
gold). Writes, under --out:

- score_distributions.png: the paper's Figure 1a for any set of runs; one panel per
  task on a shared x-axis, each run's held-out score density overlaid, its per-task
  mean marked, and the AM's ±margin as dashed lines when --margin is given;
- task_means.png: per-task mean score ± std per run, so the across-task spread of the
  means (what a single KL-penalised reward cannot absorb) is visible at a glance;
- reliability.png: one reliability diagram per run (accuracy per confidence bin
  against the diagonal, bin counts, ECE in the title);

and prints a table of accuracy, ECE and the across-task spread of means.
Every number is read from the run directories.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from scipy.stats import gaussian_kde  # noqa: E402

from stable_rlhf.io import atomic_path, read_jsonl  # noqa: E402

SUMMARY = "summary.json"
SCORES = "scores_eval.jsonl"
KDE_MIN_SCORES = 5
"""below this many scores (or with zero variance) a task's distribution is a step histogram, not a KDE"""


# ---------------------------------------------------------------------------- loading


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (a score-model run directory holds {SUMMARY} and {SCORES})")
    return path


def _load_summary(run_dir: str | Path) -> dict:
    return json.loads(_require(Path(run_dir) / SUMMARY).read_text(encoding="utf-8"))


def load_run(run_dir: str | Path) -> dict:
    """{"summary": summary.json, "scores": rows of scores_eval.jsonl}; FileNotFoundError names a missing file."""
    run_dir = Path(run_dir)
    summary = _load_summary(run_dir)
    scores = read_jsonl(_require(run_dir / SCORES))
    return {"summary": summary, "scores": scores}


def _per_task(summary: dict) -> dict:
    # "all" is the pooled row some of our summaries carry next to the tasks; it is not a task.
    return {t: s for t, s in summary.get("per_task", {}).items() if t != "all"}


def _task_order(summaries: list[dict], rows: Iterable[list[dict]] = ()) -> list[str]:
    """Tasks in order of first appearance across the runs' summaries, then any only seen in scores."""
    tasks: dict[str, None] = {}
    for s in summaries:
        tasks.update(dict.fromkeys(_per_task(s)))
    for rs in rows:
        tasks.update(dict.fromkeys(r["task"] for r in rs if r["task"] != "all"))
    return list(tasks)


def across_task_spread(summary: dict) -> float:
    """Std (ddof=0) across tasks of the per-task mean score: 0 when every task is centred alike."""
    means = [s["score_mean"] for s in _per_task(summary).values()]
    if not means:
        raise ValueError("summary has no per-task entries")
    return float(np.std(means))


# ---------------------------------------------------------------------------- plots


def _save(fig, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _colours(labels) -> dict[str, str]:
    # One colour per run label, the same in every figure.
    return {label: f"C{i % 10}" for i, label in enumerate(labels)}


def _grid(n: int, cols: int = 3, width: float = 4.0, height: float = 2.8, **kw):
    cols = max(1, min(cols, n))
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(width * cols, height * nrows), squeeze=False, **kw)
    return fig, axes, cols


def _hide_unused(axes, used: int, cols: int) -> None:
    flat = list(axes.flat)
    for i in range(used, len(flat)):
        flat[i].axis("off")
        # With sharex only the bottom row shows tick labels; the panel above an empty
        # slot is the bottom of its column, so it gets them back.
        if i - cols >= 0 and i - cols < used:
            flat[i - cols].xaxis.set_tick_params(labelbottom=True)


def plot_score_distributions(runs: dict[str, Path], path: Path, margin: float | None = None) -> None:
    """Figure 1a: per task, each run's held-out score density (KDE, or a step histogram for
    fewer than KDE_MIN_SCORES scores or zero variance), per-task means dotted, ±margin dashed."""
    loaded = {label: load_run(d) for label, d in runs.items()}
    colour = _colours(loaded)
    tasks = _task_order([r["summary"] for r in loaded.values()], [r["scores"] for r in loaded.values()])
    # scores[label][task] -> (n,) array of held-out scores
    scores = {
        label: {t: np.array([r["score"] for r in run["scores"] if r["task"] == t], dtype=float) for t in tasks}
        for label, run in loaded.items()
    }

    # One x-range and one set of histogram edges for every panel, so positions compare across tasks.
    pooled = np.concatenate([a for per in scores.values() for a in per.values()] + [np.zeros(0)])
    lo, hi = (float(pooled.min()), float(pooled.max())) if pooled.size else (-1.0, 1.0)
    if margin is not None:
        lo, hi = min(lo, -abs(margin)), max(hi, abs(margin))
    pad = 0.08 * (hi - lo) if hi > lo else 0.5
    lo, hi = lo - pad, hi + pad
    grid = np.linspace(lo, hi, 256)
    edges = np.linspace(lo, hi, 41)

    fig, axes, cols = _grid(max(1, len(tasks)), sharex=True)
    for ax, task in zip(axes.flat, tasks):
        for label in loaded:
            x = scores[label][task]
            if x.size == 0:
                continue
            if x.size >= KDE_MIN_SCORES and np.std(x) > 0:
                ax.plot(grid, gaussian_kde(x)(grid), color=colour[label], linewidth=1.5)
            else:
                ax.hist(x, bins=edges, density=True, histtype="step", color=colour[label], linewidth=1.5)
            ax.axvline(x.mean(), color=colour[label], linestyle=":", linewidth=1.2)
        if margin is not None:
            for m in (-abs(margin), abs(margin)):
                ax.axvline(m, color="0.4", linestyle="--", linewidth=1)
        counts = ", ".join(f"{label} {scores[label][task].size}" for label in loaded)
        ax.set_title(f"{task}  (n: {counts})", fontsize=9)
        ax.set_xlim(lo, hi)
        ax.tick_params(labelsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("density")
    for i, ax in enumerate(axes.flat):
        if i + cols >= len(tasks):  # the lowest used panel of its column
            ax.set_xlabel("held-out score")
    _hide_unused(axes, len(tasks), cols)

    handles = [Line2D([], [], color=colour[label], linewidth=1.5, label=label) for label in loaded]
    handles.append(Line2D([], [], color="black", linestyle=":", linewidth=1.2, label="per-task mean"))
    if margin is not None:
        handles.append(Line2D([], [], color="0.4", linestyle="--", linewidth=1, label=f"±margin ({abs(margin):g})"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle(f"Held-out score distributions per task: {', '.join(loaded)}")
    # Leave a strip about 0.3 in high at the bottom for the legend.
    fig.tight_layout(rect=(0, 0.3 / fig.get_figheight(), 1, 1))
    _save(fig, path)


def plot_task_means(runs: dict[str, Path], path: Path) -> None:
    """Per-task mean score ± 1 std per run, as grouped error bars; the legend gives each
    run's across-task spread of means."""
    summaries = {label: _load_summary(d) for label, d in runs.items()}
    colour = _colours(summaries)
    tasks = _task_order(list(summaries.values()))
    width = 0.7 / max(1, len(summaries))  # the group of runs spans 0.7 of a task slot
    # about 1.2 in per task for the axes, 3 in to its right for the legend
    fig, ax = plt.subplots(figsize=(1.2 * max(3, len(tasks)) + 3.0, 3.6))
    for i, (label, s) in enumerate(summaries.items()):
        per_task = _per_task(s)
        xs = [k + (i - (len(summaries) - 1) / 2) * width for k, t in enumerate(tasks) if t in per_task]
        present = [t for t in tasks if t in per_task]
        means = [per_task[t]["score_mean"] for t in present]
        stds = [per_task[t]["score_std"] for t in present]
        spread = across_task_spread(s) if per_task else float("nan")
        ax.errorbar(xs, means, yerr=stds, fmt="o", capsize=3, color=colour[label],
                    label=f"{label} (spread of means {spread:.2f})")
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=30 if len(tasks) > 4 else 0, ha="right" if len(tasks) > 4 else "center")
    ax.set_ylabel("held-out score (mean ± 1 std)")
    ax.set_title(f"Per-task mean score: {', '.join(summaries)}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    _save(fig, path)


def plot_reliability(runs: dict[str, Path], path: Path) -> None:
    """One reliability diagram per run: accuracy per confidence bin (bars) against perfect
    calibration (diagonal), each bin's count above it, ECE in percent in the title."""
    summaries = {label: _load_summary(d) for label, d in runs.items()}
    colour = _colours(summaries)
    fig, axes, cols = _grid(len(summaries), width=3.8, height=3.6)
    for ax, (label, s) in zip(axes.flat, summaries.items()):
        bins = s.get("reliability") or []
        many = len(bins) > 10
        for b in bins:
            mid, w = (b["lo"] + b["hi"]) / 2, b["hi"] - b["lo"]
            if b["accuracy"] is None:  # empty bin: no bar, but say so
                ax.text(mid, 0.02, str(b["count"]), ha="center", va="bottom", fontsize=6 if many else 7,
                        color="0.5", rotation=90 if many else 0)
                continue
            ax.bar(b["lo"], b["accuracy"], width=w, align="edge", color=colour[label], alpha=0.75,
                   edgecolor="white", linewidth=0.6)
            ax.text(mid, b["accuracy"] + 0.015, str(b["count"]), ha="center", va="bottom",
                    fontsize=6 if many else 7, rotation=90 if many else 0)
        x0 = min((b["lo"] for b in bins), default=0.5)
        x1 = max((b["hi"] for b in bins), default=1.0)
        ax.plot([x0, x1], [x0, x1], color="black", linestyle="--", linewidth=1)
        if not bins:
            ax.text(0.5, 0.5, "no reliability bins", transform=ax.transAxes, ha="center", color="0.5")
        ax.set_xlim(x0, x1)
        ax.set_ylim(0, 1.12)
        ax.set_title(f"{label}: ECE {100 * s['ece']:.1f}%  (accuracy {s['accuracy']:.3f})", fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.tick_params(labelsize=8)
    _hide_unused(axes, len(summaries), cols)
    fig.suptitle("Reliability on held-out comparisons (bar labels: pairs per bin)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


# ---------------------------------------------------------------------------- CLI


def _parse_run(text: str) -> tuple[str, Path]:
    label, sep, run_dir = text.partition("=")
    if not sep or not label or not run_dir:
        raise argparse.ArgumentTypeError(f"expected LABEL=DIR, got {text!r}")
    return label, Path(run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=_parse_run, action="append", required=True, metavar="LABEL=DIR",
                        help="a score-model run directory and its label in the plots (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the PNGs")
    parser.add_argument("--margin", type=float, default=None, help="draw ±margin on the score distributions")
    args = parser.parse_args(argv)
    runs = dict(args.run)
    if len(runs) != len(args.run):
        parser.error("run labels must be distinct")
    try:
        summaries = {label: load_run(d)["summary"] for label, d in runs.items()}
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    plot_score_distributions(runs, args.out / "score_distributions.png", margin=args.margin)
    plot_task_means(runs, args.out / "task_means.png")
    plot_reliability(runs, args.out / "reliability.png")

    w = max(5, *(len(label) for label in runs))
    print(f"{'label':<{w}}  {'objective':<10}  {'accuracy':>8}  {'ECE %':>6}  {'spread of means':>15}")
    for label, s in summaries.items():
        spread = across_task_spread(s) if _per_task(s) else float("nan")
        print(f"{label:<{w}}  {s.get('objective', '?'):<10}  {s['accuracy']:>8.4f}  {100 * s['ece']:>6.2f}  "
              f"{spread:>15.3f}")
    print(f"plots: {args.out}/score_distributions.png, task_means.png, reliability.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
