"""``stable-rlhf train-rm`` and ``train-am``: one score-model trainer, two losses.

    objective=rm   L = L_rank                                     (InstructGPT)
    objective=am   L = L_rank + λ_c·center + λ_b·bound + λ_t·task   (docs/methods.md)

``train(cfg)`` as numbered steps:

1. read and validate the comparisons (train and held-out) before any model loads;
2. build the score model (a scalar head on the backbone, or a saved score model);
3. for each epoch: minibatches of comparisons, every response of a comparison encoded
   once, the loss of the objective, one optimiser step (skipped when not finite); every
   term logged; a held-out evaluation at the end of the epoch; a checkpoint to resume
   from (``checkpoints/step-N``: the run layer ``runs.Run`` and the epoch trainer
   ``runs.TrainState`` that SFT shares);
4. score statistics of the training data (global and per task), saved with the model;
5. held-out metrics (accuracy against the gold order and the labels, ECE with its
   reliability bins, per-task score moments) in ``summary.json``; raw held-out scores
   in ``scores_eval.jsonl`` for the plots in ``analysis/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from .config import ModelConfig, yaml_load
from .io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl
from .losses import (
    batch_task_moments,
    bound_loss,
    centering_loss,
    expected_calibration_error,
    ranking_loss,
    task_moment_loss,
)
from .data import ranks_of
from .runs import GuardedRunSettings, Run, TrainState, adamw
from .scoring import encode, normalise_per_task, per_task_stats, score_texts


@dataclasses.dataclass
class AMLossConfig:
    """Advantage-model terms (docs/methods.md); each is logged on its own."""

    center_coef: float = 0.3
    """λ_c: weight of E_x[(mean_k a(x, y_k))²] over comparisons of SFT samples"""
    center_on: Literal["sft_samples", "all", "off"] = "sft_samples"
    """which comparisons the centring term uses: those marked sft_samples (the K responses
    are samples of π_SFT), all of them, or none (human-written responses)"""
    bound_coef: float = 1.0
    """λ_b: weight of E[relu(|a| - m)²]"""
    margin: float = 2.5
    """m: advantages are bounded to [-m, m] (the paper's margin)"""
    task_coef: float = 0.1
    """λ_t: weight of Σ_t [μ_t² + (log s_t - log s*)²]"""
    target_std: float = 0.8
    """s*: the common per-task spread (scale fixed); m / s* ≈ 3 so the bound rarely binds"""
    scale: Literal["fixed", "free"] = "free"
    """fixed: every task's spread is target_std; free: the tasks' spreads are equal, at a
    common spread the loss does not set (s* is the mean of the tasks' log spreads), so the
    ranking loss sets the scale, as for an RM. A spread target the labels cannot support
    forces a scale the ranking does not earn: on the CPU testbed the fixed 0.8 costs ranking
    accuracy. std_floor stays absolute: spreads well below it are not equalised (a floor
    relative to the batch's spread let the spread part collapse the scores' ranking)"""
    std_floor: float = 0.1
    """floor added (as a variance) inside log s_t: a task whose few batch scores nearly
    coincide would otherwise give the log-spread term a gradient ~1/s_t that swamps the rest"""
    running_weight: float = 0.5
    """w: the detached running per-task moments are pooled into a batch's with an effective
    count of w times that task's scores in the batch, so the batch's own scores carry
    1 / (1 + w) of the pooled moments (and of the gradient) at any batch size"""
    running_momentum: float = 0.9
    """EMA momentum of the running per-task moments"""

    def __post_init__(self):
        if self.margin <= 0 or self.target_std <= 0:
            raise ValueError("margin and target_std must be > 0")
        if min(self.center_coef, self.bound_coef, self.task_coef, self.running_weight) < 0:
            raise ValueError("coefficients must be >= 0")
        if not 0 <= self.running_momentum < 1:
            raise ValueError("running_momentum must be in [0, 1)")


@dataclasses.dataclass
class ScoreTrainConfig(GuardedRunSettings):
    """``stable-rlhf train-rm`` / ``train-am``: a score model on K-ranked comparisons (the run
    settings come from ``GuardedRunSettings``)."""

    objective: Literal["rm", "am"] = "rm"
    """rm: ranking loss only; am: ranking loss plus the advantage-model terms"""
    train_data: str = "data/testbed/preferences_train.jsonl"
    """comparisons to train on (a data spec: path.jsonl, hh:path, hf:name[:split], ...)"""
    eval_data: str = "data/testbed/preferences_eval.jsonl"
    """held-out comparisons, evaluated every epoch"""
    data_kind: Literal["ranked", "pair"] = "ranked"
    """record kind of both files; pairs are K = 2 comparisons"""
    out_dir: str = ""
    """run directory (default: runs/<objective>)"""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """backbone: the policy's (a causal LM whose unembedding is replaced by the head) or an encoder"""
    init_from: Optional[str] = None
    """start from a saved score model directory instead of a new head"""
    seed: int = 0
    """seed for the head, the data order and dropout"""
    epochs: int = 2
    """passes over the training comparisons"""
    batch_size: int = 8
    """comparisons per optimiser step (all K responses of each)"""
    lr: float = 2e-5
    """peak learning rate (AdamW), linear warm-up then linear decay"""
    head_lr: float = 1e-3
    """learning rate of the new scalar head"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_ratio: float = 0.1
    """fraction of steps spent warming up"""
    grad_clip: float = 1.0
    """max gradient norm"""
    max_length: int = 384
    """tokens per (prompt, response); prompts are cut from the left"""
    train_layers: Optional[int] = None
    """train only the top N transformer layers and the head (None: all); for small budgets"""
    eval_batch_size: int = 32
    """responses per forward pass when scoring"""
    n_bins: int = 10
    """reliability-diagram bins for ECE"""
    dropout: bool = False
    """train with the backbone's dropout (off: the model is in eval mode while it trains, as the
    scores it is judged by are)"""
    stratify: bool = True
    """deal every task into every minibatch in turn (round-robin over shuffled per-task lists), so
    the per-task moment terms see each task in each batch; False: a plain shuffle"""
    am: AMLossConfig = dataclasses.field(default_factory=AMLossConfig)
    """advantage-model terms (objective=am)"""

    def __post_init__(self):
        if not self.out_dir:
            self.out_dir = f"runs/{self.objective}"
        super().__post_init__()
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError("learning rates must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if self.train_layers is not None and self.train_layers < 0:
            raise ValueError("train_layers must be >= 0")


# --------------------------------------------------------------------------- data


def load_comparisons(spec: str, kind: str) -> list[dict]:
    from .data import load_records, pair_to_ranked

    records = load_records(spec, kind)
    return [pair_to_ranked(r) for r in records] if kind == "pair" else records


def collate(batch: list[dict], tokenizer, task_index: dict[str, int], max_length: int, center_on: str) -> dict:
    """Comparisons -> one flat row per response plus the (B, Kmax) layout of the losses."""
    K = max(len(c["responses"]) for c in batch)
    prompts = [c["prompt"] for c in batch for _ in c["responses"]]
    responses = [r for c in batch for r in c["responses"]]
    enc = encode(tokenizer, prompts, responses, max_length)  # (N, T)
    B = len(batch)
    mask = torch.zeros(B, K, dtype=torch.bool)
    ranks = torch.full((B, K), K, dtype=torch.long)
    for b, c in enumerate(batch):
        k = len(c["responses"])
        mask[b, :k] = True
        ranks[b, :k] = torch.tensor(ranks_of(c["ranking"]))
    if center_on == "all":
        centred = [True] * B
    elif center_on == "sft_samples":
        centred = [bool(c.get("sft_samples", False)) for c in batch]
    else:
        centred = [False] * B
    return {
        **enc,
        "mask": mask,  # (B, K)
        "ranks": ranks,  # (B, K)
        "task_ids": torch.tensor([task_index[c.get("task", "default")] for c in batch for _ in c["responses"]]),
        "centred": torch.tensor(centred),
    }


def to_grid(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) scores of the real responses -> (B, K) with zeros at padding."""
    grid = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    return grid.masked_scatter(mask.to(flat.device), flat)


