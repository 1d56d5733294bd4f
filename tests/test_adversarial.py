"""The red team of the gold reward (``stable_rlhf/testbed/adversarial.py``): its families of
gamed answers, the harness that compares them with the SFT answers, and the CLI
``stable-rlhf testbed red-team``.

Most tests use stand-in scorers (one that pays for length, one that pays only the SFT
answers, one that raises), so they check the harness, not the gold reward, and run in
seconds. The last test runs the real gold reward on the shipped eval data: it fails
for as long as some trick beats the SFT answers, which is what it is there to show.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from stable_rlhf import cli
from stable_rlhf.io import read_jsonl
from stable_rlhf.testbed import adversarial as A
from stable_rlhf.testbed.tasks import TASK_NAMES

DATA = Path(__file__).resolve().parents[1] / "data" / "testbed"
PROMPTS, SAMPLES = DATA / "prompts_eval.jsonl", DATA / "samples_eval.jsonl"
RECORDS, ROWS = read_jsonl(PROMPTS), read_jsonl(SAMPLES)
SFT = A.group_sft(ROWS)
SFT_ANSWERS = {row["response"] for row in ROWS}
FLAGS = ["--prompts", str(PROMPTS), "--samples", str(SAMPLES), "--limit-per-task", "2"]
INVISIBLE = ("\u200b", "\u2060", "\u00ad")


def others_for(record: dict) -> list[str]:
    return A.others_by_prompt([record], SFT, RECORDS)[str(record["id"])]


def length_score(records: list[dict], responses: list[str]) -> list[float]:
    """A gameable scorer: longer is better."""
    return [min(1.0, len(r) / 2000) for r in responses]


def sft_only_score(records: list[dict], responses: list[str]) -> list[float]:
    """A scorer the tricks cannot beat: the SFT answers get the top score, anything else 0."""
    return [1.0 if r in SFT_ANSWERS else 0.0 for r in responses]


def invisible_raises(records: list[dict], responses: list[str]) -> list[float]:
    """A scorer that crashes on zero-width characters (and pays the SFT answers most)."""
    if any(c in r for r in responses for c in INVISIBLE):
        raise UnicodeError("cannot score zero-width characters")
    return sft_only_score(records, responses)


@pytest.mark.parametrize("name", sorted(A.FAMILIES))
def test_every_family_yields_a_string_for_every_applicable_record_deterministically(name):
    family = A.FAMILIES[name]
    records = [r for r in RECORDS if r["task"] in family.tasks]
    assert records
    for record in records:
        sft, others = SFT.get(record["id"], []), others_for(record)  # some prompts have no SFT answers
        for k in range(2):
            first = A.generate(name, record, sft, seed=7, k=k, others=others)
            again = A.generate(name, record, sft, seed=7, k=k, others=others)
            assert isinstance(first, str) and first.strip(), (name, record["id"])
            assert first == again, (name, record["id"], k)


def test_every_task_has_at_least_six_families_and_every_family_a_task_and_a_docstring():
    for task in TASK_NAMES:
        assert len(A.families_for(task)) >= 6, task
    for family in A.FAMILIES.values():
        assert family.tasks and set(family.tasks) <= set(TASK_NAMES)
        assert family.about, family.name


def test_families_build_what_they_say():
    keywords = next(r for r in RECORDS if r["task"] == "keywords" and SFT.get(r["id"]))
    sft = SFT[keywords["id"]]
    assert any(c in A.generate("invisible_glue", keywords, sft) for c in INVISIBLE)
    assert any(ord(c) > 0xFF00 for c in A.generate("fullwidth_letters", keywords, sft))
    # answer k of an SFT-based family is made from SFT answer k: a paired comparison
    assert A.generate("repeat_answer", keywords, sft, k=1).startswith(sft[1])
    code = next(r for r in RECORDS if r["task"] == "code")
    assert f"def {code['meta']['func_name']}(" in A.generate("return_zero", code)
    assert str(A.REPO_ROOT) in A.generate("read_hidden_tests", code)


def test_a_length_rewarding_scorer_is_gamed_and_the_cli_names_the_family(capsys):
    assert A.main(FLAGS + ["--tasks", "keywords", "code"], score_fn=length_score) == 1
    out = capsys.readouterr().out
    wins = [line.split()[0] for line in out.splitlines() if line.rstrip().endswith("WINS")]
    assert "spray_answers" in wins and "repeat_answer" in wins
    assert "families beat the SFT answers" in out


def test_a_scorer_that_pays_only_the_sft_answers_is_not_gamed(capsys, tmp_path):
    report = tmp_path / "red_team.json"
    assert A.main(FLAGS + ["--json", str(report)], score_fn=sft_only_score) == 0
    assert "no family beats the SFT answers" in capsys.readouterr().out
    saved = json.loads(report.read_text())
    assert set(saved) == set(TASK_NAMES)
    assert saved["keywords"]["sft_mean"] == 1.0 and saved["keywords"]["prompts"] == 2


def test_errors_from_a_raising_scorer_are_counted_per_family_and_fail_the_run(capsys):
    reports = A.red_team(RECORDS, ROWS, margin=0.05, score_fn=invisible_raises, limit_per_task=2,
                         tasks=["keywords", "word_limit"])
    for report in reports.values():
        by_name = {f.family: f for f in report.families}
        assert by_name["invisible_glue"].errors == 6 and by_name["invisible_glue"].verdict == "errors"
        assert "UnicodeError" in by_name["invisible_glue"].first_error
        assert by_name["keyword_salad"].errors == 0 and by_name["keyword_salad"].verdict == "ok"
        assert report.sft_errors == 0 and report.sft_mean == 1.0
    assert A.main(FLAGS + ["--tasks", "keywords"], score_fn=invisible_raises) == 1
    assert "UnicodeError" in capsys.readouterr().out


def test_bad_scores_and_broken_families_are_errors_not_crashes(monkeypatch):
    def nan_for_salads(records, responses):
        return [math.nan if r.endswith(".") and "\n" not in r else 0.0 for r in responses]

    reports = A.red_team(RECORDS, ROWS, families=["keyword_salad"], score_fn=nan_for_salads,
                         tasks=["keywords"], limit_per_task=1)
    assert reports["keywords"].families[0].errors == 3

    def broken(record, sft, rng):
        raise KeyError("meta")

    monkeypatch.setitem(A.FAMILIES, "broken", A.Family("broken", ("lowercase",), broken))
    reports = A.red_team(RECORDS, ROWS, families=["broken"], score_fn=sft_only_score, tasks=["lowercase"],
                         limit_per_task=2)
    result = reports["lowercase"].families[0]
    assert (result.errors, result.n, result.verdict) == (6, 0, "errors")
    with pytest.raises(ValueError, match="unknown"):
        A.red_team(RECORDS, ROWS, families=["no_such_family"])


def test_the_cli_is_wired_into_stable_rlhf(capsys):
    assert cli.main(["--help"]) == 0
    assert "testbed red-team" in capsys.readouterr().out
    assert cli.main(["testbed", "red-team", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(f"{task} (" in listed for task in TASK_NAMES) and "read_hidden_tests" in listed
    assert cli.main(["testbed"]) == 0
    assert cli.main(["testbed", "nope"]) == 2
    assert cli.main(["testbed", "red-team", "--families", "nope", *FLAGS]) == 2
    assert cli.main(["testbed", "red-team", "--prompts", "/does/not/exist.jsonl"]) == 2


def test_no_family_beats_sft_on_the_real_gold():
    """The gold reward, on 10 shipped eval prompts per task: no trick may out-score the
    SFT answers to the same prompts by more than 0.05, and nothing may raise."""
    reports = A.red_team(RECORDS, ROWS, limit_per_task=10)
    tables = "\n\n".join(A.format_report(r) for r in reports.values())
    assert set(reports) == set(TASK_NAMES)
    assert not any(r.winners or r.errors for r in reports.values()), f"{A.summary(reports)}\n\n{tables}"
