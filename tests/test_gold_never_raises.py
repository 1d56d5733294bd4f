"""The gold reward never raises on a response: every string, however hostile, gets a
score in [0, 1] and a finite reward in its task's range, and a scorer that fails is
visible (logged, and recorded in ``details["error"]``) rather than silently floored.

Property-based (hypothesis) over arbitrary Unicode, code-like text and adversarial
constructions (deep nesting, huge numbers, very long lines), plus the concrete inputs
that crashed it. Few examples reach the code sandbox (a process each), so the file
runs in well under 30 s.
"""

from __future__ import annotations

import logging
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stable_rlhf.testbed import sandbox, text
from stable_rlhf.testbed.prompts import generate_prompts
from stable_rlhf.testbed.sandbox import run_python_tests
from stable_rlhf.testbed.tasks import MAX_RESPONSE_CHARS, TASK_NAMES, TASKS, gold_reward_details, gold_rewards

RECORDS = {task: generate_prompts(task, 1, seed=5)[0] for task in TASK_NAMES}
TEXT_TASKS = [t for t in TASK_NAMES if t != "code"]
FUNC = RECORDS["code"]["meta"]["func_name"]

FAST = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SANDBOX = settings(FAST, max_examples=20)  # each example may start a sandbox process

# Characters that have broken text code before: lone surrogates, NUL, line and
# paragraph separators, BOM, bidi override, a combining mark, case-changing
# expansions (İ lowercases to two characters), astral emoji, markdown and number glyphs.
ODD = ["\ud800", "\udfff", "\x00", "\u2028", "\u2029", "\ufeff", "\u202e", "\u0301", "İ", "ß", "ﬁ",
       "\U0001f600", "\t", "\r", "\x0b", "\x0c", "\u3000", "`", "-", "*", "•", "1", ",", ".", "=", "\n"]
ANY_CHAR = st.one_of(st.characters(exclude_categories=()), st.sampled_from(ODD))
ANY_TEXT = st.text(ANY_CHAR, max_size=300)

# Code-like text: tokens that assemble into fenced blocks, defs of the right and wrong
# name, unbalanced brackets and quotes, big literals and prose.
CODE_TOKENS = ["```", "```python\n", "\n", "    ", "def ", FUNC, "f", "(", ")", "x", ":", "return ", "[", "]",
               "-", "1", "10**400", "'''", '"', "#", "lambda", "import os", "the answer", " ", "\x00", "\ud800"]
