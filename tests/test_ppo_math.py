"""PPO and NLL math against hand-computed cases, plain loops (float64) and torch references."""

import math

import numpy as np
import pytest
import torch

from stable_rlhf.losses import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    explained_variance,
    gae,
    group_advantages,
    kl_penalised_rewards,
    kl_per_token,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_rescale,
    masked_whiten,
    nll_loss,
    policy_loss,
    rloo_advantages,
    value_loss,
)


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def right_padded_mask(lengths, T):
    """(B, T) True on the first lengths[b] positions of each row."""
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


# Right-padded rows of 5, 1, 3 and 6 (no padding) real tokens in T = 6 positions; the
# length-1 row is the edge case where the first token is also the last.
LENGTHS = [5, 1, 3, 6]
T = 6


# --------------------------------------------------------------------------- masked helpers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_mean_and_var_match_naive_versions(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, T, generator=g, dtype=torch.float64) * 3 + 1
    mask = right_padded_mask(LENGTHS, T)
    x = torch.where(mask, x, torch.full_like(x, 1e6)).to(dtype)  # padding far away: a leak shows
    real = x[mask].double()
    tol = dict(rel=1e-6) if dtype == torch.float32 else dict(rel=1e-12)
    assert masked_mean(x, mask).item() == pytest.approx(real.mean().item(), **tol)
    assert masked_var(x, mask).item() == pytest.approx(real.var(unbiased=True).item(), **tol)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(real.var(unbiased=False).item(), **tol)
    assert masked_mean(x, mask).dtype == dtype
    per_row = masked_mean(x, mask, dim=1)  # (B,)
    for b, n in enumerate(LENGTHS):
        assert per_row[b].item() == pytest.approx(x[b, :n].double().mean().item(), **tol)


def test_masked_mean_bfloat16_within_tolerance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, T, generator=g, dtype=torch.float64)
    mask = right_padded_mask(LENGTHS, T)
    x = torch.where(mask, x, torch.full_like(x, 1e4))
    expected = x.to(torch.bfloat16).double()[mask].mean().item()  # same inputs, exact mean
    out = masked_mean(x.to(torch.bfloat16), mask)
    assert out.dtype == torch.bfloat16
    assert out.item() == pytest.approx(expected, abs=2e-2)


def test_masked_var_of_fewer_than_two_tokens_is_zero():
    x = t([[3.0, 7.0, 9.0]])
    assert masked_var(x, torch.tensor([[True, False, False]])).item() == 0.0
    assert masked_var(x, torch.tensor([[False, False, False]])).item() == 0.0