# --------------------------------------------------------------------------- the loss


class RunningTaskMoments:
    """EMA of per-task score mean and variance: the prior pooled into the task term."""

    def __init__(self, n_tasks: int, momentum: float, weight: float):
        self.mean = torch.zeros(n_tasks, dtype=torch.float64)
        self.var = torch.ones(n_tasks, dtype=torch.float64)
        self.seen = torch.zeros(n_tasks, dtype=torch.bool)
        self.momentum, self.weight = momentum, weight

    def prior(self, task_ids: torch.Tensor) -> dict:
        """The prior for a batch of ``task_ids``: each seen task's running moments, counted
        ``weight`` times the task's scores in the batch."""
        in_batch = torch.bincount(task_ids.cpu(), minlength=len(self.mean)).double()
        return {"prior_mean": self.mean, "prior_var": self.var,
                "prior_count": self.seen.double() * self.weight * in_batch}

    def update(self, scores: torch.Tensor, task_ids: torch.Tensor) -> None:
        n, mean, var = batch_task_moments(scores.double().cpu(), task_ids.cpu(), len(self.mean))
        here = n > 0
        first = here & ~self.seen
        m = self.momentum
        self.mean = torch.where(first, mean, torch.where(here, m * self.mean + (1 - m) * mean, self.mean))
        self.var = torch.where(first, var, torch.where(here, m * self.var + (1 - m) * var, self.var))
        self.seen |= here

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.seen = state["mean"], state["var"], state["seen"]


