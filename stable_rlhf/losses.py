"""The math: pure tensor functions, each returning ``(loss, stats)`` or a plain tensor.

Trainers call these; nothing copies them. Shapes: B comparisons (prompts), K responses
per comparison (padded to the largest K in the batch, ``mask`` True where a response
is real), ``ranks`` the position of each response in its labeler's ranking (0 = best).

Ranking loss (InstructGPT): all C(K,2) pairs of one prompt form one batch element,
    L = -1/C(K,2) · Σ_{(w,l)} log σ(s_w - s_l).
Advantage-model terms (shared/DESIGN.md): centred, bounded with margin m, and with
per-task mean 0 and a common spread s*.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _better(ranks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, K, K) True where response i is ranked above response j (both real)."""
    valid = mask[:, :, None] & mask[:, None, :]
    return (ranks[:, :, None] < ranks[:, None, :]) & valid


def ranking_loss(scores: torch.Tensor, ranks: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """K-way ranking loss; K = 2 is the pairwise Bradley-Terry loss.

    scores (B, K) float, ranks (B, K) long, mask (B, K) bool. Each comparison weighs the
    same whatever its K (the mean over its own pairs), as in InstructGPT.
    """
    better = _better(ranks, mask)  # (B, K, K)
    diff = scores[:, :, None] - scores[:, None, :]  # (B, K, K) s_i - s_j
    n_pairs = better.sum(dim=(1, 2))  # (B,)
    nll = -(F.logsigmoid(diff) * better).sum(dim=(1, 2)) / n_pairs.clamp(min=1)  # (B,)
    has_pairs = n_pairs > 0
    loss = nll[has_pairs].mean() if has_pairs.any() else scores.sum() * 0.0
    with torch.no_grad():
        correct = ((diff > 0) & better).sum()
        accuracy = correct.float() / better.sum().clamp(min=1)
    return loss, {"loss/rank": loss.item(), "rank/accuracy": accuracy.item(), "rank/pairs": int(better.sum())}


def centering_loss(scores: torch.Tensor, mask: torch.Tensor, centred: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """E_x[(mean_k a(x, y_k))²] over comparisons whose responses are SFT samples.

    ``centred`` (B,) bool selects those comparisons: the mean of the SFT policy's
    samples estimates E_{y~π_SFT}[a(x, y)], which should be 0 for an advantage.
    """
    counts = mask.sum(dim=1).clamp(min=1)  # (B,)
    means = (scores * mask).sum(dim=1) / counts  # (B,)
    if not centred.any():
        zero = scores.sum() * 0.0
        return zero, {"loss/center": 0.0, "am/prompt_mean_abs": 0.0}
    loss = (means[centred] ** 2).mean()
    return loss, {"loss/center": loss.item(), "am/prompt_mean_abs": means[centred].abs().mean().item()}


def bound_loss(scores: torch.Tensor, mask: torch.Tensor, margin: float) -> tuple[torch.Tensor, dict]:
    """E[relu(|a| - m)²] over real responses: zero inside [-m, m], quadratic outside."""
    excess = F.relu(scores.abs() - margin)[mask]
    loss = (excess**2).mean() if excess.numel() else scores.sum() * 0.0
    return loss, {"loss/bound": loss.item(), "am/frac_outside_margin": (excess > 0).float().mean().item()}


def task_moment_loss(
    scores: torch.Tensor,
    task_ids: torch.Tensor,
    n_tasks: int,
    target_std: float,
    prior_mean: torch.Tensor | None = None,
    prior_var: torch.Tensor | None = None,
    prior_count: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict]:
    """Σ_t [μ_t² + (log s_t - log s*)²]: every task's scores have mean 0 and spread s*.

    scores (N,) real responses only, task_ids (N,) long in [0, n_tasks). μ_t and s_t are
    the batch moments of task t, pooled with a detached prior (running estimates: mean,
    variance and an effective count per task) so a task with few scores in the batch is
    still estimated sensibly; gradients flow through the batch part only. Tasks with
    neither batch scores nor prior count are left out.
    """
    device, dtype = scores.device, scores.dtype
    ones = torch.ones_like(scores)
    n_b = torch.zeros(n_tasks, device=device, dtype=dtype).index_add(0, task_ids, ones)  # (T,)
    s1 = torch.zeros(n_tasks, device=device, dtype=dtype).index_add(0, task_ids, scores)  # (T,)
    s2 = torch.zeros(n_tasks, device=device, dtype=dtype).index_add(0, task_ids, scores**2)  # (T,)
    if prior_count is not None:
        pc = prior_count.to(device=device, dtype=dtype).detach()
        pm = prior_mean.to(device=device, dtype=dtype).detach()
        pv = prior_var.to(device=device, dtype=dtype).detach()
        n = n_b + pc
        s1 = s1 + pc * pm
        s2 = s2 + pc * (pv + pm**2)
    else:
        n = n_b
    present = n > 0
    if not present.any():
        zero = scores.sum() * 0.0
        return zero, {"loss/task": 0.0}
    mean = s1[present] / n[present]  # (T',)
    var = (s2[present] / n[present] - mean**2).clamp(min=0.0)
    log_std = 0.5 * torch.log(var + eps)
    per_task = mean**2 + (log_std - math.log(target_std)) ** 2  # (T',)
    loss = per_task.sum()
    return loss, {
        "loss/task": loss.item(),
        "am/task_mean_abs_max": mean.abs().max().item(),
        "am/task_std_min": log_std.exp().min().item(),
        "am/task_std_max": log_std.exp().max().item(),
    }


def batch_task_moments(scores: torch.Tensor, task_ids: torch.Tensor, n_tasks: int):
    """(count, mean, var) per task of a batch, detached: the update for running estimates."""
    with torch.no_grad():
        ones = torch.ones_like(scores)
        n = torch.zeros(n_tasks, dtype=scores.dtype, device=scores.device).index_add(0, task_ids, ones)
        s1 = torch.zeros_like(n).index_add(0, task_ids, scores)
        s2 = torch.zeros_like(n).index_add(0, task_ids, scores**2)
        mean = s1 / n.clamp(min=1)
        var = (s2 / n.clamp(min=1) - mean**2).clamp(min=0.0)
    return n, mean, var


def pair_confidences(scores: torch.Tensor, ranks: torch.Tensor, mask: torch.Tensor):
    """For every labelled pair (i above j): P(i ≻ j) = σ(s_i - s_j). Returns (B·pairs,) probs."""
    better = _better(ranks, mask)
    diff = scores[:, :, None] - scores[:, None, :]
    return torch.sigmoid(diff[better])


def expected_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10
) -> tuple[float, list[dict]]:
    """ECE of binary predictions (Guo et al. 2017), with the reliability-diagram bins.

    probs (N,) = P(label = 1); labels (N,) in {0, 1}. The prediction is the likelier
    class, its confidence max(p, 1 - p) in [0.5, 1]; bins split [0.5, 1] evenly and
    ECE = Σ_b (n_b / N) · |accuracy_b - confidence_b|.
    """
    probs = probs.detach().double().flatten()
    labels = labels.detach().double().flatten()
    confidence = torch.maximum(probs, 1 - probs)
    correct = ((probs >= 0.5).double() == labels).double()
    edges = torch.linspace(0.5, 1.0, n_bins + 1, dtype=torch.float64)
    # bucketize with right=True puts confidence == edge into the bin above; clamp so 1.0
    # falls into the last bin and 0.5 into the first.
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
    n = max(len(probs), 1)
    ece, bins = 0.0, []
    for b in range(n_bins):
        sel = index == b
        count = int(sel.sum())
        if count:
            conf_b, acc_b = confidence[sel].mean().item(), correct[sel].mean().item()
            ece += count / n * abs(acc_b - conf_b)
        else:
            conf_b = acc_b = None
        bins.append({"lo": edges[b].item(), "hi": edges[b + 1].item(), "count": count,
                     "confidence": conf_b, "accuracy": acc_b})
    return ece, bins
