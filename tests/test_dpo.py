"""DPO: the three losses against hand-computed values, K-way rankings expanded into their pairs,
response-only log-probabilities against a plain per-row computation, and `stable-rlhf dpo` on the
tiny random Llama: it learns held-out preferences, writes its outputs, agrees with itself across
the three ways of getting π_ref, refuses bad input before loading a model and resumes exactly
after SIGKILL."""

import json
import math

import pytest
import torch

from stable_rlhf import dpo
from stable_rlhf.cli import main as cli_main
from stable_rlhf.config import ModelConfig, load_config
from stable_rlhf.dpo import DPOConfig, encode_pairs, load_pairs, ranked_pairs, response_logps, train
from stable_rlhf.io import atomic_write_jsonl, read_jsonl
from stable_rlhf.losses import dpo_loss, ipo_loss
from stable_rlhf.models import chat_prompt, load_policy
from tests.test_code_shape import PACKAGE, functions
from tests import test_behaviour_fixture, test_sft
from tests.test_sft import assert_killed_run_resumes_exactly, run_stage, saved_weights

pytestmark = pytest.mark.usefixtures("small_model_cpu")

# --------------------------------------------------------------------------- the losses

# Two pairs plus a third the policy gets wrong: h = (π_c - ref_c) - (π_r - ref_r) = 1.0, 0.5, -1.0.
POLICY_CHOSEN = [-1.0, -2.0, -3.0]
POLICY_REJECTED = [-2.0, -1.5, -1.0]
REF_CHOSEN = [-1.5, -2.0, -2.5]
REF_REJECTED = [-1.5, -1.0, -1.5]
H = [1.0, 0.5, -1.0]
BETA = 0.5


def tensors(requires_grad=False):
    return [torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad)
            for v in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)]


def neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


def test_dpo_loss_and_its_implicit_rewards_by_hand():
    loss, stats = dpo_loss(*tensors(), beta=BETA)
    assert loss.dtype == torch.float64
    expected = (neg_log_sigmoid(0.5) + neg_log_sigmoid(0.25) + neg_log_sigmoid(-0.5)) / 3  # -log σ(β·h)
    assert loss.item() == pytest.approx(expected, rel=1e-12) and stats["loss/dpo"] == loss.item()
    # implicit rewards β·(π - ref): chosen 0.25, 0, -0.25; rejected -0.25, -0.25, 0.25
    assert stats["dpo/rewards_chosen"] == pytest.approx(0.0, abs=1e-12)
    assert stats["dpo/rewards_rejected"] == pytest.approx(-0.25 / 3, rel=1e-12)
    assert stats["dpo/margin"] == pytest.approx(BETA * sum(H) / 3, rel=1e-12)
    assert stats["dpo/accuracy"] == pytest.approx(2 / 3)
    assert stats["dpo/logps_chosen"] == pytest.approx(-2.0) and stats["dpo/logps_rejected"] == pytest.approx(-1.5)


def test_dpo_gradient_is_the_papers():
    # ∂L/∂π_c = -β·σ(-β·h) / B (Rafailov et al. 2023, §4): larger where the implicit reward is wrong
    policy_chosen, *rest = tensors(requires_grad=True)
    dpo_loss(policy_chosen, *rest, beta=BETA)[0].backward()
    expected = [-BETA / (1 + math.exp(BETA * h)) / 3 for h in H]
    assert policy_chosen.grad.tolist() == pytest.approx(expected, rel=1e-12)


def test_cdpo_loss_by_hand_and_plain_dpo_at_zero_smoothing():
    eps = 0.1
    loss, stats = dpo_loss(*tensors(), beta=BETA, label_smoothing=eps)
    expected = sum((1 - eps) * neg_log_sigmoid(BETA * h) + eps * neg_log_sigmoid(-BETA * h) for h in H) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert dpo_loss(*tensors(), beta=BETA, label_smoothing=0.0)[0].item() == dpo_loss(*tensors(), beta=BETA)[0].item()
    # a pair with a large margin still costs ε·β·h: cDPO's loss has a finite optimum in h
    big = [torch.tensor([v], dtype=torch.float64) for v in (0.0, -40.0, 0.0, 0.0)]
    assert dpo_loss(*big, beta=BETA, label_smoothing=eps)[0].item() == pytest.approx(eps * BETA * 40, rel=1e-6)


