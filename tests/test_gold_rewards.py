"""Gold rewards: right > partial > wrong on every task, degenerate answers at the
bottom everywhere, rewards inside each task's range, deterministic."""

from __future__ import annotations

import json

import pytest

from stable_rlhf.testbed.prompts import generate_prompts, topic_keywords
from stable_rlhf.testbed.tasks import (
    TASK_MARKERS,
    TASK_NAMES,
    TASKS,
    TaskSpec,
    gold_record_problem,
    gold_reward,
    gold_reward_details,
    gold_rewards,
    style_markers,
)


def _rec(task: str, prompt: str, **meta) -> dict:
    if "topic" in meta:
        meta["topic_keywords"] = topic_keywords(meta["topic"])
    return {"id": f"{task}-test", "task": task, "prompt": prompt, "meta": meta}


ARITH = _rec(
    "arithmetic",
    "Tom has 12 apples, buys 7 more and gives away 5. How many apples does Tom have now? "
    "Explain briefly and end with the final number.",
    answer=14, operands=[12, 7, 5],
)
BULLETS = _rec("bullets", "List exactly 3 facts about volcanoes as a bulleted list.",
               n_bullets=3, things="facts", topic="volcanoes")
LOWER = _rec("lowercase", "Write one or two sentences about the ocean using only lowercase letters.",
             topic="the ocean", style="")
LIMIT = _rec("word_limit", "Describe volcanoes in at most 20 words.", word_limit=20, topic="volcanoes")
KEYWORDS = _rec("keywords", "Write a sentence about the ocean that uses the words 'salt' and 'wave'.",
                keywords=["salt", "wave"], topic="the ocean")
SUM_TESTS = [[[[1, 2, 3]], 6], [[[]], 0], [[[5]], 5], [[[-1, 1]], 0], [[[10, 20]], 30], [[[2, 2]], 4]]
CODE = _rec("code", "Write a Python function `sum_list(nums)` that returns the sum of the numbers in the list `nums`.",
            func_name="sum_list", signature="sum_list(nums)", family="sum", param=None, tests=SUM_TESTS)

GOOD = {
    "arithmetic": (ARITH, "Tom starts with 12 apples. 12 + 7 = 19, and 19 - 5 = 14. The answer is 14."),
    "bullets": (BULLETS, "- Volcanoes erupt hot lava and ash.\n- Magma rises from deep under the crust.\n"
                         "- Many volcanoes build tall mountains over time."),
    "lowercase": (LOWER, "the ocean is deep and full of fish, and its waves crash on the beach every day."),
    "word_limit": (LIMIT, "A volcano is a mountain that erupts hot lava, ash and gas from magma deep below the crust."),
    "keywords": (KEYWORDS, "Every wave that rolls onto the beach carries salt from the deep ocean."),
    "code": (CODE, "```python\ndef sum_list(nums):\n    total = 0\n    for x in nums:\n        total += x\n    return total\n```"),
}


def _r(record: dict, response: str) -> float:
    return gold_reward(record, response)


def _frac(task: str, reward: float) -> float:
    """Where a reward sits in its task's range, 0 (floor) to 1 (ceiling)."""
    spec = TASKS[task]
    return (reward - spec.low) / (spec.high - spec.low)


# ------------------------------------------------------------------ the interface


def test_task_table():
    assert TASK_NAMES == ("arithmetic", "bullets", "lowercase", "word_limit", "keywords", "code")
    assert set(TASKS) == set(TASK_NAMES)
    assert all(isinstance(t, TaskSpec) and t.low < t.high and t.description for t in TASKS.values())
    # Scales and offsets differ, so per-task reward distributions really differ.
    assert len({(t.low, t.high) for t in TASKS.values()}) == len(TASKS)
    assert len({t.high - t.low for t in TASKS.values()}) >= 4
    assert len({t.low for t in TASKS.values()}) >= 3


def test_good_answers_reach_near_the_ceiling():
    for task, (record, response) in GOOD.items():
        assert _frac(task, _r(record, response)) >= 0.9, task


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown task"):
        gold_reward({"id": "x-1", "task": "poetry", "prompt": "p", "meta": {}}, "text")


