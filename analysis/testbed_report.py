"""Report of a testbed build (``stable-rlhf main`` / ``build-data``) from its run directory.

    python -m analysis.testbed_report runs/main

Reads summary.json, samples_eval.jsonl and labeler_stats.json; writes
plots/sft_gold_by_task.png (the SFT policy's gold-reward distribution per task, on each
task's own scale), plots/labeler_agreement.png, and report.md / report.html.
Every number in the report is read from the run directory.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from stable_rlhf.io import atomic_path, atomic_write_text, read_jsonl  # noqa: E402


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_gold_by_task(rows: list[dict], per_task: dict, path: Path) -> None:
    tasks = [t for t in per_task if t != "all"]
    cols = 3
    nrows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        s = per_task[task]
        gold = [r["gold"] for r in rows if r["task"] == task]
        ax.hist(gold, bins=12, range=(s["range_low"], s["range_high"]), color="tab:blue", alpha=0.8)
        ax.axvline(s["gold_mean"], color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{task}  (mean {s['gold_mean']:.2f}, n={s['n']})", fontsize=9)
        ax.set_xlabel("gold reward")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.suptitle("SFT policy: gold reward per task (each on its own scale)")
    fig.tight_layout()
    _save(fig, path)


def plot_labeler_agreement(stats: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3))
    vals = [stats["agreement_predicted"], stats["agreement_measured"], stats["agreement_panel_mean"]]
    errs = [0.0, stats["agreement_single_labeling_std"], 0.0]
    labels = ["predicted", "these labels\n(±1σ)", f"mean of {stats['agreement_panel_draws']}\nlabelings"]
    ax.bar(labels, vals, yerr=errs, capsize=4, color=["tab:gray", "tab:green", "tab:blue"])
    for i, (v, e) in enumerate(zip(vals, errs)):
        ax.text(i, v + e + 0.02, f"{v:.3f}", ha="center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("pairwise agreement with gold order")
    ax.set_title(f"simulated labelers ({stats['prompts']} prompts, {stats['pairs']} pairs)", fontsize=9)
    _save(fig, path)


def build_report(run_dir: Path) -> Path:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_jsonl(run_dir / "samples_eval.jsonl")
    labeler = json.loads((run_dir / "labeler_stats.json").read_text())
    plots = run_dir / "plots"
    plot_gold_by_task(rows, summary["per_task"], plots / "sft_gold_by_task.png")
    plot_labeler_agreement(labeler, plots / "labeler_agreement.png")

    table = (run_dir / "sft_table.md").read_text()
    counts = summary["counts"]
    timings = summary["timings"]
    headroom = summary["headroom_problems"]
    examples = _examples(rows)
    md = [
        f"# Testbed build: {run_dir}",
        "",
        f"Policy: `{summary['policy']}`.",
        "",
        table,
        "![SFT gold by task](plots/sft_gold_by_task.png)",
        "",
        "## Simulated labelers",
        "",
        f"On {labeler['prompts']} prompts ({labeler['pairs']} response pairs with distinct gold), agreement with the "
        f"gold order predicted by the noise model (temperature {labeler['config']['temperature']}, flip rate "
        f"{labeler['config']['flip_rate']}): **{labeler['agreement_predicted']:.4f}**. The labels in this build: "
        f"**{labeler['agreement_measured']:.4f}**; one labeling of this many pairs varies by "
        f"±{labeler['agreement_single_labeling_std']:.4f} (1σ). Mean of {labeler['agreement_panel_draws']} "
        f"independent labelings of the same responses: **{labeler['agreement_panel_mean']:.4f}**.",
        "",
        "![labeler agreement](plots/labeler_agreement.png)",
        "",
        "## Data written",
        "",
        f"- preferences_train.jsonl: {counts['preferences_train']} K-ranked comparisons",
        f"- preferences_eval.jsonl: {counts['preferences_eval']} held-out comparisons",
        f"- prompts_forget.jsonl: {counts['forgetting_set']} forgetting-set prompts",
        f"- samples scored: {counts['samples']}",
        f"- headroom problems: {', '.join(headroom) if headroom else 'none'}",
        "",
        "## Timings (seconds; a resumed build keeps the times of the steps it reused)",
        "",
        *[f"- {k}: {v:.1f}" for k, v in timings.items()],
        "",
        "## Sample responses (best and worst per task)",
        "",
        *examples,
    ]
    text = "\n".join(md) + "\n"
    atomic_write_text(run_dir / "report.md", text)
    atomic_write_text(run_dir / "report.html", _to_html(text))
    return run_dir / "report.md"


def _examples(rows: list[dict]) -> list[str]:
    out = []
    for task in sorted({r["task"] for r in rows}):
        sub = sorted((r for r in rows if r["task"] == task), key=lambda r: r["gold"])
        for label, r in (("best", sub[-1]), ("worst", sub[0])):
            resp = r["response"].replace("\n", " ⏎ ")
            out.append(f"- **{task}**, {label} (gold {r['gold']:.3f}): _{r['prompt']}_ → `{resp[:300]}`")
    return out


def _to_html(markdown: str) -> str:
    """A minimal markdown-to-HTML rendering: tables, headings, images, paragraphs."""
    body, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= set("-: ") for c in cells):
                continue
            if not in_table:
                body.append("<table border=1 cellspacing=0 cellpadding=3>")
                in_table = True
            body.append("<tr>" + "".join(f"<td>{html.escape(c).replace('**', '')}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1 : line.rindex(")")]
            body.append(f'<img src="{html.escape(src)}" style="max-width:900px">')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    return "<!doctype html><meta charset=utf-8><title>stable-rlhf report</title>\n" + "\n".join(body) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    if not (args.run_dir / "summary.json").exists():
        print(f"error: {args.run_dir}/summary.json not found (run `stable-rlhf main` first)", file=sys.stderr)
        return 2
    path = build_report(args.run_dir)
    print(f"report: {path} (and report.html, plots/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