def test_ipo_loss_by_hand():
    loss, stats = ipo_loss(*tensors(), beta=BETA)
    # (h - 1/(2β))² with 1/(2β) = 1: 0, 0.25, 4
    assert loss.item() == pytest.approx((0 + 0.25 + 4) / 3, rel=1e-12) and stats["loss/ipo"] == loss.item()
    assert stats["dpo/margin"] == pytest.approx(BETA * sum(H) / 3, rel=1e-12)


# --------------------------------------------------------------------------- pairs


def test_a_k3_ranking_expands_into_its_three_pairs(tmp_path):
    comparison = {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1], "task": "t", "gold": [0.5, 0.1, 0.9]}
    assert ranked_pairs(comparison) == [
        {"prompt": "p", "chosen": "c", "rejected": "a", "task": "t", "gold": [0.9, 0.5]},
        {"prompt": "p", "chosen": "c", "rejected": "b", "task": "t", "gold": [0.9, 0.1]},
        {"prompt": "p", "chosen": "a", "rejected": "b", "task": "t", "gold": [0.5, 0.1]},
    ]
    path = tmp_path / "pairs.jsonl"
    atomic_write_jsonl(path, [{"prompt": "q", "chosen": "yes", "rejected": "no"}])
    assert load_pairs(str(path), "pair") == [{"prompt": "q", "chosen": "yes", "rejected": "no", "task": "default",
                                              "index": 0}]


def test_response_logps_sum_exactly_the_response_tokens(tiny_model_cfg):
    model, tokenizer = load_policy(tiny_model_cfg, device="cpu")
    pairs = [{"prompt": "What is 12 plus 30?", "chosen": "The answer is 42.", "rejected": "It is 41."},
             {"prompt": "hello there!", "chosen": "Hi! How are you?", "rejected": "Go away."}]
    cfg = DPOConfig(max_length=256)
    batch = encode_pairs(tokenizer, pairs, cfg)
    with torch.no_grad():
        sums, counts = response_logps(model, batch)
        for i, (prompt, response) in enumerate([(p["prompt"], p[k]) for k in ("chosen", "rejected") for p in pairs]):
            # each row alone and unpadded: the prompt conditions, the response (with its end-of-turn) is scored
            p_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
            r_ids = tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([p_ids + r_ids])).logits[0].double(), -1)
            expected = sum(logp[len(p_ids) + t - 1, r].item() for t, r in enumerate(r_ids))
            assert counts[i] == len(r_ids)
            assert sums[i].item() == pytest.approx(expected, rel=1e-5)
        # the pair view: sums for dpo, per-token means for ipo (the same tokens for π and π_ref)
        pairs = [{**p, "index": i} for i, p in enumerate(pairs)]
        reference = dpo.Reference({"train": torch.stack(sums.chunk(2), 1) - 1.0}, None, False)
        sum_view = dpo.pair_logps(model, reference, "train", pairs, tokenizer, cfg)
        mean_view = dpo.pair_logps(model, reference, "train", pairs, tokenizer, DPOConfig(max_length=256, loss_type="ipo"))
    assert torch.allclose(sum_view[0], sums[:2]) and torch.allclose(sum_view[3], sums[2:] - 1.0)
    assert torch.allclose(mean_view[1], sums[2:] / counts[2:]) and torch.allclose(mean_view[2], (sums[:2] - 1) / counts[:2])


