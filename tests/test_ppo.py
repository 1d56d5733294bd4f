"""PPO trainer on the tiny random model: it trains, writes its contract, skips and stops
on non-finite values, resumes exactly after SIGKILL, and runs under 2 gloo processes."""

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stable_rlhf.ppo as ppo
from stable_rlhf.runs import latest_checkpoint
from stable_rlhf.config import load_config
from stable_rlhf.io import read_jsonl
from stable_rlhf.rewards import GoldReward

pytestmark = pytest.mark.usefixtures("small_model_cpu")

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT / "data" / "testbed"


def overrides(out, *extra) -> list[str]:
    return [
        f"out_dir={out}", "model.name_or_path=tiny-random", f"prompts={TESTBED / 'prompts_train.jsonl'}",
        f"eval.prompts={TESTBED / 'prompts_eval.jsonl'}", f"eval.forget_prompts={TESTBED / 'prompts_forget.jsonl'}",
        "eval.limit_per_task=1", "eval.every=2", "eval.generation.max_new_tokens=10",
        "generation.max_new_tokens=10", "steps=4", "batch_size=8", "mini_batch_size=4", "save_every=2",
        "lr=1e-3", "value_lr=1e-3", "log_with=none", "reward.workers=1",
        "keep_final_checkpoint=true", *extra,
    ]


def run(out, *extra) -> dict:
    return ppo.train(load_config(ppo.PPOConfig, None, overrides(out, *extra)))


def final_params(out: Path) -> dict:
    state = torch.load(latest_checkpoint(out) / "state.pt", weights_only=True)
    return {**{f"policy.{k}": v for k, v in state["policy"].items()}, **{f"value.{k}": v for k, v in state["value"].items()}}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo") / "straight"
    summary = run(out)
    return out, summary


def test_ppo_trains_and_writes_its_contract(reference_run):
    out, summary = reference_run
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model/config.json", "samples_final.md",
                 "eval_reference_eval.jsonl", "samples/eval-step000004.jsonl", "samples/forget-step000004.jsonl"):
        assert (out / name).exists(), name
    assert summary["steps"] == 4
    assert set(summary["final"]) >= {"gold_reward", "proxy_score", "kl", "win", "lose", "tie", "degenerate",
                                     "forget_degenerate"}
    assert 0 <= summary["final"]["degenerate"] <= 1
    assert abs(summary["final"]["win"] + summary["final"]["lose"] + summary["final"]["tie"] - 1) < 1e-9
    assert set(summary["per_task"]) == {"arithmetic", "bullets", "code", "keywords", "lowercase", "word_limit"}
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "objective/kl" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("objective/score", "objective/kl", "objective/non_score_reward", "loss/policy", "loss/value",
                "policy/approx_kl", "policy/clipfrac", "policy/entropy", "policy/ratio_max",
                "value/explained_variance", "time/generate", "time/score", "time/forward", "time/update",
                "time/step", "time/samples_per_s", "time/generated_tokens_per_s"):
        assert key in rows[0], key
    # the first rollout comes from the reference policy itself: KL 0 (to the rounding between the
    # sampler's logits, log pi_old, and the reference's forward pass), ratio 1 at the first minibatch
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert rows[1]["objective/kl"] != 0.0
    # the policy moved away from its initial weights
    from stable_rlhf.models import load_policy
    from stable_rlhf.config import ModelConfig

    init, _ = load_policy(ModelConfig(name_or_path="tiny-random"), device="cpu")
    trained, _ = load_policy(ModelConfig(name_or_path=str(out / "model")), device="cpu")
    diffs = [(a - b).abs().max().item() for a, b in zip(init.parameters(), trained.parameters())]
    assert max(diffs) > 1e-4