def score_loss(cfg: ScoreTrainConfig, flat: torch.Tensor, batch: dict, running: RunningTaskMoments | None):
    """The objective's loss on one minibatch and every term's statistics."""
    scores = to_grid(flat, batch["mask"])  # (B, K)
    mask = batch["mask"].to(flat.device)
    loss, stats = ranking_loss(scores, batch["ranks"].to(flat.device), mask)
    if cfg.objective == "am":
        am = cfg.am
        center, s_c = centering_loss(scores, mask, batch["centred"].to(flat.device))
        bound, s_b = bound_loss(scores, mask, am.margin)
        prior = {k: v.to(flat.device) for k, v in running.prior(batch["task_ids"]).items()}
        task, s_t = task_moment_loss(flat, batch["task_ids"].to(flat.device), len(running.mean),
                                     None if am.scale == "free" else am.target_std, eps=am.std_floor**2, **prior)
        loss = loss + am.center_coef * center + am.bound_coef * bound + am.task_coef * task
        stats.update(s_c | s_b | s_t)
        running.update(flat.detach(), batch["task_ids"])
    stats["loss/total"] = loss.item()
    stats["score/mean"] = flat.mean().item()
    stats["score/std"] = flat.std().item() if flat.numel() > 1 else 0.0
    return loss, stats


# --------------------------------------------------------------------------- metrics


def comparison_metrics(comparisons: list[dict], scores: list[list[float]], n_bins: int = 10,
                       margin: float | None = None) -> dict:
    """Held-out metrics of per-response scores, overall and per task.

    accuracy: pairs ordered like the gold reward (pairs with distinct gold; falls back
    to the labels where there is no gold); accuracy_labels: pairs ordered like the
    labelers; ece: calibration of σ(s_i - s_j) against the labels.
    """
    def block(idx: list[int]) -> dict:
        gold_right = gold_n = label_right = label_n = 0
        probs, labels, flat = [], [], []
        for c_i in idx:
            c, s = comparisons[c_i], scores[c_i]
            flat.extend(s)
            ranks = ranks_of(c["ranking"])
            for i in range(len(s)):
                for j in range(i + 1, len(s)):
                    label_i_wins = ranks[i] < ranks[j]
                    label_right += (s[i] > s[j]) == label_i_wins and s[i] != s[j]
                    label_n += 1
                    probs.append(1 / (1 + math.exp(-(s[i] - s[j]))))
                    labels.append(1.0 if label_i_wins else 0.0)
                    if "gold" in c and c["gold"][i] != c["gold"][j]:
                        gold_right += (s[i] > s[j]) == (c["gold"][i] > c["gold"][j]) and s[i] != s[j]
                        gold_n += 1
        ece, bins = expected_calibration_error(torch.tensor(probs), torch.tensor(labels), n_bins)
        values = np.array(flat, dtype=np.float64)
        out = {
            "accuracy": gold_right / gold_n if gold_n else label_right / max(label_n, 1),
            "accuracy_labels": label_right / max(label_n, 1),
            "ece": ece,
            "score_mean": float(values.mean()),
            "score_std": float(values.std()),
            "n": len(idx),
            "pairs": label_n,
            "gold_pairs": gold_n,
        }
        if margin is not None:
            out["frac_within_margin"] = float(np.mean(np.abs(values) <= margin))
        return out, bins

    overall, bins = block(list(range(len(comparisons))))
    tasks = sorted({c.get("task", "default") for c in comparisons})
    per_task = {t: block([i for i, c in enumerate(comparisons) if c.get("task", "default") == t])[0] for t in tasks}
    means = [v["score_mean"] for v in per_task.values()]
    return {
        **overall,
        "margin": margin,
        "across_task_std_of_means": float(np.std(means)) if means else 0.0,
        "per_task": per_task,
        "reliability": bins,
    }


def score_comparisons(model, tokenizer, comparisons: list[dict], batch_size: int, max_length: int) -> list[list[float]]:
    prompts = [c["prompt"] for c in comparisons for _ in c["responses"]]
    responses = [r for c in comparisons for r in c["responses"]]
    flat = score_texts(model, tokenizer, prompts, responses, batch_size, max_length).tolist()
    out, i = [], 0
    for c in comparisons:
        out.append(flat[i : i + len(c["responses"])])
        i += len(c["responses"])
    return out