def test_the_reference_cache_key_follows_what_the_log_probabilities_depend_on():
    splits = {"train": [{"prompt": "p", "chosen": "a", "rejected": "b"}]}
    key = dpo.cache_key(DPOConfig(), splits)
    assert key == dpo.cache_key(DPOConfig(lr=1.0, beta=0.3, epochs=4), splits)  # training settings do not matter
    for other in (DPOConfig(max_length=64), DPOConfig(system_prompt="Be brief."), DPOConfig(precision="bf16-mixed"),
                  DPOConfig(model=ModelConfig(name_or_path="tiny-random"))):
        assert dpo.cache_key(other, splits) != key
    assert dpo.cache_key(DPOConfig(), {"train": [{"prompt": "p", "chosen": "a", "rejected": "c"}]}) != key


# --------------------------------------------------------------------------- the dpo stage

WORDS = "river stone cloud music garden paper window bread light storm sun moon sea tree bird fox".split()


def comparisons(n: int, seed: int) -> list[dict]:
    return test_behaviour_fixture.comparisons(n, seed, words=WORDS)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-data")
    atomic_write_jsonl(root / "train.jsonl", comparisons(16, 0))  # 48 pairs
    atomic_write_jsonl(root / "eval.jsonl", comparisons(8, 1))  # 24 held-out pairs
    return root


def overrides(prefs, out, *extra) -> list[str]:
    return [f"train_data={prefs / 'train.jsonl'}", f"eval_data={prefs / 'eval.jsonl'}", f"out_dir={out}",
            "model.name_or_path=tiny-random", "batch_size=8", "max_length=64", "beta=0.5", "lr=3e-4", "epochs=2",
            "log_with=none", *extra]


def cfg_for(prefs, out, *extra) -> DPOConfig:
    return load_config(DPOConfig, None, overrides(prefs, out, *extra))


def test_dpo_learns_the_held_out_preferences_and_writes_its_outputs(prefs, tmp_path, tiny_model_cfg):
    out = tmp_path / "run"
    summary = train(cfg_for(prefs, out))
    for name in ("summary.json", "config.yaml", "metrics.jsonl", "ref_logprobs.json", "model/config.json"):
        assert (out / name).exists(), name
    assert not (out / "checkpoints").exists()
    assert summary["steps"] == 12 and summary["train_pairs"] == 48 and summary["eval_pairs"] == 24
    assert json.loads((out / "summary.json").read_text())["eval"] == summary["eval"]

    rows = read_jsonl(out / "metrics.jsonl")
    train_rows, eval_rows = [r for r in rows if "loss/total" in r], [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13)) and [r["step"] for r in eval_rows] == [6, 12]
    for key in ("loss/dpo", "dpo/rewards_chosen", "dpo/rewards_rejected", "dpo/margin", "dpo/accuracy",
                "optim/grad_norm", "optim/lr"):
        assert all(math.isfinite(r[key]) for r in train_rows), key
    # at the first step the policy is π_ref itself: h = 0 and the loss is log 2
    assert train_rows[0]["loss/total"] == pytest.approx(math.log(2), abs=1e-6) and train_rows[0]["dpo/margin"] == 0
    first, last = eval_rows[0], eval_rows[-1]
    assert first["eval/accuracy"] > 0.5 and last["eval/accuracy"] >= 0.9 and last["eval/accuracy_gold"] >= 0.9
    assert last["eval/loss"] < first["eval/loss"] < math.log(2)
    assert last["eval/rewards_chosen"] > last["eval/rewards_rejected"] and last["eval/margin"] > first["eval/margin"]
    assert summary["eval"]["accuracy"] == last["eval/accuracy"] and summary["loss_last"] < summary["loss_first"]

    init, _ = load_policy(tiny_model_cfg, device="cpu")
    trained, _ = load_policy(ModelConfig(name_or_path=str(out / "model")), device="cpu")
    unchanged = [n for (n, p), (_, q) in zip(init.named_parameters(), trained.named_parameters()) if torch.equal(p, q)]
    assert not unchanged

    cached = json.loads((out / "ref_logprobs.json").read_text())
    assert len(cached["train"]) == 48 and len(cached["eval"]) == 24


