"""Simulated labelers: rankings of K responses drawn from a noisy model of the gold reward.

A labeler ranks K responses by sorting ``g_i / T + Gumbel_i`` (best first), where g is
the gold reward (divided by the task's reward range when ``per_task_scale``, so that
the noise means the same thing on every task) and T the temperature. Gumbel-perturbed
sorting samples a Plackett-Luce ranking, the K-way generalisation of Bradley-Terry:
the difference of two independent Gumbels is logistic, so every pair (i, j) of the
ranking is ordered ``i`` above ``j`` with probability exactly ``σ((g_i - g_j) / T)``.
With probability ``flip_rate`` the labeler then reverses the whole ranking (a careless
or adversarial annotator; for K = 2 this is the usual label-flip noise).

So the agreement of the labels with the gold order, over pairs with distinct gold, has
the closed form ``(1 - f)·σ(|Δ|/T) + f·(1 - σ(|Δ|/T))`` averaged over pairs, which
``predicted_agreement`` returns and the tests check against simulation.
InstructGPT reports ~73% inter-labeler agreement; the defaults land near that.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import numpy as np

from ..data import ranks_of


@dataclasses.dataclass
class LabelerConfig:
    """Noise model of the simulated labelers."""

    temperature: float = 0.15
    """Bradley-Terry temperature on the (range-normalised) gold reward; 0 = noiseless"""
    flip_rate: float = 0.1
    """probability that a labeler reverses its whole ranking"""
    per_task_scale: bool = True
    """divide gold rewards by the task's reward range first, so noise is comparable across tasks"""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 <= self.flip_rate <= 1:
            raise ValueError("flip_rate must be in [0, 1]")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _scaled(gold: Sequence[float], scale: float) -> np.ndarray:
    return np.asarray(gold, dtype=np.float64) / scale


def sample_ranking(
    gold: Sequence[float], cfg: LabelerConfig, rng: np.random.Generator, scale: float = 1.0
) -> list[int]:
    """One labeler's ranking of K responses: indices best-first."""
    g = _scaled(gold, scale)
    if cfg.temperature == 0:
        # Noiseless: gold order, ties broken at random.
        keys = g * 1e9 + rng.random(len(g))
    else:
        keys = g / cfg.temperature + rng.gumbel(size=len(g))
    ranking = [int(i) for i in np.argsort(-keys, kind="stable")]
    if rng.random() < cfg.flip_rate:
        ranking.reverse()
    return ranking


def pair_agreement_probability(delta: float, cfg: LabelerConfig) -> float:
    """P(labeler orders a pair as gold does), for a gold gap |delta| > 0 (already scaled)."""
    p = 1.0 if cfg.temperature == 0 else _sigmoid(abs(delta) / cfg.temperature)
    return (1 - cfg.flip_rate) * p + cfg.flip_rate * (1 - p)


def _gold_pairs(gold: Sequence[float]):
    for i, j in itertools.combinations(range(len(gold)), 2):
        if gold[i] != gold[j]:
            yield i, j


def predicted_agreement(
    golds: Sequence[Sequence[float]], cfg: LabelerConfig, scales: Sequence[float] | None = None
) -> tuple[float, int]:
    """Expected fraction of distinct-gold pairs the labels order like the gold reward."""
    total, n = 0.0, 0
    for k, gold in enumerate(golds):
        g = _scaled(gold, scales[k] if scales else 1.0)
        for i, j in _gold_pairs(gold):
            total += pair_agreement_probability(g[i] - g[j], cfg)
            n += 1
    return (total / n if n else float("nan")), n


def measured_agreement(golds: Sequence[Sequence[float]], rankings: Sequence[Sequence[int]]) -> tuple[float, int]:
    """Fraction of distinct-gold pairs that the rankings order like the gold reward."""
    agree, n = 0, 0
    for gold, ranking in zip(golds, rankings):
        position = ranks_of(ranking)
        for i, j in _gold_pairs(gold):
            gold_says_i = gold[i] > gold[j]
            label_says_i = position[i] < position[j]
            agree += gold_says_i == label_says_i
            n += 1
    return (agree / n if n else float("nan")), n


def label_groups(
    golds: Sequence[Sequence[float]],
    cfg: LabelerConfig,
    seed: int,
    scales: Sequence[float] | None = None,
) -> tuple[list[list[int]], dict]:
    """Rank every group of K responses; return the rankings and agreement statistics."""
    rng = np.random.default_rng(seed)
    rankings = [
        sample_ranking(gold, cfg, rng, scales[k] if scales else 1.0) for k, gold in enumerate(golds)
    ]
    measured, n_pairs = measured_agreement(golds, rankings)
    predicted, _ = predicted_agreement(golds, cfg, scales)
    stats = {
        "labeler/agreement_measured": measured,
        "labeler/agreement_predicted": predicted,
        "labeler/pairs": n_pairs,
        "labeler/groups": len(golds),
        "labeler/tied_pairs": sum(
            1 for g in golds for i, j in itertools.combinations(range(len(g)), 2) if g[i] == g[j]
        ),
    }
    return rankings, stats


def agreement_panel(
    golds: Sequence[Sequence[float]],
    cfg: LabelerConfig,
    seed: int,
    scales: Sequence[float] | None = None,
    draws: int = 200,
) -> dict:
    """Agreement of ``draws`` independent labelings of the same groups.

    One labeling of a few hundred prompts measures agreement only to ±2-3 points (1σ):
    pairs are few, and the pairs of one ranking move together. The panel's mean checks
    the noise model against ``predicted_agreement`` to a fraction of a point, and its
    spread is the sampling error to expect of any single labeling.
    """
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        rankings = [
            sample_ranking(gold, cfg, rng, scales[k] if scales else 1.0) for k, gold in enumerate(golds)
        ]
        values.append(measured_agreement(golds, rankings)[0])
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)), "draws": draws}
