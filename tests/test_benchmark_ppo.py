"""The PPO benchmark runs the PPO trainer itself (tiny model) and reports every phase from
the trainer's own metrics, with figures that agree with each other. No timed assertions:
speed is the benchmark's to measure, not the tests'."""

import json
import statistics

import pytest

from experiments import benchmark_ppo
from stable_rlhf import ppo
from stable_rlhf.io import read_jsonl

pytestmark = pytest.mark.usefixtures("small_model_cpu")


@pytest.fixture
def train_calls(monkeypatch) -> list:
    """The configs ``stable_rlhf.ppo.train`` was called with (it still runs)."""
    calls, real = [], ppo.train

    def spy(cfg):
        calls.append(cfg)
        return real(cfg)

    monkeypatch.setattr(ppo, "train", spy)
    return calls


@pytest.mark.parametrize("lora", [False, True])
def test_benchmark_runs_the_trainer_and_reports_its_phases(tmp_path, capsys, train_calls, lora):
    out, run_dir = tmp_path / "bench.json", tmp_path / "run"
    args = ["--model", "tiny-random", "--steps", "2", "--warmup", "1", "--batch-size", "4", "--new-tokens", "8",
            "--out-dir", str(run_dir), "--json", str(out)]
    result = benchmark_ppo.main(args + (["--lora"] if lora else []))

    [cfg] = train_calls
    assert (cfg.steps, cfg.batch_size, cfg.generation.max_new_tokens, cfg.lora.enabled) == (3, 4, 8, lora)
    assert json.loads(out.read_text()) == result
    assert result["trainer"] == "stable_rlhf.ppo.train" and result["lora"] == lora and result["world"] == 1
    seconds = result["seconds"]
    assert set(seconds) == set(benchmark_ppo.PHASES)
    assert all(0 < s["min"] <= s["mean"] <= s["max"] for s in seconds.values())

    # the figures are the trainer's own per-step timings, warm-up step left out
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "time/step" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for phase in ("generate", "score", "forward", "step"):
        assert seconds[phase]["mean"] == pytest.approx(statistics.mean(r[f"time/{phase}"] for r in rows[1:]))

    phases = sum(seconds[k]["mean"] for k in ("generate", "score", "forward", "update"))
    assert 0.8 * seconds["step"]["mean"] <= phases <= seconds["step"]["mean"] * (1 + 1e-9)
    assert result["seconds_per_step"] == seconds["step"]["mean"]
    assert result["samples_per_s"] == pytest.approx(4 / result["seconds_per_step"])
    assert 4 <= result["generated_tokens_per_step"] <= 4 * 8
    assert result["generated_tokens_per_s"] == pytest.approx(
        result["generated_tokens_per_step"] / seconds["generate"]["mean"])
    assert result["peak_rss_mb"] > 0
    printed = capsys.readouterr().out
    assert "stable_rlhf.ppo.train" in printed and "| update |" in printed and "samples/s" in printed


def row(step, generate, score, forward, total, **extra):
    return {"step": step, "time/generate": generate, "time/score": score, "time/forward": forward,
            "time/step": total, "policy/response_tokens": 10.0, **extra}


def test_update_is_the_rest_of_the_step_unless_the_trainer_times_it():
    rest = benchmark_ppo.ppo_figures([row(2, 1.0, 0.5, 2.0, 6.0), row(3, 1.0, 0.5, 2.0, 8.0)], 4, 1)
    assert rest["update_is_rest_of_step"] and rest["seconds"]["update"] == {"mean": 3.5, "min": 2.5, "max": 4.5}
    timed = benchmark_ppo.ppo_figures([row(2, 1.0, 0.5, 2.0, 6.0, **{"time/update": 2.0})], 4, 2)
    assert not timed["update_is_rest_of_step"] and timed["seconds"]["update"]["mean"] == 2.0
    assert timed["samples_per_s"] == pytest.approx(8 / 6.0)  # batch × world / s/step
    assert timed["generated_tokens_per_s"] == pytest.approx(10.0 * 4 * 2 / 1.0)


def test_warmup_steps_eval_rows_and_skipped_steps_are_not_measured():
    rows = [{"step": 0, "eval/gold_norm": 0.3}, row(1, 9.0, 9.0, 9.0, 30.0), {"step": 2, "skipped": 1},
            row(3, 1.0, 0.5, 2.0, 6.0), {"step": 3, "time/eval": 4.0}]
    assert [r["step"] for r in benchmark_ppo.measured_rows(rows, warmup=1)] == [3]
    with pytest.raises(RuntimeError, match="no measured step"):
        benchmark_ppo.measured_rows(rows[:3], warmup=1)
