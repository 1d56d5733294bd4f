"""Build the testbed's data from a policy: the ``make-prompts``, ``build-data`` and ``main`` stages.

``build_data`` is a recipe of numbered steps:

1. prompt splits (train / eval / forget_pool) from the seeded generator, disjoint by text;
2. K samples from the SFT policy per preference prompt (train subset and eval subset);
3. gold reward for every sample; simulated labelers rank each group of K;
4. preference files (K-ranked records, gold attached) and SFT demonstrations;
5. forgetting set: forget-pool prompts on which the SFT policy already does well;
6. the SFT policy's per-task gold table on the eval samples.

Every sampling step writes its scored samples atomically and records a key of the
settings it depends on in ``stages.json``, so a killed build resumes at the first step
that has not finished, and a rebuild with other settings redoes only what changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import GenerationConfig, ModelConfig, save_config, to_dict
from ..io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl
from .labelers import LabelerConfig, agreement_panel, label_groups, measured_agreement, predicted_agreement
from .prompts import make_splits
from .tasks import TASK_NAMES, TASKS


@dataclasses.dataclass
class SplitSizes:
    """Prompts per task in each split."""

    train: int = 300
    """prompts per task for training (preference data, PPO, rehearsal selection)"""
    eval: int = 40
    """held-out prompts per task for evaluation"""
    forget_pool: int = 40
    """held-out prompts per task from which the forgetting set is selected"""

    def __post_init__(self):
        if min(self.train, self.eval, self.forget_pool) < 1:
            raise ValueError("every split needs at least one prompt per task")


def _default_tasks() -> list[str]:
    return list(TASK_NAMES)


@dataclasses.dataclass
class MakePromptsConfig:
    """``stable-rlhf make-prompts``: the prompt splits alone (no model needed)."""

    out_dir: str = "data/testbed"
    """directory for prompts_{train,eval,forget_pool}.jsonl"""
    seed: int = 0
    """generator seed: the same seed writes byte-identical files"""
    tasks: list[str] = dataclasses.field(default_factory=_default_tasks)
    """task families"""
    sizes: SplitSizes = dataclasses.field(default_factory=SplitSizes)
    """prompts per task per split"""

    def __post_init__(self):
        _check_tasks(self.tasks)


@dataclasses.dataclass
class BuildDataConfig:
    """``stable-rlhf build-data`` / ``main``: testbed data and the SFT policy's gold table.

    The defaults are the quick CPU preset of the main job (about 680 SmolLM2 samples,
    ~10 minutes on 2 cores); experiments/testbed_full.yaml is the GPU-sized preset.
    """

    out_dir: str = "runs/main"
    """run directory"""
    seed: int = 0
    """seed for prompts, sampling and labelers"""
    tasks: list[str] = dataclasses.field(default_factory=_default_tasks)
    """task families"""
    sizes: SplitSizes = dataclasses.field(default_factory=SplitSizes)
    """prompts per task per split"""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """the SFT policy that writes the responses"""
    generation: GenerationConfig = dataclasses.field(default_factory=lambda: GenerationConfig(max_new_tokens=80))
    """sampling settings"""
    k: int = 3
    """responses per prompt in a comparison"""
    pref_train_per_task: int = 24
    """train prompts per task that get K samples and a simulated ranking"""
    pref_eval_per_task: int = 10
    """eval prompts per task that get K samples (held-out comparisons and the SFT table)"""
    forget_pool_per_task: int = 6
    """forget-pool prompts per task sampled to find those the SFT policy already does well"""
    forget_samples: int = 2
    """SFT samples per forget-pool prompt"""
    forget_min_score: float = 0.5
    """a prompt enters the forgetting set if its mean range-normalised gold is at least this"""
    labeler: LabelerConfig = dataclasses.field(default_factory=LabelerConfig)
    """simulated labelers"""
    workers: int = 2
    """concurrent sandboxes for the code task"""

    def __post_init__(self):
        _check_tasks(self.tasks)
        if self.k < 2:
            raise ValueError("k must be >= 2")
        if self.pref_train_per_task > self.sizes.train:
            raise ValueError(f"pref_train_per_task ({self.pref_train_per_task}) > sizes.train ({self.sizes.train})")
        if self.pref_eval_per_task > self.sizes.eval:
            raise ValueError(f"pref_eval_per_task ({self.pref_eval_per_task}) > sizes.eval ({self.sizes.eval})")
        if self.forget_pool_per_task > self.sizes.forget_pool:
            raise ValueError(
                f"forget_pool_per_task ({self.forget_pool_per_task}) > sizes.forget_pool ({self.sizes.forget_pool})"
            )


def _check_tasks(tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {list(TASKS)}")
    if not tasks:
        raise ValueError("tasks is empty")


# --------------------------------------------------------------------------- make-prompts


def write_prompt_splits(out: Path, tasks: list[str], sizes: SplitSizes, seed: int) -> dict[str, list[dict]]:
    splits = make_splits(list(tasks), dataclasses.asdict(sizes), seed)
    for name, records in splits.items():
        atomic_write_jsonl(out / f"prompts_{name}.jsonl", records)
    return splits


def make_prompts(cfg: MakePromptsConfig) -> None:
    out = Path(cfg.out_dir)
    splits = write_prompt_splits(out, cfg.tasks, cfg.sizes, cfg.seed)
    for name, records in splits.items():
        print(f"{out / f'prompts_{name}.jsonl'}: {len(records)} prompts")


# --------------------------------------------------------------------------- build-data


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Stages:
    """Resumable steps: a step's output is reused when its key matches ``stages.json``,
    which also keeps the seconds the step took when it ran."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out / "stages.json"
        self.done = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, key: str, fn: Callable[[], list[dict]]) -> tuple[list[dict], float]:
        """The step's rows and the seconds it took (when it ran, possibly in an earlier run)."""
        path = self.out / f"{name}.jsonl"
        entry = self.done.get(name)
        if isinstance(entry, dict) and entry.get("key") == key and path.exists():
            print(f"[build] {name}: reusing {path}")
            return read_jsonl(path), entry["seconds"]
        start = time.time()
        rows = fn()
        atomic_write_jsonl(path, rows)
        self.done[name] = {"key": key, "seconds": time.time() - start}
        atomic_write_json(self.path, self.done)
        return rows, self.done[name]["seconds"]