def test_the_eval_objective_is_the_shaped_score_less_the_kl_penalty(reference_run):
    """eval/objective at each eval point: the eval answers (sampled as the rollouts are) scored,
    shaped with the SFT answers' fixed moments, less beta * KL; its gain in SEs in summary.json."""
    out, summary = reference_run
    cfg = load_config(ppo.PPOConfig, None, overrides(out))
    points = [r for r in read_jsonl(out / "metrics.jsonl") if "eval/objective" in r]
    assert [r["step"] for r in points] == [0, 2, 4]
    assert points[0]["eval/objective_kl"] == 0.0  # the SFT policy is the reference
    mean, std = torch.load(latest_checkpoint(out) / "state.pt", weights_only=True)["eval_moments"]
    records = {r["id"]: r for r in read_jsonl(TESTBED / "prompts_eval.jsonl")}
    rows = read_jsonl(out / "samples" / "eval-step000004.jsonl")
    gold = GoldReward(workers=1)([records[r["id"]] for r in rows], [r["response"] for r in rows]).float()
    truncated = torch.tensor([r["truncated"] for r in rows])
    shaped = ppo.shape_scores(cfg, gold, truncated, mean, std)  # the gold source: raw, penalty in sigmas
    # step 0: the SFT reference answers themselves (the policy is the reference), whose raw
    # scores give the fixed moments; nothing else is sampled
    ref = read_jsonl(out / "eval_reference_eval.jsonl")
    ref_gold = GoldReward(workers=1)([records[r["id"]] for r in ref], [r["response"] for r in ref]).float()
    assert [mean, std] == pytest.approx([ref_gold.mean().item(), ref_gold.std().item()])
    ref_shaped = ppo.shape_scores(cfg, ref_gold, torch.tensor([r["truncated"] for r in ref]), mean, std)
    assert points[0]["eval/objective_by_prompt"] == pytest.approx(ref_shaped.tolist(), abs=1e-6)
    last = points[-1]
    assert last["eval/objective_score"] == pytest.approx(shaped.mean().item(), abs=1e-6)
    assert last["eval/objective_truncated"] == pytest.approx(truncated.float().mean().item())
    assert last["eval/objective"] == pytest.approx(last["eval/objective_score"] - cfg.kl_coef * last["eval/objective_kl"],
                                                   abs=1e-5)
    assert last["eval/objective"] == pytest.approx(sum(last["eval/objective_by_prompt"]) / len(rows))
    diffs = [b - a for a, b in zip(points[0]["eval/objective_by_prompt"], last["eval/objective_by_prompt"])]
    assert len(diffs) == len(rows) == 6
    paired_t = statistics.mean(diffs) / (statistics.stdev(diffs) / math.sqrt(len(diffs)))
    assert summary["final"]["objective_gain"] == pytest.approx(statistics.mean(diffs))
    assert summary["final"]["objective_gain_se"] == pytest.approx(paired_t)
    assert isinstance(summary["warnings"], list)


def test_old_logprobs_from_generation_match_a_forward_pass(reference_run, tmp_path):
    """The default takes log pi_old from the sampler's logits; a second policy pass over the
    finished sequences (old_logprobs=forward) gives the same run to float rounding."""
    out, _ = reference_run
    run(tmp_path / "forward", "old_logprobs=forward")
    keys = ("objective/kl", "objective/score", "loss/policy", "loss/value", "policy/approx_kl", "policy/ratio_max")
    a = [r for r in read_jsonl(out / "metrics.jsonl") if "objective/kl" in r]
    b = [r for r in read_jsonl(tmp_path / "forward" / "metrics.jsonl") if "objective/kl" in r]
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for key in keys:
            assert ra[key] == pytest.approx(rb[key], rel=1e-3, abs=1e-4), (ra["step"], key)


def test_step_warnings_name_truncation_and_a_critic_explaining_less_than_nothing():
    cfg = load_config(ppo.PPOConfig, None, ["critic_warmup=1", "warn_ev_after=2"])
    quiet = {"step": 2, "policy/truncated": 0.5, "value/explained_variance": -1.0}
    assert [w.split(":")[1].split()[1] for w in ppo.step_warnings(cfg, quiet)] == ["of"]  # truncation only
    both = ppo.step_warnings(cfg, {"step": 3, "policy/truncated": 0.125, "value/explained_variance": -0.5})
    assert len(both) == 2 and "12%" in both[0] and "-0.50" in both[1]
    assert ppo.step_warnings(cfg, {"step": 9, "policy/truncated": 0.1, "value/explained_variance": 0.2}) == []


