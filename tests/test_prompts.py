"""Prompt generators: many distinct prompts per task, deterministic, disjoint splits,
and records that carry everything the gold reward needs."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from stable_rlhf.testbed.prompts import (
    CODE_FAMILIES,
    TOPICS,
    generate_prompts,
    make_splits,
    normalise_prompt,
    prompt_capacity,
)
from stable_rlhf.testbed.tasks import TASK_NAMES, TASKS, gold_reward


@pytest.mark.parametrize("task", TASK_NAMES)
def test_at_least_a_thousand_distinct_prompts(task):
    assert prompt_capacity(task) >= 1000
    records = generate_prompts(task, 1000, seed=0)
    assert len(records) == 1000
    assert len({normalise_prompt(r["prompt"]) for r in records}) == 1000
    assert len({r["id"] for r in records}) == 1000


@pytest.mark.parametrize("task", TASK_NAMES)
def test_records_are_well_formed_and_json_safe(task):
    for r in generate_prompts(task, 50, seed=1):
        assert set(r) == {"id", "task", "prompt", "meta"}
        assert r["task"] == task and re.fullmatch(rf"{task}-[0-9a-f]{{12}}", r["id"])
        assert json.loads(json.dumps(r)) == r  # tuples would come back as lists
        assert r["prompt"].strip() == r["prompt"] and len(r["prompt"]) > 20


@pytest.mark.parametrize("task", TASK_NAMES)
def test_deterministic_given_the_seed(task):
    a = generate_prompts(task, 30, seed=7)
    assert a == generate_prompts(task, 30, seed=7)
    assert [r["id"] for r in a] != [r["id"] for r in generate_prompts(task, 30, seed=8)]


def test_too_many_or_unknown_is_an_error():
    with pytest.raises(ValueError, match="distinct prompts"):
        generate_prompts("lowercase", prompt_capacity("lowercase") + 1, seed=0)
    with pytest.raises(ValueError, match="unknown task"):
        generate_prompts("poetry", 3, seed=0)


def test_topic_bank():
    assert len(TOPICS) >= 40
    for name, t in TOPICS.items():
        assert t["own"] and len(t["related"]) >= 8, name


def test_arithmetic_answer_is_never_a_prompt_number():
    for r in generate_prompts("arithmetic", 500, seed=2):
        prompt_numbers = {int(n) for n in re.findall(r"\d+", r["prompt"])}
        assert isinstance(r["meta"]["answer"], int) and r["meta"]["answer"] > 0
        assert r["meta"]["answer"] not in prompt_numbers
        assert set(r["meta"]["operands"]) <= prompt_numbers


def test_task_parameters_cover_their_ranges():
    bullets = generate_prompts("bullets", 400, seed=0)
    assert {r["meta"]["n_bullets"] for r in bullets} == set(range(2, 7))
    assert all(f"exactly {r['meta']['n_bullets']} " in r["prompt"] for r in bullets)
    limits = generate_prompts("word_limit", 400, seed=0)
    assert {r["meta"]["word_limit"] for r in limits} == set(range(10, 41))
    for r in generate_prompts("keywords", 100, seed=0):
        x, y = r["meta"]["keywords"]
        assert f"'{x}'" in r["prompt"] and f"'{y}'" in r["prompt"]


def test_code_prompts_cover_every_family_evenly_with_informative_tests():
    records = generate_prompts("code", 15 * len(CODE_FAMILIES), seed=0)
    counts = Counter(r["meta"]["family"] for r in records)
    assert set(counts) == {f.key for f in CODE_FAMILIES}
    assert max(counts.values()) - min(counts.values()) <= 1
    for r in records:
        meta = r["meta"]
        assert f"`{meta['signature']}`" in r["prompt"] and meta["signature"].startswith(meta["func_name"] + "(")
        assert len(meta["tests"]) >= 5
        # A function returning a constant can never pass every test.
        assert len({json.dumps(expected) for _, expected in meta["tests"]}) >= 2, r["prompt"]


def test_code_tests_are_fixed_by_the_prompt_text():
    a = {r["prompt"]: r["meta"]["tests"] for r in generate_prompts("code", 300, seed=0)}
    b = {r["prompt"]: r["meta"]["tests"] for r in generate_prompts("code", 300, seed=1)}
    shared = set(a) & set(b)
    assert shared and all(a[p] == b[p] for p in shared)


SIZES = {"train": 300, "eval": 40, "forget_pool": 60}


def test_splits_are_disjoint_sized_and_deterministic():
    splits = make_splits(list(TASK_NAMES), SIZES, seed=0)
    assert set(splits) == set(SIZES)
    seen: dict[str, str] = {}
    for name, records in splits.items():
        counts = Counter(r["task"] for r in records)
        assert counts == {t: SIZES[name] for t in TASK_NAMES}
        for r in records:
            key = normalise_prompt(r["prompt"])
            assert key not in seen, f"{r['prompt']!r} is in both {seen[key]} and {name}"
            seen[key] = name
    assert splits == make_splits(list(TASK_NAMES), SIZES, seed=0)
    assert splits["eval"] != make_splits(list(TASK_NAMES), SIZES, seed=1)["eval"]
    # Tasks are interleaved, not in blocks.
    assert [r["task"] for r in splits["eval"][: len(TASK_NAMES)]] == list(TASK_NAMES)


def test_eval_split_does_not_move_when_train_grows():
    small = make_splits(["bullets", "code"], {"train": 50, "eval": 20}, seed=4)
    large = make_splits(["bullets", "code"], {"train": 200, "eval": 20}, seed=4)
    assert small["eval"] == large["eval"]


def test_split_larger_than_capacity_is_an_error():
    with pytest.raises(ValueError):
        make_splits(["lowercase"], {"train": prompt_capacity("lowercase"), "eval": 10}, seed=0)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_generated_records_score_in_range(task):
    for r in generate_prompts(task, 10, seed=5):
        assert TASKS[task].low <= gold_reward(r, "I am not sure about this one, sorry.") <= TASKS[task].high