# What each task's scorer reads from meta: a record without it is a data error.
META_KEYS = {"arithmetic": ["answer", "operands"], "bullets": ["n_bullets", "topic_keywords"],
             "lowercase": ["topic_keywords"], "word_limit": ["word_limit", "topic_keywords"],
             "keywords": ["keywords", "topic_keywords"], "code": ["func_name", "tests"]}
BAD_META = [("arithmetic", "operands", []), ("arithmetic", "answer", float("inf")), ("arithmetic", "answer", 10**400),
            ("arithmetic", "answer", True), ("arithmetic", "steps", ["x"]), ("word_limit", "word_limit", 0),
            ("bullets", "n_bullets", "3"), ("keywords", "keywords", []), ("keywords", "topic_keywords", [" "]),
            ("code", "func_name", "not a name"), ("code", "func_name", "lambda"), ("code", "tests", []),
            ("code", "tests", [[1, 2]]), ("code", "tests", [[[1], 2, 3]])]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_records_lacking_what_the_scorer_reads_are_refused(task):
    for record in generate_prompts(task, 5, seed=1) + [GOOD[task][0]]:
        assert gold_record_problem(record) is None
    record = GOOD[task][0]
    for key in META_KEYS[task]:
        bad = {**record, "meta": {k: v for k, v in record["meta"].items() if k != key}}
        field, message = gold_record_problem(bad)
        assert field == f"meta.{key}" and "missing" in message
        with pytest.raises(ValueError, match=f"meta.{key}"):
            gold_reward_details(bad, GOOD[task][1])
    assert gold_record_problem({k: v for k, v in record.items() if k != "meta"})[0] == "meta"
    assert gold_record_problem({**record, "meta": [1]})[0] == "meta"
    assert gold_record_problem({**record, "prompt": None})[0] == "prompt"


@pytest.mark.parametrize("task, key, value", BAD_META, ids=[f"{t}-{k}-{v!r:.12}" for t, k, v in BAD_META])
def test_records_with_unusable_meta_values_are_refused(task, key, value):
    record = GOOD[task][0]
    field, message = gold_record_problem({**record, "meta": {**record["meta"], key: value}})
    assert field == f"meta.{key}" and "expected" in message


@pytest.mark.parametrize("task", [None, "default", "poetry", ["code"], 3])
def test_records_without_a_gold_task_are_refused(task):
    field, message = gold_record_problem({**ARITH, "task": task})
    assert field == "task" and "unknown task" in message and "arithmetic" in message
    assert ("without a task" in message) == (task == "default")


def test_details_name_their_components():
    d = gold_reward_details(*GOOD["arithmetic"])
    assert {"reward", "score", "degenerate", "correct", "operands_used"} <= set(d)
    assert d["degenerate"] is None and d["correct"] == 1.0
    assert gold_reward_details(ARITH, "")["degenerate"] == "empty"


# ------------------------------------------------------------------ per task


def test_arithmetic_judges_the_final_number():
    full = _r(ARITH, "12 + 7 = 19, minus 5 is 14. The answer is 14.")
    bare = _r(ARITH, "14")
    changed_mind_wrong = _r(ARITH, "The answer is 19, ... wait 13")
    assert full > bare > changed_mind_wrong
    assert _frac("arithmetic", bare) > 0.4  # partial credit for a bare correct number
    assert _frac("arithmetic", changed_mind_wrong) < 0.3
    # The first number is not the answer; the last one is.
    assert _r(ARITH, "At first I thought 13, but 12 + 7 - 5 = 14, so the answer is 14.") > 0.5 * TASKS["arithmetic"].high
    assert _frac("arithmetic", _r(ARITH, "The answer is 14. Actually, 12 + 7 - 5 = 15.")) < 0.3
    # Worked but wrong: some effort credit, far below any correct answer, and more
    # when the final number is close or the intermediate step is right.
    wrong = _r(ARITH, "12 + 7 = 19 and 19 - 5 = 15. The answer is 15.")
    way_off = _r(ARITH, "12 + 7 = 19 and 19 * 5 = 95. The answer is 95.")
    assert 0 < way_off < wrong < bare
    with_steps = {**ARITH, "meta": {**ARITH["meta"], "steps": [19]}}
    assert _r(with_steps, "12 + 7 = 19 and 19 - 5 = 15. The answer is 15.") > wrong
    assert _r(with_steps, "12 + 7 = 20 and 20 - 5 = 15. The answer is 15.") == pytest.approx(wrong)
    assert _frac("arithmetic", _r(with_steps, "12 + 7 = 19 and 19 - 5 = 15. The answer is 15.")) < 0.5


