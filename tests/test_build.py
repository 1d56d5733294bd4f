"""The testbed build stage end to end on a tiny random policy, its resume, the CLI and the report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stable_rlhf.cli import main as cli_main
from stable_rlhf.config import load_config
from stable_rlhf.data import read_jsonl
from stable_rlhf.testbed.build import (
    BuildDataConfig,
    MakePromptsConfig,
    build_data,
    make_prompts,
    preference_records,
    select_forgetting_set,
)
from stable_rlhf.testbed.evaluate import check_headroom, task_table
from stable_rlhf.testbed.labelers import LabelerConfig
from stable_rlhf.testbed.tasks import TASKS

TINY = [
    "model.name_or_path=tiny-random",
    "generation.max_new_tokens=8",
    "sizes.train=6",
    "sizes.eval=3",
    "sizes.forget_pool=3",
    "pref_train_per_task=2",
    "pref_eval_per_task=1",
    "forget_pool_per_task=1",
    "tasks=[arithmetic, word_limit, code]",
]


def row(pid, task, response, gold, markers=()):
    return {"id": pid, "task": task, "prompt": f"p-{pid}", "response": response, "gold": gold,
            "tokens": len(response.split()), "truncated": False, "markers": list(markers)}


def test_preference_records_dedupe_and_rank_by_gold():
    prompts = {"a": {"id": "a", "task": "arithmetic", "prompt": "p-a", "meta": {"answer": 3}},
               "b": {"id": "b", "task": "arithmetic", "prompt": "p-b", "meta": {}}}
    rows = [row("a", "arithmetic", "x is 3", 1.0), row("a", "arithmetic", "x is 4", 0.0),
            row("a", "arithmetic", " x is 3 ", 1.0), row("b", "arithmetic", "same", 0.2),
            row("b", "arithmetic", "same", 0.2)]
    records, stats = preference_records(rows, prompts, LabelerConfig(temperature=0, flip_rate=0), seed=0)
    assert len(records) == 1  # group b had one distinct response
    rec = records[0]
    assert rec["responses"] == ["x is 3", "x is 4"] and rec["ranking"] == [0, 1]
    assert rec["gold"] == [1.0, 0.0] and rec["sft_samples"] is True and rec["meta"]["answer"] == 3
    assert stats["labeler/duplicate_responses_dropped"] == 2 and stats["labeler/groups_dropped"] == 1


def test_forgetting_set_uses_range_normalised_mean():
    spec = TASKS["code"]
    span = spec.high - spec.low
    rows = [row("good", "code", "r1", spec.low + 0.9 * span), row("good", "code", "r2", spec.low + 0.7 * span),
            row("bad", "code", "r3", spec.low + 0.1 * span), row("bad", "code", "r4", spec.low + 0.5 * span)]
    chosen = select_forgetting_set(rows, min_score=0.5)
    assert [pid for pid, _ in chosen] == ["good"]
    assert chosen[0][1] == pytest.approx(0.8)


def test_task_table_statistics_and_headroom():
    spec = TASKS["word_limit"]
    rows = [row("a", "word_limit", "r", spec.low, ["code"]), row("b", "word_limit", "r", spec.high),
            row("c", "word_limit", "r", spec.low)]
    t = task_table(rows)["word_limit"]
    assert t["n"] == 3 and t["frac_floor"] == pytest.approx(2 / 3) and t["frac_ceiling"] == pytest.approx(1 / 3)
    assert t["leakage_rate"] == pytest.approx(1 / 3) and t["leaked_markers"] == {"code": 1}
    assert check_headroom(task_table(rows)) == []
    floor_only = [row("a", "word_limit", "r", spec.low), row("b", "word_limit", "r", spec.low)]
    assert "every sample at the floor" in check_headroom(task_table(floor_only))[0]


def test_make_prompts_is_byte_identical_for_a_seed(tmp_path):
    for d in ("a", "b"):
        make_prompts(load_config(MakePromptsConfig, None, [f"out_dir={tmp_path / d}", "sizes.train=20", "seed=3"]))
    for split in ("train", "eval", "forget_pool"):
        assert (tmp_path / "a" / f"prompts_{split}.jsonl").read_bytes() == (tmp_path / "b" / f"prompts_{split}.jsonl").read_bytes()


def test_build_data_on_tiny_policy_writes_everything_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = load_config(BuildDataConfig, None, TINY + [f"out_dir={out}"])
    summary = build_data(cfg)
    for name in ("config.yaml", "summary.json", "sft_table.md", "labeler_stats.json", "preferences_train.jsonl",
                 "preferences_eval.jsonl", "sft_demos.jsonl", "prompts_forget.jsonl", "stages.json"):
        assert (out / name).exists(), name
    # The preference file is valid input for the trainers (validated by the data reader).
    prefs = read_jsonl(out / "preferences_train.jsonl", "ranked")
    assert all(p["sft_samples"] and len(p["gold"]) == len(p["responses"]) for p in prefs)
    assert set(summary["per_task"]) == {"arithmetic", "word_limit", "code", "all"}
    assert summary["counts"]["samples"] == 3 * (2 * 3 + 1 * 3 + 1 * 2)
    # A second run with the same settings reuses every sampling step.
    capsys.readouterr()
    build_data(cfg)
    assert capsys.readouterr().out.count("reusing") == 3
    # The report is drawn from the run directory alone.
    from analysis.testbed_report import build_report

    build_report(out)
    for png in ("sft_gold_by_task.png", "labeler_agreement.png"):
        assert (out / "plots" / png).stat().st_size > 1000
    assert "SFT policy" in (out / "report.md").read_text() and "<table" in (out / "report.html").read_text()


def test_cli_help_and_errors(capsys):
    assert cli_main(["--help"]) == 0
    assert "build-data" in capsys.readouterr().out
    assert cli_main(["build-data", "--help"]) == 0
    assert "labeler.flip_rate" in capsys.readouterr().out
    assert cli_main(["build-data", "labeler.flip=0.2"]) == 2
    assert "override labeler.flip: unknown key" in capsys.readouterr().err
    assert cli_main(["build-data", "k=1"]) == 2
    assert "k must be >= 2" in capsys.readouterr().err
    assert cli_main(["nope"]) == 2


def test_evaluate_rejects_bad_prompt_file_before_loading_a_model(tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "hi", "task": "arithmetic"}\n{"prompt": "", "task": "code"}\n')
    assert cli_main(["evaluate", f"prompts={bad}", "model.name_or_path=does/not-exist"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: field 'prompt'" in err


def test_console_script_runs(tmp_path):
    exe = Path(sys.executable).parent / "stable-rlhf"
    proc = subprocess.run([str(exe), "make-prompts", f"out_dir={tmp_path}", "sizes.train=5", "sizes.eval=2",
                           "sizes.forget_pool=2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "prompts_train.jsonl").read_text().splitlines()) == 5 * len(TASKS)


def test_relabel_data_rescores_a_build_as_a_rebuild_would(tmp_path):
    from stable_rlhf.testbed.build import RelabelDataConfig, relabel_data

    out = tmp_path / "run"
    build_data(load_config(BuildDataConfig, None, TINY + [f"out_dir={out}"]))
    files = ("preferences_train.jsonl", "preferences_eval.jsonl", "sft_demos.jsonl", "labeler_stats.json")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    # A copy whose gold values, labels and demonstrations are stale (as after a change of
    # the gold reward), with its checksums.
    for name in files:
        rows = [json.loads(line) for line in (out / name).read_text().splitlines()] if name.endswith("l") else []
        for r in rows:
            if "responses" in r:  # a comparison
                r.update(gold=[0.0] * len(r["responses"]), ranking=list(reversed(r["ranking"])))
            else:  # a demonstration
                r["meta"]["gold"] = 0.0
        text = "".join(json.dumps(r) + "\n" for r in rows) if rows else "{}\n"
        (shipped / name).write_text(text)
    (shipped / "SHA256SUMS").write_text("".join(f"{'0' * 64}  {name}\n" for name in files))
    relabel_data(load_config(RelabelDataConfig, None, TINY + [f"data_dir={shipped}"]))
    for name in files:
        assert (shipped / name).read_bytes() == (out / name).read_bytes(), name
    assert read_jsonl(shipped / "preferences_train.jsonl", "ranked")  # checksums now match