def group_by_prompt(rows: list[dict]) -> list[list[dict]]:
    """Scored samples grouped by prompt id, in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["id"], []).append(r)
    return list(groups.values())


def preference_records(
    rows: list[dict], prompts_by_id: dict[str, dict], labeler: LabelerConfig, seed: int
) -> tuple[list[dict], dict]:
    """K-ranked comparison records from scored samples, ranked by simulated labelers.

    Identical responses within a group are kept once (a labeler cannot rank a text
    against itself); groups left with fewer than two distinct responses are dropped.
    """
    groups, dropped_dupes, dropped_groups = [], 0, 0
    for group in group_by_prompt(rows):
        unique: dict[str, dict] = {}
        for r in group:
            unique.setdefault(r["response"].strip(), r)
        dropped_dupes += len(group) - len(unique)
        if len(unique) < 2:
            dropped_groups += 1
            continue
        groups.append(list(unique.values()))
    golds = [[r["gold"] for r in g] for g in groups]
    scales = [TASKS[g[0]["task"]].span for g in groups] if labeler.per_task_scale else None
    rankings, stats = label_groups(golds, labeler, seed, scales)
    records = []
    for group, ranking, gold in zip(groups, rankings, golds):
        prompt = prompts_by_id[group[0]["id"]]
        records.append(
            {
                "prompt": prompt["prompt"],
                "responses": [r["response"] for r in group],
                "ranking": ranking,
                "task": prompt["task"],
                "gold": gold,
                # The responses are samples of the SFT policy: the AM's centring term may use them.
                "sft_samples": True,
                "meta": {"id": prompt["id"], **prompt.get("meta", {})},
            }
        )
    stats.update({"labeler/duplicate_responses_dropped": dropped_dupes, "labeler/groups_dropped": dropped_groups})
    return records, stats


def select_forgetting_set(rows: list[dict], min_score: float) -> list[dict]:
    """Forget-pool prompts whose mean range-normalised SFT gold is at least ``min_score``."""
    chosen = []
    for group in group_by_prompt(rows):
        spec = TASKS[group[0]["task"]]
        norm = float(np.mean([spec.normalise(r["gold"]) for r in group]))
        if norm >= min_score:
            chosen.append((group[0]["id"], norm))
    return chosen


def best_demonstrations(rows: list[dict], prompts_by_id: dict[str, dict]) -> list[dict]:
    """The SFT policy's best sample (by gold) for each prompt, as SFT demonstrations."""
    demos = []
    for group in group_by_prompt(rows):
        best = max(group, key=lambda r: r["gold"])
        prompt = prompts_by_id[best["id"]]
        demos.append(
            {"prompt": prompt["prompt"], "response": best["response"], "task": prompt["task"],
             "meta": {"id": prompt["id"], "gold": best["gold"]}}
        )
    return demos