@pytest.mark.parametrize("text, value", [("It is -3.", -3), ("So 1,200 in all", 1200), ("The total is 12.0", 12)])
def test_arithmetic_number_formats(text, value):
    rec = _rec("arithmetic", "How many? Explain briefly and end with the final number.", answer=value, operands=[2, 5])
    assert gold_reward_details(rec, text)["correct"] == 1.0


def test_bullets_count_content_and_topic():
    exact = _r(BULLETS, GOOD["bullets"][1])
    numbered = _r(BULLETS, "Here are three facts:\n1. Volcanoes erupt hot lava and ash.\n"
                           "2. Magma rises from deep under the crust.\n3. Many volcanoes build tall mountains.")
    short_by_one = _r(BULLETS, "- Volcanoes erupt hot lava and ash.\n- Magma rises from deep under the crust.")
    extra_one = _r(BULLETS, GOOD["bullets"][1] + "\n- Some volcanoes sleep for centuries.")
    contentless = _r(BULLETS, "- a\n- b\n- c")
    keywords_only = _r(BULLETS, "- volcano\n- lava\n- ash")
    repeated = _r(BULLETS, "- Volcanoes erupt hot lava.\n- Volcanoes erupt hot lava.\n- Volcanoes erupt hot lava.")
    off_topic = _r(BULLETS, "- I like pizza with cheese.\n- My car is red and fast.\n- The weekend was fun.")
    prose = _r(BULLETS, "Volcanoes erupt lava and ash from deep inside the earth.")
    assert exact == pytest.approx(numbered)
    assert exact > short_by_one and exact > extra_one
    assert min(short_by_one, extra_one, off_topic) > max(contentless, keywords_only)
    # Three copies of one item are one fact said three times: no better than no content.
    assert exact > repeated >= contentless
    assert _frac("bullets", contentless) < 0.2 and _frac("bullets", prose) < 0.1


def test_lowercase_needs_no_capitals_and_a_real_sentence():
    good = _r(LOWER, GOOD["lowercase"][1])
    one_capital = _r(LOWER, "The ocean is deep and full of fish, and its waves crash on the beach every day.")
    title_case = _r(LOWER, "The Ocean Is Deep And Full Of Fish.")
    word_list = _r(LOWER, "ocean water fish wave salt")
    off_topic = _r(LOWER, "i like to eat pizza with my friends on the weekend.")
    assert good > one_capital > title_case
    assert good > off_topic > word_list
    assert _frac("lowercase", one_capital) < 0.5


def test_word_limit_within_and_substantive():
    at_limit = "A volcano is a tall mountain that erupts hot lava, ash and gas from magma deep below the earth's crust."
    assert len(at_limit.split()) == 20
    good = _r(LIMIT, at_limit)
    over_by_one = _r(LIMIT, at_limit + " Wow.")
    far_over = _r(LIMIT, at_limit + " Sometimes it destroys towns and forests nearby, and the ash can cover whole cities.")
    far_under = _r(LIMIT, "Volcanoes erupt lava.")
    word_list = _r(LIMIT, "volcano lava ash magma crater eruption hot rock")
    assert _frac("word_limit", good) > 0.95
    assert good > over_by_one > far_over
    assert good > far_under and good > word_list
    assert _frac("word_limit", far_over) < 0.15 and _frac("word_limit", far_under) < 0.4
    assert _frac("word_limit", _r(LIMIT, "*cat*")) == 0.0


