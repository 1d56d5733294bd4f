"""The objective "gain" sampling luck alone gives: the SFT arm's answers (the SFT policy
resampled with another seed) against the SFT reference answers, under each PPO arm's score
and shaping, in the paired standard errors of the report's diagnostics table.

    python -m experiments.objective_null runs/main --arms rm-ppo am-ppo

Every PPO arm's ``eval/objective`` starts from the same reference sample (one answer per
eval prompt), so that sample's luck moves every arm's gain alike; this measures it. The
SFT policy is the reference, so its KL term is exactly 0 and the objective is the shaped
score, normalised with the reference answers' moments, as ``ppo.EvalObjective`` does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from stable_rlhf import ppo
from stable_rlhf.config import load_config
from stable_rlhf.io import read_jsonl
from stable_rlhf.rewards import build_reward


def null_gain(run: Path, arm: str, seed: int = 0) -> dict:
    cfg = load_config(ppo.PPOConfig, str(run / "arms" / arm / f"seed{seed}" / "config.yaml"), [])
    ref = read_jsonl(run / "shared" / "eval_reference" / "eval_reference_eval.jsonl")
    sft = read_jsonl(run / "arms" / "sft" / f"seed{seed}" / "samples" / "eval-step000000.jsonl")
    if [r["id"] for r in ref] != [r["id"] for r in sft]:
        raise ValueError(f"{run}: the SFT arm's eval answers are not to the reference's prompts")
    prompts = {r["id"]: r for r in read_jsonl(cfg.eval.prompts)}
    records = [prompts[r["id"]] for r in ref]
    reward = build_reward(cfg.reward, device="cpu")
    raw_ref = reward(records, [r["response"] for r in ref])
    raw_sft = reward(records, [r["response"] for r in sft])
    moments = (raw_ref.mean().item(), raw_ref.std().item())
    points = []
    for raw, rows in ((raw_ref, ref), (raw_sft, sft)):
        shaped = ppo.shape_scores(cfg, raw, torch.tensor([r["truncated"] for r in rows]), *moments).double()
        points.append({"eval/objective": shaped.mean().item(), "eval/objective_by_prompt": shaped.tolist()})
    change = ppo.objective_change(points)  # the paired gain the report's diagnostics table gives
    return {"arm": arm, "start": change["objective_start"], "end": change["objective_end"],
            "gain": change["objective_gain"], "gain_se": change["objective_gain_se"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--arms", nargs="+", default=["rm-ppo", "am-ppo"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for arm in args.arms:
        g = null_gain(args.run, arm, args.seed)
        print(f"{arm}: objective of the SFT reference answers {g['start']:.3f}, of the SFT policy resampled "
              f"{g['end']:.3f}: gain {g['gain']:+.3f} ({g['gain_se']:+.1f} SE) without training")


if __name__ == "__main__":
    main()
