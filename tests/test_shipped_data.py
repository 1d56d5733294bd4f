"""data/testbed/ and data/testbed_large/: valid, regenerable from the seed, checksummed,
and their gold rewards recomputable."""

import hashlib
from pathlib import Path

import pytest

from stable_rlhf.config import load_config
from stable_rlhf.data import read_jsonl
from stable_rlhf.testbed.build import BuildDataConfig, write_prompt_splits
from stable_rlhf.testbed.tasks import gold_rewards

DATA = Path(__file__).resolve().parent.parent / "data" / "testbed"
LARGE = DATA.parent / "testbed_large"  # the same seed's prompts, more of them with preferences


def test_prompt_splits_regenerate_byte_for_byte(tmp_path):
    cfg = load_config(BuildDataConfig, DATA / "build_config.yaml")
    write_prompt_splits(tmp_path, cfg.tasks, cfg.sizes, cfg.seed)
    for split in ("train", "eval", "forget_pool"):
        name = f"prompts_{split}.jsonl"
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == \
            hashlib.sha256((DATA / name).read_bytes()).hexdigest(), name


@pytest.mark.parametrize("data", [DATA, LARGE], ids=["testbed", "testbed_large"])
def test_checksums_match_the_shipped_files(data):
    for line in (data / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((data / name).read_bytes()).hexdigest() == digest, name


def test_splits_share_no_prompt_text_and_forgetting_set_is_held_out():
    splits = {s: read_jsonl(DATA / f"prompts_{s}.jsonl", "prompt") for s in ("train", "eval", "forget_pool")}
    texts = {s: {r["prompt"].strip().lower() for r in recs} for s, recs in splits.items()}
    assert not texts["train"] & texts["eval"]
    assert not texts["train"] & texts["forget_pool"]
    assert not texts["eval"] & texts["forget_pool"]
    forget = read_jsonl(DATA / "prompts_forget.jsonl", "prompt")
    assert forget and {r["id"] for r in forget} <= {r["id"] for r in splits["forget_pool"]}
    assert all(r["meta"]["sft_gold_norm"] >= 0.5 for r in forget)


@pytest.mark.parametrize("data", [DATA, LARGE], ids=["testbed", "testbed_large"])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_preferences_are_valid_and_gold_is_recomputable(data, split):
    # testbed_large was built from the same seed: its prompts are records of DATA's splits
    prefs = read_jsonl(data / f"preferences_{split}.jsonl", "ranked")  # the trainers' validation
    prompts = {r["id"]: r for s in ("train", "eval") for r in read_jsonl(DATA / f"prompts_{s}.jsonl", "prompt")}
    records, responses, stored = [], [], []
    for p in prefs:
        rec = prompts[p["meta"]["id"]]
        assert rec["prompt"] == p["prompt"] and rec["task"] == p["task"]
        for response, gold in zip(p["responses"], p["gold"]):
            records.append(rec)
            responses.append(response)
            stored.append(gold)
    recomputed = gold_rewards(records, responses, workers=2)
    assert recomputed == pytest.approx(stored, abs=1e-9)