def test_keywords_both_present_in_a_sentence():
    both = _r(KEYWORDS, GOOD["keywords"][1])
    one = _r(KEYWORDS, "The ocean has salt in its water and fish swim in it.")
    none = _r(KEYWORDS, "Every day the deep ocean carries sand onto the beach.")
    bare_list = _r(KEYWORDS, "salt wave ocean water")
    case_and_plural = _r(KEYWORDS, "Salt spray flies as the Waves hit the rocks of the ocean shore.")
    assert both > one > none
    assert one > bare_list
    assert _frac("keywords", case_and_plural) > 0.9
    assert _frac("keywords", bare_list) < 0.2
    # Mentioning the words is not using them, and restating the instruction is no answer.
    quoted = _r(KEYWORDS, 'Here is a sentence about the ocean with the words "salt" and "wave" in it.')
    restated = _r(KEYWORDS, "This is a sentence about the ocean that uses the words salt and wave.")
    assert max(quoted, restated) < none


def test_code_runs_hidden_tests_in_the_sandbox():
    correct = _r(CODE, GOOD["code"][1])
    raw = _r(CODE, "Sure!\ndef sum_list(nums):\n    return sum(nums)\nThis adds every number.")
    partial = _r(CODE, "```python\ndef sum_list(nums):\n    return nums[0] if nums else 0\n```")
    syntax_error = _r(CODE, "```python\ndef sum_list(nums)\n    return sum(nums)\n```")
    wrong_name = _r(CODE, "```python\ndef total(nums):\n    return sum(nums)\n```")
    loops = _r(CODE, "```python\ndef sum_list(nums):\n    while True:\n        pass\n```")
    prints = _r(CODE, "```python\ndef sum_list(nums):\n    print(sum(nums))\n```")
    assert correct == raw == TASKS["code"].high
    assert correct > partial > loops >= prints > wrong_name > syntax_error == TASKS["code"].low
    # Most credit is for passing every test (a constant passes a few tests of most specs):
    # the partial solution passes 2 of 6, 0.1 + 0.3 * 2/6.
    assert _frac("code", partial) == pytest.approx(0.1 + 0.3 * 2 / 6)
    assert _frac("code", loops) <= 0.1 and _frac("code", wrong_name) < 0.05


def test_code_is_never_run_in_process(monkeypatch):
    import builtins

    def boom(*a, **k):
        raise AssertionError("model code reached exec() in the test process")

    monkeypatch.setattr(builtins, "exec", boom)
    code = "```python\nimport sys\ndef sum_list(nums):\n    return sum(nums)\n```"
    assert _r(CODE, code) == TASKS["code"].high


def test_text_tasks_penalise_code_fences():
    plain = _r(*GOOD["lowercase"])
    fenced = _r(LOWER, "```\n" + GOOD["lowercase"][1] + "\n```")
    assert fenced < plain


# ------------------------------------------------------------- degenerate answers

DEGENERATE = ["", "   \n ", "cat", "*cat*", "**bold**", "the the the the the the the the the the",
              "- \n- \n- ", "```\n```", "ECHO"]


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("answer", DEGENERATE)
def test_degenerate_answers_score_at_the_bottom(task, answer):
    record, good = GOOD[task]
    response = record["prompt"] if answer == "ECHO" else answer
    reward = _r(record, response)
    assert _frac(task, reward) <= 0.1, (task, answer, gold_reward_details(record, response))
    assert reward < _r(record, good)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_echoed_generated_prompts_get_the_floor(task):
    for record in generate_prompts(task, 20, seed=3):
        assert _r(record, record["prompt"]) == TASKS[task].low
        assert _r(record, "Sure! " + record["prompt"]) <= TASKS[task].low + 0.1 * (TASKS[task].high - TASKS[task].low)


# ---------------------------------------------------- ranges, determinism, batching

FUZZ = [
    "", "14", "The answer is 7.", "- one two three\n- four five six", "hello world", "x" * 500,
    "the ocean is big and blue.", "```python\ndef f(x):\n    return x\n```", "1. a\n2. b", "Lava! " * 30,
    "A volcano erupts. " * 3, "def sum_list(nums): return 0", "12 + 7 = 19 and 19 - 5 = 14", "\u2022 tea is hot\n\u2022 tea is green",
]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_rewards_stay_in_range_and_are_deterministic(task):
    records = generate_prompts(task, 6, seed=11)
    for record in records:
        for response in FUZZ + [GOOD[task][1]]:
            a = _r(record, response)
            assert TASKS[task].low <= a <= TASKS[task].high
            assert _r(record, response) == a
            # A record read back from JSONL scores the same.
            assert _r(json.loads(json.dumps(record)), response) == a


