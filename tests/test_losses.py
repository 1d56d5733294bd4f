"""Losses against hand-computed values and plain-loop references (float64)."""

import itertools
import math

import pytest
import torch

from stable_rlhf.losses import (
    batch_task_moments,
    bound_loss,
    centering_loss,
    expected_calibration_error,
    pair_confidences,
    ranking_loss,
    task_moment_loss,
)


def nls(x):  # -log σ(x)
    return math.log1p(math.exp(-x))


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def test_pairwise_loss_hand_computed():
    loss, stats = ranking_loss(t([[1.0, 0.0]]), torch.tensor([[0, 1]]), torch.tensor([[True, True]]))
    assert loss.item() == pytest.approx(nls(1.0))
    assert stats["rank/accuracy"] == 1.0 and stats["rank/pairs"] == 1


def test_kway_loss_hand_computed_and_per_comparison_weighting():
    # K = 3 ranked 0 > 1 > 2 with scores 2, 1, 0: pairs with gaps 1, 2, 1.
    k3 = (nls(1) + nls(2) + nls(1)) / 3
    # A K = 2 comparison in the same batch, padded to K = 3; the worse response scores higher.
    scores = t([[2.0, 1.0, 0.0], [0.0, 0.5, 99.0]])
    ranks = torch.tensor([[0, 1, 2], [0, 1, 2]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss, stats = ranking_loss(scores, ranks, mask)
    assert loss.item() == pytest.approx((k3 + nls(-0.5)) / 2)
    assert stats["rank/accuracy"] == pytest.approx(3 / 4) and stats["rank/pairs"] == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ranking_loss_matches_a_plain_loop(dtype):
    g = torch.Generator().manual_seed(0)
    B, K = 5, 4
    scores = torch.randn(B, K, generator=g, dtype=torch.float64)
    ranks = torch.stack([torch.randperm(K, generator=g) for _ in range(B)])
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[1, 3] = mask[2, 2:] = False
    ranks[2] = torch.tensor([1, 0, 2, 3])  # ranks among the two real ones still 0/1
    expected = []
    for b in range(B):
        real = [k for k in range(K) if mask[b, k]]
        terms = [nls((scores[b, i] - scores[b, j]).item()) for i, j in itertools.permutations(real, 2)
                 if ranks[b, i] < ranks[b, j]]
        expected.append(sum(terms) / len(terms))
    loss, _ = ranking_loss(scores.to(dtype), ranks, mask)
    assert loss.item() == pytest.approx(sum(expected) / B, rel=1e-5 if dtype == torch.float32 else 1e-12)


def test_ranking_loss_gradient_pushes_winner_up():
    scores = t([[0.0, 0.0]]).requires_grad_()
    loss, _ = ranking_loss(scores, torch.tensor([[1, 0]]), torch.tensor([[True, True]]))
    loss.backward()
    assert scores.grad[0, 1] < 0 < scores.grad[0, 0]  # descent raises the winner (index 1)


def test_centering_loss_hand_computed():
    scores, mask = t([[1.0, 3.0], [2.0, -2.0]]), torch.ones(2, 2, dtype=torch.bool)
    loss, _ = centering_loss(scores, mask, torch.tensor([True, True]))
    assert loss.item() == pytest.approx((2.0**2 + 0.0) / 2)
    loss, _ = centering_loss(scores, mask, torch.tensor([True, False]))
    assert loss.item() == pytest.approx(4.0)
    loss, stats = centering_loss(scores, mask, torch.tensor([False, False]))
    assert loss.item() == 0.0
    masked = torch.tensor([[True, False], [True, True]])
    loss, _ = centering_loss(scores, masked, torch.tensor([True, False]))
    assert loss.item() == pytest.approx(1.0)  # mean of the real response only


def test_bound_loss_hand_computed():
    loss, stats = bound_loss(t([[3.0, -4.0, 1.0]]), torch.tensor([[True, True, True]]), margin=2.5)
    assert loss.item() == pytest.approx((0.5**2 + 1.5**2 + 0) / 3)
    assert stats["am/frac_outside_margin"] == pytest.approx(2 / 3)
    loss, _ = bound_loss(t([[3.0, -4.0, 1.0]]), torch.tensor([[False, False, True]]), margin=2.5)
    assert loss.item() == 0.0


def test_task_moment_loss_hand_computed():
    scores = t([1.0, 3.0, -1.0, 1.0])
    tasks = torch.tensor([0, 0, 1, 1])
    # task 0: mean 2, std 1; task 1: mean 0, std 1; target std 1 -> 2² + 0 + 0 + 0
    loss, _ = task_moment_loss(scores, tasks, n_tasks=3, target_std=1.0, eps=0.0)
    assert loss.item() == pytest.approx(4.0)
    # target std 2: each task adds (log 1 - log 2)²
    loss, _ = task_moment_loss(scores, tasks, n_tasks=3, target_std=2.0, eps=0.0)
    assert loss.item() == pytest.approx(4.0 + 2 * math.log(2) ** 2)


def test_task_moment_loss_free_spread_equalises_without_scaling():
    # task 0: mean 0, std 1; task 1: mean 0, std 4 -> log s* = mean(log 1, log 4) = log 2
    scores = t([-1.0, 1.0, -4.0, 4.0]).requires_grad_()
    tasks = torch.tensor([0, 0, 1, 1])
    loss, _ = task_moment_loss(scores, tasks, n_tasks=2, target_std=None, eps=0.0)
    assert loss.item() == pytest.approx(2 * math.log(2) ** 2)
    loss.backward()
    # rescaling every score leaves the spread part unchanged: its gradient is orthogonal to the scores
    assert torch.dot(scores.grad, scores.detach()).item() == pytest.approx(0.0, abs=1e-12)
    twice, _ = task_moment_loss(2 * scores.detach(), tasks, n_tasks=2, target_std=None, eps=0.0)
    assert twice.item() == pytest.approx(loss.item())
    # the wider task is pulled in, the narrower pushed out
    assert scores.grad[3] > 0 > scores.grad[1]


def test_task_moment_loss_pools_a_detached_prior():
    scores = t([1.0, 3.0]).requires_grad_()
    tasks = torch.tensor([0, 0])
    prior = dict(prior_mean=t([0.0]), prior_var=t([1.0]), prior_count=t([2.0]))
    loss, _ = task_moment_loss(scores, tasks, n_tasks=1, target_std=1.0, eps=0.0, **prior)
    # n = 4, Σa = 4, Σa² = 10 + 2·(1 + 0) = 12 -> mean 1, var 2
    assert loss.item() == pytest.approx(1.0 + (0.5 * math.log(2)) ** 2)
    loss.backward()
    assert scores.grad.abs().sum() > 0
    # a task seen only through its prior still counts; one with neither is left out
    loss, _ = task_moment_loss(t([0.0]), torch.tensor([0]), n_tasks=2, target_std=1.0, eps=0.0,
                               prior_mean=t([0.0, 3.0]), prior_var=t([0.0, 1.0]), prior_count=t([0.0, 5.0]))
    assert loss.item() > 9.0 - 1e-9  # task 1's mean 3 -> 9 (+ task 0's degenerate spread)


def test_batch_task_moments():
    n, mean, var = batch_task_moments(t([1.0, 3.0, 5.0]), torch.tensor([0, 0, 2]), 3)
    assert n.tolist() == [2, 0, 1] and mean.tolist() == [2, 0, 5] and var.tolist() == [1, 0, 0]


def test_pair_confidences():
    probs = pair_confidences(t([[2.0, 0.0, 1.0]]), torch.tensor([[0, 2, 1]]), torch.tensor([[True] * 3]))
    expected = sorted([1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-1))])
    assert sorted(probs.tolist()) == pytest.approx(expected)


