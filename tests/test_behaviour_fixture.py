"""The trainers' behaviour pinned by a stored fixture: tiny PPO (full and LoRA, with critic
warm-up and both NLL mixes), rejection-sampling, RM, AM and SFT runs with fixed seeds must
log the same metrics.jsonl as when the fixture was written, to 1e-4 relative, with float
kernels pinned so that the CPU model does not matter (``PINNED_KERNELS``).

A refactor that changes what a trainer computes (an RNG draw moved, a loss term reordered,
a stat renamed) fails here. Timings are left out (they are not behaviour). A change that is
meant to alter behaviour rewrites the fixture on purpose, and says so in its commit:

    STABLE_RLHF_WRITE_FIXTURES=1 .venv/bin/python -m pytest tests/test_behaviour_fixture.py
"""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from stable_rlhf.config import load_config
from stable_rlhf.io import atomic_write_jsonl, read_jsonl

pytestmark = pytest.mark.usefixtures("small_model_cpu")

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT / "data" / "testbed"
FIXTURES = ROOT / "tests" / "fixtures" / "behaviour"
WRITE = os.environ.get("STABLE_RLHF_WRITE_FIXTURES") == "1"
WORDS = "apple river stone cloud maple ember lotus quartz tiger violet willow zephyr amber cedar delta fjord".split()


def is_timing(key: str) -> bool:
    return key.startswith("time/") or key in {"seconds"}


def policy_common(out: Path) -> list[str]:
    return [f"out_dir={out}", "model.name_or_path=tiny-random", f"prompts={TESTBED / 'prompts_train.jsonl'}",
            f"eval.prompts={TESTBED / 'prompts_eval.jsonl'}", "eval.limit_per_task=1",
            "eval.generation.max_new_tokens=8", "generation.max_new_tokens=10", "log_with=none", "reward.workers=1"]


def run_ppo(out: Path, *extra: str) -> None:
    import stable_rlhf.ppo as ppo

    demos = TESTBED / "sft_demos.jsonl"
    ppo.train(load_config(ppo.PPOConfig, None, [
        *policy_common(out), f"eval.forget_prompts={TESTBED / 'prompts_forget.jsonl'}", "eval.every=2", "steps=4",
        "batch_size=8", "mini_batch_size=4", "ppo_epochs=2", "save_every=2", "lr=1e-3", "value_lr=1e-3",
        "critic_warmup=1", f"ptx.data={demos}", "ptx.coef=0.5", f"rehearsal.data={demos}", "rehearsal.batch_size=2",
        *extra]))


def run_rs(out: Path) -> None:
    import stable_rlhf.rejection_sampling as rs

    rs.train(load_config(rs.RejectionSamplingConfig, None, [
        *policy_common(out), "eval.forget_prompts=null", "iterations=2", "prompts_per_iteration=6", "n=3",
        "batch_size=4", "lr=1e-3", "drop_truncated=false"]))


def comparisons(n: int, seed: int, k: int = 3, words: list[str] = WORDS, **fields) -> list[dict]:
    """Learnable K-ranked comparisons over two tasks: more 'good' words rank higher.
    ``fields`` are added to every record (the fixture's: ``sft_samples=True``)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        goods = rng.sample(range(4), k)
        out.append({"prompt": f"say something about {rng.choice(words)}",
                    "responses": [" ".join(rng.sample(words, 3) + ["good"] * g + ["bad"] * (3 - g)) for g in goods],
                    "ranking": sorted(range(k), key=lambda j: -goods[j]), "task": "alpha" if i % 2 else "beta",
                    "gold": [float(g) for g in goods], **fields})
    return out


def run_score(out: Path, objective: str) -> None:
    from stable_rlhf.reward_model import ScoreTrainConfig, train

    data = out.parent / "prefs"
    atomic_write_jsonl(data / "train.jsonl", comparisons(32, 0, sft_samples=True))
    atomic_write_jsonl(data / "eval.jsonl", comparisons(12, 1, sft_samples=True))
    train(load_config(ScoreTrainConfig, None, [
        f"train_data={data / 'train.jsonl'}", f"eval_data={data / 'eval.jsonl'}", f"out_dir={out}",
        f"objective={objective}", "model.name_or_path=tiny-random", "model.tiny_hidden=32", "batch_size=8",
        "lr=3e-3", "head_lr=3e-2", "warmup_ratio=0", "epochs=2"]))


def run_sft(out: Path) -> None:
    from stable_rlhf.sft import SFTConfig, train

    demos = out.parent / "demos.jsonl"
    atomic_write_jsonl(demos, [{"prompt": f"Say the word {w} three times.", "response": f"{w} {w} {w}.",
                                "task": "alpha" if i % 2 else "beta"} for i, w in enumerate(WORDS)])
    train(load_config(SFTConfig, None, [f"data={demos}", f"out_dir={out}", "model.name_or_path=tiny-random",
                                        "batch_size=4", "lr=1e-3", "max_length=64", "epochs=2"]))


RUNS = {
    "ppo": run_ppo,
    "ppo_lora": lambda out: run_ppo(out, "lora.enabled=true", "lora.r=4", "lora.alpha=8", "lr=1e-2"),
    "rejection_sampling": run_rs,
    "rm": lambda out: run_score(out, "rm"),
    "am": lambda out: run_score(out, "am"),
    "sft": run_sft,
}


def behaviour(metrics: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not is_timing(k)} for row in read_jsonl(metrics)]


def assert_same(got: list[dict], want: list[dict], name: str) -> None:
    assert len(got) == len(want), f"{name}: {len(got)} metric rows, the fixture has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert set(w) <= set(g), f"{name} row {i}: missing {sorted(set(w) - set(g))}"
        for key, value in w.items():
            if isinstance(value, float) and not (math.isnan(value) and math.isnan(g[key])):
                # With PINNED_KERNELS the host's MKL instruction set (AVX-512, AVX2, SSE4.2)
                # changes no bit; 1e-4 leaves room for a CPU we have not met.
                assert g[key] == pytest.approx(value, rel=1e-4, abs=1e-5), f"{name} row {i} {key}"
            elif not isinstance(value, float):
                assert g[key] == value, f"{name} row {i} {key}"


# Kernels that give the same bits on every x86 CPU: MKL's conditional numerical
# reproducibility mode and ATen's plain (not AVX2/AVX-512) kernels, one thread. With the
# host's fastest kernels the same code differed between two of our machines by 1e-2
# after a few lr=1e-3 steps on the tiny model (a clip fraction 0.0 on one, 0.025 on the other).
PINNED_KERNELS = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1",
                  "MKL_NUM_THREADS": "1"}


def run_pinned(name: str, out: Path) -> None:
    """``RUNS[name]`` in a fresh interpreter with ``PINNED_KERNELS`` (they are read when
    torch loads, so they cannot be set in this one)."""
    code = ("import sys, torch; from pathlib import Path; torch.backends.mkldnn.enabled = False; "
            "from tests.test_behaviour_fixture import RUNS; RUNS[sys.argv[1]](Path(sys.argv[2]))")
    proc = subprocess.run([sys.executable, "-c", code, name, str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **PINNED_KERNELS}, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("name", sorted(RUNS))
def test_metrics_match_the_stored_fixture(name, tmp_path):
    out = tmp_path / name
    run_pinned(name, out)
    got = behaviour(out / "metrics.jsonl")
    fixture = FIXTURES / f"{name}.jsonl"
    if WRITE:
        atomic_write_jsonl(fixture, got)
    want = read_jsonl(fixture)
    assert want, f"{fixture} is empty"
    assert_same(got, want, name)
    json.dumps(got)  # the log stays plain JSON
