"""Run by tests/test_ppo.py under ``torchrun --nproc_per_node 2``: a short PPO run whose
ranks sample different rollouts; afterwards every rank's policy and value parameters must
be identical (DDP all-reduced the gradients). Rank 0 writes what it saw to argv[1]."""

import json
import sys

import torch
import torch.distributed as dist

import stable_rlhf.ppo as ppo
from stable_rlhf.config import load_config

out_json, overrides = sys.argv[1], sys.argv[2:]
responses: list[str] = []
models: list = []
_generate = ppo.generate

import stable_rlhf.models as models_mod  # noqa: E402


def recording_generate(*args, **kwargs):
    gen = _generate(*args, **kwargs)
    responses.extend(gen.responses)
    return gen


def recording(fn):
    def wrapper(*args, **kwargs):
        result = fn(*args, **kwargs)
        models.append(result[0])
        return result
    return wrapper


ppo.generate = recording_generate
# keep the process group alive after train() for the comparison below
import accelerate  # noqa: E402

accelerate.Accelerator.end_training = lambda self: None
models_mod.load_policy = recording(models_mod.load_policy)
models_mod.load_score_model = recording(models_mod.load_score_model)
cfg = load_config(ppo.PPOConfig, None, overrides)
ppo.train(cfg)

# models: [policy, reference, value model] in load order
flat = torch.cat([torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (models[0], models[2])])
reference = torch.cat([p.detach().flatten() for p in models[1].parameters()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
all_responses = [None] * dist.get_world_size()
dist.all_gather_object(all_responses, responses)
if dist.get_rank() == 0:
    json.dump({
        "world": dist.get_world_size(),
        "max_param_diff": max((g - gathered[0]).abs().max().item() for g in gathered),
        "changed_from_reference": (flat[: reference.numel()] - reference).abs().max().item(),
        "same_rollouts": all(r == all_responses[0] for r in all_responses),
        "n_rollouts": [len(r) for r in all_responses],
    }, open(out_json, "w"))
# Tear the process group down before exit: left to the interpreter's exit, gloo's threads
# were destroyed while joinable on a loaded machine ("terminate called without an active
# exception", SIGABRT) after the run and the comparison had finished.
dist.barrier()
dist.destroy_process_group()