def test_pearson_against_numpy():
    import numpy as np

    x, y = torch.tensor([1.0, 2.0, 4.0, 3.0]), torch.tensor([0.5, 0.1, 2.0, -1.0])
    assert ppo.pearson(x, y) == pytest.approx(float(np.corrcoef(x.numpy(), y.numpy())[0, 1]))
    assert ppo.pearson(x, torch.ones(4)) is None


def test_critic_warmup_updates_only_the_value_model(tmp_path):
    from stable_rlhf.config import ModelConfig
    from stable_rlhf.models import load_policy

    out = tmp_path / "warm"
    run(out, "steps=2", "critic_warmup=1", "save_every=1", "keep_checkpoints=2", "eval.every=1",
        "rehearsal.data=" + str(TESTBED / "sft_demos.jsonl"), "rehearsal.coef=1.0")
    first = torch.load(out / "checkpoints" / "step-000001" / "state.pt", weights_only=True)
    init, _ = load_policy(ModelConfig(name_or_path="tiny-random"), device="cpu")
    init_state = init.state_dict()
    # after the warm-up rollout: the policy is exactly the initial one (no PPO, no rehearsal step) ...
    assert all(torch.equal(v, init_state[k]) for k, v in first["policy"].items())
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "objective/kl" in r]
    assert rows[0]["policy/critic_warmup"] == 1.0 and "loss/policy" not in rows[0] and "loss/rehearsal" not in rows[0]
    assert rows[0]["loss/value"] > 0 and rows[0]["optim/grad_norm"] > 0
    # ... while the value model moved; the second rollout updates both, with the rehearsal term
    second = torch.load(out / "checkpoints" / "step-000002" / "state.pt", weights_only=True)
    assert any(not torch.equal(a, second["value"][k]) for k, a in first["value"].items())
    assert any(not torch.equal(v, init_state[k]) for k, v in second["policy"].items())
    assert "loss/policy" in rows[1] and "loss/rehearsal" in rows[1] and "policy/critic_warmup" not in rows[1]
    with pytest.raises(ValueError, match="critic_warmup"):
        ppo.PPOConfig(steps=2, critic_warmup=2)


def test_a_zero_value_head_starts_at_v_zero_with_its_own_lr(tmp_path):
    out = tmp_path / "zero_head"
    run(out, "steps=1", "save_every=1", "eval.every=1", "value_head_init=zero", "value_head_lr=5e-4")
    row = next(r for r in read_jsonl(out / "metrics.jsonl") if "objective/kl" in r)
    # V = 0 everywhere in the first rollout: no better than a constant, exactly
    assert row["value/mean"] == 0.0 and row["value/explained_variance"] == pytest.approx(0.0, abs=1e-12)
    state = torch.load(latest_checkpoint(out) / "state.pt", weights_only=True)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [1e-3, 1e-3, 5e-4]
    assert state["value"]["head.weight"].abs().max() > 0  # one update moved the head off zero
    with pytest.raises(ValueError, match="value_head_lr"):
        ppo.PPOConfig(value_head_lr=0.0)