def test_batched_rewards_match_single_calls():
    records, responses = [], []
    for task, (record, good) in GOOD.items():
        records += [record, record]
        responses += [good, "cat"]
    records.append(CODE)
    responses.append("```python\ndef sum_list(nums):\n    return len(nums)\n```")
    batched = gold_rewards(records, responses, workers=2)
    assert batched == [_r(r, s) for r, s in zip(records, responses)]
    with pytest.raises(ValueError):
        gold_rewards(records, responses[:-1])


# ---------------------------------------------------------------- style markers


def test_style_markers():
    assert set(TASK_MARKERS) == set(TASK_NAMES)
    assert style_markers("```python\ndef f(x):\n    return x\n```") >= {"code"}
    assert "code" in style_markers("def f(x):\n    return x")
    assert "code" not in style_markers("We define things here.")
    assert "bullets" in style_markers("- one thing\n- another thing")
    assert "bullets" not in style_markers("- just one line")
    assert "lowercase" in style_markers("all lowercase here")
    assert "lowercase" not in style_markers("Not lowercase")
    assert "lowercase" not in style_markers("ab")
    assert "arithmetic" in style_markers("12 + 7 = 19")
    assert "arithmetic" in style_markers("So the answer is 12.")
    assert "arithmetic" not in style_markers("The ocean is blue.")
    # Leakage: a code fence in an arithmetic answer carries both markers.
    assert style_markers("```\n12 + 7 = 19\n```") >= {"code", "arithmetic"}
    assert style_markers("The ocean is blue and deep.") == set()


# ------------------------------------------------------------------ the degenerate-answer meter


def test_the_degenerate_meter_is_the_gold_rewards_own_gate():
    from pathlib import Path

    from stable_rlhf.testbed.tasks import degenerate_reason

    TESTBED = Path(__file__).resolve().parents[1] / "data" / "testbed"
    records = [json.loads(line) for line in (TESTBED / "prompts_eval.jsonl").read_text().splitlines()]
    by_task = {r["task"]: r for r in records}
    for task, record in by_task.items():
        for response in ("", "the the the the the the the the the the the the", record["prompt"], "x" * 20_001):
            reason = degenerate_reason(record, response)
            details = gold_reward_details(record, response)
            assert reason is not None, (task, response[:40])
            assert details["degenerate"] == reason and details["score"] == 0.0
        for response in ("ok", "A plain answer of a few words, written as one sentence."):
            assert degenerate_reason(record, response) == gold_reward_details(record, response)["degenerate"]
    samples = [json.loads(line) for line in (TESTBED / "samples_eval.jsonl").read_text().splitlines()]
    flagged = [s for s in samples if degenerate_reason(by_task[s["task"]] | {"prompt": s["prompt"]}, s["response"])]
    assert len(flagged) < 0.5 * len(samples)  # the SFT policy mostly answers


def test_task_table_reports_the_degenerate_share_per_task_and_over_tasks():
    from stable_rlhf.testbed.evaluate import task_table

    rec = {"task": "word_limit", "prompt": "In at most 20 words, describe a river."}
    rows = [{**rec, "response": r, "gold": 0.0, "tokens": 3, "truncated": False, "markers": []}
            for r in ("", "A quiet river bends through green hills under a pale morning sky.")]
    rows.append({"task": "arithmetic", "prompt": "What is 2 + 3?", "response": "2 + 3 = 5, so the answer is 5.",
                 "gold": 1.0, "tokens": 9, "truncated": False, "markers": [], "degenerate": None})
    table = task_table(rows)
    assert table["word_limit"]["degenerate_rate"] == 0.5 and table["arithmetic"]["degenerate_rate"] == 0.0
    assert table["all"]["degenerate_rate"] == 0.25  # the mean over tasks, like the gold


# ------------------------------------------------ what the hardening holds against


def _frac_of(record: dict, response: str) -> float:
    return _frac(record["task"], _r(record, response))


