"""Score-model trainer (train-rm / train-am) on tiny models: it learns, writes its contract,
skips and stops on non-finite losses, and resumes exactly after SIGKILL."""

import json
import math
import random

import pytest
import torch

from stable_rlhf import reward_model as rmod
from stable_rlhf.cli import main as cli_main
from stable_rlhf.config import load_config
from stable_rlhf.io import atomic_write_jsonl, read_jsonl
from stable_rlhf.models import ScoreModel
from stable_rlhf.data import ranks_of
from stable_rlhf.reward_model import ScoreTrainConfig, comparison_metrics, per_task_normalised_run, train
from stable_rlhf.runs import latest_checkpoint
from stable_rlhf.scoring import ScoreSource, normalise_per_task, per_task_stats
from tests.test_sft import assert_killed_run_resumes_exactly, run_stage

WORDS = "river stone cloud music garden paper window bread light storm".split()


def synthetic(n: int, seed: int, k: int = 3) -> list[dict]:
    """Learnable comparisons: the more times 'good' appears, the better; two tasks."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        task = "alpha" if i % 2 else "beta"
        goods = rng.sample(range(4), k)
        responses = [" ".join(rng.sample(WORDS, 3) + ["good"] * g + ["bad"] * (3 - g)) for g in goods]
        ranking = sorted(range(k), key=lambda j: -goods[j])
        out.append({"prompt": f"say something about {rng.choice(WORDS)}", "responses": responses,
                    "ranking": ranking, "task": task, "gold": [float(g) for g in goods], "sft_samples": True})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefs")
    atomic_write_jsonl(d / "train.jsonl", synthetic(48, 0))
    atomic_write_jsonl(d / "eval.jsonl", synthetic(16, 1))
    return d


def overrides(data, out, *extra) -> list[str]:
    return [f"train_data={data / 'train.jsonl'}", f"eval_data={data / 'eval.jsonl'}", f"out_dir={out}",
            "model.name_or_path=tiny-random", "model.tiny_hidden=32", "batch_size=8", "lr=3e-3", "head_lr=3e-2",
            "warmup_ratio=0", *extra]


def cfg_for(data, out, *extra):
    return load_config(ScoreTrainConfig, None, overrides(data, out, "log_with=none", *extra))


def test_ranks_of():
    assert ranks_of([2, 0, 1]) == [1, 2, 0]


def test_comparison_metrics_hand_computed():
    comps = [{"ranking": [0, 1], "task": "a", "gold": [1.0, 0.0], "responses": ["x", "y"]},
             {"ranking": [1, 0], "task": "b", "gold": [0.0, 0.0], "responses": ["x", "y"]}]
    m = comparison_metrics(comps, [[3.0, 1.0], [-1.0, 0.0]], n_bins=5, margin=2.5)
    assert m["accuracy"] == 1.0 and m["gold_pairs"] == 1  # the tied-gold pair is left out
    assert m["accuracy_labels"] == 1.0 and m["pairs"] == 2
    assert m["frac_within_margin"] == pytest.approx(3 / 4)
    assert m["per_task"]["a"]["score_mean"] == 2.0 and m["per_task"]["b"]["score_mean"] == -0.5
    assert m["across_task_std_of_means"] == pytest.approx(1.25)
    # calibration: σ(2) = 0.881 and σ(1) = 0.731, both right -> ECE = mean(1 - conf)
    expected = ((1 - 1 / (1 + 2.718281828 ** -2)) + (1 - 1 / (1 + 2.718281828 ** -1))) / 2
    assert m["ece"] == pytest.approx(expected, rel=1e-6)


def test_per_task_normalisation_gives_zero_mean_unit_std():
    scores = [1.0, 3.0, 10.0, 14.0, 12.0]
    tasks = ["a", "a", "b", "b", "b"]
    stats = per_task_stats(scores, tasks)
    z = normalise_per_task(torch.tensor(scores, dtype=torch.float64), tasks, stats)
    assert z[:2].tolist() == pytest.approx([-1.0, 1.0])
    assert z[2:].mean().item() == pytest.approx(0.0, abs=1e-12) and z[2:].std(unbiased=False).item() == pytest.approx(1.0)
    assert normalise_per_task(torch.tensor([5.0]), ["unseen"], stats).item() == pytest.approx(
        (5.0 - stats["global"]["mean"]) / stats["global"]["std"])


def test_train_rm_learns_and_writes_its_contract(data, tmp_path):
    cfg = cfg_for(data, tmp_path / "rm", "epochs=4", "log_with=tensorboard", "keep_final_checkpoint=true")
    summary = train(cfg)
    assert summary["steps"] == 24 and summary["skipped_updates"] == 0
    assert latest_checkpoint(tmp_path / "rm").name == "step-000024"  # one per epoch, the newest kept
    assert list((tmp_path / "rm" / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    # it learned the synthetic preference (chance is 0.5)
    assert summary["accuracy"] > 0.85, summary["accuracy"]
    for key in ("accuracy", "ece", "score_mean", "score_std", "per_task", "reliability"):
        assert key in summary
    assert set(summary["per_task"]) == {"alpha", "beta"}
    assert {"accuracy", "ece", "score_mean", "score_std", "n"} <= set(summary["per_task"]["alpha"])
    saved = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert saved["accuracy"] == summary["accuracy"] and (tmp_path / "rm" / "config.yaml").exists()
    metrics = read_jsonl(tmp_path / "rm" / "metrics.jsonl")
    assert any("eval/accuracy" in m for m in metrics) and all("loss/center" not in m for m in metrics)
    rows = read_jsonl(tmp_path / "rm" / "scores_eval.jsonl")
    assert len(rows) == 16 * 3 and {"task", "score", "gold"} <= set(rows[0])
    # the checkpoint: plain transformers backbone + head; training statistics attached
    model = ScoreModel.from_pretrained(tmp_path / "rm" / "model")
    assert set(model.extra["score_stats"]["per_task"]) == {"alpha", "beta"} and model.extra["objective"] == "rm"
    source = ScoreSource.load(tmp_path / "rm" / "model", normalize="per_task")
    out = source(["say something about river"] * 2, ["river good good good", "river bad bad bad"], ["alpha"] * 2)
    assert out.shape == (2,) and out[0] > out[1]


def test_parameters_change_and_am_terms_are_logged(data, tmp_path):
    from stable_rlhf.models import load_score_model

    cfg = cfg_for(data, tmp_path / "am", "epochs=3", "objective=am")
    init, _ = load_score_model(cfg.model)
    summary = train(cfg)
    trained = ScoreModel.from_pretrained(tmp_path / "am" / "model")
    assert not torch.equal(init.head.weight, trained.head.weight)
    changed = [n for (n, p), (_, q) in zip(init.backbone.named_parameters(), trained.backbone.named_parameters())
               if not torch.equal(p, q)]
    assert len(changed) > 10
    metrics = [m for m in read_jsonl(tmp_path / "am" / "metrics.jsonl") if "loss/total" in m]
    for term in ("loss/rank", "loss/center", "loss/bound", "loss/task"):
        assert all(term in m for m in metrics), term
    # the AM's properties on held-out data: bounded, centred per task, still ranking
    assert summary["frac_within_margin"] >= 0.99
    assert all(abs(t["score_mean"]) < 0.5 for t in summary["per_task"].values()), summary["per_task"]
    assert summary["accuracy"] > 0.7


def test_nonfinite_losses_skip_updates_then_stop_with_a_checkpoint_to_resume(data, tmp_path, monkeypatch):
    out, real = tmp_path / "nan", rmod.score_loss
    calls = {"n": 0}

    def nan_from_the_second_step(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), stats) if calls["n"] >= 2 else (loss, stats)

    monkeypatch.setattr(rmod, "score_loss", nan_from_the_second_step)
    with pytest.raises(RuntimeError, match="2 consecutive steps"):
        train(cfg_for(data, out, "epochs=2", "max_bad_steps=2"))
    assert latest_checkpoint(out).name == "step-000003"  # saved mid-epoch, where it stopped
    assert [r["skipped_updates"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 1]
    monkeypatch.setattr(rmod, "score_loss", real)
    summary = train(cfg_for(data, out, "epochs=2", "max_bad_steps=2", "resume=true"))
    assert summary["steps"] == 12 and summary["skipped_updates"] == 2
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss/total" in r]
    assert steps == list(range(1, 13))  # the rest of epoch 0, then epoch 1


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("small-prefs")
    atomic_write_jsonl(d / "train.jsonl", synthetic(16, 0))
    atomic_write_jsonl(d / "eval.jsonl", synthetic(8, 1))
    return d


@pytest.fixture(scope="module")
def straight_am(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("am-cli") / "straight"
    proc = run_stage("train-am", overrides(small_data, out, "epochs=2", "log_with=none"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.parametrize("fault", ["train:3", "checkpoint:4"])  # mid epoch 1; while writing epoch 1's checkpoint
def test_sigkilled_am_run_resumes_to_the_same_result(straight_am, small_data, tmp_path, fault):
    """The AM: its running task moments are part of what a checkpoint must carry."""
    out = tmp_path / "killed"
    assert_killed_run_resumes_exactly("train-am", overrides(small_data, out, "epochs=2", "log_with=none"),
                                      straight_am, out, fault, resumes_from="step-000002")
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight_am, out))
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert read_jsonl(out / "scores_eval.jsonl") == read_jsonl(straight_am / "scores_eval.jsonl")


def test_sigkilled_rm_run_resumes_to_the_same_result(small_data, tmp_path):
    straight = tmp_path / "straight"
    proc = run_stage("train-rm", overrides(small_data, straight, "epochs=2", "log_with=none"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "killed"
    assert_killed_run_resumes_exactly("train-rm", overrides(small_data, out, "epochs=2", "log_with=none"),
                                      straight, out, "train:3", resumes_from="step-000002")
    assert read_jsonl(out / "scores_eval.jsonl") == read_jsonl(straight / "scores_eval.jsonl")


def test_per_task_normalised_run(data, tmp_path):
    train(cfg_for(data, tmp_path / "rm", "epochs=1"))
    result = per_task_normalised_run(tmp_path / "rm", tmp_path / "rm-pertask")
    raw = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert result["objective"] == "rm-pertask"
    assert result["accuracy"] == raw["accuracy"]  # a per-task affine map keeps within-prompt order
    assert len(read_jsonl(tmp_path / "rm-pertask" / "scores_eval.jsonl")) == 48


def test_cli_train_am_sets_objective_and_rejects_bad_data_first(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0], "task": "t"}\n')
    code = cli_main(["train-am", f"train_data={bad}", f"eval_data={bad}", "model.name_or_path=does/not-exist",
                     f"out_dir={tmp_path / 'x'}"])
    assert code == 2
    assert f"{bad}:1: field 'ranking'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert load_config(ScoreTrainConfig, None, ["objective=am"]).out_dir == "runs/am"


def test_epoch_order_is_a_permutation_and_stratified():
    from stable_rlhf.reward_model import epoch_order

    tasks = ["a"] * 40 + ["b"] * 20 + ["c"] * 20
    order = epoch_order(tasks, seed=3, stratify=True)
    assert sorted(order) == list(range(80))
    assert order == epoch_order(tasks, seed=3, stratify=True) and order != epoch_order(tasks, seed=4, stratify=True)
    for start in range(0, 80, 8):  # every batch of 8 holds every task, in proportion
        window = [tasks[i] for i in order[start : start + 8]]
        assert 2 <= window.count("a") <= 6 and window.count("b") >= 1 and window.count("c") >= 1
    plain = epoch_order(tasks, seed=3, stratify=False)
    assert sorted(plain) == list(range(80))


@pytest.mark.parametrize("dropout", [False, True])
def test_dropout_is_off_while_training_unless_asked(data, tmp_path, monkeypatch, dropout):
    modes = []
    forward = ScoreModel.forward

    def recording(self, *args, **kwargs):
        if torch.is_grad_enabled():
            modes.append(self.training)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ScoreModel, "forward", recording)
    train(cfg_for(data, tmp_path / "rm", "epochs=1", f"dropout={str(dropout).lower()}"))
    assert modes and set(modes) == {dropout}


def test_mark_layout_puts_back_what_an_uncased_tokenizer_drops():
    from stable_rlhf.scoring import mark_layout

    text = "Hello World, NASA and iPhone.\n- item one\n    def f(x):\n\treturn X\n  two"
    assert mark_layout(text) == ("[unused1] Hello [unused1] World, [unused2] NASA and iPhone. [unused3] - item one "
                                 "[unused3] [unused4] def f(x): [unused3] [unused4] return [unused1] X "
                                 "[unused3] [unused4] two")
    assert mark_layout("all lowercase here") == "all lowercase here"


def test_the_minilm_score_model_sees_case_line_breaks_and_indentation():
    from stable_rlhf.config import ModelConfig
    from stable_rlhf.models import load_score_model
    from stable_rlhf.scoring import LAYOUT_MARKS, encode

    _, tokenizer = load_score_model(ModelConfig(name_or_path="minilm"), device="cpu")
    vocab = len(tokenizer)

    def ids(response: str) -> list[int]:
        enc = encode(tokenizer, ["write it"], [response], 64)
        return enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()

    # each pair reads the same to the bare tokenizer, and differently to the score model
    for a, b in (("the cat sat.", "The Cat sat."), ("one two", "one\ntwo"), ("x = 1", "    x = 1"),
                 ("loud words", "LOUD words")):
        assert tokenizer(a)["input_ids"] == tokenizer(b)["input_ids"]
        assert ids(a) != ids(b), (a, b)
    marks = tokenizer.convert_tokens_to_ids(list(LAYOUT_MARKS.values()))
    assert len(tokenizer) == vocab and marks == [2, 3, 4, 5]  # reserved entries: no new ids
    assert set(ids("A\n\tB")) >= {marks[0], marks[2], marks[3]}



def test_running_moments_count_relative_to_the_batch():
    """The running prior counts w times each task's scores in the batch, so with w = 0.5 a
    batch's own scores carry 2/3 of the pooled mean whatever the batch size."""
    running = rmod.RunningTaskMoments(3, momentum=0.9, weight=0.5)
    running.update(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 1]))  # task 2 never seen
    for per_task in (2, 6):
        ids = torch.tensor([0] * per_task + [1] * per_task + [2] * per_task)
        prior = running.prior(ids)
        assert prior["prior_count"].tolist() == [0.5 * per_task, 0.5 * per_task, 0.0]
        scores = torch.zeros(len(ids), dtype=torch.float64, requires_grad=True)
        loss, _ = rmod.task_moment_loss(scores, ids, 3, target_std=1.0, eps=1.0, **prior)
        loss.backward()
        # task 0 (prior mean 2, var 1; batch scores 0): n = 1.5·b, μ = 2/3, s² = 2.5/1.5 - μ²;
        # d/da_i [μ² + (½·log(s² + 1))²] = (2μ/n)·(1 - ½·log(s² + 1)/(s² + 1)), the same for any b
        n, mu = 1.5 * per_task, 2 / 3
        var = 2.5 / 1.5 - mu**2
        half_log = 0.5 * math.log(var + 1)
        expected = 2 * mu / n * (1 - half_log / (var + 1))
        assert scores.grad[:per_task].tolist() == pytest.approx([expected] * per_task, rel=1e-9)
        assert scores.grad[:per_task].sum().item() == pytest.approx(2 * mu / 1.5 * (1 - half_log / (var + 1)))


