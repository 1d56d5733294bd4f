"""Evaluate a policy on the testbed: per-task gold reward, response length, style leakage.

``sample_and_score`` is the one place that turns (policy, prompt records) into scored
samples; ``task_table`` aggregates them. The build stage, the ``evaluate`` command and
(later) the trainers' eval hooks all go through these two functions.

Style leakage: ``style_markers`` says which task families' characteristic markers a
response carries (code fences, bullet lists, an all-lowercase reply, ...). For a
response of task t, any marker of another family is leakage, e.g. a code fence in an
arithmetic answer: the cross-task pattern transfer that the Advantage Model paper
blames on per-task reward-scale differences.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import GenerationConfig, ModelConfig, save_config
from ..io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from .tasks import TASKS, degenerate_reason, gold_record_problem, gold_rewards, style_markers


def sample_and_score(
    model,
    tokenizer,
    records: list[dict],
    gen_cfg: GenerationConfig,
    n: int,
    seed: int,
    workers: int = 2,
    device=None,
    progress: bool = True,
) -> list[dict]:
    """n samples per prompt record, each scored by the gold reward. One row per sample."""
    from ..generation import generate

    gen = generate(
        model, tokenizer, [r["prompt"] for r in records], gen_cfg, n=n, seed=seed, device=device, progress=progress
    )
    return score_samples(records, gen, workers)


def score_samples(records: list[dict], gen, workers: int = 2) -> list[dict]:
    """The rows of ``sample_and_score`` for a ``Generation`` sampled from ``records``' prompts."""
    sampled = [records[i] for i in gen.prompt_index]
    golds = gold_rewards(sampled, gen.responses, workers=workers)
    lengths = gen.response_mask.sum(dim=1).tolist()
    rows = []
    for rec, response, gold, length, truncated in zip(
        sampled, gen.responses, golds, lengths, gen.truncated.tolist()
    ):
        rows.append(
            {
                "id": rec["id"],
                "task": rec["task"],
                "prompt": rec["prompt"],
                "response": response,
                "gold": float(gold),
                "tokens": int(length),
                "truncated": bool(truncated),
                "markers": sorted(style_markers(response)),
                "degenerate": degenerate_reason(rec, response),
            }
        )
    return rows


def leaked_markers(task: str, markers) -> list[str]:
    """Markers of other task families found in a response of ``task``."""
    return [m for m in markers if m != task]


def task_table(rows: list[dict]) -> dict[str, dict]:
    """Per-task statistics of scored samples (plus an 'all' row of range-normalised gold)."""
    table: dict[str, dict] = {}
    tasks = sorted({r["task"] for r in rows})
    for task in tasks:
        sub = [r for r in rows if r["task"] == task]
        gold = np.array([r["gold"] for r in sub], dtype=np.float64)
        spec = TASKS.get(task)
        low, high = (spec.low, spec.high) if spec else (float(gold.min()), float(gold.max()))
        span = high - low or 1.0
        eps = 1e-6 * span
        leak = [bool(leaked_markers(task, r["markers"])) for r in sub]
        table[task] = {
            "n": len(sub),
            "gold_mean": float(gold.mean()),
            "gold_std": float(gold.std(ddof=1)) if len(sub) > 1 else 0.0,
            "gold_min": float(gold.min()),
            "gold_max": float(gold.max()),
            "range_low": low,
            "range_high": high,
            "gold_norm_mean": float(((gold - low) / span).mean()),
            "frac_floor": float(np.mean(gold <= low + eps)),
            "frac_ceiling": float(np.mean(gold >= high - eps)),
            "tokens_mean": float(np.mean([r["tokens"] for r in sub])),
            "truncated_frac": float(np.mean([r["truncated"] for r in sub])),
            "leakage_rate": float(np.mean(leak)),
            "leaked_markers": _marker_counts(task, sub),
            "degenerate_rate": float(np.mean([is_degenerate(r) for r in sub])),
        }
    if rows:
        table["all"] = {
            "n": len(rows),
            # Mean over tasks of the range-normalised gold: every task weighs the same.
            "gold_norm_mean": float(np.mean([table[t]["gold_norm_mean"] for t in tasks])),
            "tokens_mean": float(np.mean([r["tokens"] for r in rows])),
            "leakage_rate": float(np.mean([bool(leaked_markers(r["task"], r["markers"])) for r in rows])),
            # like the gold: the mean over tasks, every task weighing the same
            "degenerate_rate": float(np.mean([table[t]["degenerate_rate"] for t in tasks])),
        }
    return table


