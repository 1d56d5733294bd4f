"""Precision: weights that train are stored in float32 (the optimiser's master copy), and
``precision: bf16-mixed`` computes under bf16 autocast on top of them.

AdamW's first step moves every weight by about lr; a bf16 weight of magnitude 0.02 has a
spacing of ~8e-5, so at lr 1e-5 most updates round away when the weights themselves are
bf16 (the bug this guards against: on CUDA, 'auto' once loaded trained models in bf16).
accelerate's mixed-precision state is one per process, so each setting runs in its own."""

import json
import os
import subprocess
import sys

import pytest
import torch

from stable_rlhf.config import ModelConfig, load_config
from stable_rlhf.models import resolve_dtype

STEP = """
import json, sys, torch
from stable_rlhf.config import ModelConfig
from stable_rlhf.models import load_policy, make_accelerator
from stable_rlhf.sft import encode_demos, sequence_nll

mixed, store_bf16 = sys.argv[1], sys.argv[2] == "1"
torch.manual_seed(0)
model, tok = load_policy(ModelConfig(name_or_path="tiny-random"), device="cpu", trainable=True)
if store_bf16:
    model = model.to(torch.bfloat16)  # the old failure mode: AdamW updates bf16 weights in place
accelerator = make_accelerator(cpu=True, mixed_precision=mixed)
model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-5))
before = [p.detach().clone() for p in model.parameters()]
batch = encode_demos(tok, ["Say the word apple three times."] * 4, ["apple apple apple."] * 4, 64)
model.train()
# accelerate hands outputs back in fp32: read the compute dtype inside, at a linear layer
seen = []
linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
hook = linear.register_forward_hook(lambda module, args, out: seen.append(str(out.dtype)))
loss, _ = sequence_nll(model, batch)
hook.remove()
accelerator.backward(loss)
optimizer.step()
changed = sum((p.detach() != b).sum().item() for p, b in zip(model.parameters(), before))
print(json.dumps({"changed": changed / sum(b.numel() for b in before), "compute": seen[0],
                  "weights": str(next(model.parameters()).dtype)}))
"""


def one_adamw_step(mixed: str, store_bf16: bool = False) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", STEP, mixed, "1" if store_bf16 else "0"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bf16_mixed_updates_almost_every_weight_like_fp32():
    fp32, mixed, stored_bf16 = one_adamw_step("no"), one_adamw_step("bf16"), one_adamw_step("no", store_bf16=True)
    assert fp32["weights"] == mixed["weights"] == "torch.float32"
    assert mixed["compute"] == "torch.bfloat16" and fp32["compute"] == "torch.float32"  # autocast is on
    assert fp32["changed"] >= 0.95 and mixed["changed"] >= 0.95
    assert stored_bf16["changed"] < 0.5  # what bf16 weights without a master copy do at lr 1e-5


def test_weights_that_train_are_never_loaded_in_bf16():
    # 'auto' stores a trained model in float32 even on CUDA (no GPU needed to decide this) ...
    assert resolve_dtype(ModelConfig(), "cuda", trainable=True) == torch.float32
    assert resolve_dtype(ModelConfig(), "cpu") == torch.float32
    assert resolve_dtype(ModelConfig(dtype="bfloat16"), "cpu") == torch.bfloat16  # a frozen model may be bf16
    # ... and an explicit half dtype for a model that trains is refused, pointing at bf16-mixed
    with pytest.raises(ValueError, match="bf16-mixed"):
        resolve_dtype(ModelConfig(dtype="bfloat16"), "cpu", trainable=True)


@pytest.mark.parametrize("stage", ["sft", "ppo", "rejection_sampling", "reward_model"])
def test_every_trainer_has_a_precision_setting(stage):
    import importlib

    module = importlib.import_module(f"stable_rlhf.{stage}")
    cls = {"sft": "SFTConfig", "ppo": "PPOConfig", "rejection_sampling": "RejectionSamplingConfig",
           "reward_model": "ScoreTrainConfig"}[stage]
    cfg = load_config(getattr(module, cls), None, ["precision=bf16-mixed"])
    assert cfg.precision == "bf16-mixed"
    assert getattr(module, cls)().precision == "auto"


def test_sft_trains_under_bf16_mixed_and_saves_float32(tmp_path):
    from stable_rlhf.io import atomic_write_jsonl

    demos = tmp_path / "demos.jsonl"
    atomic_write_jsonl(demos, [{"prompt": f"Say {w}.", "response": f"{w} {w}."} for w in "abcdefgh"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "stable_rlhf.cli", "sft", f"data={demos}",
                           f"out_dir={tmp_path / 'run'}", "model.name_or_path=tiny-random", "batch_size=4",
                           "lr=1e-3", "epochs=3", "log_with=none", "precision=bf16-mixed"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["nll_last"] < summary["nll_first"]
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert {str(w.dtype) for w in weights.values()} == {"torch.float32"}


SAMPLE = """
import json, torch
from stable_rlhf.config import GenerationConfig, ModelConfig
from stable_rlhf.generation import generate
from stable_rlhf.models import load_policy, make_accelerator

model, tok = load_policy(ModelConfig(name_or_path="tiny-random"), device="cpu", trainable=True)
model = make_accelerator(cpu=True, mixed_precision="bf16").prepare(model)
seen = []
linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
hook = linear.register_forward_hook(lambda module, args, out: seen.append(str(out.dtype)))
wrapped = model.__dict__["forward"]
generate(model, tok, ["Name a colour."], GenerationConfig(max_new_tokens=4, temperature=1.0), seed=0)
sampling = sorted(set(seen))
seen.clear()
model(input_ids=torch.tensor([[1, 2, 3]]))
print(json.dumps({"sampling": sampling, "training": sorted(set(seen)),
                  "restored": model.__dict__["forward"] is wrapped}))
"""


def test_sampling_runs_the_float32_weights_under_bf16_mixed():
    """Under bf16-mixed the sampler runs the stored float32 weights (autocast would re-cast
    them at every decoding step), and the training forward keeps its autocast afterwards."""
    out = subprocess.run([sys.executable, "-c", SAMPLE], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"sampling": ["torch.float32"], "training": ["torch.bfloat16"], "restored": True}
