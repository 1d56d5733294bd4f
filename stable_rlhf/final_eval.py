"""A finished trainer run's policy evaluated once, as a policy trainer's final eval point.

PPO and rejection sampling evaluate their policy while they train (``policy_eval.TrainingEval``);
a trainer that does not (``dpo``) is evaluated afterwards with the same ``PolicyEvaluator``:
the same eval and forgetting prompts, sampling seed and settings, gold reward, proxy score and
win/lose/tie against the SFT policy's answers. The ablation's DPO arms run this after their
``dpo`` stage; it writes what a PPO run's directory holds for the report:

    metrics.jsonl        two eval points: step 0 (the SFT policy: its reference answers, reused)
                         and the trained policy's, at the trainer's last step
    summary.json         ``final`` (``policy_eval.final_metrics`` + ``kl``), ``per_task``, the
                         trainer's own summary under ``trainer``
    samples/, samples_final.md, eval_reference_<set>.jsonl, config.yaml

KL: a trainer without rollouts has no rollout KL, so ``eval/kl`` (and ``final.kl``) is the mean
over the eval answers of Σ_t [log π(y_t | x, y_<t) − log π_SFT(y_t | x, y_<t)], both at the eval
sampling temperature: the k1 estimate of KL(π ‖ π_SFT) per response that PPO logs for its
rollouts, here on the answers re-encoded from their text (a truncated answer without the
end-of-turn token it never sampled). With greedy eval sampling (temperature 0) it is undefined:
null, shown as n/a.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import torch

from .config import ModelConfig, save_config
from .io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl
from .policy_eval import EvalConfig, PolicyEvaluator, final_metrics, per_task_final
from .rewards import RewardConfig


@dataclasses.dataclass
class FinalEvalConfig:
    """Evaluate a finished run's policy (``run_dir``/model) like a policy trainer's eval points."""

    run_dir: str = "runs/dpo"
    """a finished trainer run: its model/ is evaluated, its summary.json's ``steps`` numbers the eval point"""
    out_dir: str = "runs/dpo/eval"
    """where the evaluation goes (metrics.jsonl, summary.json, samples)"""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """the initial (SFT) policy: the win/lose/tie and KL reference; the trained policy loads with
    these settings from run_dir/model"""
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    """the proxy score of the eval answers (source gold: none; the gold reward scores them anyway)"""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    """the eval settings, the same as the trainers' (reference_dir: shared SFT answers)"""
    kl_batch_size: int = 8
    """answers per forward pass of the KL estimate"""
    kl_max_length: int = 1024
    """tokens per (prompt, answer) in the KL estimate (the prompt is cut from the left first)"""

    def __post_init__(self):
        if self.kl_batch_size < 1 or self.kl_max_length < 2:
            raise ValueError("kl_batch_size must be >= 1 and kl_max_length >= 2")