def test_a_free_scale_am_ranks_and_ppo_reads_it_in_its_training_unit(data, tmp_path):
    """am.scale=free: the AM terms read scores in units of the batch's spread, so the model
    keeps ranking; PPO (reward.normalize auto) divides its scores by their training std."""
    from stable_rlhf.rewards import ModelReward, RewardConfig

    summary = train(cfg_for(data, tmp_path / "am", "epochs=3", "objective=am", "am.scale=free"))
    assert summary["accuracy"] > 0.7
    model_dir = tmp_path / "am" / "model"
    train_std = ScoreModel.from_pretrained(model_dir).extra["score_stats"]["global"]["std"]
    records = [{"prompt": "say something about river", "task": "alpha"}] * 2
    responses = ["river good good good", "river bad bad bad"]
    raw = ScoreSource.load(model_dir)([r["prompt"] for r in records], responses, ["alpha"] * 2)
    reward = ModelReward(RewardConfig(source="am", path=str(model_dir)), device="cpu")
    assert reward.scale == pytest.approx(train_std)
    assert reward(records, responses).tolist() == pytest.approx((raw / train_std).tolist(), rel=1e-5)
    as_is = ModelReward(RewardConfig(source="am", path=str(model_dir), normalize="none"), device="cpu")
    assert as_is(records, responses).tolist() == pytest.approx(raw.tolist(), rel=1e-5)
