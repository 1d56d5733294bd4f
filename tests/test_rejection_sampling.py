"""Rejection sampling on the tiny random model: best-of-n selection against a naive
version, a run that trains and writes its contract, exact resume, bad data rejected early."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

import stable_rlhf.rejection_sampling as rs
from stable_rlhf.config import load_config
from stable_rlhf.io import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT / "data" / "testbed"
TASKS = {"arithmetic", "bullets", "code", "keywords", "lowercase", "word_limit"}


def overrides(out, *extra) -> list[str]:
    return [
        f"out_dir={out}", "model.name_or_path=tiny-random", f"prompts={TESTBED / 'prompts_train.jsonl'}",
        f"eval.prompts={TESTBED / 'prompts_eval.jsonl'}", "eval.forget_prompts=null", "eval.limit_per_task=1",
        "eval.generation.max_new_tokens=8", "generation.max_new_tokens=10", "iterations=3",
        "prompts_per_iteration=6", "n=3", "batch_size=4", "lr=1e-3", "drop_truncated=false", "log_with=none",
        "reward.workers=1",
        "keep_final_checkpoint=true", *extra,
    ]


pytestmark = pytest.mark.usefixtures("small_model_cpu")


def run(out, *extra) -> dict:
    return rs.train(load_config(rs.RejectionSamplingConfig, None, overrides(out, *extra)))


def params(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


# --------------------------------------------------------------------------- selection


def test_select_best_keeps_the_best_per_prompt_first_on_ties():
    prompt_index = [0, 0, 0, 1, 1, 1, 2, 2]
    scores = [0.1, 0.5, 0.3, 0.2, 0.2, 0.1, 0.9, 0.9]
    complete = [False] * 8
    assert rs.select_best(prompt_index, scores, complete) == [1, 3, 6]
    assert rs.select_best(prompt_index, torch.tensor(scores), torch.tensor(complete)) == [1, 3, 6]


def test_select_best_threshold_and_truncation():
    prompt_index = [0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.5, 0.3, 0.2, 0.2, 0.1]
    truncated = [False, True, False, True, True, True]
    # the best complete sample wins, not the best one; a prompt with none keeps nothing
    assert rs.select_best(prompt_index, scores, truncated) == [2]
    assert rs.select_best(prompt_index, scores, truncated, drop_truncated=False) == [1, 3]
    # >= threshold: a best exactly at the threshold is kept, one below it is not
    assert rs.select_best(prompt_index, scores, truncated, threshold=0.2, drop_truncated=False) == [1, 3]
    assert rs.select_best(prompt_index, scores, truncated, threshold=0.25, drop_truncated=False) == [1]
    assert rs.select_best(prompt_index, scores, truncated, threshold=0.4) == []


def test_select_best_skips_non_finite_scores_and_any_row_order():
    nan, inf = float("nan"), float("inf")
    assert rs.select_best([0, 0, 0], [nan, inf, -1.0], [False] * 3) == [2]
    assert rs.select_best([0, 0], [nan, -inf], [False] * 2) == []
    # rows need not be prompt-major; the result is in prompt order
    assert rs.select_best([1, 0, 1, 0], [0.3, 0.1, 0.4, 0.2], [False] * 4) == [3, 2]
    with pytest.raises(ValueError, match="3 prompt indices, 2 scores"):
        rs.select_best([0, 0, 1], [0.1, 0.2], [False] * 3)


@pytest.mark.parametrize("seed", range(5))
def test_select_best_matches_a_vectorised_reference(seed):
    # Prompt-major (P, n) scores with many ties: masked argmax returns the first maximum.
    rng = random.Random(seed)
    P, n = 7, 5
    scores = torch.tensor([[rng.choice([0.0, 0.5, 1.0, float("nan")]) for _ in range(n)] for _ in range(P)],
                          dtype=torch.float64)
    truncated = torch.tensor([[rng.random() < 0.3 for _ in range(n)] for _ in range(P)])
    threshold, drop = rng.choice([None, 0.5]), rng.choice([True, False])
    eligible = torch.isfinite(scores) & ~(truncated & drop)
    if threshold is not None:
        eligible &= scores >= threshold
    masked = torch.where(eligible, scores, -math.inf)  # (P, n)
    best = masked.argmax(-1)  # (P,)
    expected = [p * n + int(best[p]) for p in range(P) if eligible[p].any()]
    prompt_index = [p for p in range(P) for _ in range(n)]
    assert rs.select_best(prompt_index, scores.flatten(), truncated.flatten(), threshold, drop) == expected


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rs") / "straight"
    return out, run(out)


def test_rejection_sampling_trains_and_writes_its_contract(tmp_path):
    from stable_rlhf.config import ModelConfig
    from stable_rlhf.models import load_policy

    out = tmp_path / "run"
    summary = run(out, "iterations=2", f"eval.forget_prompts={TESTBED / 'prompts_forget.jsonl'}",
                  "log_with=tensorboard")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "samples_final.md", "model/config.json",
                 "model/tokenizer_config.json", "kept/iter-0001.jsonl", "kept/iter-0002.jsonl",
                 "eval_reference_eval.jsonl", "eval_reference_forget.jsonl", "samples/eval-step000002.jsonl",
                 "samples/forget-step000002.jsonl"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard event file in tensorboard/"
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["kept"] == 12 and summary["kept_fraction"] == 1.0
    assert set(summary["final"]) >= {"gold_reward", "proxy_score", "win", "lose", "tie", "forget_win"}
    assert abs(summary["final"]["win"] + summary["final"]["lose"] + summary["final"]["tie"] - 1) < 1e-9
    assert set(summary["per_task"]) == TASKS and summary["seconds"] > 0

    history = read_jsonl(out / "metrics.jsonl")
    assert [r["iteration"] for r in history if "eval/gold_norm" in r] == [0, 1, 2]
    rows = [r for r in history if "objective/kept" in r]
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss/nll"]) and r["optim/grad_norm"] > 0 and r["optim/steps"] == 2
        # best-of-n really selects: the kept mean can only be above the mean of all samples
        assert r["objective/kept_score"] >= r["objective/score"] - 1e-12
        assert r["objective/kept_score_max"] == r["objective/score_max"]
        assert any(k.startswith("score/") and k.endswith("/mean") for k in r)
        kept = read_jsonl(out / "kept" / f"iter-{r['iteration']:04d}.jsonl")
        assert len(kept) == r["objective/kept"] == 6
        assert abs(sum(k["score"] for k in kept) / len(kept) - r["objective/kept_score"]) < 1e-9
        assert {"id", "task", "prompt", "response", "score"} <= set(kept[0])
    assert any(r["objective/kept_score"] > r["objective/score"] for r in rows)

    before, _ = load_policy(ModelConfig(name_or_path="tiny-random"), device="cpu")
    after = params(out / "model")
    changed = max((after[k] - v).abs().max().item() for k, v in before.state_dict().items() if k in after)
    assert changed > 1e-4


def test_threshold_and_truncation_can_leave_nothing_to_train_on(tmp_path):
    # The tiny random model never ends a 10-token response: drop_truncated keeps nothing.
    summary = run(tmp_path / "none", "iterations=1", "drop_truncated=true")
    row = [r for r in read_jsonl(tmp_path / "none" / "metrics.jsonl") if "objective/kept" in r][0]
    assert row["objective/kept"] == 0 and row["objective/kept_score"] is None and row["optim/steps"] == 0
    assert summary["kept"] == 0 and read_jsonl(tmp_path / "none" / "kept" / "iter-0001.jsonl") == []


def test_a_nonfinite_loss_skips_the_update(tmp_path, monkeypatch):
    from stable_rlhf.sft import sequence_nll

    calls = []

    def nan_first(model, batch):
        loss, stats = sequence_nll(model, batch)
        calls.append(1)
        return (loss * float("nan"), stats) if len(calls) == 1 else (loss, stats)

    monkeypatch.setattr(rs, "sequence_nll", nan_first)
    run(tmp_path / "nan", "iterations=1")
    row = [r for r in read_jsonl(tmp_path / "nan" / "metrics.jsonl") if "objective/kept" in r][0]
    assert row["skipped_updates"] == 1 and row["optim/steps"] == 1  # 6 kept in batches of 4: 2 steps
    assert all(torch.isfinite(v).all() for v in params(tmp_path / "nan" / "model").values())


def test_resumed_run_ends_where_a_straight_run_does(straight_run, tmp_path):
    straight, straight_summary = straight_run
    out = tmp_path / "resumed"
    run(out, "iterations=2")
    summary = run(out, "resume=true")
    assert summary["iterations"] == 3
    assert summary["final"] == straight_summary["final"]
    assert summary["per_task"] == straight_summary["per_task"]
    a, b = params(straight / "model"), params(out / "model")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)

    def training_rows(path):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_jsonl(path / "metrics.jsonl")]

    assert training_rows(out) == training_rows(straight)  # nothing logged twice, nothing lost
    assert read_jsonl(out / "kept" / "iter-0003.jsonl") == read_jsonl(straight / "kept" / "iter-0003.jsonl")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]


def test_a_fresh_run_clears_an_earlier_run(straight_run, tmp_path):
    # Without resume an existing out_dir starts over: no stale kept files, checkpoints or SFT
    # reference answers (a different initial policy would otherwise be judged against them).
    import shutil

    out = tmp_path / "again"
    shutil.copytree(straight_run[0], out)
    (out / "eval_reference_eval.jsonl").write_text('{"stale": true}\n')
    run(out, "iterations=1")
    assert sorted(p.name for p in (out / "kept").iterdir()) == ["iter-0001.jsonl"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    assert "stale" not in (out / "eval_reference_eval.jsonl").read_text()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("which", ["prompts", "eval.prompts"])
def test_bad_prompts_are_rejected_before_any_model_loads(tmp_path, capsys, monkeypatch, which):
    from stable_rlhf.cli import main

    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "ok", "task": "arithmetic"}\n{"task": "arithmetic"}\n')
    monkeypatch.setattr("stable_rlhf.models.load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "o"
    assert main(["rejection-sampling", *overrides(out, f"{which}={bad}")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: field 'prompt'" in err and "missing" in err
    assert not (out / "config.yaml").exists()


def test_cli_registers_the_stage_and_checks_the_config(capsys):
    from stable_rlhf.cli import main

    assert main(["rejection-sampling", "--help"]) == 0
    text = capsys.readouterr().out
    assert "prompts_per_iteration" in text and "drop_truncated" in text and "threshold" in text
    assert main(["rejection-sampling", "generation.temperature=0", "n=4"]) == 2
    assert "temperature must be > 0" in capsys.readouterr().err


def test_two_gloo_processes_train_one_policy(tmp_path):
    # 5 prompts per rank and a threshold leave an odd kept set: in the last optimiser step
    # one rank has no rows and must still join the all-reduce (with a zero-weight backward).
    import os
    import shutil
    import socket
    import subprocess
    import sys

    from stable_rlhf.config import ModelConfig
    from stable_rlhf.models import load_policy

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(ROOT / "tests" / "ddp_rs_worker.py"),
           str(tmp_path), *overrides(tmp_path / "ddp", "prompts_per_iteration=5", "batch_size=2", "threshold=0.02")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["responses"] != r1["responses"], "both ranks sampled the same responses"
    assert r0["kept"] == r1["kept"] and any(k % 2 for k in r0["kept"]), r0["kept"]
    assert torch.equal(r0["params"], r1["params"])
    initial, _ = load_policy(ModelConfig(name_or_path="tiny-random"), device="cpu")
    assert (torch.cat([p.detach().flatten() for p in initial.parameters()]) - r0["params"]).abs().max() > 1e-4
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["iterations"] == 3 and summary["kept"] == sum(r0["kept"])


@pytest.fixture(scope="module")
def straight_cli_run(tmp_path_factory):
    from tests.test_sft import run_stage

    out = tmp_path_factory.mktemp("rs-cli") / "straight"
    proc = run_stage("rejection-sampling", overrides(out, "iterations=2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


# iteration 2: killed after its fine-tuning, before its checkpoint; killed while writing it
@pytest.mark.parametrize("fault", ["train:2", "checkpoint:2"])
def test_sigkilled_run_resumes_to_the_same_result(straight_cli_run, tmp_path, fault):
    from tests.test_sft import assert_killed_run_resumes_exactly

    out = tmp_path / "killed"
    assert_killed_run_resumes_exactly("rejection-sampling", overrides(out, "iterations=2"), straight_cli_run, out,
                                      fault, resumes_from="step-000001")
    assert read_jsonl(out / "kept" / "iter-0002.jsonl") == read_jsonl(straight_cli_run / "kept" / "iter-0002.jsonl")
    straight, resumed = (json.loads((d / "summary.json").read_text()) for d in (straight_cli_run, out))
    assert resumed["final"] == straight["final"] and resumed["kept"] == straight["kept"]
