"""SFT on the tiny random Llama: the encoding masks exactly the response, the NLL is the
plain one, the data order is seeded and resumable, and `stable-rlhf sft` trains, writes
its outputs, skips a non-finite update and resumes exactly after SIGKILL."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stable_rlhf import sft
from stable_rlhf.cli import main as cli_main
from stable_rlhf.config import ModelConfig, load_config
from stable_rlhf.io import atomic_write_jsonl, read_jsonl
from stable_rlhf.models import chat_prompt, load_policy, load_tokenizer
from stable_rlhf.runs import latest_checkpoint
from stable_rlhf.sft import DemoBatches, SFTConfig, encode_demos, sequence_nll, train

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is 12 plus 30?", "Write three bullet points about the sea:", "hello there!"]
RESPONSES = ["The answer is 42.", "- The sea is large.\n- Fish live in the water.\n- Waves move.", "Hi!"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name_or_path="tiny-random"))


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def template_ids(tokenizer, prompt, system_prompt=None):
    """The prompt as the chat template tokenises it, independently of chat_prompt."""
    messages = [{"role": "user", "content": prompt}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# --------------------------------------------------------------------------- encode_demos


@pytest.mark.parametrize("system_prompt", [None, "Be brief."])
def test_encode_demos_masks_exactly_the_response(tokenizer, system_prompt):
    batch = encode_demos(tokenizer, PROMPTS, RESPONSES, max_length=256, system_prompt=system_prompt)
    input_ids, attn, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    assert input_ids.shape == attn.shape == loss_mask.shape and attn.dtype == loss_mask.dtype == torch.bool
    for b, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        n = int(attn[b].sum())
        assert attn[b, :n].all() and not attn[b, n:].any()  # right-padded
        assert (input_ids[b, n:] == tokenizer.pad_token_id).all()
        p_ids = ids(tokenizer, chat_prompt(tokenizer, prompt, system_prompt))
        assert p_ids == template_ids(tokenizer, prompt, system_prompt)  # as generate formats it
        r_ids = ids(tokenizer, response + tokenizer.eos_token)
        assert input_ids[b, :n].tolist() == p_ids + r_ids
        assert loss_mask[b].tolist() == [False] * len(p_ids) + [True] * len(r_ids) + [False] * (input_ids.shape[1] - n)
        masked = input_ids[b][loss_mask[b]].tolist()
        assert masked[-1] == tokenizer.eos_token_id  # the end-of-turn token is learned
        assert tokenizer.decode(masked) == response + tokenizer.eos_token
        assert tokenizer.decode(masked, skip_special_tokens=True) == response
        assert tokenizer.decode(input_ids[b][attn[b] & ~loss_mask[b]]) == chat_prompt(tokenizer, prompt, system_prompt)


def test_encode_demos_truncates_the_prompt_from_the_left_first(tokenizer):
    p_ids = [ids(tokenizer, chat_prompt(tokenizer, p)) for p in PROMPTS]
    r_ids = [ids(tokenizer, r + tokenizer.eos_token) for r in RESPONSES]
    # room for the longest response and 3 prompt tokens; the shorter responses keep more prompt
    max_length = max(len(r) for r in r_ids) + 3
    batch = encode_demos(tokenizer, PROMPTS, RESPONSES, max_length=max_length)
    assert batch["input_ids"].shape[1] == max_length
    for b in range(len(PROMPTS)):
        keep = max_length - len(r_ids[b])
        assert keep < len(p_ids[b])  # every prompt is cut here
        n = int(batch["attention_mask"][b].sum())
        assert n == max_length
        assert batch["input_ids"][b].tolist() == p_ids[b][-keep:] + r_ids[b]
        assert batch["loss_mask"][b].tolist() == [False] * keep + [True] * len(r_ids[b])


def test_encode_demos_cuts_a_too_long_response_at_its_end(tokenizer):
    p_ids = ids(tokenizer, chat_prompt(tokenizer, PROMPTS[1]))
    r_ids = ids(tokenizer, RESPONSES[1] + tokenizer.eos_token)
    batch = encode_demos(tokenizer, PROMPTS[1:2], RESPONSES[1:2], max_length=6)
    # one prompt token to condition on, then the start of the response
    assert batch["input_ids"][0].tolist() == p_ids[-1:] + r_ids[:5]
    assert batch["loss_mask"][0].tolist() == [False] + [True] * 5
    with pytest.raises(ValueError):
        encode_demos(tokenizer, [], [], max_length=16)


# --------------------------------------------------------------------------- sequence_nll


def test_sequence_nll_equals_a_manual_per_row_computation(tiny_model_cfg):
    model, tokenizer = load_policy(tiny_model_cfg, device="cpu")
    batch = encode_demos(tokenizer, PROMPTS, RESPONSES, max_length=256)
    with torch.no_grad():
        loss, stats = sequence_nll(model, batch)
        total, count = 0.0, 0
        for b in range(len(PROMPTS)):
            # each row alone, without padding: the padded batch must not change anything
            n = int(batch["attention_mask"][b].sum())
            row = batch["input_ids"][b, :n]
            logp = torch.log_softmax(model(input_ids=row[None]).logits[0].double(), -1)  # (n, V)
            for i in range(1, n):
                if batch["loss_mask"][b, i]:  # token i is predicted at position i - 1
                    total -= logp[i - 1, row[i]].item()
                    count += 1
    assert count == int(batch["loss_mask"].sum()) == stats["nll/tokens"]
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    assert loss.item() == pytest.approx(math.log(len(tokenizer)), rel=0.2)  # random init: ~uniform


# --------------------------------------------------------------------------- DemoBatches

DEMOS = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]


def stream(batches: DemoBatches, n_batches: int) -> list[str]:
    return [d["prompt"] for _ in range(n_batches) for d in batches.next()]


def test_demo_batches_are_seeded_and_cover_every_demo_once_per_epoch():
    a = stream(DemoBatches(DEMOS, batch_size=3, seed=7), 10)  # 30 demos: 3 epochs, batches straddling them
    assert a == stream(DemoBatches(DEMOS, batch_size=3, seed=7), 10)
    assert a != stream(DemoBatches(DEMOS, batch_size=3, seed=8), 10)
    epochs = [a[i:i + 10] for i in range(0, 30, 10)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(d["prompt"] for d in DEMOS)
    assert epochs[0] != epochs[1]  # reshuffled every epoch


@pytest.mark.parametrize("before", [2, 3, 7])  # mid-epoch, within a few items of the end, later epochs
def test_demo_batches_resume_the_exact_sequence(before):
    full = DemoBatches(DEMOS, batch_size=4, seed=3)
    stream(full, before)
    state = json.loads(json.dumps(full.state_dict()))  # survives a round trip through a checkpoint
    rest = stream(full, 8)
    resumed = DemoBatches(DEMOS, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert stream(resumed, 8) == rest


# --------------------------------------------------------------------------- the sft stage

WORDS = "river stone cloud music garden paper window bread light storm sun moon sea tree bird fox".split()


@pytest.fixture(scope="module")
def demos_file(tmp_path_factory):
    """16 learnable demonstrations: the answer repeats the word the prompt names."""
    path = tmp_path_factory.mktemp("sft") / "demos.jsonl"
    atomic_write_jsonl(path, [{"prompt": f"Say the word {w} three times.", "response": f"{w} {w} {w}.",
                               "task": "alpha" if i % 2 else "beta"} for i, w in enumerate(WORDS)])
    return path


def overrides(data, out, *extra) -> list[str]:
    return [f"data={data}", f"out_dir={out}", "model.name_or_path=tiny-random", "batch_size=4", "lr=1e-3",
            "max_length=64", *extra]


def cfg_for(data, out, *extra) -> SFTConfig:
    return load_config(SFTConfig, None, overrides(data, out, "log_with=none", *extra))


def demo_nll(model, tokenizer, path) -> float:
    rows = read_jsonl(path)
    with torch.no_grad():
        loss, _ = sequence_nll(model, encode_demos(tokenizer, [r["prompt"] for r in rows],
                                                   [r["response"] for r in rows], 64))
    return loss.item()


def test_sft_trains_writes_its_outputs_and_a_finished_run_resumes_to_itself(demos_file, tmp_path, tiny_model_cfg):
    out = tmp_path / "run"
    summary = train(cfg_for(demos_file, out, "epochs=3", "log_with=tensorboard", "keep_final_checkpoint=true"))
    assert summary["steps"] == 12 and summary["demos"] == 16 and summary["skipped_updates"] == 0
    for name in ("summary.json", "config.yaml", "metrics.jsonl", "model/config.json"):
        assert (out / name).exists(), name
    assert latest_checkpoint(out).name == "step-000012"  # one per epoch, the newest kept
    assert list((out / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert json.loads((out / "summary.json").read_text())["steps"] == 12
    assert load_config(SFTConfig, out / "config.yaml").epochs == 3
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert [m["epoch"] for m in metrics] == [e for e in range(3) for _ in range(4)]
    assert all(math.isfinite(m["loss/nll"]) and math.isfinite(m["optim/grad_norm"]) for m in metrics)
    assert summary["nll_first"] == metrics[0]["loss/nll"] and summary["nll_last"] == metrics[-1]["loss/nll"]
    assert summary["nll_last"] < summary["nll_first"]

    init, tokenizer = load_policy(tiny_model_cfg, device="cpu")
    trained, trained_tok = load_policy(ModelConfig(name_or_path=str(out / "model")), device="cpu")
    assert trained_tok.eos_token == tokenizer.eos_token and len(trained_tok) == len(tokenizer)
    unchanged = [n for (n, p), (_, q) in zip(init.named_parameters(), trained.named_parameters()) if torch.equal(p, q)]
    assert not unchanged
    assert demo_nll(trained, tokenizer, demos_file) < demo_nll(init, tokenizer, demos_file) - 0.5

    # resuming a finished run trains nothing more and keeps its result
    weights = saved_weights(out / "model")
    again = train(cfg_for(demos_file, out, "epochs=3", "resume=true", "keep_final_checkpoint=true"))
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in summary.items() if k != "seconds"}
    assert read_jsonl(out / "metrics.jsonl") == metrics
    assert saved_weights(out / "model") == weights


def test_a_finished_run_drops_its_checkpoints_unless_asked_and_refuses_to_resume_without_them(demos_file, tmp_path):
    from stable_rlhf.config import ConfigError

    out = tmp_path / "run"
    summary = train(cfg_for(demos_file, out, "epochs=2"))
    assert not (out / "checkpoints").exists()  # optimiser and RNG states are gone ...
    # ... the result stays
    assert (out / "model" / "config.json").exists() and len(read_jsonl(out / "metrics.jsonl")) == 8
    with pytest.raises(ConfigError, match="finished and dropped its checkpoints"):
        train(cfg_for(demos_file, out, "epochs=2", "resume=true"))
    assert json.loads((out / "summary.json").read_text())["steps"] == summary["steps"]  # untouched by the refusal
    again = train(cfg_for(demos_file, out, "epochs=2"))  # resume=false: run again from the start
    assert again["nll_last"] == pytest.approx(summary["nll_last"], abs=1e-6)


def test_a_nonfinite_loss_skips_its_update(demos_file, tmp_path, monkeypatch):
    real, calls = sft.sequence_nll, {"n": 0}

    def nan_on_the_second_step(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), stats) if calls["n"] == 2 else (loss, stats)

    monkeypatch.setattr(sft, "sequence_nll", nan_on_the_second_step)
    summary = train(cfg_for(demos_file, tmp_path / "nan", "epochs=1", "keep_final_checkpoint=true"))
    rows = read_jsonl(tmp_path / "nan" / "metrics.jsonl")
    assert [r["skipped_updates"] for r in rows] == [0, 1, 0, 0] and summary["skipped_updates"] == 1
    assert "optim/grad_norm" not in rows[1] and math.isfinite(rows[2]["optim/grad_norm"])
    assert rows[0]["optim/lr"] == rows[1]["optim/lr"] > rows[2]["optim/lr"]  # the scheduler waited too
    state = torch.load(latest_checkpoint(tmp_path / "nan") / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


# --------------------------------------------------------------------------- kill -9 and resume
# Shared with tests/test_reward_model.py: the same resume contract holds for every epoch trainer.


def run_stage(stage: str, overrides: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    """A stage in a fresh process (killed, resumed and straight runs alike: the same threads and
    kernels, so their floating-point results can be compared bit for bit)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("STABLE_RLHF_FAULT", None)
    if fault:
        env["STABLE_RLHF_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "stable_rlhf.cli", stage, *overrides], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def saved_weights(model_dir: Path) -> dict[str, list]:
    """Every tensor of a saved model directory (safetensors files), as nested lists."""
    from safetensors.torch import load_file

    return {f"{f.name}:{k}": v.tolist() for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_killed_run_resumes_exactly(stage: str, overrides: list[str], straight: Path, out: Path, fault: str,
                                      resumes_from: str) -> None:
    """SIGKILL the stage at ``fault``, resume it, and find the uninterrupted run's metrics and weights."""
    proc = run_stage(stage, overrides, fault=fault)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "summary.json").exists()
    assert latest_checkpoint(out).name == resumes_from
    proc = run_stage(stage, [*overrides, "resume=true"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints' / resumes_from}" in proc.stdout
    def behaviour(run_dir: Path) -> list[dict]:  # wall-clock timings aside
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_jsonl(run_dir / "metrics.jsonl")]

    rows = behaviour(out)
    assert rows == behaviour(straight)  # lost steps' rows dropped, then redone once
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows)
    assert saved_weights(out / "model") == saved_weights(straight / "model")
    assert not list((out / "checkpoints").glob(".step-*"))


@pytest.fixture(scope="module")
def straight_sft(demos_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-cli") / "straight"
    proc = run_stage("sft", overrides(demos_file, out, "epochs=2", "log_with=none"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.parametrize("fault", ["train:6", "checkpoint:8"])  # mid epoch 1; while writing epoch 1's checkpoint
def test_sigkilled_sft_run_resumes_to_the_same_result(straight_sft, demos_file, tmp_path, fault):
    out = tmp_path / "killed"
    assert_killed_run_resumes_exactly("sft", overrides(demos_file, out, "epochs=2", "log_with=none"), straight_sft,
                                      out, fault, resumes_from="step-000004")


def test_cli_sft_rejects_bad_data_before_loading_a_model(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "q", "response": 3}\n')
    code = cli_main(["sft", f"data={bad}", "model.name_or_path=does/not-exist", f"out_dir={tmp_path / 'x'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: field 'response'" in err and "expected a string" in err
    assert not (tmp_path / "x").exists()
