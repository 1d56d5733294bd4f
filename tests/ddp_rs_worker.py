"""Run by tests/test_rejection_sampling.py under ``torchrun --nproc_per_node 2``: a short
rejection-sampling run; every rank writes its final policy parameters, the kept-set sizes it
trained on and its sampled responses to <argv[1]>/rank<R>.pt for the test to compare."""

import os
import sys

import torch

torch.set_num_threads(1)
torch.backends.mkldnn.enabled = False

import stable_rlhf.models as models_mod  # noqa: E402
import stable_rlhf.rejection_sampling as rs  # noqa: E402
from stable_rlhf.config import load_config  # noqa: E402

out, overrides = sys.argv[1], sys.argv[2:]
seen = {"policies": [], "kept": [], "responses": []}
_load_policy, _finetune, _generate = models_mod.load_policy, rs.finetune, rs.generate


def load_policy(*args, **kwargs):
    result = _load_policy(*args, **kwargs)
    seen["policies"].append(result[0])
    return result


def finetune(run, cfg, state, kept):
    seen["kept"].append(len(kept))
    return _finetune(run, cfg, state, kept)


def generate(*args, **kwargs):
    gen = _generate(*args, **kwargs)
    seen["responses"].extend(gen.responses)
    return gen


models_mod.load_policy, rs.finetune, rs.generate = load_policy, finetune, generate
rs.train(load_config(rs.RejectionSamplingConfig, None, overrides))
flat = torch.cat([p.detach().flatten() for p in seen["policies"][0].parameters()])
torch.save({"params": flat, "kept": seen["kept"], "responses": seen["responses"]},
           os.path.join(out, f"rank{os.environ['RANK']}.pt"))