@pytest.mark.parametrize("loss_type, extra", [("ipo", []), ("cdpo", ["label_smoothing=0.1"])])
def test_ipo_and_cdpo_runs_learn_too(prefs, tmp_path, loss_type, extra):
    summary = train(cfg_for(prefs, tmp_path / loss_type, f"loss_type={loss_type}", *extra, "lr=1e-3"))
    rows = read_jsonl(tmp_path / loss_type / "metrics.jsonl")
    first_loss = 1.0 if loss_type == "ipo" else math.log(2)  # h = 0: (0 - 1/(2β))² = 1, or log 2
    assert rows[0]["loss/total"] == pytest.approx(first_loss, abs=1e-6)
    assert summary["eval"]["accuracy"] >= 0.9 and summary["loss_last"] < summary["loss_first"]


@pytest.mark.parametrize("lora", [False, True])
def test_the_reference_is_the_same_precomputed_or_computed_each_step(prefs, tmp_path, lora):
    """A frozen copy (or the policy with its adapters off) gives π_ref as the table does."""
    extra = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "lr=1e-2"] if lora else []
    pre = train(cfg_for(prefs, tmp_path / "pre", "epochs=1", *extra))
    live = train(cfg_for(prefs, tmp_path / "live", "epochs=1", "precompute_ref=false", *extra))
    assert not (tmp_path / "live" / "ref_logprobs.json").exists()
    for key, value in pre["eval"].items():
        assert live["eval"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert pre["eval"]["accuracy"] > 0.5
    if lora:  # adapters merged into a plain causal LM
        weights = saved_weights(tmp_path / "pre" / "model")
        assert weights and not any("lora" in k for k in weights)


def test_config_refuses_mismatched_loss_settings():
    for bad in (["loss_type=cdpo"], ["loss_type=cdpo", "label_smoothing=0.5"], ["loss_type=ipo", "label_smoothing=0.1"],
                ["label_smoothing=0.1"], ["beta=0"], ["batch_size=0"], ["max_length=1"]):
        with pytest.raises(Exception, match="label_smoothing|beta|batch_size|max_length"):
            load_config(DPOConfig, None, bad)
    assert load_config(DPOConfig, None, ["loss_type=cdpo", "label_smoothing=0.2"]).label_smoothing == 0.2


def test_cli_dpo_rejects_bad_data_before_loading_a_model(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    atomic_write_jsonl(good, comparisons(2, 0))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(comparisons(1, 0)[0]) + '\n{"prompt": "q", "responses": ["a", "b"], "ranking": [0, 0]}\n')
    code = cli_main(["dpo", f"train_data={good}", f"eval_data={bad}", "model.name_or_path=does/not-exist",
                     f"out_dir={tmp_path / 'x'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: field 'ranking'" in err and "not a permutation" in err
    assert not (tmp_path / "x").exists()


def test_dpo_help_and_train_is_a_short_recipe(capsys):
    assert cli_main(["dpo", "--help"]) == 0
    assert "loss_type" in capsys.readouterr().out
    sizes = [n for name, _, n in functions(PACKAGE / "dpo.py") if name == "train"]
    assert sizes and sizes[0] <= 50


# --------------------------------------------------------------------------- kill -9 and resume


def test_sigkilled_dpo_run_resumes_to_the_same_result(prefs, tmp_path, monkeypatch):
    procs = []

    def recorded(*args, **kwargs):
        procs.append(run_stage(*args, **kwargs))
        return procs[-1]

    monkeypatch.setattr(test_sft, "run_stage", recorded)  # to read what the resumed run printed
    assert run_stage("dpo", overrides(prefs, tmp_path / "straight")).returncode == 0
    killed = tmp_path / "killed"
    # killed mid epoch 1 (6 steps an epoch), resumed from the end of epoch 0
    assert_killed_run_resumes_exactly("dpo", overrides(prefs, killed), tmp_path / "straight", killed, "train:9",
                                      resumes_from="step-000006")
    assert f"reference log-probabilities from {killed / 'ref_logprobs.json'}" in procs[-1].stdout  # not recomputed
    assert json.loads((killed / "ref_logprobs.json").read_text()) == \
        json.loads((tmp_path / "straight" / "ref_logprobs.json").read_text())