class _PolicySampling:
    """build_data's resumable sampling steps (``_Stages``) with the SFT policy loaded once, on
    the first step that has to run: a rebuild whose steps are all reused never loads it."""

    def __init__(self, cfg: BuildDataConfig, out: Path, timings: dict[str, float]):
        self.cfg = cfg
        self.timings = timings
        self.stages = _Stages(out)
        self.policy: tuple | None = None  # (model, tokenizer, device) once loaded
        # What every step's samples depend on besides its own prompts, n and seed.
        self.model_key = to_dict(cfg.model), to_dict(cfg.generation), cfg.tasks, to_dict(cfg.sizes), cfg.seed

    def run(self, name: str, records: list[dict], n: int, seed_offset: int) -> list[dict]:
        """``n`` gold-scored samples per record, from ``name``.jsonl when its key is unchanged."""
        key = _key(self.model_key, [r["id"] for r in records], n, seed_offset)
        rows, self.timings[f"{name}_s"] = self.stages.run(
            name, key, lambda: self._sample_and_score(records, n, self.cfg.seed + seed_offset)
        )
        return rows

    def _sample_and_score(self, records: list[dict], n: int, seed: int) -> list[dict]:
        from .evaluate import sample_and_score

        model, tokenizer, device = self._load_policy()
        return sample_and_score(model, tokenizer, records, self.cfg.generation, n, seed, self.cfg.workers, device)

    def _load_policy(self) -> tuple:
        from ..models import load_policy, make_accelerator

        if self.policy is None:
            t = time.time()
            accelerator = make_accelerator(seed=self.cfg.seed)
            model, tokenizer = load_policy(self.cfg.model, device=accelerator.device)
            self.policy = model, tokenizer, accelerator.device
            self.timings["load_policy_s"] = time.time() - t
            print(f"[build] policy {self.cfg.model.name_or_path} loaded in {self.timings['load_policy_s']:.1f}s "
                  f"on {accelerator.device}")
        return self.policy


def _labeler_stats(labeler: LabelerConfig, seed: int, prefs: list[dict], stats_train: dict, stats_eval: dict) -> dict:
    """How often the simulated labels agree with the gold order: measured on ``prefs``, predicted
    by the labeler model, and the spread over independent labelings of the same groups."""
    all_golds = [p["gold"] for p in prefs]
    scales = [TASKS[p["task"]].span for p in prefs]
    scales = scales if labeler.per_task_scale else None
    measured, n_pairs = measured_agreement(all_golds, [p["ranking"] for p in prefs])
    predicted, _ = predicted_agreement(all_golds, labeler, scales)
    panel = agreement_panel(all_golds, labeler, seed + 12, scales)
    return {
        "prompts": len(all_golds),
        "pairs": n_pairs,
        "agreement_measured": measured,
        "agreement_predicted": predicted,
        "agreement_single_labeling_std": panel["std"],
        "agreement_panel_mean": panel["mean"],
        "agreement_panel_draws": panel["draws"],
        "train": stats_train,
        "eval": stats_eval,
        "config": to_dict(labeler),
    }


def _forgetting_prompts(rows: list[dict], prompts_by_id: dict[str, dict], min_score: float) -> list[dict]:
    """The prompt records of ``select_forgetting_set``, each with its SFT score in meta."""
    return [
        {**prompts_by_id[pid], "meta": {**prompts_by_id[pid].get("meta", {}), "sft_gold_norm": score}}
        for pid, score in select_forgetting_set(rows, min_score)
    ]


