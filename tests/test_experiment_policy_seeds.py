"""experiments/policy_seeds.py on the tiny model: seeds run, curves and the 3-std verdict
are computed from the run directories, plots are drawn, finished seeds are skipped."""

import json
from pathlib import Path

import pytest

from experiments import policy_seeds

pytestmark = pytest.mark.usefixtures("small_model_cpu")

TESTBED = Path(__file__).resolve().parents[1] / "data" / "testbed"


def test_policy_seeds_runs_summarises_and_plots(tmp_path, capsys):
    out = tmp_path / "exp"

    overrides = ["model.name_or_path=tiny-random", f"prompts={TESTBED / 'prompts_train.jsonl'}",
                 f"eval.prompts={TESTBED / 'prompts_eval.jsonl'}", "eval.forget_prompts=null",
                 "eval.limit_per_task=1", "eval.every=1", "eval.generation.max_new_tokens=8",
                 "generation.max_new_tokens=8", "steps=2", "batch_size=4", "mini_batch_size=2", "lr=1e-3",
                 "log_with=none", "reward.workers=1"]
    assert policy_seeds.main([*overrides, "--config", "", "--out", str(out), "--seeds", "0", "1"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["seeds"] == [0, 1]
    for seed in ("0", "1"):
        steps = [s for s, _ in result["curves"][seed]]
        assert steps == [0, 1, 2]
    # the verdict is recomputed from the curves
    change = [result["curves"][s][-1][1] - result["curves"][s][0][1] for s in ("0", "1")]
    assert result["change"] == pytest.approx(change)
    assert result["exceeds_3_std"] == (sum(change) / 2 > 3 * result["change_std"])
    assert (out / "plots" / "gold_curve.png").stat().st_size > 1000
    assert (out / "plots" / "gold_vs_kl.png").stat().st_size > 1000
    # the degenerate share rides along (tiny-random answers are gibberish: flagged)
    assert [s for s, _ in result["degenerate_curves"]["0"]] == [0, 1, 2]
    assert all(0.0 <= v <= 1.0 for _, v in result["degenerate_curves"]["0"])
    printed = capsys.readouterr().out
    assert "more than 3 std" in printed and "flags degenerate, first → last: seed 0:" in printed
    # a second call skips the finished seeds and reports the same result
    before = (out / "seed0" / "metrics.jsonl").read_text()
    assert policy_seeds.main([*overrides, "--config", "", "--out", str(out), "--seeds", "0", "1"]) == 0
    assert (out / "seed0" / "metrics.jsonl").read_text() == before