def score_rows(comparisons: list[dict], scores: list[list[float]]) -> list[dict]:
    """One row per held-out response, for the plots."""
    rows = []
    for c_i, (c, s) in enumerate(zip(comparisons, scores)):
        for r_i, value in enumerate(s):
            rows.append({"task": c.get("task", "default"), "score": value,
                         "gold": c["gold"][r_i] if "gold" in c else None, "comparison": c_i, "response": r_i})
    return rows


# --------------------------------------------------------------------------- training


def epoch_order(tasks: list[str], seed: int, stratify: bool) -> list[int]:
    """The order of one epoch: a seeded shuffle, or task-stratified — each task's comparisons
    shuffled, then dealt round-robin (tasks in a fresh random order each round), so any run of
    consecutive comparisons holds the tasks in proportion."""
    rng = random.Random(seed)
    if not stratify:
        order = list(range(len(tasks)))
        rng.shuffle(order)
        return order
    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        by_task.setdefault(t, []).append(i)
    for idx in by_task.values():
        rng.shuffle(idx)
    # each task's items are spread evenly over [0, 1): item j of n sits at (j + u) / n
    keyed = [((j + rng.random()) / len(idx), i) for idx in by_task.values() for j, i in enumerate(idx)]
    return [i for _, i in sorted(keyed)]


def score_optimizer(model, cfg: ScoreTrainConfig) -> torch.optim.AdamW:
    """AdamW with the new scalar head at its own (larger) learning rate."""
    head_params = list(model.head.parameters())
    head_ids = {id(p) for p in head_params}
    body_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    return adamw([{"params": body_params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}],
                 weight_decay=cfg.weight_decay)