CODE_TEXT = st.lists(st.sampled_from(CODE_TOKENS), max_size=40).map("".join)
# A function of the right name returning an arbitrary value: these run in the sandbox
# and exercise the comparison of whatever comes back with the expected outputs.
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(ANY_CHAR, max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
RETURNS = VALUES.map(lambda v: f"```python\ndef {FUNC}(*a):\n    return {v!r}\n```")


def _nested(open_: str, close: str, depth: int, core: str = "1") -> str:
    return open_ * depth + core + close * depth


# Adversarial constructions, built rather than searched for: hypothesis picks the
# shape and its size.
ADVERSARIAL = st.one_of(
    st.integers(1, 5000).map(lambda n: "-" * n + "1"),
    st.integers(1, 5000).map(lambda n: _nested("(", ")", n)),
    st.integers(1, 5000).map(lambda n: _nested("[", "]", n)),
    st.integers(1, 3000).map(lambda n: f"def {FUNC}(*a):\n    return " + _nested("[", "]", n, "")),
    st.integers(1, 3000).map(lambda n: f"def {FUNC}(*a):\n    return " + "-" * n + "1"),
    st.integers(1, 1000).map(lambda n: "The answer is " + "9" * n + "."),
    st.integers(1, 1000).map(lambda n: f"def {FUNC}(*a):\n    return 10**{n}"),
    st.integers(1, 3 * MAX_RESPONSE_CHARS).map(lambda n: ("a " * n)[:n]),
    st.integers(1, 3 * MAX_RESPONSE_CHARS).map(lambda n: " ".join(f"w{i}" for i in range(n // 4))),
    st.integers(0, 2000).map(lambda n: " \t\n\u3000" * n),
    st.integers(1, 2000).map(lambda n: "\x00" * n),
)


def check_details(task: str, response: str) -> dict:
    d = gold_reward_details(RECORDS[task], response)
    spec = TASKS[task]
    assert isinstance(d["score"], float) and 0.0 <= d["score"] <= 1.0, d
    assert math.isfinite(d["reward"]) and spec.low <= d["reward"] <= spec.high, d
    return d


@FAST
@given(task=st.sampled_from(TEXT_TASKS), response=st.one_of(ANY_TEXT, ADVERSARIAL))
def test_text_tasks_score_any_string(task, response):
    check_details(task, response)


@SANDBOX
@given(response=st.one_of(CODE_TEXT, RETURNS, ADVERSARIAL, ANY_TEXT))
def test_code_task_scores_any_string(response):
    check_details("code", response)


@FAST
@given(task=st.sampled_from(TEXT_TASKS), responses=st.lists(st.one_of(ANY_TEXT, CODE_TEXT), min_size=1, max_size=4))
def test_gold_rewards_one_finite_reward_per_response(task, responses):
    rewards = gold_rewards([RECORDS[task]] * len(responses), responses, workers=2)
    assert len(rewards) == len(responses)
    for r in rewards:
        assert isinstance(r, float) and math.isfinite(r) and TASKS[task].low <= r <= TASKS[task].high


@SANDBOX
@given(responses=st.lists(st.one_of(CODE_TEXT, RETURNS, ADVERSARIAL), min_size=1, max_size=3))
def test_gold_rewards_mixed_batch_with_code(responses):
    records = [RECORDS["code"], RECORDS["bullets"]] * len(responses)
    rewards = gold_rewards(records, [r for r in responses for _ in range(2)], workers=2)
    assert all(isinstance(r, float) and math.isfinite(r) for r in rewards)
    assert all(TASKS[rec["task"]].low <= r <= TASKS[rec["task"]].high for rec, r in zip(records, rewards))


# ------------------------------------------------------------ inputs that crashed it

DEEP_LIST = f"def {FUNC}(*a):\n    x = []\n    for _ in range(990):\n        x = [x]\n    return x"
CRASHES = {
    "3000 unary minus signs": f"def {FUNC}(*a):\n    return " + "-" * 3000 + "1",  # RecursionError in ast.parse
    "returns 10**400": f"def {FUNC}(*a):\n    return 10**400",  # OverflowError comparing in sandbox._same
    "returns a list 990 deep": DEEP_LIST,  # RecursionError decoding the result in sandbox._collect
    "3000 nested parentheses": f"def {FUNC}(*a):\n    return " + _nested("(", ")", 3000),
}


@pytest.mark.parametrize("response", list(CRASHES.values()), ids=list(CRASHES))
def test_known_crashes_score_near_the_floor(response):
    d = check_details("code", response)
    # the floor (with details["error"]) where scoring fails; 0.1, a defined function that
    # passes no test, where the sandbox copes with the result itself
    assert d["score"] <= 0.1, d


@pytest.mark.parametrize("task", TASK_NAMES)
def test_oversized_whitespace_and_nul_responses(task):
    assert check_details(task, "x" * (MAX_RESPONSE_CHARS + 1))["degenerate"] == "too_long"
    assert check_details(task, " \t\n\u3000\u2028 ")["degenerate"] == "empty"
    assert check_details(task, "\x00" * 50)["score"] == 0.0
    check_details(task, "a lone \ud800 surrogate and a \x00 NUL in a longer answer.")


def test_oversized_code_is_not_run(monkeypatch):
    monkeypatch.setattr("stable_rlhf.testbed.tasks.run_python_tests", lambda *a, **k: pytest.fail("sandbox ran"))
    good = f"def {FUNC}(*a):\n    return 1\n"
    assert check_details("code", good + "#" * MAX_RESPONSE_CHARS)["score"] == 0.0


# ------------------------------------------------- a scorer bug is visible, not hidden


def test_a_scorer_bug_is_logged_and_recorded(monkeypatch, caplog):
    def broken(*a, **k):
        raise ZeroDivisionError("a bug in a text helper")

    monkeypatch.setattr(text, "sentence_score", broken)
    response = "the ocean is deep and full of fish, and its waves crash on the beach."
    with caplog.at_level(logging.WARNING, logger="stable_rlhf.testbed.tasks"):
        d = check_details("lowercase", response)
    assert d["score"] == 0.0 and d["reward"] == TASKS["lowercase"].low
    assert d["error"].startswith("scorer raised ZeroDivisionError") and "a bug in a text helper" in d["error"]
    [rec] = [r for r in caplog.records if r.name == "stable_rlhf.testbed.tasks"]
    assert rec.levelno == logging.WARNING and rec.exc_info and rec.exc_info[0] is ZeroDivisionError
    assert "lowercase" in rec.getMessage()


def test_a_nan_score_is_a_recorded_failure_not_a_ceiling(monkeypatch, caplog):
    # _clip01(nan) is 1.0: a NaN must never reach it
    monkeypatch.setattr(text, "diversity", lambda *a, **k: float("nan"))
    with caplog.at_level(logging.WARNING, logger="stable_rlhf.testbed.tasks"):
        d = check_details("word_limit", "A volcano is a mountain that erupts hot lava and ash.")
    assert d["score"] == 0.0 and "non-finite" in d["error"]
    assert caplog.records


def test_bad_records_still_raise():
    # a record is data, not a response: refusing it loudly is right (loaders refuse it first)
    record = {**RECORDS["code"], "meta": {"func_name": FUNC}}
    with pytest.raises(ValueError, match="meta.tests"):
        gold_reward_details(record, "def f(): pass")
    with pytest.raises(TypeError, match="string"):
        gold_reward_details(RECORDS["bullets"], None)


def test_an_unusable_sandbox_stops_the_run(monkeypatch):
    # not a response's fault: flooring every code answer would train on a broken reward
    def unavailable(*a, **k):
        raise sandbox.SandboxUnavailable("the code sandbox needs root")

    monkeypatch.setattr("stable_rlhf.testbed.tasks.run_python_tests", unavailable)
    with pytest.raises(sandbox.SandboxUnavailable, match="needs root"):
        gold_reward_details(RECORDS["code"], f"def {FUNC}(*a):\n    return 1")


# ------------------------------------------------------- what sandbox.py must cope with
# run_python_tests once raised on these results (an OverflowError comparing 10**400, a
# RecursionError decoding a 990-deep list) instead of counting the test as failed.


def test_sandbox_counts_a_huge_int_result_as_a_failed_test():
    res = run_python_tests("def f():\n    return 10**400", "f", [([], 1)], timeout_s=5.0)
    assert (res.passed, res.total) == (0, 1)


def test_sandbox_counts_a_deeply_nested_result_as_a_failed_test():
    res = run_python_tests(DEEP_LIST.replace(FUNC, "f"), "f", [([], 1)], timeout_s=5.0)
    assert (res.passed, res.total) == (0, 1)