def _print_summary(table_text: str, summary: dict, out: Path) -> None:
    s = summary["labeler"]
    print(table_text)
    print(
        f"[build] labelers on {s['prompts']} prompts ({s['pairs']} pairs), agreement with the gold order: "
        f"predicted {s['agreement_predicted']:.4f}; these labels {s['agreement_measured']:.4f} "
        f"(one labeling varies by ±{s['agreement_single_labeling_std']:.4f}, 1σ); "
        f"mean of {s['agreement_panel_draws']} independent labelings {s['agreement_panel_mean']:.4f}"
    )
    print(f"[build] forgetting set: {summary['counts']['forgetting_set']} prompts; "
          f"headroom problems: {summary['headroom_problems'] or 'none'}")
    print(f"[build] done in {summary['timings']['this_run_s']:.0f}s -> {out}")


def build_data(cfg: BuildDataConfig) -> dict:
    from .evaluate import check_headroom, format_table, limit_per_task, task_table

    start = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    timings: dict[str, float] = {}

    # 1. Prompt splits: pure functions of (tasks, sizes, seed).
    splits = write_prompt_splits(out, cfg.tasks, cfg.sizes, cfg.seed)
    prompts_by_id = {r["id"]: r for recs in splits.values() for r in recs}
    pref_train = limit_per_task(splits["train"], cfg.pref_train_per_task)
    pref_eval = limit_per_task(splits["eval"], cfg.pref_eval_per_task)
    forget_pool = limit_per_task(splits["forget_pool"], cfg.forget_pool_per_task)

    # 2-3. Sample from the SFT policy and score with the gold reward (resumable).
    sampling = _PolicySampling(cfg, out, timings)
    train_rows = sampling.run("samples_pref_train", pref_train, cfg.k, 1)
    eval_rows = sampling.run("samples_eval", pref_eval, cfg.k, 2)
    forget_rows = sampling.run("samples_forget_pool", forget_pool, cfg.forget_samples, 3)

    # 4. Simulated labels -> K-ranked preference files; best samples -> SFT demonstrations.
    prefs_train, stats_train = preference_records(train_rows, prompts_by_id, cfg.labeler, cfg.seed + 10)
    prefs_eval, stats_eval = preference_records(eval_rows, prompts_by_id, cfg.labeler, cfg.seed + 11)
    atomic_write_jsonl(out / "preferences_train.jsonl", prefs_train)
    atomic_write_jsonl(out / "preferences_eval.jsonl", prefs_eval)
    atomic_write_jsonl(out / "sft_demos.jsonl", best_demonstrations(train_rows, prompts_by_id))
    labeler_stats = _labeler_stats(cfg.labeler, cfg.seed, prefs_train + prefs_eval, stats_train, stats_eval)
    atomic_write_json(out / "labeler_stats.json", labeler_stats)

    # 5. Forgetting set: held-out prompts the SFT policy already answers well.
    forget = _forgetting_prompts(forget_rows, prompts_by_id, cfg.forget_min_score)
    atomic_write_jsonl(out / "prompts_forget.jsonl", forget)

    # 6. The SFT policy's per-task table on the held-out samples.
    table = task_table(eval_rows)
    headroom = check_headroom(table)
    text = format_table(table, f"SFT policy ({cfg.model.name_or_path}) gold reward on held-out prompts")
    atomic_write_text(out / "sft_table.md", text)
    timings["this_run_s"] = time.time() - start
    timings["sampling_and_scoring_s"] = sum(v for k, v in timings.items() if k.startswith("samples_"))
    summary = {
        "policy": cfg.model.name_or_path,
        "per_task": table,
        "headroom_problems": headroom,
        "labeler": {k: v for k, v in labeler_stats.items() if k.startswith(("prompts", "pairs", "agreement"))},
        "counts": {
            "preferences_train": len(prefs_train),
            "preferences_eval": len(prefs_eval),
            "forgetting_set": len(forget),
            "samples": len(train_rows) + len(eval_rows) + len(forget_rows),
        },
        "timings": timings,
    }
    atomic_write_json(out / "summary.json", summary)
    _print_summary(text, summary, out)
    return summary


# ----------------------------------------------------------------------- relabel