def score_step(state: TrainState, comparisons: list[dict], tokenizer, task_index: dict[str, int],
               running: RunningTaskMoments, cfg: ScoreTrainConfig) -> None:
    """One step: every response of the minibatch's comparisons scored once, the objective's loss, one update."""
    batch = collate(comparisons, tokenizer, task_index, cfg.max_length, cfg.am.center_on)
    device = state.run.device
    flat = state.model(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (N,)
    loss, stats = score_loss(cfg, flat, batch, running if cfg.objective == "am" else None)
    state.update(loss, stats)


def evaluate(state: TrainState, epoch: int, eval_set: list[dict], tokenizer, cfg: ScoreTrainConfig
             ) -> list[list[float]]:
    """Score the held-out comparisons, log their metrics for ``epoch``; returns the scores."""
    scores = score_comparisons(state.unwrapped, tokenizer, eval_set, cfg.eval_batch_size, cfg.max_length)
    metrics = comparison_metrics(eval_set, scores, cfg.n_bins, cfg.am.margin if cfg.objective == "am" else None)
    state.run.log({"step": state.step, "epoch": epoch, **{
        f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}})
    state.run.print(f"epoch {epoch}: loss {state.last['loss/total']:.4f}  held-out accuracy {metrics['accuracy']:.4f} "
                    f"(labels {metrics['accuracy_labels']:.4f})  ECE {metrics['ece']:.4f}  "
                    f"across-task std of means {metrics['across_task_std_of_means']:.4f}")
    return scores


def save_and_summarise(state: TrainState, train_set: list[dict], eval_set: list[dict], scores, tokenizer,
                       tasks: list[str], cfg: ScoreTrainConfig, start_time: float) -> dict:
    """4. training-data score statistics saved with the model (per-task normalisation reads them);
    5. the held-out summary and raw scores (scored here when a resumed run had no epoch left)."""
    run, unwrapped = state.run, state.unwrapped
    train_scores = score_comparisons(unwrapped, tokenizer, train_set, cfg.eval_batch_size, cfg.max_length)
    score_stats = per_task_stats([s for ss in train_scores for s in ss],
                                 [c.get("task", "default") for c, ss in zip(train_set, train_scores) for _ in ss])
    if scores is None:
        scores = score_comparisons(unwrapped, tokenizer, eval_set, cfg.eval_batch_size, cfg.max_length)
    summary = summarise(cfg.objective, eval_set, scores, cfg.n_bins, cfg.am.margin)
    summary.update({"steps": state.step, "skipped_updates": state.skipped, "seconds": time.time() - start_time,
                    "train_score_stats": score_stats})
    if run.is_main:
        unwrapped.save_pretrained(run.out / "model", extra={"objective": cfg.objective, "score_stats": score_stats,
                                                            "tasks": tasks, "margin": cfg.am.margin})
        atomic_write_jsonl(run.out / "scores_eval.jsonl", score_rows(eval_set, scores))
    run.finish(summary)
    run.print(f"done in {summary['seconds']:.0f}s: accuracy {summary['accuracy']:.4f}  ECE {summary['ece']:.4f}  "
              f"within ±{cfg.am.margin:g}: {summary['frac_within_margin']:.4f} -> {run.out}")
    return summary


def train(cfg: ScoreTrainConfig) -> dict:
    """1. comparisons; 2. the score model; 3. resume; 4. epochs of steps, each with a held-out
    evaluation and a checkpoint; 5. score statistics, the model and summary.json."""
    from .models import freeze_lower_layers, load_score_model

    start_time = time.time()
    train_set = load_comparisons(cfg.train_data, cfg.data_kind)  # 1. a bad file stops us before a model loads
    eval_set = load_comparisons(cfg.eval_data, cfg.data_kind)
    tasks = sorted({c.get("task", "default") for c in train_set + eval_set})
    task_index = {t: i for i, t in enumerate(tasks)}
    run = Run(cfg, cfg.objective, log_with=cfg.log_with, fresh_files=("scores_eval.jsonl",), fresh_dirs=("model",))
    model, tokenizer = load_score_model(cfg.model, device=run.device, init_from=cfg.init_from, trainable=True)  # 2.
    freeze_lower_layers(model, cfg.train_layers)
    running = RunningTaskMoments(len(tasks), cfg.am.running_momentum, cfg.am.running_weight)
    state = TrainState(run, model, score_optimizer(model, cfg), cfg, len(train_set), running=running)
    state.resume(run.start(cfg.resume))  # 3.
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run.print(f"{len(train_set)} train / {len(eval_set)} held-out comparisons, tasks {tasks}; "
              f"{n_trainable / 1e6:.1f}M trainable parameters, {state.total} steps")

    scores = None  # the last epoch's held-out scores are the final ones: the model is done changing
    for epoch in range(state.epoch, cfg.epochs):  # 4.
        # Dropout off by default: the AM's moment terms read a batch's score spread, and dropout
        # noise is spread the head can amplify for free — scores then collapse to a constant
        # at eval time (seen with MiniLM, dropout 0.1: held-out std 0.08 against 0.2-0.4 in
        # training, and every task's held-out mean off by -0.56).
        state.model.train(cfg.dropout)
        order = epoch_order([c.get("task", "default") for c in train_set], cfg.seed * 1000 + epoch, cfg.stratify)
        for b in state.batches_left(epoch):
            batch = [train_set[i] for i in order[b * cfg.batch_size : (b + 1) * cfg.batch_size]]
            score_step(state, batch, tokenizer, task_index, running, cfg)
        scores = evaluate(state, epoch, eval_set, tokenizer, cfg)
        run.checkpoint(state.step, state.state_dict())
    return save_and_summarise(state, train_set, eval_set, scores, tokenizer, tasks, cfg, start_time)


def summarise(objective: str, comparisons: list[dict], scores: list[list[float]], n_bins: int, margin: float) -> dict:
    """summary.json: the output contract of a score-model run (see README)."""
    return {"objective": objective, **comparison_metrics(comparisons, scores, n_bins, margin)}


def per_task_normalised_run(rm_dir: str | Path, out_dir: str | Path, n_bins: int = 10) -> dict:
    """The per-task-normalised RM: an RM run's held-out scores z-scored with its own
    training statistics, written as a run directory of its own (objective 'rm-pertask')."""
    rm_dir, out = Path(rm_dir), Path(out_dir)
    cfg_text = (rm_dir / "config.yaml").read_text()
    summary = json.loads((rm_dir / "summary.json").read_text())
    cfg = yaml_load(cfg_text)
    eval_set = load_comparisons(cfg["eval_data"], cfg["data_kind"])
    rows = read_jsonl(rm_dir / "scores_eval.jsonl")
    normed = normalise_per_task(torch.tensor([r["score"] for r in rows], dtype=torch.float64),
                                [r["task"] for r in rows], summary["train_score_stats"]).tolist()
    scores, i = [], 0
    for c in eval_set:
        scores.append(normed[i : i + len(c["responses"])])
        i += len(c["responses"])
    margin = summary.get("margin") or 2.5
    result = summarise("rm-pertask", eval_set, scores, n_bins, margin)
    result["source"] = str(rm_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out / "scores_eval.jsonl", score_rows(eval_set, scores))
    atomic_write_json(out / "summary.json", result)
    atomic_write_text(out / "config.yaml", cfg_text)
    return result