def test_text_is_counted_as_a_reader_sees_it():
    from stable_rlhf.testbed import text as T

    # Invisible characters separate words; a hyphen chain is several words, one hyphen one.
    assert T.word_count(T.normalise("the\u200bsea\u2060is\u00adblue")) == 4
    assert T.word_count("the-sea-is-blue well-known") == 5
    assert T.normalise("Ｓｅａ café") == "Sea cafe"
    assert T.foreign_letters(T.normalise("the ѕea іs blue ᴀ")) == 3  # Cyrillic s, i; small capital A
    glued = "\u200b".join(GOOD["word_limit"][1].split())
    assert _r(LIMIT, glued) == pytest.approx(_r(LIMIT, GOOD["word_limit"][1]))


def test_lookalike_letters_do_not_pass_a_rule():
    plain = "the ocean is deep and full of fish, and waves roll over the salty water."
    assert _frac_of(LOWER, plain) > 0.8
    small_capital = "ᴛ" + plain[1:]  # a capital's lookalike counts as a capital, and as foreign
    assert _frac_of(LOWER, small_capital) < 0.4 * _frac_of(LOWER, plain)
    cyrillic = plain.replace("o", "о")  # lowercase Cyrillic o: not English
    assert _frac_of(LOWER, cyrillic) < 0.1


def test_arithmetic_spraying_candidates_halves_credit_per_extra_number():
    committed = _r(ARITH, "12 + 7 = 19 and 19 - 5 = 14, so Tom has 14 apples now.")
    hedged = _r(ARITH, "It could be 11, 13 or 16; 12 + 7 = 19 and 19 - 5 = 14, so Tom has 14 apples now.")
    d = gold_reward_details(ARITH, "It could be 11, 13 or 16; 12 + 7 = 19 and 19 - 5 = 14, so Tom has 14 apples now.")
    assert d["extra_numbers"] == 3  # 11, 13, 16, 19, 14 stated; 19 and 14 are the worked answer
    assert 0 < hedged <= committed * 0.5 ** 3 + 1e-9


def test_restating_the_instruction_or_listing_keywords_is_not_an_answer():
    reworded = "here are one or two sentences about the ocean, written only in lowercase letters."
    assert _frac_of(LOWER, reworded) < 0.15
    answer = GOOD["keywords"][1]
    assert _frac_of(KEYWORDS, answer) > 0.9
    without = "The ocean is wide and deep, and fish swim far below its surface."
    appended = without[:-1] + ", salt, wave."  # the required words as a list tacked on
    assert _frac_of(KEYWORDS, appended) <= _frac_of(KEYWORDS, without) + 1e-9
    wrapped = "The *salt* of the ocean rides on every «wave» that rolls toward the shore."
    assert _frac_of(KEYWORDS, wrapped) <= _frac_of(KEYWORDS, without) + 1e-9


def test_salads_score_no_better_than_the_floor_band():
    salads = [
        (LOWER, "in ocean the sea by water in wave but fish and tide."),
        (LIMIT, "volcano lava eruption magma ash mountain crater erupt hot rock"),
        (KEYWORDS, "the of salt and is wave to a in that it for on with as"),
        (BULLETS, "- **volcano** **lava** **ash**\n- **magma** **crater** **rock**\n- **erupt** **hot** **mountain**"),
    ]
    for record, salad in salads:
        assert _frac_of(record, salad) < 0.2, (record["task"], salad)


def test_the_meter_names_salads_and_lookalikes():
    from stable_rlhf.testbed.tasks import degenerate_reason

    assert degenerate_reason(LOWER, "in ocean the sea by water in wave but fish and tide and salt.") == "incoherent"
    assert degenerate_reason(LOWER, "the ѕea is deep and full of fish, and waves roll over it.") == "lookalike_letters"
    assert degenerate_reason(LOWER, GOOD["lowercase"][1]) is None
    assert degenerate_reason(ARITH, "4 * 3 = 12") is None  # arithmetic is not judged as prose
    assert gold_reward_details(LOWER, "in ocean the sea by water in wave but fish and tide and salt.")[
        "degenerate"] == "incoherent"
