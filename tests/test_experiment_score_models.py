"""experiments/score_models.py end to end on a tiny model: runs, skips finished runs, table, plots."""

import json

import pytest

from experiments.score_models import main, table
from stable_rlhf.io import atomic_write_jsonl
from tests.test_reward_model import synthetic


def fake(acc, spread, within=1.0):
    return {"accuracy": acc, "ece": 0.05, "across_task_std_of_means": spread, "frac_within_margin": within,
            "score_std": 1.0}


def test_table_aggregates_over_seeds():
    per_seed = {0: {"rm": fake(0.6, 0.8), "am": fake(0.62, 0.1), "rm-pertask": fake(0.6, 0.05)},
                1: {"rm": fake(0.7, 0.4), "am": fake(0.66, 0.2), "rm-pertask": fake(0.7, 0.05)}}
    text, agg = table(per_seed)
    assert agg["rm"]["accuracy"]["mean"] == pytest.approx(0.65)
    assert agg["rm"]["accuracy"]["std"] == pytest.approx(0.0707107, rel=1e-5)
    assert agg["am_over_rm_spread"] == pytest.approx([0.125, 0.5])
    assert "| AM | 0.6400 ± 0.0283 |" in text and "0.125, 0.500" in text


def tiny_config(tmp_path):
    """A score-model config on synthetic comparisons and the tiny random backbone."""
    atomic_write_jsonl(tmp_path / "train.jsonl", synthetic(16, 0))
    atomic_write_jsonl(tmp_path / "eval.jsonl", synthetic(8, 1))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"train_data: {tmp_path / 'train.jsonl'}\neval_data: {tmp_path / 'eval.jsonl'}\n"
                   "model:\n  name_or_path: tiny-random\n  tiny_hidden: 32\nepochs: 1\nbatch_size: 8\n")
    return cfg


def test_runs_skips_finished_runs_and_draws_plots(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    out = tmp_path / "exp"
    assert main(["--config", str(cfg), "--seeds", "0", "--out", str(out)]) == 0
    for name in ("rm-seed0/summary.json", "am-seed0/summary.json", "rm-pertask-seed0/summary.json",
                 "results.md", "results.json", "plots/score_distributions.png", "plots/reliability.png"):
        assert (out / name).exists(), name
    first = (out / "am-seed0" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["--config", str(cfg), "--seeds", "0", "--out", str(out)]) == 0
    assert (out / "am-seed0" / "summary.json").stat().st_mtime_ns == first  # not retrained
    assert "per-task-normalised RM" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["seeds"] == [0]


def test_paired_accuracy_difference(tmp_path):
    from experiments.score_models import paired_accuracy_difference

    def write(name, scores):
        rows = [{"task": "t", "comparison": 0, "response": i, "score": s, "gold": g}
                for i, (s, g) in enumerate(zip(scores, [3.0, 2.0, 1.0]))]
        (tmp_path / name).mkdir()
        atomic_write_jsonl(tmp_path / name / "scores_eval.jsonl", rows)

    write("a", [3, 2, 1])  # all 3 pairs right
    write("b", [1, 2, 3])  # all 3 pairs wrong
    d = paired_accuracy_difference(tmp_path / "a", tmp_path / "b")
    assert d == {"diff": 1.0, "se": 0.0, "pairs": 3}


def test_am_from_rm_starts_each_am_from_its_seeds_rm(tmp_path):
    import yaml

    cfg = tiny_config(tmp_path)
    out = tmp_path / "exp"
    assert main(["--config", str(cfg), "--seeds", "0", "--out", str(out), "--am-from-rm"]) == 0
    am_cfg = yaml.safe_load((out / "am-seed0" / "config.yaml").read_text())
    assert am_cfg["init_from"] == str(out / "rm-seed0" / "model")
    assert yaml.safe_load((out / "rm-seed0" / "config.yaml").read_text())["init_from"] is None
    assert json.loads((out / "results.json").read_text())["am_from_rm"] is True