def is_degenerate(row: dict) -> bool:
    """Whether a scored sample row is a degenerate answer (rows written before the meter
    existed are judged now, by the same gate)."""
    reason = row["degenerate"] if "degenerate" in row else degenerate_reason(row, row["response"])
    return reason is not None


def _marker_counts(task: str, rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        for m in leaked_markers(task, r["markers"]):
            counts[m] = counts.get(m, 0) + 1
    return dict(sorted(counts.items()))


def format_table(table: dict[str, dict], title: str = "") -> str:
    """Markdown table of ``task_table`` output."""
    head = (
        "| task | n | gold range | gold mean | gold std | min | max | at floor | at ceiling "
        "| normalised | tokens | truncated | leakage |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for task, s in table.items():
        if task == "all":
            continue
        lines.append(
            f"| {task} | {s['n']} | [{s['range_low']:g}, {s['range_high']:g}] | {s['gold_mean']:.3f} "
            f"| {s['gold_std']:.3f} | {s['gold_min']:.3f} | {s['gold_max']:.3f} | {s['frac_floor']:.0%} "
            f"| {s['frac_ceiling']:.0%} | {s['gold_norm_mean']:.3f} | {s['tokens_mean']:.1f} "
            f"| {s['truncated_frac']:.0%} | {s['leakage_rate']:.0%} |"
        )
    if "all" in table:
        a = table["all"]
        lines.append(
            f"| **all** | {a['n']} | | | | | | | | {a['gold_norm_mean']:.3f} | {a['tokens_mean']:.1f} | "
            f"| {a['leakage_rate']:.0%} |"
        )
    out = (f"### {title}\n\n" if title else "") + head + "\n".join(lines) + "\n"
    return out


def check_headroom(table: dict[str, dict]) -> list[str]:
    """Problems that leave no room for RLHF to improve or to hack (empty list: none)."""
    problems = []
    for task, s in table.items():
        if task == "all":
            continue
        if s["frac_floor"] == 1.0:
            problems.append(f"{task}: every sample at the floor ({s['range_low']:g})")
        if s["frac_ceiling"] == 1.0:
            problems.append(f"{task}: every sample at the ceiling ({s['range_high']:g})")
    means = [s["gold_norm_mean"] for t, s in table.items() if t != "all"]
    if len(means) > 1 and max(means) - min(means) < 1e-6:
        problems.append("all tasks have the same normalised gold mean")
    return problems


# --------------------------------------------------------------------------- command


@dataclasses.dataclass
class EvaluateConfig:
    """``stable-rlhf evaluate``: score a policy's samples on a prompt file with the gold reward."""

    prompts: str = "data/testbed/prompts_eval.jsonl"
    """prompt records (JSONL with prompt, task, meta) from the testbed"""
    out_dir: str = "runs/evaluate"
    """run directory: config.yaml, samples.jsonl, summary.json, table.md"""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """the policy to evaluate"""
    generation: GenerationConfig = dataclasses.field(default_factory=lambda: GenerationConfig(max_new_tokens=80))
    """sampling settings"""
    n: int = 2
    """samples per prompt"""
    limit_per_task: Optional[int] = None
    """evaluate only the first N prompts of each task"""
    seed: int = 0
    """sampling seed"""
    workers: int = 2
    """concurrent sandboxes for the code task"""

    def __post_init__(self):
        if self.n < 1:
            raise ValueError("n must be >= 1")


def limit_per_task(records: list[dict], limit: Optional[int]) -> list[dict]:
    if limit is None:
        return records
    seen: dict[str, int] = {}
    out = []
    for r in records:
        if seen.get(r["task"], 0) < limit:
            out.append(r)
            seen[r["task"]] = seen.get(r["task"], 0) + 1
    return out


def evaluate(cfg: EvaluateConfig) -> dict:
    from ..data import read_jsonl
    from ..models import load_policy, make_accelerator

    # validated before a model loads: every record must be one the gold reward can score
    records = limit_per_task(read_jsonl(cfg.prompts, "prompt", check=gold_record_problem), cfg.limit_per_task)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    accelerator = make_accelerator(seed=cfg.seed)
    model, tokenizer = load_policy(cfg.model, device=accelerator.device)
    start = time.time()
    rows = sample_and_score(model, tokenizer, records, cfg.generation, cfg.n, cfg.seed, cfg.workers, accelerator.device)
    table = task_table(rows)
    atomic_write_jsonl(out / "samples.jsonl", rows)
    summary = {"per_task": table, "seconds": time.time() - start, "headroom_problems": check_headroom(table)}
    atomic_write_json(out / "summary.json", summary)
    text = format_table(table, f"Gold reward of {cfg.model.name_or_path} on {cfg.prompts}")
    atomic_write_text(out / "table.md", text)
    print(text)
    return summary