def test_lora_trains_adapters_only_and_starts_at_kl_zero(tmp_path):
    out = tmp_path / "lora"
    run(out, "lora.enabled=true", "lora.r=4", "steps=2", "eval.every=2", "lr=1e-2", "log_with=tensorboard")
    assert list((out / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard event file in tensorboard/"
    state = torch.load(latest_checkpoint(out) / "state.pt", weights_only=True)
    assert state["policy"] and all("lora_" in k for k in state["policy"])
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "objective/kl" in r]
    # adapters start at zero: policy == base == reference (to the sampler's rounding)
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert rows[1]["objective/kl"] != 0.0  # and the reference (adapters disabled) did not move with them


class FlakyReward:
    """The gold reward, except NaN on the calls listed (0-based). The eval points call it too
    (``eval/objective``): call 0 is step 0's eval point, then one call per rollout and one
    per eval point (every 2 steps in ``overrides``)."""

    def __init__(self, bad_calls):
        self.gold, self.bad, self.calls = GoldReward(workers=1), set(bad_calls), 0

    def __call__(self, records, responses):
        scores = self.gold(records, responses)
        if self.calls in self.bad:
            scores[0] = float("nan")
        self.calls += 1
        return scores


def test_a_nonfinite_score_skips_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(ppo, "build_reward", lambda cfg, device=None: FlakyReward({2}))  # step 2's rollout
    summary = run(tmp_path / "skip")
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1
    skipped = [r for r in read_jsonl(tmp_path / "skip" / "metrics.jsonl") if r.get("skipped")]
    assert [(r["step"], r["skip_reason"]) for r in skipped] == [(2, "non-finite score")]


def test_consecutive_nonfinite_steps_stop_with_a_usable_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "stop"
    monkeypatch.setattr(ppo, "build_reward", lambda cfg, device=None: FlakyReward({4, 5, 6, 7}))  # steps 3-6
    with pytest.raises(ppo.NonFiniteError, match="3 consecutive steps"):
        run(out, "max_bad_steps=3", "steps=8", "save_every=100")
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == "step-000005"
    monkeypatch.setattr(ppo, "build_reward", lambda cfg, device=None: GoldReward(workers=1))
    summary = run(out, "max_bad_steps=3", "steps=8", "save_every=100", "resume=true")
    assert summary["steps"] == 8


def test_a_nonfinite_loss_skips_the_update(tmp_path, monkeypatch):
    real, calls = ppo.policy_loss, {"n": 0}

    def nan_once(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), stats) if calls["n"] == 3 else (loss, stats)

    monkeypatch.setattr(ppo, "policy_loss", nan_once)
    run(tmp_path / "nanloss", "steps=2")
    rows = [r for r in read_jsonl(tmp_path / "nanloss" / "metrics.jsonl") if "objective/kl" in r]
    assert [r["skipped_updates"] for r in rows] == [0, 1]
    state = torch.load(latest_checkpoint(tmp_path / "nanloss") / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["policy"].values())


