"""The PPO benchmark runs end to end on the tiny model and reports every phase."""

import json

import pytest

from experiments import benchmark_ppo

pytestmark = pytest.mark.usefixtures("small_model_cpu")


@pytest.mark.parametrize("lora", [False, True])
def test_benchmark_reports_phases_tokens_and_memory(tmp_path, capsys, lora):
    out = tmp_path / "bench.json"
    args = ["--model", "tiny-random", "--steps", "1", "--batch-size", "4", "--new-tokens", "8", "--json", str(out)]
    result = benchmark_ppo.main(args + (["--lora"] if lora else []))
    assert json.loads(out.read_text()) == result
    assert set(result["seconds"]) == {"generate", "score", "forward", "update", "step"}
    assert all(v > 0 for v in result["seconds"].values())
    assert result["seconds"]["step"] >= result["seconds"]["generate"] + result["seconds"]["update"]
    assert 4 <= result["generated_tokens_per_step"] <= 4 * 8
    assert result["peak_memory_mb"] > 0 and result["lora"] == lora
    assert "| update |" in capsys.readouterr().out
