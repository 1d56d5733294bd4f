"""The ablation report, built from an ablation's run directories alone.

    python -m analysis.ablation_report runs/main

Reads ``ablation.json`` (the index ``stable-rlhf ablation`` writes), each arm's
``summary.json`` and ``metrics.jsonl`` per seed, and the shared RM / AM runs. Writes
``report.md``, ``report.html``, ``report.json`` (every number in the tables) and, under
``plots/``:

- ``score_distributions.png``: per-task held-out score distributions, RM vs AM (Figure 1a);
- ``reliability.png``: reliability diagrams of the RM, the AM and the per-task RM;
- ``win_lose_tie.png``: win/lose/tie against the SFT policy per arm (mean over seeds);
- ``gold_vs_kl.png`` / ``proxy_vs_kl.png``: the gold reward and the optimised (proxy) score
  at every eval point against the KL of the rollout of that step (over-optimisation curves;
  an arm without rollouts, DPO, at the KL measured on its eval answers);
- ``forgetting.png``: forgetting-set win rate against the SFT policy over training (Figure 1b);
- ``reward_curves.png``: eval gold reward and the training score over steps.

Means are over the seeds that finished; ± is the standard deviation over seeds (ddof 1),
left out with one seed. No number is typed by hand: all come from the run directories.
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
import numpy as np  # noqa: E402

from stable_rlhf.config import yaml_load  # noqa: E402
from stable_rlhf.io import atomic_write_text, read_jsonl  # noqa: E402

from .score_models import plot_reliability, plot_score_distributions  # noqa: E402


# --------------------------------------------------------------------------- loading


def load(out: Path) -> dict:
    """The index with, per arm, the finished seeds' summaries and metrics."""
    path = out / "ablation.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the ablation first (stable-rlhf ablation / run.sh main)")
    index = json.loads(path.read_text())
    for arm in index["arms"].values():
        arm["seeds"] = {}
        for seed, rel in arm["runs"].items():
            run_dir = out / rel
            if (run_dir / "summary.json").exists():
                arm["seeds"][int(seed)] = {"summary": json.loads((run_dir / "summary.json").read_text()),
                                           "metrics": read_jsonl(run_dir / "metrics.jsonl"), "dir": run_dir}
    return index


