"""The math: pure tensor functions, each returning ``(loss, stats)`` or a plain tensor.

Trainers call these; nothing copies them. Shapes: B comparisons (prompts), K responses
per comparison (padded to the largest K in the batch, ``mask`` True where a response
is real), ``ranks`` the position of each response in its labeler's ranking (0 = best).

Ranking loss (InstructGPT): all C(K,2) pairs of one prompt form one batch element,
    L = -1/C(K,2) · Σ_{(w,l)} log σ(s_w - s_l).
Advantage-model terms (docs/methods.md): centred, bounded with margin m, and with
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
    target_std: float | None,
    prior_mean: torch.Tensor | None = None,
    prior_var: torch.Tensor | None = None,
    prior_count: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict]:
    """Σ_t [μ_t² + (log s_t - log s*)²]: every task's scores have mean 0 and spread s*.

    ``target_std=None`` leaves s* free: log s* is the mean of the tasks' log s_t, so the
    spread part equalises the spreads without setting their scale (its gradient along a
    common rescaling of every score is zero).

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
    log_target = log_std.mean() if target_std is None else math.log(target_std)
    per_task = mean**2 + (log_std - log_target) ** 2  # (T',)
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


# --------------------------------------------------------------------------- token-level helpers
#
# Shapes: B sequences, T response tokens; ``mask`` (B, T) True where a token is real.


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over real tokens (all of them, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over real tokens (Bessel-corrected by default, as TRL)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            return var * 0.0
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over real tokens; padding positions come back as 0.

    ``shift_mean=False`` scales without centring (used for rewards, where the sign
    carries meaning)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def masked_rescale(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x / std over real tokens, not centred (every value keeps its sign); padding 0."""
    return x * torch.rsqrt(masked_var(x, mask) + eps) * mask.to(x.dtype)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int = 2**25) -> torch.Tensor:
    """log p(label) per position. (B, T, V), (B, T) -> (B, T), in float32 at least.

    The label's logit less the row's logsumexp, a few rows at a time (at most
    ``chunk_elements`` logits per chunk): no (B, T, V) log-softmax is ever materialised,
    nor a float32 copy of all bf16 logits. In float32 even for bf16 logits: the ratio
    exp(new - old) of two bf16 log-probabilities is off by up to ~1%, enough to trip the
    PPO clip on its own."""
    rows = max(1, chunk_elements // max(1, logits.shape[-1] * (logits.shape[1] if logits.dim() == 3 else 1)))
    out = []
    for start in range(0, logits.shape[0], rows):
        chunk = logits[start : start + rows]
        chunk = chunk.float() if chunk.dtype in (torch.float16, torch.bfloat16) else chunk
        picked = chunk.gather(-1, labels[start : start + rows].unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(out) if len(out) > 1 else out[0]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical at each position. (B, T, V) -> (B, T)"""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def nll_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mean token NLL of ``labels`` under ``logits`` over real (unmasked) label tokens.

    logits (B, T, V) predict labels (B, T) at the same positions (the caller shifts);
    mask (B, T) True for the tokens that count (response tokens: the prompt is masked).
    The one NLL of SFT, rejection sampling, PPO-ptx and selective rehearsal."""
    token_nll = -logprobs_from_logits(logits, labels)  # (B, T)
    loss = masked_mean(token_nll, mask)
    return loss, {"loss/nll": loss.item(), "nll/tokens": int(mask.sum())}


# --------------------------------------------------------------------------- PPO


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from samples of π (Schulman's k1/k2/k3).

    k1 = log π - log π_ref (unbiased, can be negative; InstructGPT's penalty),
    k2 = ½ (log π - log π_ref)², k3 = (r - 1) - log r with r = π_ref / π (unbiased, ≥ 0)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2, k3)")


def kl_penalised_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
    kl_coef: float, estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -β·KL_t, plus the sequence score at its last real token.

    scores (B,), logprobs/ref_logprobs/mask (B, T). Returns (rewards (B, T), kl (B, T)),
    both 0 at padding. (InstructGPT's objective, as lm-human-preferences and TRL do it.)"""
    kl = kl_per_token(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    last = mask.long().sum(-1).clamp(min=1) - 1  # (B,) responses are right-padded
    rewards = rewards.clone()
    rewards[torch.arange(len(scores), device=scores.device), last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over right-padded responses.

    rewards, values, mask (B, T). The value after the last real token is 0 (the episode
    ends there), so padding never leaks into an advantage. Returns (advantages, returns),
    with returns = advantages + values, both 0 at padding.
        δ_t = r_t + γ·V_{t+1} - V_t,   A_t = δ_t + γλ·A_{t+1}
    """
    maskf = mask.to(values.dtype)
    values = values * maskf
    rewards = rewards * maskf
    T = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        # at padding positions delta is 0 and the running sum resets: A_t = 0 there
        last_gae = (delta + gamma * lam * last_gae) * maskf[:, t]
        advantages[:, t] = last_gae
    returns = (advantages + values) * maskf
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate, token-level mean over real tokens.

        ratio = exp(log π - log π_old);  L = E[max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε))]"""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
        clipfrac = masked_mean((pg_loss2 > pg_loss1).float(), mask)
        real = ratio[mask.bool()]
    return loss, {
        "loss/policy": loss.item(),
        "policy/approx_kl": approx_kl.item(),
        "policy/clipfrac": clipfrac.item(),
        "policy/ratio_mean": real.mean().item() if real.numel() else 1.0,
        "policy/ratio_max": real.max().item() if real.numel() else 1.0,
        "policy/ratio_min": real.min().item() if real.numel() else 1.0,
    }


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: ½·E[max((V - R)², (clip(V, V_old ± ε) - R)²)] over real tokens."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_loss1, vf_loss2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((vf_loss2 > vf_loss1).float(), mask)
    return loss, {"loss/value": loss.item(), "value/clipfrac": clipfrac.item()}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over real tokens (1: perfect, 0: no better than a constant)."""
    var_r = masked_var(returns.double(), mask, unbiased=False)
    if var_r <= 0:
        return float("nan")
    return float(1.0 - masked_var((returns - values).double(), mask, unbiased=False) / var_r)


class FixedKLController:
    """β stays where it is set."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019: move β so the measured KL tracks a target.

        e = clip(KL / target - 1, -0.2, 0.2);   β ← β · (1 + e · n_steps / horizon)"""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError("adaptive KL needs target > 0 and horizon > 0")
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class RunningMoments:
    """Running mean and std of a stream of scores (Chan et al.'s parallel update),
    for the common practice of normalising RM scores globally during PPO."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def update(self, xs: torch.Tensor) -> None:
        xs = xs.detach().double().flatten()
        n = xs.numel()
        if n == 0:
            return
        batch_mean, batch_var = xs.mean().item(), xs.var(unbiased=False).item()
        delta, total = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])


# --------------------------------------------------------------------------- DPO
#
# Shapes: B preference pairs. ``policy_chosen`` / ``policy_rejected`` (B,) are log π(y_w | x) and
# log π(y_l | x), ``ref_chosen`` / ``ref_rejected`` (B,) the same under π_ref: sums over the response
# tokens (per-token means for IPO, as ``dpo.py`` passes them). With
#     h = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))
# the implicit reward of a response is r = β·(log π - log π_ref) (Rafailov et al. 2023, eq. 5).


def _implicit_reward_stats(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                           ref_rejected: torch.Tensor, beta: float) -> dict:
    """Means of the implicit rewards, their margin, how often the chosen one is higher (a tie
    counts as wrong, so a policy still equal to π_ref scores 0), and the policy's log-probabilities
    (both falling together is the likelihood displacement DPO is known for)."""
    with torch.no_grad():
        chosen = beta * (policy_chosen - ref_chosen)  # (B,)
        rejected = beta * (policy_rejected - ref_rejected)  # (B,)
        return {"dpo/rewards_chosen": chosen.mean().item(), "dpo/rewards_rejected": rejected.mean().item(),
                "dpo/margin": (chosen - rejected).mean().item(),
                "dpo/accuracy": (chosen > rejected).float().mean().item(),
                "dpo/logps_chosen": policy_chosen.mean().item(), "dpo/logps_rejected": policy_rejected.mean().item()}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al. 2023, eq. 7), and with label_smoothing ε > 0 conservative DPO (cDPO,
    Mitchell 2023: each label is wrong with probability ε), mean over pairs:

        L = -(1 - ε)·log σ(β·h) - ε·log σ(-β·h)"""
    logits = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))  # (B,) β·h
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    loss = losses.mean()
    return loss, {"loss/dpo": loss.item(),
                  **_implicit_reward_stats(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)}


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """IPO (Azar et al. 2023, eq. 17, with τ = β): h regressed onto 1/(2β) rather than pushed
    without bound (DPO's optimum is h → ∞ on a pair labelled the same way every time), mean over pairs:

        L = (h - 1/(2β))²"""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # (B,)
    loss = ((h - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, {"loss/ipo": loss.item(),
                  **_implicit_reward_stats(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)}


# --------------------------------------------------------------------------- critic-free estimators


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): each of a prompt's k
    samples is judged against the mean score of the other k - 1. ``scores`` (B,) holds the
    groups as consecutive blocks of ``group_size``; returns (B,) advantages."""
    grouped = scores.view(-1, group_size)  # (P, k)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)  # (P, k)
    return (grouped - baseline).reshape(-1)


def group_advantages(scores: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024): a sample's score minus its group's
    mean, divided by the group's standard deviation (unbiased, + ``eps``) when
    ``scale_by_std``. The division weighs prompts whose samples barely differ (all right or
    all wrong) up, and the per-sequence token mean in the loss favours short answers when
    the advantage is positive: Dr. GRPO (Liu et al. 2025) drops both; ``scale_by_std=False``
    is its advantage. ``scores`` (B,) in consecutive blocks; returns (B,)."""
    grouped = scores.view(-1, group_size)  # (P, k)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)
