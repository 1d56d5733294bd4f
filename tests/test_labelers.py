"""Simulated labelers: closed-form agreement against simulation, hand-computed cases."""

import math

import numpy as np
import pytest

from stable_rlhf.testbed.labelers import (
    LabelerConfig,
    label_groups,
    measured_agreement,
    pair_agreement_probability,
    predicted_agreement,
    sample_ranking,
)


def test_pair_probability_hand_computed():
    cfg = LabelerConfig(temperature=0.15, flip_rate=0.1)
    s = 1 / (1 + math.exp(-1.0))  # σ(0.15 / 0.15)
    assert pair_agreement_probability(0.15, cfg) == pytest.approx(0.9 * s + 0.1 * (1 - s))
    assert pair_agreement_probability(-0.15, cfg) == pytest.approx(0.9 * s + 0.1 * (1 - s))


def test_noiseless_labelers_follow_gold_and_full_flip_reverses_it():
    rng = np.random.default_rng(0)
    golds = [list(rng.random(4)) for _ in range(50)]
    rankings, stats = label_groups(golds, LabelerConfig(temperature=0, flip_rate=0), seed=1)
    assert stats["labeler/agreement_measured"] == 1.0
    assert all(r == sorted(range(4), key=lambda i: -g[i]) for r, g in zip(rankings, golds))
    _, stats = label_groups(golds, LabelerConfig(temperature=0, flip_rate=1), seed=1)
    assert stats["labeler/agreement_measured"] == 0.0
    assert stats["labeler/agreement_predicted"] == 0.0


def test_rankings_are_permutations():
    rng = np.random.default_rng(3)
    for _ in range(100):
        r = sample_ranking(rng.random(5), LabelerConfig(), rng)
        assert sorted(r) == list(range(5))


@pytest.mark.parametrize("temperature,flip", [(0.15, 0.1), (0.3, 0.0), (0.05, 0.2)])
def test_measured_agreement_matches_prediction_on_200_prompts(temperature, flip):
    # 200 prompts x C(4,2) pairs: the acceptance bound is 3 points.
    rng = np.random.default_rng(7)
    golds = [list(np.round(rng.random(4), 2)) for _ in range(200)]
    cfg = LabelerConfig(temperature=temperature, flip_rate=flip)
    _, stats = label_groups(golds, cfg, seed=11)
    measured, predicted = stats["labeler/agreement_measured"], stats["labeler/agreement_predicted"]
    print(f"T={temperature} f={flip}: measured {measured:.4f} predicted {predicted:.4f} over {stats['labeler/pairs']} pairs")
    assert abs(measured - predicted) < 0.03


def test_plackett_luce_pair_marginals_are_bradley_terry():
    # Many labelers on ONE group of K=4: each pair's empirical order frequency is σ(Δ/T).
    gold = [0.9, 0.6, 0.5, 0.1]
    cfg = LabelerConfig(temperature=0.2, flip_rate=0.0)
    rng = np.random.default_rng(5)
    rankings = [sample_ranking(gold, cfg, rng) for _ in range(20000)]
    for i, j in [(0, 1), (1, 2), (0, 3), (2, 3)]:
        freq = np.mean([r.index(i) < r.index(j) for r in rankings])
        expected = 1 / (1 + math.exp(-(gold[i] - gold[j]) / cfg.temperature))
        assert abs(freq - expected) < 0.015, (i, j, freq, expected)


def test_per_task_scale_divides_gold_gaps():
    cfg = LabelerConfig(temperature=0.1, flip_rate=0.0)
    p_raw, _ = predicted_agreement([[4.0, 0.0]], cfg)
    p_scaled, _ = predicted_agreement([[4.0, 0.0]], cfg, scales=[40.0])
    assert p_raw == pytest.approx(1 / (1 + math.exp(-40)))
    assert p_scaled == pytest.approx(1 / (1 + math.exp(-1)))


def test_ties_are_excluded_from_agreement():
    agree, n = measured_agreement([[1.0, 1.0, 0.0]], [[0, 1, 2]])
    assert n == 2 and agree == 1.0


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        LabelerConfig(flip_rate=1.5)
    with pytest.raises(ValueError):
        LabelerConfig(temperature=-1)


def test_panel_mean_is_precise_and_its_spread_is_one_labelings_error():
    from stable_rlhf.testbed.labelers import agreement_panel

    rng = np.random.default_rng(2)
    golds = [list(np.round(rng.random(3), 2)) for _ in range(200)]
    cfg = LabelerConfig()
    predicted, _ = predicted_agreement(golds, cfg)
    panel = agreement_panel(golds, cfg, seed=0, draws=60)
    print(f"panel mean {panel['mean']:.4f} (std {panel['std']:.4f}) predicted {predicted:.4f}")
    assert abs(panel["mean"] - predicted) < 0.01
    singles = [label_groups(golds, cfg, seed=s)[1]["labeler/agreement_measured"] for s in range(100, 160)]
    assert np.std(singles) == pytest.approx(panel["std"], rel=0.35)