def mean_std(values: list[float]) -> tuple[float, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan"), None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def fmt(values: list[float], digits: int = 3, scale: float = 1.0) -> str:
    m, s = mean_std([None if v is None else v * scale for v in values])
    if np.isnan(m):
        return "n/a"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")


def eval_series(metrics: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in metrics if r.get(key) is not None and key.split("/")[0] in ("eval", "forget")]


def kl_at(metrics: list[dict], step: int) -> float | None:
    """The KL of the rollout at ``step`` (the last training step at or before it; 0 at step 0),
    or for a run without rollouts (DPO) the KL its eval points measured on their answers
    (``eval/kl``); None for a run that logs neither (rejection sampling)."""
    kl = ([(r["step"], r["objective/kl"]) for r in metrics if "objective/kl" in r]
          or [(r["step"], r["eval/kl"]) for r in metrics if r.get("eval/kl") is not None])
    if step == 0:
        return 0.0
    if not kl:
        return None
    before = [v for s, v in kl if s <= step]
    return before[-1] if before else 0.0


# --------------------------------------------------------------------------- tables


def table1(out: Path, index: dict) -> tuple[list[str], list[list[str]], dict]:
    head = ["score model", "accuracy vs gold", "ECE (%)", "across-task std of means", "score std", "within ±m"]
    rows, data = [], {}
    for key, label in (("rm", "RM"), ("am", "AM"), ("rm-pertask", "per-task-normalised RM")):
        rel = index["shared"].get(key)
        if not rel or not (out / rel / "summary.json").exists():
            continue
        s = json.loads((out / rel / "summary.json").read_text())
        data[key] = {k: s.get(k) for k in ("accuracy", "ece", "across_task_std_of_means", "score_std",
                                           "frac_within_margin", "gold_pairs")}
        rows.append([label, f"{s['accuracy']:.4f}", f"{100 * s['ece']:.2f}", f"{s['across_task_std_of_means']:.4f}",
                     f"{s['score_std']:.4f}", f"{s['frac_within_margin']:.4f}"])
    ceiling = labeller_ceiling(out, index)
    if ceiling is not None:
        data["labellers"] = {"accuracy": ceiling}
        rows.append(["simulated labellers (the ceiling)", f"{ceiling:.4f}", "", "", "", ""])
    return head, rows, data


def labeller_ceiling(out: Path, index: dict) -> float | None:
    """How often the simulated labellers of the held-out comparisons agree with the gold order
    (``labeler_stats.json`` beside the RM's eval data, written when the data were built): the
    accuracy a score model trained on their labels can hope for. None without the file."""
    rel = index["shared"].get("rm") or index["shared"].get("am")
    if not rel or not (out / rel / "config.yaml").exists():
        return None
    eval_data = yaml_load((out / rel / "config.yaml").read_text()).get("eval_data") or ""
    stats = Path(eval_data).parent / "labeler_stats.json"
    if not stats.is_file():
        return None
    return json.loads(stats.read_text()).get("eval", {}).get("labeler/agreement_measured")


def table2(index: dict) -> tuple[list[str], list[list[str]], dict]:
    head = ["arm", "seeds", "gold (norm.)", "win", "lose", "tie", "KL", "forgetting-set win", "proxy score",
            "degenerate share"]
    rows, data = [], {}
    for name, arm in index["arms"].items():
        finals = [r["summary"]["final"] for r in arm["seeds"].values()]
        if not finals:
            rows.append([arm["label"], "0"] + ["not run"] * (len(head) - 2))
            continue
        cols = {k: [f.get(k) for f in finals] for k in ("gold_reward", "win", "lose", "tie", "kl", "forget_win",
                                                         "proxy_score", "degenerate")}
        data[name] = {k: {"mean": mean_std(v)[0], "std": mean_std(v)[1], "values": v} for k, v in cols.items()}
        rows.append([arm["label"], str(len(finals)), fmt(cols["gold_reward"], 4), fmt(cols["win"]),
                     fmt(cols["lose"]), fmt(cols["tie"]), fmt(cols["kl"], 2), fmt(cols["forget_win"]),
                     fmt(cols["proxy_score"], 3), fmt(cols["degenerate"])])
    return head, rows, data


def task_table(index: dict, prefix: str, digits: int = 3) -> tuple[list[str], list[list[str]]]:
    """Final per-task value of ``prefix``/<task> per arm (mean ± std over seeds), the SFT
    reference's (step 0 of the first trainer run) first."""
    finals: dict[str, list[dict]] = {}
    ref_row = None
    for name, arm in index["arms"].items():
        for r in arm["seeds"].values():
            evals = [m for m in r["metrics"] if "eval/gold_norm" in m]
            if evals:
                finals.setdefault(name, []).append(evals[-1])
                if ref_row is None and evals[0]["step"] == 0 and arm["kind"] != "sft" and len(evals) > 1:
                    ref_row = evals[0]
    tasks = sorted({k.split("/", 2)[2] for rows in finals.values() for m in rows for k in m
                    if k.startswith(prefix + "/")})
    head = ["arm"] + tasks + ["all"]
    overall = prefix if prefix in ("eval/leakage", "eval/degenerate") else "eval/gold_norm"
    rows = []
    if ref_row is not None:
        # a run made before a metric existed lacks it: "n/a", not a crash
        rows.append(["SFT reference answers"] + [fmt([ref_row.get(f"{prefix}/{t}")], digits) for t in tasks]
                    + [fmt([ref_row.get(overall)], digits)])
    for name, ms in finals.items():
        rows.append([index["arms"][name]["label"]] + [fmt([m.get(f"{prefix}/{t}") for m in ms], digits) for t in tasks]
                    + [fmt([m.get(overall) for m in ms], digits)])
    return head, rows


def findings(index: dict, t2: dict, ref_gold: float | None) -> list[str]:
    """Plain statements of what the numbers show, each with its seed spread."""
    lines = []
    for name, d in t2.items():
        arm = index["arms"][name]
        n = len(arm["seeds"])
        g = d["gold_reward"]
        net = [w - lo for w, lo in zip(d["win"]["values"], d["lose"]["values"])]
        m, s = mean_std(net)
        spread = f" ± {s:.3f} (std over {n} seeds)" if s is not None else " (one seed: no spread)"
        parts = [f"**{arm['label']}**: win − lose against SFT {m:+.3f}{spread}"
                 + (" (the SFT policy resampled: sampling luck alone)" if arm["kind"] == "sft" else "")]
        if ref_gold is not None and arm["kind"] != "sft":
            dg = [v - ref_gold for v in g["values"]]
            dm, ds = mean_std(dg)
            verdict = ""
            if ds is not None:
                verdict = (" — more than 2 seed std from zero" if abs(dm) > 2 * ds else " — within 2 seed std of zero")
            parts.append(f"eval gold {dm:+.4f} vs the SFT answers" + (f" ± {ds:.4f}" if ds is not None else "")
                         + verdict)
        if d["forget_win"]["mean"] == d["forget_win"]["mean"]:
            parts.append(f"forgetting-set win {d['forget_win']['mean']:.3f}")
        lines.append("; ".join(parts) + ".")
    pairs = [("am-ppo", "rm-ppo", "win", "AM-PPO − RM-PPO win rate"),
             ("am-ppo-sr", "am-ppo", "forget_win", "AM-PPO-SR − AM-PPO forgetting-set win rate"),
             ("am-ppo-sr", "am-ppo-random-rehearsal", "win", "AM-PPO-SR − AM-PPO random rehearsal win rate"),
             ("grpo-am", "am-ppo", "win", "GRPO (AM) − AM-PPO win rate"),
             ("rloo-rm", "rm-ppo", "win", "RLOO (RM) − RM-PPO win rate"),
             ("dpo", "rm-ppo", "win", "DPO − RM-PPO win rate")]
    for a, b, key, text in pairs:
        if a in t2 and b in t2:
            sa, sb = index["arms"][a]["seeds"], index["arms"][b]["seeds"]
            common = sorted(set(sa) & set(sb))
            diffs = [sa[s]["summary"]["final"].get(key, float("nan")) - sb[s]["summary"]["final"].get(key, float("nan"))
                     for s in common]
            m, s = mean_std(diffs)
            lines.append(f"{text}, paired by seed ({len(common)} seed(s)): {m:+.3f}"
                         + (f" ± {s:.3f}" if s is not None else " (one seed: no spread)") + ".")
    return lines


def diagnostics_table(index: dict) -> tuple[list[str], list[list[str]], dict]:
    """Per PPO-type arm: whether optimisation worked. The objective PPO maximises measured on
    the eval prompts at its first and last eval points (``eval/objective``: shaped score less
    β·KL, fixed normalisation) and the gain in standard errors; the rollouts' worst truncation,
    the value model's explained variance at the last step, the mean correlation of the first
    token's advantage with the score, and the trainer's warnings (seeds listed apart)."""
    head = ["arm", "objective start", "objective end", "gain (SE)", "max truncation", "last value EV",
            "advantage-score corr", "warnings"]
    rows, data = [], {}
    for name, arm in index["arms"].items():
        seeds = arm["seeds"]
        train = {s: [m for m in r["metrics"] if "objective/kl" in m] for s, r in seeds.items()}
        if not any(train.values()):
            continue
        finals = {s: r["summary"]["final"] for s, r in seeds.items()}
        warn = {s: r["summary"].get("warnings", []) for s, r in seeds.items()}
        cols = {"objective_start": [f.get("objective_start") for f in finals.values()],
                "objective_end": [f.get("objective_end") for f in finals.values()],
                "objective_gain_se": [f.get("objective_gain_se") for f in finals.values()],
                "max_truncation": [max((m.get("policy/truncated", 0.0) for m in t), default=None)
                                   for t in train.values()],
                "last_value_ev": [t[-1].get("value/explained_variance") if t else None for t in train.values()],
                "advantage_score_corr": [mean_std([m.get("advantage/score_corr") for m in t])[0] if t else None
                                         for t in train.values()]}
        cols["advantage_score_corr"] = [None if v is None or np.isnan(v) else v for v in cols["advantage_score_corr"]]
        data[name] = {**{k: {"mean": mean_std(v)[0], "std": mean_std(v)[1], "values": v} for k, v in cols.items()},
                      "warnings": {str(s): w for s, w in warn.items()}}
        rows.append([arm["label"], fmt(cols["objective_start"]), fmt(cols["objective_end"]),
                     fmt(cols["objective_gain_se"], 1), fmt(cols["max_truncation"], 2), fmt(cols["last_value_ev"], 2),
                     fmt(cols["advantage_score_corr"], 2), str(sum(len(w) for w in warn.values()))])
    return head, rows, data


def warning_line(label: str, seed: str, warnings: list[str], shown: int = 3) -> str:
    """One paragraph per arm and seed: its first ``shown`` warnings and how many more."""
    more = f"; and {len(warnings) - shown} more (summary.json)" if len(warnings) > shown else ""
    return f"Warnings, {label} seed {seed} ({len(warnings)}): " + "; ".join(warnings[:shown]) + more + "."


# --------------------------------------------------------------------------- figures


def _colours(names) -> dict[str, str]:
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_wlt(index: dict, t2: dict, path: Path) -> Path:
    names = [n for n in index["arms"] if n in t2]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) + 2), 3.6))
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    for key, colour in (("win", "tab:green"), ("tie", "tab:gray"), ("lose", "tab:red")):
        vals = np.array([t2[n][key]["mean"] for n in names])
        errs = [t2[n][key]["std"] or 0.0 for n in names]
        ax.bar(x, vals, bottom=bottom, color=colour, label=key, yerr=errs, capsize=3)
        bottom += vals
    ax.set_xticks(x, [index["arms"][n]["label"] for n in names], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("fraction of eval prompts")
    ax.set_title("win / tie / lose vs the SFT policy (gold reward)")
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def plot_vs_kl(index: dict, key: str, path: Path, ylabel: str) -> Path | None:
    """``key`` at every eval point against the rollout KL of that step, one line per arm and seed."""
    arms = {n: a for n, a in index["arms"].items()
            if any(eval_series(r["metrics"], key) and kl_at(r["metrics"], 1) is not None for r in a["seeds"].values())}
    if not arms:
        return None
    colours = _colours(index["arms"])
    per_panel = key == "eval/proxy"  # proxies of different arms are on different scales
    cols = min(3, len(arms)) if per_panel else 1
    rows = -(-len(arms) // cols) if per_panel else 1
    size = (4.2 * cols, 3.2 * rows) if per_panel else (7.0, 4.5)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    for i, (name, arm) in enumerate(arms.items()):
        ax = axes.flat[i] if per_panel else axes.flat[0]
        for j, (seed, r) in enumerate(sorted(arm["seeds"].items())):
            pts = [(kl_at(r["metrics"], s), v) for s, v in eval_series(r["metrics"], key)]
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "-o", color=colours[name], ms=4, alpha=0.85,
                    label=arm["label"] if j == 0 else None)
        if per_panel:
            ax.set_title(arm["label"], fontsize=9)
    for ax in axes.flat[: len(arms) if per_panel else 1]:
        ax.set_xlabel("KL(π ‖ π_SFT) of the rollout, nats per response")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        if not per_panel:
            ax.legend(fontsize=7)
    for ax in axes.flat[len(arms) if per_panel else 1:]:
        ax.set_visible(False)
    return _save(fig, path)


def plot_over_steps(index: dict, keys: list[tuple[str, str]], path: Path, title: str) -> Path | None:
    """Mean over seeds (band: ± std) of eval keys against the step, one panel per key."""
    present = [(k, lab) for k, lab in keys if any(eval_series(r["metrics"], k) for a in index["arms"].values()
                                                  for r in a["seeds"].values())]
    if not present:
        return None
    colours = _colours(index["arms"])
    fig, axes = plt.subplots(1, len(present), figsize=(5.2 * len(present), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes.flat, present):
        for name, arm in index["arms"].items():
            series = [dict(eval_series(r["metrics"], key)) for r in arm["seeds"].values()]
            series = [s for s in series if s]
            if not series or arm["kind"] == "sft":
                continue
            steps = sorted(set.intersection(*(set(s) for s in series)))
            m = np.array([np.mean([s[t] for s in series]) for t in steps])
            sd = np.array([np.std([s[t] for s in series], ddof=1) if len(series) > 1 else 0.0 for t in steps])
            ax.plot(steps, m, "-o", ms=4, color=colours[name], label=f"{arm['label']} (n={len(series)})")
            if len(series) > 1:
                ax.fill_between(steps, m - sd, m + sd, color=colours[name], alpha=0.15)
        sft = index["arms"].get("sft")
        if sft and sft["seeds"]:
            vals = [dict(eval_series(r["metrics"], key)).get(0) for r in sft["seeds"].values()]
            vals = [v for v in vals if v is not None]
            if vals:
                ax.axhline(np.mean(vals), color="k", ls=":", lw=1, label="SFT, resampled")
        ax.set_xlabel("step")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------- rendering


def md_table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def _html_paragraph(text: str) -> str:
    text = html.escape(text)
    while "**" in text:
        text = text.replace("**", "<b>", 1).replace("**", "</b>", 1)
    return f"<p>{text}</p>"


def _html_table(content) -> str:
    head, rows = content
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
            + "</table>")


HTML = {"h1": lambda c: f"<h1>{html.escape(c)}</h1>", "h2": lambda c: f"<h2>{html.escape(c)}</h2>",
        "p": _html_paragraph, "table": _html_table,
        "img": lambda c: f'<p><img src="{html.escape(c)}" alt="{html.escape(c)}"></p>'}
MARKDOWN = {"h1": lambda c: f"# {c}", "h2": lambda c: f"## {c}", "p": str, "table": lambda c: md_table(*c),
            "img": lambda c: f"![{Path(c).stem}]({c})"}
HTML_HEAD = ("<!doctype html><meta charset=utf-8><title>stable-rlhf ablation report</title>\n"
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}td,th{padding:3px 8px;"
             "border:1px solid #ccc}table{border-collapse:collapse;margin:1em 0}img{max-width:100%}</style>")


def to_html(blocks: list[tuple[str, object]]) -> str:
    return HTML_HEAD + "\n" + "\n".join(HTML[kind](content) for kind, content in blocks) + "\n"


def to_markdown(blocks: list[tuple[str, object]]) -> str:
    return "\n\n".join(MARKDOWN[kind](content) for kind, content in blocks) + "\n"


def build_report(out: Path) -> Path:
    out = Path(out)
    index = load(out)
    plots = out / "plots"
    t1_head, t1_rows, t1 = table1(out, index)
    t2_head, t2_rows, t2 = table2(index)
    gold_head, gold_rows = task_table(index, "eval/gold")
    leak_head, leak_rows = task_table(index, "eval/leakage")
    degen_head, degen_rows = task_table(index, "eval/degenerate")
    diag_head, diag_rows, diag = diagnostics_table(index)
    ref_rows = read_jsonl(out / index["shared"]["eval_reference"] / "eval_reference_eval.jsonl") \
        if (out / index["shared"]["eval_reference"] / "eval_reference_eval.jsonl").exists() else []
    ref_gold = None
    if ref_rows:
        from stable_rlhf.testbed.evaluate import task_table as tb

        ref_gold = tb(ref_rows)["all"]["gold_norm_mean"]

    figures: dict[str, Path | None] = {}
    score_runs = {label: out / index["shared"][k] for k, label in (("rm", "RM"), ("am", "AM"), ("rm-pertask", "RM-pertask"))
                  if k in index["shared"]}
    if score_runs:
        margin = json.loads((score_runs["AM"] / "summary.json").read_text()).get("margin") if "AM" in score_runs else None
        plot_score_distributions({k: v for k, v in score_runs.items() if k != "RM-pertask"},
                                 plots / "score_distributions.png", margin)
        figures["score_distributions"] = plots / "score_distributions.png"
        plot_reliability(score_runs, plots / "reliability.png")
        figures["reliability"] = plots / "reliability.png"
    if t2:
        figures["win_lose_tie"] = plot_wlt(index, t2, plots / "win_lose_tie.png")
    figures["gold_vs_kl"] = plot_vs_kl(index, "eval/gold_norm", plots / "gold_vs_kl.png", "eval gold (normalised)")
    figures["degenerate_vs_kl"] = plot_vs_kl(index, "eval/degenerate", plots / "degenerate_vs_kl.png",
                                             "degenerate share of eval answers")
    figures["proxy_vs_kl"] = plot_vs_kl(index, "eval/proxy", plots / "proxy_vs_kl.png", "eval proxy score (optimised)")
    figures["forgetting"] = plot_over_steps(index, [("forget/win", "forgetting-set win rate vs SFT"),
                                                    ("forget/lose", "forgetting-set lose rate vs SFT")],
                                            plots / "forgetting.png", "forgetting set (prompts SFT answers well)")
    figures["reward_curves"] = plot_over_steps(index, [("eval/gold_norm", "eval gold (normalised)"),
                                                       ("eval/proxy", "eval proxy score")],
                                               plots / "reward_curves.png", "reward curves")

    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    seeds = index["seeds"]
    blocks: list[tuple[str, object]] = [
        ("h1", "stable-rlhf ablation report"),
        ("p", f"Run directory `{out}`; arms {', '.join(a['label'] for a in index['arms'].values())}; policy seeds "
              f"{seeds}. Means over the seeds that finished; ± is the standard deviation over seeds (absent with "
              "one seed). Every number below is read from the run directories by analysis/ablation_report.py."),
        ("h2", "Findings, as measured"),
        *[("p", line) for line in findings(index, t2, ref_gold)],
        ("h2", "Table 1: score models (held-out comparisons, accuracy against the gold order)"),
        ("table", (t1_head, t1_rows)) if t1_rows else ("p", "No score model was trained in this ablation."),
        ("h2", "Table 2: win / lose / tie against the SFT policy, judged by the gold reward"),
        ("p", "gold: mean over tasks of the range-normalised gold reward of the final policy's eval answers"
              + (f" (the SFT reference answers: {ref_gold:.4f})" if ref_gold is not None else "")
              + "; KL: the last rollout's mean KL(π ‖ π_SFT) per response (DPO, which has no rollouts: the "
                "same estimate on its eval answers; n/a where neither exists); proxy: the eval answers' mean "
                "score by the arm's score model (DPO: the model named by its score, which it does not optimise); "
                "the SFT arm is the SFT policy resampled with another seed: the win/lose/tie of sampling luck "
                "alone."),
        ("table", (t2_head, t2_rows)),
        *([("h2", "Did optimisation work? Training diagnostics of the PPO-type arms"),
           ("p", "objective: what PPO maximises, measured on the eval prompts with the rollouts' sampling "
                 "settings (the shaped score, normalised with the SFT answers' moments, less β·KL), at the "
                 "first and last eval points; gain: end − start in standard errors of the mean per-prompt "
                 "difference (the two points answer the same prompts with the same seed: paired); max "
                 "truncation: the largest share of a rollout that ran out of tokens; last value EV: the value "
                 "model's explained variance at the last step (GAE arms); advantage-score corr: the mean over "
                 "steps of corr(first token's advantage, score); warnings: the trainers' (listed below).")]
          + [("table", (diag_head, diag_rows))]
          + [("p", warning_line(index["arms"][n]["label"], s, ws)) for n, d in diag.items()
             for s, ws in d["warnings"].items() if ws]
          if diag_rows else []),
        ("h2", "Gold reward per task (final eval: each task's raw gold scale; all: the normalised mean)"),
        ("table", (gold_head, gold_rows)),
        ("h2", "Style leakage (fraction of eval answers carrying another task's style)"),
        ("table", (leak_head, leak_rows)),
        ("h2", "Degenerate answers (fraction of final eval answers the gold reward's degeneracy gate floors: "
               "empty, too short, repeated tokens, the prompt echoed, bare markup, too long)"),
        ("table", (degen_head, degen_rows)),
    ]
    captions = {
        "score_distributions": "Per-task score distributions of the RM and the AM on held-out responses (Figure 1a).",
        "reliability": "Reliability diagrams: accuracy per confidence bin of P(y_w ≻ y_l) = σ(s_w − s_l).",
        "win_lose_tie": "Win / tie / lose against the SFT policy per arm.",
        "gold_vs_kl": "Gold reward against the KL from the SFT policy, every eval point of every seed.",
        "degenerate_vs_kl": "Share of degenerate eval answers against the KL from the SFT policy: over-optimisation "
                            "that games the proxy with garbage shows here first.",
        "proxy_vs_kl": "The optimised (proxy) score against KL, one panel per arm (proxies differ in scale; DPO "
                       "optimises no score model: its panel shows the score model it is evaluated with).",
        "forgetting": "Forgetting-set win and lose rates against the SFT policy over training (Figure 1b).",
        "reward_curves": "Eval gold reward and eval proxy score over training (mean ± std over seeds).",
    }
    blocks.append(("h2", "Figures"))
    for key, path in figures.items():
        if path is not None:
            blocks += [("p", captions[key]), ("img", str(path.relative_to(out)))]
    if timings:
        blocks += [("h2", "Stage times (seconds, as last run)"),
                   ("table", (["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in timings.items()]))]
    atomic_write_text(out / "report.md", to_markdown(blocks))
    atomic_write_text(out / "report.html", to_html(blocks))
    # No timings: report.json holds what the run measured, the same for two runs of one commit
    # on one machine (the stage times are in timings.json and report.md).
    report = {"table1": t1, "table2": t2, "diagnostics": diag, "sft_reference_gold": ref_gold,
              "figures": {k: str(v.relative_to(out)) if v else None for k, v in figures.items()}}
    undefined: dict[str, str] = {}
    report = strict_json(report, "", undefined)
    report["undefined"] = undefined
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    return out / "report.md"


def strict_json(value, path: str, undefined: dict[str, str]):
    """``value`` with every non-finite float replaced by null, its path recorded in
    ``undefined`` with the reason (JSON has no NaN: a strict parser rejects the literal)."""
    if isinstance(value, dict):
        return {k: strict_json(v, f"{path}.{k}" if path else str(k), undefined) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v, f"{path}[{i}]", undefined) for i, v in enumerate(value)]
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        undefined[path] = ("no value to average (e.g. a proxy score for an arm without a proxy, or a metric no "
                           "seed logged)" if np.isnan(value) else "infinite")
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="the ablation's out_dir")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.out_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path} (and report.html, plots/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