def test_ece_hand_computed_and_bins():
    probs, labels = t([0.92, 0.92, 0.62, 0.38]), t([1, 0, 1, 1])
    # confidences 0.92, 0.92, 0.62, 0.62; correct 1, 0, 1, 0
    ece, bins = expected_calibration_error(probs, labels, n_bins=10)
    assert ece == pytest.approx(2 / 4 * abs(0.5 - 0.92) + 2 / 4 * abs(0.5 - 0.62))
    assert len(bins) == 10 and sum(b["count"] for b in bins) == 4
    assert bins[8]["count"] == 2 and bins[8]["accuracy"] == 0.5 and bins[0]["confidence"] is None
    assert expected_calibration_error(t([1.0, 0.5]), t([1, 1]), n_bins=5)[1][-1]["count"] == 1


def test_ece_is_small_for_calibrated_and_large_for_overconfident_predictions():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(20000, generator=g, dtype=torch.float64)
    labels = (torch.rand(20000, generator=g, dtype=torch.float64) < p).double()
    assert expected_calibration_error(p, labels)[0] < 0.02
    sharpened = torch.sigmoid(4 * torch.logit(p))
    assert expected_calibration_error(sharpened, labels)[0] > 0.1


def test_std_floor_bounds_the_log_spread_gradient():
    # Two nearly equal scores of one task: without a floor d/ds (log s)² ~ 1/s explodes.
    def grad_norm(eps):
        scores = t([0.5, 0.5 + 1e-4]).requires_grad_()
        loss, _ = task_moment_loss(scores, torch.tensor([0, 0]), n_tasks=1, target_std=0.8, eps=eps)
        loss.backward()
        return scores.grad.norm().item()

    assert grad_norm(1e-12) > 1e3
    assert grad_norm(0.1**2) < 50
