"""Score sources for PPO and rejection sampling: ``reward(records, responses) -> (N,)``.

    gold        the testbed's programmatic gold reward, range-normalised to [0, 1] per task
                (every task weighs the same); the oracle upper bound
    rm          a trained reward model, raw scores (PPO normalises them globally with running
                moments, the common practice: ``RewardConfig.normalize='auto'``)
    am          a trained advantage model: its scores are advantages, used as they are
    rm-pertask  a reward model z-normalised per task with its training-data statistics

``records`` are prompt records (``prompt``, ``task``, ``meta``), so the gold reward can
check each response against its task's hidden answer.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch

SOURCES = ("gold", "rm", "am", "rm-pertask")


@dataclasses.dataclass
class RewardConfig:
    """Which score PPO / rejection sampling optimises."""

    source: Literal["gold", "rm", "am", "rm-pertask"] = "gold"
    """gold (oracle), rm, am or rm-pertask (a per-task-normalised RM)"""
    path: Optional[str] = None
    """saved score model directory (rm / am / rm-pertask): a train-rm / train-am run's model/"""
    normalize: Literal["auto", "none", "running", "scale"] = "auto"
    """running: z-score with running global mean/std of all scores seen; scale: divide by the
    score model's standard deviation on its own training responses (saved with it), no
    centring; auto: running for rm, scale for am (an AM is already centred, and in the RM's
    unit its scores weigh against β·KL as the RM arm's do), none for gold (in [0, 1]) and
    rm-pertask (z-scored per task)"""
    batch_size: int = 32
    """responses per score-model forward pass"""
    max_length: int = 512
    """tokens per (prompt, response) for the score model"""
    workers: int = 2
    """processes for the gold reward's code sandbox"""

    def __post_init__(self):
        if self.source != "gold" and not self.path:
            raise ValueError(f"reward.source={self.source} needs reward.path (a saved score model directory)")

    @property
    def running_normalisation(self) -> bool:
        return self.normalize == "running" or (self.normalize == "auto" and self.source == "rm")

    @property
    def training_scale(self) -> bool:
        """Whether scores are divided by the score model's training-time standard deviation."""
        return self.normalize == "scale" or (self.normalize == "auto" and self.source == "am")


class GoldReward:
    """The testbed's gold reward, range-normalised per task to [0, 1]."""

    name = "gold"

    def __init__(self, workers: int = 2):
        self.workers = workers

    def __call__(self, records: list[dict], responses: list[str]) -> torch.Tensor:
        from .testbed.tasks import TASKS, gold_rewards

        raw = gold_rewards(records, responses, workers=self.workers)
        return torch.tensor([TASKS[r["task"]].normalise(g) for r, g in zip(records, raw)], dtype=torch.float32)


class ModelReward:
    """A saved RM / AM (optionally per-task normalised) as a reward."""

    def __init__(self, cfg: RewardConfig, device=None):
        from .scoring import ScoreSource

        self.name = cfg.source
        normalize = "per_task" if cfg.source == "rm-pertask" else "none"
        self.source = ScoreSource.load(cfg.path, normalize=normalize, device=device,
                                       batch_size=cfg.batch_size, max_length=cfg.max_length)
        trained_as = self.source.objective
        if (cfg.source == "am") != (trained_as == "am"):
            raise ValueError(f"reward.source={cfg.source} but {cfg.path} was trained as objective={trained_as}")
        self.scale = 1.0
        if cfg.training_scale:
            stats = self.model.extra.get("score_stats", {}).get("global")
            if not stats or not stats.get("std", 0) > 0:
                raise ValueError(f"{cfg.path}: reward.normalize=scale needs the training score statistics "
                                 "saved with the model (score_model.json extra.score_stats.global.std)")
            self.scale = float(stats["std"])

    @property
    def model(self):
        return self.source.model

    def __call__(self, records: list[dict], responses: list[str]) -> torch.Tensor:
        scores = self.source([r["prompt"] for r in records], responses, [r.get("task", "default") for r in records])
        return scores.float() / self.scale


def build_reward(cfg: RewardConfig, device=None):
    """The score source a config names."""
    if cfg.source == "gold":
        return GoldReward(cfg.workers)
    return ModelReward(cfg, device)


def check_reward_inputs(cfg: RewardConfig, prompts: list[dict], prompts_spec: str) -> None:
    """Before any model loads: the gold reward can score every prompt (``check_gold_prompts``);
    a score model path is a saved score model."""
    from pathlib import Path

    from .data import DataError

    if cfg.source == "gold":
        check_gold_prompts(prompts, prompts_spec)
    elif not Path(cfg.path, "score_model.json").is_file():
        raise DataError(cfg.path, None, "reward.path", "not a saved score model directory (no score_model.json)")


def check_gold_prompts(prompts: list[dict], prompts_spec: str) -> None:
    """Refuse prompts the gold reward cannot score, with a ``DataError`` naming
    file:line:field: a task that is missing (read as "default") or not a testbed task, or
    a ``meta`` without what the task's scorer reads (``tasks.gold_record_problem``).

    Loaded records no longer know their lines, so when one fails, ``prompts_spec`` is read
    again with the check applied, which locates every failing line (prompts that did not
    come from ``prompts_spec`` are named by their index and id instead).
    """
    from .data import DataError, load_records
    from .testbed.tasks import gold_record_problem

    for i, record in enumerate(prompts):
        problem = gold_record_problem(record)
        if problem is None:
            continue
        try:
            load_records(prompts_spec, "prompt", check=gold_record_problem)
        except DataError as located:
            if located.line is not None:
                raise
        field, message = problem
        raise DataError(prompts_spec, None, field, f"prompt {i} (id {record.get('id')!r}): {message}")