def token_logprobs(model, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """log π(t_{i+1} | t_<=i) of an ``encode_demos`` batch at ``temperature``, (B, T - 1)."""
    from .losses import logprobs_from_logits
    from .models import position_ids_from_mask

    device = next(model.parameters()).device
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask.long(),
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
    return logprobs_from_logits(logits[:, :-1] / temperature, input_ids[:, 1:]).float().cpu()


@torch.no_grad()
def answer_kl(policy, reference, tokenizer, rows: list[dict], cfg: FinalEvalConfig) -> Optional[list[float]]:
    """Σ over each answer's tokens of log π − log π_SFT at the eval temperature (the module
    docstring), one value per row; None with greedy sampling."""
    from .sft import encode_demos

    gen = cfg.eval.generation
    if gen.temperature == 0:
        return None
    kl: list[float] = []
    for i in range(0, len(rows), cfg.kl_batch_size):
        chunk = rows[i: i + cfg.kl_batch_size]
        batch = encode_demos(tokenizer, [r["prompt"] for r in chunk], [r["response"] for r in chunk],
                             cfg.kl_max_length, gen.system_prompt)
        mask = batch["loss_mask"][:, 1:].clone()  # position t predicts token t + 1
        for j, row in enumerate(chunk):
            if row["truncated"]:  # the end-of-turn token encode_demos appends was never sampled
                mask[j, int(mask[j].nonzero().max())] = False
        diff = token_logprobs(policy, batch, gen.temperature) - token_logprobs(reference, batch, gen.temperature)
        kl += (diff * mask).sum(-1).tolist()
    return kl


def trained_summary(cfg: FinalEvalConfig) -> dict:
    """The trainer's summary.json (its run must have finished)."""
    path = Path(cfg.run_dir, "summary.json")
    if not path.is_file() or not Path(cfg.run_dir, "model").is_dir():
        raise FileNotFoundError(f"{cfg.run_dir}: not a finished run (no summary.json and model/)")
    return json.loads(path.read_text())


def evaluate_policy(evaluator: PolicyEvaluator, cfg: FinalEvalConfig, step: int, device) -> dict:
    """The eval point of run_dir/model at ``step``, with ``eval/kl`` against the SFT policy."""
    from .models import free_memory, load_policy

    reference, _ = load_policy(cfg.model, device=device)
    policy, tokenizer = load_policy(dataclasses.replace(cfg.model, name_or_path=str(Path(cfg.run_dir, "model"))),
                                    device=device)
    stats = {"step": step, **evaluator.run(policy, tokenizer, step, device)}
    rows = read_jsonl(Path(cfg.out_dir, "samples", f"eval-step{step:06d}.jsonl"))
    kl = answer_kl(policy, reference, tokenizer, rows, cfg)
    stats["eval/kl"] = None if kl is None else sum(kl) / len(kl)
    del policy, reference
    free_memory()
    return stats


def train(cfg: FinalEvalConfig) -> dict:
    """The stage entry point (named like every stage's): the SFT reference answers (shared ones
    copied), the step-0 eval point from them, the trained policy's eval point, then
    metrics.jsonl, samples_final.md and (last) summary.json."""
    from .models import default_device
    from .rewards import build_reward

    t0, out = time.time(), Path(cfg.out_dir)
    trainer = trained_summary(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    save_config(cfg, out / "config.yaml")
    evaluator = PolicyEvaluator(cfg.eval, out, proxy=None, workers=cfg.reward.workers)  # reads the eval prompts
    device = default_device()
    proxy = evaluator.proxy = None if cfg.reward.source == "gold" else build_reward(cfg.reward, device=device)
    if cfg.eval.reference_dir is None:
        from .models import free_memory, load_policy

        sft, tokenizer = load_policy(cfg.model, device=device)
        evaluator.prepare_reference(sft, tokenizer, device)
        del sft
        free_memory()
    else:
        evaluator.prepare_reference(None, None, None)
    first = {"step": 0, **evaluator.run(None, None, 0, device, is_reference=True), "eval/kl": 0.0}
    step = int(trainer.get("steps") or 0)
    last = evaluate_policy(evaluator, cfg, step, device)
    atomic_write_jsonl(out / "metrics.jsonl", [first, last])
    atomic_write_text(out / "samples_final.md", evaluator.sample_table(step))
    summary = {"steps": step, "reward": None, "proxy": None if proxy is None else cfg.reward.source,
               "final": {**final_metrics(last), "kl": last["eval/kl"]}, "per_task": per_task_final(last),
               "trainer": trainer, "seconds": time.time() - t0}
    atomic_write_json(out / "summary.json", summary)
    f = summary["final"]
    print(f"[final-eval] {cfg.run_dir}: gold {f['gold_reward']:.4f}, KL {f['kl']}, win/lose/tie "
          f"{f['win']:.3f}/{f['lose']:.3f}/{f['tie']:.3f} -> {out}")
    return summary