@dataclasses.dataclass
class RelabelDataConfig(BuildDataConfig):
    """``stable-rlhf relabel-data``: a build's preference data rescored with today's gold reward.

    The samples stay (they do not depend on the gold reward); their gold, the simulated
    labels drawn from it, the SFT demonstrations picked by it and the labeler statistics
    are recomputed exactly as ``build-data`` computes them, so the result equals a full
    rebuild from the same config without an hour of sampling. Give the build's own
    config (``--config DATA_DIR/build_config.yaml``).
    """

    data_dir: str = "data/testbed_large"
    """the build directory to rewrite in place (preferences_*, sft_demos, labeler_stats, SHA256SUMS)"""


def _scored_rows(pairs: list[tuple[str, str]], prompts_by_id: dict[str, dict]) -> list[dict]:
    """Sample rows (as ``sample_and_score`` writes them) for ``(prompt id, response)`` pairs,
    gold recomputed."""
    from .tasks import gold_rewards

    prompts = [prompts_by_id[pid] for pid, _ in pairs]
    golds = gold_rewards(prompts, [resp for _, resp in pairs])
    return [{"id": p["id"], "task": p["task"], "prompt": p["prompt"], "response": resp, "gold": gold}
            for p, (_, resp), gold in zip(prompts, pairs, golds)]


def _comparison_samples(records: list[dict]) -> list[tuple[str, str]]:
    return [(r["meta"]["id"], resp) for r in records for resp in r["responses"]]


def _demo_samples(old_demos: list[dict], comparisons: list[dict]) -> list[tuple[str, str]]:
    """The samples ``best_demonstrations`` chose from, in build order: a prompt whose K
    samples were all one text has no comparison record, only its demonstration."""
    by_id = {r["meta"]["id"]: r["responses"] for r in comparisons}
    pids = [d["meta"]["id"] for d in old_demos]
    return [(pid, resp) for pid, d in zip(pids, old_demos) for resp in by_id.get(pid, [d["response"]])]


def relabel_data(cfg: RelabelDataConfig) -> dict:
    data = Path(cfg.data_dir)
    splits = make_splits(list(cfg.tasks), dataclasses.asdict(cfg.sizes), cfg.seed)
    prompts_by_id = {r["id"]: r for recs in splits.values() for r in recs}
    train, held_out = (read_jsonl(data / f"preferences_{s}.jsonl") for s in ("train", "eval"))
    train_rows = _scored_rows(_comparison_samples(train), prompts_by_id)
    eval_rows = _scored_rows(_comparison_samples(held_out), prompts_by_id)
    demo_rows = _scored_rows(_demo_samples(read_jsonl(data / "sft_demos.jsonl"), train), prompts_by_id)
    # the same seeds as build_data's step 4
    prefs_train, stats_train = preference_records(train_rows, prompts_by_id, cfg.labeler, cfg.seed + 10)
    prefs_eval, stats_eval = preference_records(eval_rows, prompts_by_id, cfg.labeler, cfg.seed + 11)
    demos = best_demonstrations(demo_rows, prompts_by_id)
    labeler_stats = _labeler_stats(cfg.labeler, cfg.seed, prefs_train + prefs_eval, stats_train, stats_eval)
    atomic_write_jsonl(data / "preferences_train.jsonl", prefs_train)
    atomic_write_jsonl(data / "preferences_eval.jsonl", prefs_eval)
    atomic_write_jsonl(data / "sft_demos.jsonl", demos)
    atomic_write_json(data / "labeler_stats.json", labeler_stats)
    write_checksums(data)
    print(f"[relabel] {len(prefs_train)} + {len(prefs_eval)} comparisons rescored, {len(demos)} demonstrations; "
          f"label agreement with the gold order {labeler_stats['agreement_measured']:.4f} -> {data}")
    return labeler_stats


def write_checksums(data: Path) -> None:
    """Rewrite ``SHA256SUMS`` for the files it lists (the loaders check them)."""
    sums = data / "SHA256SUMS"
    names = [line.split()[-1] for line in sums.read_text().splitlines() if line.strip()]
    atomic_write_text(sums, "".join(
        f"{hashlib.sha256((data / n).read_bytes()).hexdigest()}  {n}\n" for n in names))
