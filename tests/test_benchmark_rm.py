"""The score-model benchmark runs train-rm itself (tiny model) and reports its optimiser
steps from the trainer's own ``time/step``, with figures that agree with each other. No
timed assertions: speed is the benchmark's to measure, not the tests'."""

import json
import statistics
from pathlib import Path

import pytest

from experiments import benchmark_rm
from stable_rlhf import reward_model
from stable_rlhf.io import read_jsonl

pytestmark = pytest.mark.usefixtures("small_model_cpu")

TESTBED = Path(__file__).resolve().parents[1] / "data" / "testbed"


@pytest.fixture
def train_calls(monkeypatch) -> list:
    """The configs ``stable_rlhf.reward_model.train`` was called with (it still runs)."""
    calls, real = [], reward_model.train

    def spy(cfg):
        calls.append(cfg)
        return real(cfg)

    monkeypatch.setattr(reward_model, "train", spy)
    return calls


def test_benchmark_runs_train_rm_and_reports_its_steps(tmp_path, capsys, train_calls):
    out, run_dir = tmp_path / "bench.json", tmp_path / "run"
    result = benchmark_rm.main(["--model", "tiny-random", "--data-dir", str(TESTBED), "--steps", "2",
                                "--warmup", "1", "--batch-size", "4", "--max-length", "64",
                                "--out-dir", str(run_dir), "--json", str(out)])

    [cfg] = train_calls
    assert (cfg.objective, cfg.epochs, cfg.batch_size, cfg.max_length) == ("rm", 1, 4, 64)
    assert len(read_jsonl(cfg.train_data)) == 3 * 4  # (warm-up + measured) steps of full batches
    assert json.loads(out.read_text()) == result
    assert result["trainer"] == "stable_rlhf.reward_model.train" and result["world"] == 1

    # every optimiser step's row has the trainer's time/step; the epoch's eval row has none
    rows = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["time/step"] > 0 for r in steps)
    assert all("time/step" not in r for r in rows if "eval/accuracy" in r)
    step = result["seconds"]["step"]
    assert step["mean"] == pytest.approx(statistics.mean(r["time/step"] for r in steps[1:]))
    assert 0 < step["min"] <= step["mean"] <= step["max"]

    assert result["seconds_per_step"] == step["mean"]
    assert result["comparisons_per_s"] == pytest.approx(4 / step["mean"])
    assert result["pairs_per_s"] == pytest.approx(3 * result["comparisons_per_s"])  # K = 3: 3 pairs each
    assert result["peak_rss_mb"] > 0
    printed = capsys.readouterr().out
    assert "stable_rlhf.reward_model.train" in printed and "comparisons/s" in printed and "pairs/s" in printed


def test_the_draw_is_task_stratified():
    drawn = benchmark_rm.draw(TESTBED / "preferences_train.jsonl", 12)
    tasks = [c["task"] for c in drawn]
    assert len(drawn) == 12 and all(tasks.count(t) == 2 for t in set(tasks)) and len(set(tasks)) == 6
    with pytest.raises(SystemExit, match="needs 100000"):
        benchmark_rm.draw(TESTBED / "preferences_train.jsonl", 100000)