def cli(out, *extra, fault: str | None = None) -> subprocess.CompletedProcess:
    """The ppo stage in a fresh process (killed, resumed and straight runs alike: the same
    threads and kernels, so their floating-point results can be compared bit for bit)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("STABLE_RLHF_FAULT", None)
    if fault:
        env["STABLE_RLHF_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "stable_rlhf.cli", "ppo", *overrides(out, *extra)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def straight_cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo-cli") / "straight"
    proc = cli(out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.parametrize("fault", ["train:3", "checkpoint:4"])
def test_sigkilled_run_resumes_to_the_same_result(straight_cli_run, tmp_path, fault):
    out = tmp_path / "killed"
    proc = cli(out, fault=fault)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "summary.json").exists()
    assert latest_checkpoint(out).name == "step-000002"  # step 4's checkpoint never completed
    proc = cli(out, "resume=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout
    straight, resumed = (json.loads((d / "summary.json").read_text()) for d in (straight_cli_run, out))
    assert resumed["final"] == straight["final"]
    assert resumed["per_task"] == straight["per_task"]
    a, b = final_params(straight_cli_run), final_params(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "objective/kl" in r]
    assert steps == [1, 2, 3, 4]  # lines of the lost steps were dropped, then redone once
    assert not list((out / "checkpoints").glob(".step-*"))


def test_two_gloo_processes_keep_identical_parameters(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found"
    result = tmp_path / "ddp.json"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29533", str(ROOT / "tests" / "ddp_ppo_worker.py"),
           str(result), *overrides(tmp_path / "ddp", "steps=2", "batch_size=4", "eval.every=100")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    seen = json.loads(result.read_text())
    assert seen["world"] == 2
    assert not seen["same_rollouts"], "both ranks sampled the same rollouts: the test would prove nothing"
    assert seen["changed_from_reference"] > 1e-4
    assert seen["max_param_diff"] == 0.0
    assert (tmp_path / "ddp" / "summary.json").exists()


def test_bad_prompts_are_rejected_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from stable_rlhf.cli import main

    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "ok", "task": "arithmetic"}\n{"task": "arithmetic"}\n')
    monkeypatch.setattr("stable_rlhf.models.load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["ppo", f"prompts={bad}", "model.name_or_path=tiny-random", f"out_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "prompt" in err


def test_ptx_and_rehearsal_nll_terms_are_mixed_in_and_logged(tmp_path):
    demos = TESTBED / "sft_demos.jsonl"
    run(tmp_path / "mix", "steps=2", f"ptx.data={demos}", "ptx.coef=0.5", f"rehearsal.data={demos}",
        "rehearsal.batch_size=2")
    rows = [r for r in read_jsonl(tmp_path / "mix" / "metrics.jsonl") if "objective/kl" in r]
    for r in rows:
        assert r["loss/ptx"] > 0 and r["loss/rehearsal"] > 0
        # total = policy + vf_coef·value + γ_ptx·NLL + γ_R·NLL (γ_R keeps its 0.01 default)
        expected = r["loss/policy"] + 0.1 * r["loss/value"] + 0.5 * r["loss/ptx"] + 0.01 * r["loss/rehearsal"]
        assert r["loss/total"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_wandb_without_the_package_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import importlib.util

    from stable_rlhf.cli import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    monkeypatch.setattr("stable_rlhf.models.load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["ppo", *overrides(tmp_path / "run"), "log_with=wandb"]) == 2
    assert "wandb package" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # no run directory, no accelerator


@pytest.mark.parametrize("estimator,kl", [("rloo", "reward"), ("grpo", "loss")])
def test_critic_free_estimators_train_without_a_value_model(tmp_path, estimator, kl):
    out = tmp_path / estimator
    summary = run(out, "steps=2", "save_every=1", "eval.every=2", f"advantage.estimator={estimator}",
                  "advantage.group_size=4", f"advantage.kl={kl}", "kl_coef=0.1")
    assert summary["steps"] == 2
    state = torch.load(latest_checkpoint(out) / "state.pt", weights_only=True)
    assert "value" not in state  # no value model was built
    assert len(state["optimizer"]["param_groups"]) == 1
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "objective/kl" in r]
    assert "value/explained_variance" not in rows[0] and "loss/value" not in rows[0]
    assert ("loss/kl" in rows[1]) == (kl == "loss")
    # 8 rows per rollout = 2 prompts x 4 samples: each prompt's samples come in one block
    samples = read_jsonl(out / "metrics.jsonl")
    assert rows[0]["policy/response_tokens"] > 0 and samples
    with pytest.raises(ValueError, match="group_size"):
        ppo.PPOConfig(batch_size=6, mini_batch_size=2, advantage=ppo.AdvantageConfig(estimator="grpo", group_size=4))


def test_critic_free_rollouts_sample_each_prompt_group_size_times(tmp_path, monkeypatch):
    seen = []
    real = ppo.generate

    def spy(model, tokenizer, prompts, *args, **kwargs):
        seen.append(list(prompts))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(ppo, "generate", spy)
    run(tmp_path / "groups", "steps=1", "eval.every=1", "advantage.estimator=rloo", "advantage.group_size=4")
    prompts = seen[1]  # seen[0]: step 0's eval objective, sampled from the eval prompts
    assert len(seen[0]) == 6 and len(prompts) == 8 and prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4
    assert prompts[0] != prompts[4]


def test_uncentred_whitening_only_rescales_the_gae_advantages():
    from types import SimpleNamespace

    from stable_rlhf.losses import gae, kl_penalised_rewards

    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    rollout = SimpleNamespace(scores=torch.tensor([1.5, -0.5]), logprobs=torch.randn(2, 5, generator=g) * mask,
                              ref_logprobs=torch.randn(2, 5, generator=g) * mask, mask=mask,
                              values=torch.randn(2, 5, generator=g) * mask)
    centred, scaled = (load_config(ppo.PPOConfig, None, [f"whiten_centre={c}"]) for c in ("true", "false"))
    rewards, _ = kl_penalised_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask, 0.1, "k1")
    raw, _ = gae(rewards, rollout.values, mask, centred.gamma, centred.lam)
    ppo.gae_advantages(scaled, rollout, 0.1)
    std = raw[mask].std()
    torch.testing.assert_close(rollout.advantages[mask], raw[mask] / std, rtol=1e-5, atol=1e-6)
    ppo.gae_advantages(centred, rollout, 0.1)
    torch.testing.assert_close(rollout.advantages[mask], (raw[mask] - raw[mask].mean()) / std, rtol=1e-5, atol=1e-6)
