"""Prompts for the gold reward are refused before training when the gold reward could not
score them: a missing or unknown task, or a ``meta`` without what the task's scorer reads.
Every refusal names file:line:field."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from stable_rlhf.data import DataError, load_records
from stable_rlhf.rewards import RewardConfig, check_gold_prompts, check_reward_inputs
from stable_rlhf.testbed.prompts import generate_prompts

TESTBED = Path(__file__).resolve().parent.parent / "data" / "testbed"
GOLD = RewardConfig(source="gold")
CODE = generate_prompts("code", 1, seed=2)[0]
WORDS = generate_prompts("word_limit", 1, seed=2)[0]


def write(tmp_path, records, name="prompts.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def refusal(spec: str) -> DataError:
    with pytest.raises(DataError) as info:
        check_reward_inputs(GOLD, load_records(spec, "prompt"), spec)
    return info.value


@pytest.mark.parametrize("split", ["train", "eval", "forget"])
def test_shipped_prompts_pass(split):
    spec = str(TESTBED / f"prompts_{split}.jsonl")
    check_reward_inputs(GOLD, load_records(spec, "prompt"), spec)


def without(record: dict, key: str) -> dict:
    return {**record, "meta": {k: v for k, v in record["meta"].items() if k != key}}


# (records, line, field, words in the message)
BAD = {
    "no task": ([CODE, {k: v for k, v in WORDS.items() if k != "task"}], 2, "task", "without a task"),
    "unknown task": ([CODE, WORDS, {**WORDS, "task": "poetry"}], 3, "task", "'poetry'"),
    "code without tests": ([WORDS, without(CODE, "tests")], 2, "meta.tests", "missing"),
    "word limit zero": ([{**WORDS, "meta": {**WORDS["meta"], "word_limit": 0}}], 1, "meta.word_limit", "positive"),
    "no meta": ([{k: v for k, v in CODE.items() if k != "meta"}], 1, "meta", "func_name, tests"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_gold_refuses_what_it_cannot_score_with_file_line_field(tmp_path, case):
    records, line, field, words = BAD[case]
    spec = write(tmp_path, records)
    err = refusal(spec)
    assert (err.path, err.line, err.field) == (spec, line, field), str(err)
    assert str(err).startswith(f"{spec}:{line}: field '{field}'") and words in err.message


def test_every_bad_line_is_reported_at_once(tmp_path):
    spec = write(tmp_path, [CODE, without(CODE, "func_name"), WORDS, {**WORDS, "task": "default"}])
    err = refusal(spec)
    assert [(e.line, e.field) for e in [err, *err.others]] == [(2, "meta.func_name"), (4, "task")]


def test_hh_prompts_have_no_gold_task(tmp_path):
    turn = "\n\nHuman: Hi\n\nAssistant:"
    hh = write(tmp_path, [{"chosen": turn + " Hello!", "rejected": turn + " Go away."}], name="hh.jsonl")
    err = refusal(f"hh:{hh}")
    assert (err.path, err.line, err.field) == (hh, 1, "task") and "'hh'" in err.message


def test_records_not_read_from_the_spec_are_named_by_index_and_id():
    with pytest.raises(DataError, match=r"prompt 1 \(id 'x'\)") as info:
        check_gold_prompts([CODE, {**without(CODE, "tests"), "id": "x"}], "<memory>")
    assert info.value.field == "meta.tests"


def test_other_sources_accept_any_task(tmp_path):
    # a score model reads prompt and task only: generic data (HH, no task) is fine for it
    spec = write(tmp_path, [{"prompt": "hello"}])
    model = tmp_path / "rm"
    model.mkdir()
    (model / "score_model.json").write_text("{}")
    check_reward_inputs(RewardConfig(source="rm", path=str(model)), load_records(spec, "prompt"), spec)


def test_ppo_refuses_bad_gold_prompts_before_a_model_loads(tmp_path, capsys, monkeypatch):
    from stable_rlhf.cli import main

    spec = write(tmp_path, [CODE, without(CODE, "tests")])
    monkeypatch.setattr("stable_rlhf.models.load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["ppo", f"prompts={spec}", "model.name_or_path=tiny-random", f"out_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert f"{spec}:2: field 'meta.tests'" in err


@pytest.mark.parametrize("which", ["eval.prompts", "eval.forget_prompts"])
@pytest.mark.parametrize("stage", ["ppo", "rejection-sampling"])
def test_eval_prompts_the_gold_reward_cannot_score_stop_a_policy_run_before_any_model(
        tmp_path, capsys, monkeypatch, stage, which):
    from stable_rlhf.cli import main

    good = json.loads((TESTBED / "prompts_eval.jsonl").read_text().splitlines()[0])
    bad = write(tmp_path, [good, {**good, "task": "poetry"}])
    monkeypatch.setattr("stable_rlhf.models.load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    code = main([stage, "model.name_or_path=tiny-random", f"out_dir={tmp_path / 'run'}", f"{which}={bad}",
                 "log_with=none"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "task" in err