def test_masked_rescale_divides_by_the_real_tokens_std_and_keeps_signs():
    x = torch.tensor([[1.0, -3.0, 2.0, 99.0], [0.5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    real = [1.0, -3.0, 2.0, 0.5]
    mean = sum(real) / 4
    std = (sum((v - mean) ** 2 for v in real) / 3) ** 0.5  # unbiased, as masked_var
    out = masked_rescale(x, mask)
    assert out[mask].tolist() == pytest.approx([v / std for v in real], rel=1e-7)
    assert torch.all(out[~mask] == 0)


def test_masked_whiten_real_tokens_mean_0_var_1_padding_0():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, T, generator=g, dtype=torch.float64) * 5 + 3
    mask = right_padded_mask(LENGTHS, T)
    x = torch.where(mask, x, torch.full_like(x, -1e3))
    out = masked_whiten(x, mask)
    real = out[mask]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert real.var(unbiased=True).item() == pytest.approx(1.0, rel=1e-6)  # eps = 1e-8 in the std
    assert torch.all(out[~mask] == 0)

    kept = masked_whiten(x, mask, shift_mean=False)
    mean = x[mask].mean()
    assert kept[mask].mean().item() == pytest.approx(mean.item(), rel=1e-12)  # the mean stays
    assert kept[mask].var(unbiased=True).item() == pytest.approx(1.0, rel=1e-6)  # the spread is scaled
    torch.testing.assert_close(kept[mask] - mean, out[mask])
    assert torch.all(kept[~mask] == 0)


# --------------------------------------------------------------------------- log-probs, entropy, NLL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logprobs_and_entropy_match_categorical(dtype):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 5, 7, generator=g, dtype=torch.float64) * 4).to(dtype)  # (B, T, V)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    dist = torch.distributions.Categorical(logits=logits)
    lp = logprobs_from_logits(logits, labels)
    assert lp.shape == (2, 5) and lp.dtype == dtype
    torch.testing.assert_close(lp, dist.log_prob(labels))
    torch.testing.assert_close(entropy_from_logits(logits), dist.entropy())


def test_logprobs_in_row_chunks_equal_one_pass_and_keep_gradients():
    """A chunk of one row at a time (chunk_elements below one row's logits) gives the
    categorical's log-probabilities and the same gradient as a single log_softmax."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 4, 9, generator=g, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.randint(0, 9, (3, 4), generator=g)
    chunked = logprobs_from_logits(logits, labels, chunk_elements=10)
    plain = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(chunked, plain)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), logits)
    (grad_plain,) = torch.autograd.grad(plain.sum(), logits)
    torch.testing.assert_close(grad_chunked, grad_plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_give_float32(dtype):
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 5, 11, generator=g) * 4).to(dtype)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    # the reference sees exactly the same (rounded) logits, in float32
    dist = torch.distributions.Categorical(logits=logits.float())
    lp, ent = logprobs_from_logits(logits, labels), entropy_from_logits(logits)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    torch.testing.assert_close(lp, dist.log_prob(labels))
    torch.testing.assert_close(ent, dist.entropy())


def test_nll_loss_matches_a_loop_over_real_tokens():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 6, generator=g, dtype=torch.float64) * 2  # (B, T, V)
    labels = torch.randint(0, 6, (3, 4), generator=g)
    mask = torch.tensor([[False, True, True, False], [True, True, True, True], [False, False, False, True]])
    terms = []
    for b in range(3):
        for i in range(4):
            if mask[b, i]:
                row = logits[b, i].tolist()
                log_z = math.log(sum(math.exp(v) for v in row))
                terms.append(log_z - row[labels[b, i]])
    loss, stats = nll_loss(logits, labels, mask)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    assert stats["loss/nll"] == pytest.approx(loss.item()) and stats["nll/tokens"] == 7


def test_nll_loss_hand_computed():
    # uniform over 4 classes: NLL = log 4 whatever the label; a confident right answer ~ 0
    logits = t([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 50.0]]])
    labels = torch.tensor([[2, 0, 0]])
    loss, _ = nll_loss(logits, labels, torch.tensor([[True, True, False]]))  # the wrong one is masked
    assert loss.item() == pytest.approx(math.log(4) / 2, rel=1e-12)


# --------------------------------------------------------------------------- KL and rewards


def test_kl_penalised_rewards_hand_computed():
    logprobs = t([[-1.0, -2.0, -0.5], [-0.3, -1.2, 5.0], [-2.0, 7.0, 7.0]])
    ref_logprobs = t([[-1.5, -1.0, -0.5], [-0.1, -1.2, -9.0], [-1.0, -9.0, -9.0]])
    mask = right_padded_mask([3, 2, 1], 3)
    scores = t([1.0, -2.0, 0.5])
    rewards, kl = kl_penalised_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # k1 = logprobs - ref_logprobs on real tokens, 0 at padding
    torch.testing.assert_close(kl, t([[0.5, -1.0, 0.0], [-0.2, 0.0, 0.0], [-1.0, 0.0, 0.0]]))
    # r_t = -0.1 * kl_t, plus the score at the last real token of each row
    expected = t([[-0.05, 0.1, 0.0 + 1.0],
                  [0.02, 0.0 - 2.0, 0.0],
                  [0.1 + 0.5, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    assert logprobs[1, 2] == 5.0  # inputs untouched


def test_kl_penalised_rewards_other_estimators_use_them():
    g = torch.Generator().manual_seed(6)
    logprobs = -torch.rand(2, 4, generator=g, dtype=torch.float64) * 3
    ref_logprobs = -torch.rand(2, 4, generator=g, dtype=torch.float64) * 3
    mask = right_padded_mask([4, 2], 4)
    for est in ("k2", "k3"):
        rewards, kl = kl_penalised_rewards(t([0.0, 0.0]), logprobs, ref_logprobs, mask, 0.5, est)
        torch.testing.assert_close(kl, kl_per_token(logprobs, ref_logprobs, est) * mask)
        torch.testing.assert_close(rewards, -0.5 * kl)


def test_kl_estimators_match_their_formulas():
    g = torch.Generator().manual_seed(7)
    logprobs = -torch.rand(50, generator=g, dtype=torch.float64) * 5
    ref_logprobs = -torch.rand(50, generator=g, dtype=torch.float64) * 5
    d = logprobs - ref_logprobs
    r = torch.exp(ref_logprobs - logprobs)  # π_ref / π
    torch.testing.assert_close(kl_per_token(logprobs, ref_logprobs, "k1"), d)
    torch.testing.assert_close(kl_per_token(logprobs, ref_logprobs, "k2"), 0.5 * d**2)
    k3 = kl_per_token(logprobs, ref_logprobs, "k3")
    torch.testing.assert_close(k3, (r - 1) - torch.log(r))
    assert torch.all(k3 >= 0)
    assert kl_per_token(t([-1.0]), t([-1.0]), "k3").item() == 0.0
    with pytest.raises(ValueError, match="k4"):
        kl_per_token(logprobs, ref_logprobs, "k4")


def test_k1_and_k3_are_unbiased_for_the_exact_kl():
    # Over a whole categorical, E_{x~π}[k] is a finite sum: k1 and k3 give KL(π || π_ref) exactly.
    g = torch.Generator().manual_seed(8)
    logp = torch.log_softmax(torch.randn(9, generator=g, dtype=torch.float64), -1)
    ref = torch.log_softmax(torch.randn(9, generator=g, dtype=torch.float64), -1)
    exact = (logp.exp() * (logp - ref)).sum()
    for est in ("k1", "k3"):
        expectation = (logp.exp() * kl_per_token(logp, ref, est)).sum()
        assert expectation.item() == pytest.approx(exact.item(), rel=1e-10), est


# --------------------------------------------------------------------------- GAE


def gae_loop(rewards, values, lengths, gamma, lam):
    """Plain Python GAE per row over its real tokens; V after the last real token is 0."""
    B, T_ = len(rewards), len(rewards[0])
    adv = [[0.0] * T_ for _ in range(B)]
    ret = [[0.0] * T_ for _ in range(B)]
    for b in range(B):
        n, running = lengths[b], 0.0
        for i in reversed(range(n)):
            next_v = values[b][i + 1] if i + 1 < n else 0.0
            delta = rewards[b][i] + gamma * next_v - values[b][i]
            running = delta + gamma * lam * running
            adv[b][i] = running
            ret[b][i] = running + values[b][i]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.5), (1.0, 1.0), (0.5, 0.0)])
def test_gae_matches_a_plain_loop(gamma, lam):
    lengths = LENGTHS + [0]  # and an empty row
    g = torch.Generator().manual_seed(9)
    rewards = torch.randn(len(lengths), T, generator=g, dtype=torch.float64)
    values = torch.randn(len(lengths), T, generator=g, dtype=torch.float64)
    mask = right_padded_mask(lengths, T)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    exp_adv, exp_ret = gae_loop(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    torch.testing.assert_close(adv, t(exp_adv), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, t(exp_ret), rtol=1e-12, atol=1e-12)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


def test_gae_padding_values_and_rewards_do_not_leak():
    g = torch.Generator().manual_seed(10)
    rewards = torch.randn(4, T, generator=g, dtype=torch.float64)
    values = torch.randn(4, T, generator=g, dtype=torch.float64)
    mask = right_padded_mask(LENGTHS, T)
    clean = gae(rewards * mask, values * mask, mask, gamma=0.99, lam=0.9)
    noisy_r = torch.where(mask, rewards, torch.full_like(rewards, 1e3))
    noisy_v = torch.where(mask, values, torch.full_like(values, -1e3))
    dirty = gae(noisy_r, noisy_v, mask, gamma=0.99, lam=0.9)
    torch.testing.assert_close(dirty[0], clean[0], rtol=0, atol=0)
    torch.testing.assert_close(dirty[1], clean[1], rtol=0, atol=0)


def test_gae_hand_computed_monte_carlo_case():
    # γ = λ = 1: A_t = Σ_{k≥t} r_k - V_t, returns = Σ_{k≥t} r_k
    rewards, values = t([[0.0, 0.0, 1.0, 9.0]]), t([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, t([[0.5, 0.4, 0.3, 0.0]]))
    torch.testing.assert_close(ret, t([[1.0, 1.0, 1.0, 0.0]]))


# --------------------------------------------------------------------------- clipped losses


def test_policy_loss_hand_computed():
    # ε = 0.2. Per token (ratio, advantage) -> max(-A·r, -A·clip(r)):
    #   (1.1, +1)  inside the clip           -> -1.1
    #   (1.5, +2)  above, A > 0: clipped     -> -2 * 1.2 = -2.4
    #   (0.5, -1)  below, A < 0: clipped     ->  1 * 0.8 =  0.8
    #   (0.7, +1)  below, A > 0: unclipped   -> -0.7  (pessimistic bound keeps the worse one)
    #   (1.3, -0.5) above, A < 0: unclipped  ->  0.65
    #   padding (ratio 9, A 5) ignored
    ratio = t([[1.1, 1.5, 0.5], [0.7, 1.3, 9.0]])
    advantages = t([[1.0, 2.0, -1.0], [1.0, -0.5, 5.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    old_logprobs = t([[-1.0, -2.0, -0.3], [-0.7, -1.1, -4.0]])
    logprobs = (old_logprobs + ratio.log()).requires_grad_()
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip=0.2)
    assert loss.item() == pytest.approx((-1.1 - 2.4 + 0.8 - 0.7 + 0.65) / 5, rel=1e-12)
    assert stats["loss/policy"] == pytest.approx(-0.55)
    assert stats["policy/clipfrac"] == pytest.approx(2 / 5)
    log_r = [math.log(r) for r in (1.1, 1.5, 0.5, 0.7, 1.3)]
    assert stats["policy/approx_kl"] == pytest.approx(sum(0.5 * v**2 for v in log_r) / 5, rel=1e-12)
    assert stats["policy/ratio_mean"] == pytest.approx(5.1 / 5, rel=1e-12)
    assert stats["policy/ratio_max"] == pytest.approx(1.5) and stats["policy/ratio_min"] == pytest.approx(0.5)
    # gradient: d/dlogπ of -A·r is -A·r / n on unclipped tokens, 0 on clipped ones and padding
    loss.backward()
    expected = t([[-1.0 * 1.1, 0.0, 0.0], [-1.0 * 0.7, 0.5 * 1.3, 0.0]]) / 5
    torch.testing.assert_close(logprobs.grad, expected)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    adv = t([[1.0, -3.0, 2.0]])
    lp = t([[-1.0, -2.0, -3.0]])
    loss, stats = policy_loss(lp, lp, adv, torch.tensor([[True, True, False]]), clip=0.2)
    assert loss.item() == pytest.approx(1.0)  # -(1 - 3) / 2
    assert stats["policy/clipfrac"] == 0.0 and stats["policy/approx_kl"] == 0.0


def test_value_loss_hand_computed():
    # ε = 0.2. Per token (V, V_old, R) -> max((V-R)², (clip(V, V_old±ε) - R)²):
    #   (1.0, 0.9, 2.0)   inside: both 1.0                       -> 1.0
    #   (1.5, 1.0, 2.0)   clipped to 1.2: 0.25 vs 0.64, clipped  -> 0.64
    #   (1.5, 1.0, 1.0)   clipped to 1.2: 0.25 vs 0.04           -> 0.25
    #   (-1.0, 0.0, 0.0)  clipped to -0.2: 1.0 vs 0.04           -> 1.0
    #   (0.0, 0.5, -1.0)  clipped to 0.3: 1.0 vs 1.69, clipped   -> 1.69
    #   padding (100, 0, 0) ignored
    values = t([[1.0, 1.5, 1.5], [-1.0, 0.0, 100.0]]).requires_grad_()
    old_values = t([[0.9, 1.0, 1.0], [0.0, 0.5, 0.0]])
    returns = t([[2.0, 2.0, 1.0], [0.0, -1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss, stats = value_loss(values, old_values, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.64 + 0.25 + 1.0 + 1.69) / 5, rel=1e-12)
    assert stats["loss/value"] == pytest.approx(0.458)
    assert stats["value/clipfrac"] == pytest.approx(2 / 5)
    # gradient (V - R) / n where the unclipped term wins, 0 where the clipped one does
    loss.backward()
    torch.testing.assert_close(values.grad, t([[-1.0, 0.0, 0.5], [-1.0, 0.0, 0.0]]) / 5)


# --------------------------------------------------------------------------- diagnostics and state


def test_explained_variance():
    g = torch.Generator().manual_seed(11)
    returns = torch.randn(4, T, generator=g, dtype=torch.float64)
    mask = right_padded_mask(LENGTHS, T)
    junk = torch.where(mask, returns, torch.full_like(returns, 50.0))  # padding differs wildly
    assert explained_variance(junk, returns, mask) == pytest.approx(1.0)
    mean_pred = torch.where(mask, returns[mask].mean(), torch.full_like(returns, -7.0))
    assert explained_variance(mean_pred, returns, mask) == pytest.approx(0.0, abs=1e-12)
    # hand case: R = 1, 2, 3, 4 (Var 1.25), residual 0, 0, 0, 1 (Var 0.1875)
    ev = explained_variance(t([[1.0, 2.0, 3.0, 3.0]]), t([[1.0, 2.0, 3.0, 4.0]]), torch.ones(1, 4, dtype=torch.bool))
    assert ev == pytest.approx(1 - 0.1875 / 1.25)
    assert math.isnan(explained_variance(t([[1.0, 2.0]]), t([[3.0, 3.0]]), torch.ones(1, 2, dtype=torch.bool)))


def test_fixed_kl_controller_never_moves():
    kl = FixedKLController(0.05)
    for current in (0.0, 1.0, 100.0):
        kl.update(current, n_steps=512)
    assert kl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(kl.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_controller_follows_the_formula():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    expected = 0.2
    # KL / target - 1: +0.5 -> clipped to +0.2; -0.5 -> -0.2; +0.1 stays; -0.05 stays
    for current, n_steps, err in ((9.0, 256, 0.2), (3.0, 128, -0.2), (6.6, 512, 0.1), (5.7, 64, -0.05)):
        ctl.update(current, n_steps)
        expected *= 1 + err * n_steps / 10_000
        assert ctl.value == pytest.approx(expected, rel=1e-12)
    ctl.update(6.0, 1000)  # on target: no change
    assert ctl.value == pytest.approx(expected, rel=1e-12)

    restored = AdaptiveKLController(0.9, target=6.0, horizon=10_000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    ctl.update(10.0, 300), restored.update(10.0, 300)
    assert restored.value == ctl.value

    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=1.0, horizon=0)


def test_running_moments_match_numpy_over_everything_seen():
    g = torch.Generator().manual_seed(12)
    batches = [torch.randn(n, generator=g, dtype=torch.float64) * s + m
               for n, s, m in ((7, 1.0, 0.0), (1, 2.0, 5.0), (0, 1.0, 0.0), (30, 0.5, -3.0), (12, 4.0, 1.0))]
    rm, seen = RunningMoments(), []
    for i, xs in enumerate(batches):
        rm.update(xs if i != 3 else xs.reshape(5, 6).float())  # any shape; float32 is widened
        seen.append(xs.float().double().numpy() if i == 3 else xs.numpy())
        everything = np.concatenate(seen)
        if len(everything):
            assert rm.count == len(everything)
            assert rm.mean == pytest.approx(np.mean(everything), rel=1e-10, abs=1e-12)
            assert rm.var == pytest.approx(np.var(everything), rel=1e-10)  # population variance
            assert rm.std == pytest.approx(np.std(everything), rel=1e-10)

    restored = RunningMoments()
    restored.load_state_dict(rm.state_dict())
    assert (restored.mean, restored.var, restored.count) == (rm.mean, rm.var, rm.count)
    more = torch.randn(5, generator=g, dtype=torch.float64)
    rm.update(more), restored.update(more)
    assert (restored.mean, restored.var, restored.count) == (rm.mean, rm.var, rm.count)


# ------------------------------------------------------------ critic-free estimators


def test_rloo_baseline_is_the_leave_one_out_mean_of_a_loop():
    scores = t([1.0, 2.0, 6.0, -1.0, 0.5, 0.5, 3.0, 1.0])  # two prompts, 4 samples each
    got = rloo_advantages(scores, 4)
    want = []
    for g in range(2):
        block = scores[4 * g : 4 * g + 4].tolist()
        for i, s in enumerate(block):
            others = [x for j, x in enumerate(block) if j != i]
            want.append(s - sum(others) / len(others))
    assert got.tolist() == pytest.approx(want)
    # the leave-one-out advantages of a group sum to zero, and k/(k-1) of the plain centring
    assert got.view(2, 4).sum(-1).tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert got.tolist() == pytest.approx((4 / 3 * group_advantages(scores, 4, scale_by_std=False)).tolist())


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_advantages_are_a_loops_group_normalisation(scale_by_std):
    scores = t([0.0, 1.0, 1.0, 3.0, 2.0, 2.0])  # two prompts, 3 samples each
    got = group_advantages(scores, 3, scale_by_std=scale_by_std, eps=1e-4)
    want = []
    for g in range(2):
        block = scores[3 * g : 3 * g + 3].tolist()
        mean = sum(block) / 3
        std = math.sqrt(sum((x - mean) ** 2 for x in block) / 2)  # unbiased, as torch.std
        want += [(x - mean) / (std + 1e-4) if scale_by_std else x - mean for x in block]
    assert got.tolist() == pytest.approx(want)
    # a group whose samples all score the same gives no signal (and no division by zero)
    flat = group_advantages(t([2.0, 2.0, 2.0]), 3)
    assert flat.tolist() == [0.0, 0.0, 0.0]


def test_fused_adamw_takes_the_steps_of_the_per_tensor_loop():
    """runs.adamw fuses the update into one kernel where it can; its parameters after a few
    steps (two groups, their own lr, weight decay) are those of torch's plain AdamW."""
    from stable_rlhf.runs import adamw

    g = torch.Generator().manual_seed(0)
    init = [torch.randn(7, 5, generator=g), torch.randn(11, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in init] for _ in range(3)]
    runs = []
    for make in (lambda groups: adamw(groups, eps=1e-5, weight_decay=0.1),
                 lambda groups: torch.optim.AdamW(groups, eps=1e-5, weight_decay=0.1, foreach=False)):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = make([{"params": [params[0]], "lr": 1e-2}, {"params": [params[1]], "lr": 1e-3}])
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            opt.step()
        runs.append((opt, params))
    (fused, a), (_, b) = runs
    assert fused.defaults["fused"]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
