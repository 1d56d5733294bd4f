"""``stable-rlhf rejection-sampling``: best-of-n fine-tuning (Llama 2's rejection sampling, RAFT).

Per iteration (shared/DESIGN.md, "Rejection sampling"):

1. take the next ``prompts_per_iteration`` prompts from a seeded, resumable stream;
2. sample ``n`` responses to each from the *current* policy (a seed per iteration);
3. score every sample with the score source (gold, RM, AM, per-task RM);
4. keep the best sample of each prompt (``select_best``: ties go to the first sample;
   optionally only complete responses, and only if the best reaches ``threshold``);
5. ``epochs`` passes of NLL fine-tuning on the kept (x, y), the same NLL as SFT
   (``sft.encode_demos`` + ``sft.sequence_nll``: prompt tokens masked);
6. log the iteration's statistics; write the kept samples to ``kept/iter-NNNN.jsonl``;
7. evaluate (gold reward per task, win/lose/tie against the initial policy, forgetting
   set) and save an atomic checkpoint with everything needed to continue exactly
   (``resume=true``).

Scores are the source's own (no running normalisation): best-of-n only compares the
samples of one prompt, so any monotone rescaling would keep the same ones; only
``threshold`` depends on the scale (gold: [0, 1] per task; AM: advantages around 0).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from .config import GenerationConfig, ModelConfig, save_config, to_dict
from .generation import generate
from .io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl
from .policy_eval import EvalConfig, PolicyEvaluator, eval_point, final_metrics, per_task_final
from .runs import (
    RunLog,
    clear_run_dir,
    fault_point,
    flat_hparams,
    latest_checkpoint,
    load_trainable,
    mean_stats,
    remove_partial_checkpoints,
    save_checkpoint,
    save_policy,
    trainable_state,
    truncate_metrics,
)
from .rewards import RewardConfig, build_reward, check_reward_inputs
from .rng import seed_everything, set_rng_state
from .sft import DemoBatches, encode_demos, sequence_nll


@dataclasses.dataclass
class RejectionSamplingConfig:
    """``stable-rlhf rejection-sampling``: iterated best-of-n sampling + NLL fine-tuning."""

    prompts: str = "data/testbed/prompts_train.jsonl"
    """prompt records to sample from (for the gold reward they need the testbed's task and meta)"""
    out_dir: str = "runs/rejection-sampling"
    """run directory; the final policy is saved in out_dir/model"""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """the initial (SFT) policy; its answers are also the win/lose/tie reference"""
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    """the score that picks the best sample (used raw: no running normalisation)"""
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    """candidate sampling (temperature must be > 0 when n > 1)"""
    seed: int = 0
    """seed for the prompt order, sampling and the fine-tuning order"""
    iterations: int = 3
    """rounds of sample -> select -> fine-tune"""
    prompts_per_iteration: int = 64
    """prompts sampled per iteration (per process)"""
    n: int = 4
    """samples per prompt (the n of best-of-n)"""
    threshold: Optional[float] = None
    """keep a prompt's best sample only if its score is >= threshold (None: always keep it)"""
    drop_truncated: bool = True
    """never keep a response that hit max_new_tokens without ending (the best complete one wins)"""
    epochs: int = 1
    """NLL passes over each iteration's kept samples"""
    batch_size: int = 8
    """kept samples per optimiser step (per process)"""
    lr: float = 1e-5
    """learning rate (AdamW, constant; the optimiser state carries across iterations)"""
    grad_clip: float = 1.0
    """max gradient norm"""
    max_length: int = 512
    """tokens per (prompt, response) in the NLL (the prompt is cut from the left first)"""
    eval: EvalConfig = dataclasses.field(default_factory=lambda: EvalConfig(every=1))
    """evaluation before the first iteration and every eval.every iterations (and after the last)"""
    keep_checkpoints: int = 1
    """checkpoints kept on disk (one is written after every iteration)"""
    log_with: Literal["tensorboard", "none"] = "tensorboard"
    """TensorBoard event files in out_dir, besides metrics.jsonl"""
    resume: bool = False
    """continue after the last finished iteration (the latest checkpoint in out_dir/checkpoints)"""

    def __post_init__(self):
        if min(self.iterations, self.prompts_per_iteration, self.n, self.epochs, self.batch_size) < 1:
            raise ValueError("iterations, prompts_per_iteration, n, epochs and batch_size must be >= 1")
        if self.n > 1 and self.generation.temperature <= 0:
            raise ValueError("greedy decoding gives n identical samples: generation.temperature must be > 0 "
                             "when n > 1")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be > 0")
        if self.max_length < 2:
            raise ValueError("max_length must be >= 2 (a prompt token and a response token)")
        if self.keep_checkpoints < 1:
            raise ValueError("keep_checkpoints must be >= 1")


# --------------------------------------------------------------------------- selection


def select_best(
    prompt_index: Sequence[int],
    scores: torch.Tensor | Sequence[float],
    truncated: torch.Tensor | Sequence[bool],
    threshold: float | None = None,
    drop_truncated: bool = True,
) -> list[int]:
    """Row indices of the kept samples: at most one per prompt, in order of prompt.

    A row is a candidate when its score is finite, it is complete (if ``drop_truncated``)
    and its score is >= ``threshold`` (if given); each prompt keeps its highest-scoring
    candidate, the first one on ties. A prompt without candidates keeps nothing."""
    scores = scores.tolist() if isinstance(scores, torch.Tensor) else list(scores)
    truncated = truncated.tolist() if isinstance(truncated, torch.Tensor) else list(truncated)
    if not len(prompt_index) == len(scores) == len(truncated):
        raise ValueError(f"{len(prompt_index)} prompt indices, {len(scores)} scores, {len(truncated)} truncated flags")
    best: dict[int, int] = {}  # prompt -> row
    for row, (p, s, t) in enumerate(zip(prompt_index, scores, truncated)):
        if not math.isfinite(s) or (drop_truncated and t) or (threshold is not None and s < threshold):
            continue
        if p not in best or s > scores[best[p]]:  # strict: ties keep the earlier row
            best[p] = row
    return [best[p] for p in sorted(best)]


# --------------------------------------------------------------------------- fine-tuning


def _finetune(policy, tokenizer, optimizer, accelerator, kept: list[dict], cfg: RejectionSamplingConfig,
              iteration: int) -> tuple[list[dict], int]:
    """``cfg.epochs`` shuffled passes of NLL steps over the kept samples (every process holds
    all of them); one step per ``batch_size * world`` samples, each rank taking its stride.

    Returns the per-step statistics and the number of steps skipped for a non-finite loss
    or gradient."""
    rank, world = accelerator.process_index, accelerator.num_processes
    step_stats, skipped = [], 0
    policy.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(
            cfg.seed * 7919 + iteration * 31 + epoch)).tolist()
        for start in range(0, len(order), cfg.batch_size * world):
            mine = order[start : start + cfg.batch_size * world][rank::world]
            # A rank left without rows in the last batch still runs a (zero-weight) forward and
            # backward: DDP all-reduces gradients on every backward of every rank.
            rows = [kept[i] for i in (mine or order[:1])]
            batch = encode_demos(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                                 cfg.max_length, cfg.generation.system_prompt)
            nll, stats = sequence_nll(policy, batch)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(nll if mine else 0.0 * nll)
            grad_norm = accelerator.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            ok = torch.isfinite(torch.stack([nll.detach().float(), grad_norm.detach().float()])).all()
            if not bool(accelerator.gather(ok.float()[None]).min().item()):
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            optimizer.step()
            if mine:
                step_stats.append({**stats, "optim/grad_norm": float(grad_norm)})
    policy.eval()
    return step_stats, skipped


def _iteration_stats(sampled: list[dict], kept: list[dict], n_prompts: int) -> dict:
    """Score statistics of all samples and of the kept ones, overall and per task."""

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    finite = [s for s in sampled if math.isfinite(s["score"])]
    scores, kept_scores = [s["score"] for s in finite], [k["score"] for k in kept]
    stats = {
        "objective/score": mean(scores),
        "objective/score_max": max(scores, default=None),
        "objective/kept_score": mean(kept_scores),
        "objective/kept_score_max": max(kept_scores, default=None),
        "objective/kept": len(kept),
        "objective/kept_fraction": len(kept) / n_prompts,
        "objective/non_finite_scores": len(sampled) - len(finite),
        "policy/truncated": mean([float(s["truncated"]) for s in sampled]),
        "policy/response_tokens": mean([s["tokens"] for s in sampled]),
    }
    for task in sorted({s["task"] for s in sampled}):
        stats[f"score/{task}/mean"] = mean([s["score"] for s in finite if s["task"] == task])
        stats[f"score/{task}/kept_mean"] = mean([k["score"] for k in kept if k["task"] == task])
    return stats


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# --------------------------------------------------------------------------- training


def train(cfg: RejectionSamplingConfig) -> dict:
    from accelerate.utils import gather_object

    from .data import load_records
    from .models import free_memory, load_policy, make_accelerator

    start_time = time.time()
    out = Path(cfg.out_dir)

    # 1. Data first: every file is validated before a model loads.
    prompts = load_records(cfg.prompts, "prompt")
    check_reward_inputs(cfg.reward, prompts, cfg.prompts)
    out.mkdir(parents=True, exist_ok=True)

    seed_everything(cfg.seed)
    accelerator = make_accelerator(seed=cfg.seed, log_with=None if cfg.log_with == "none" else cfg.log_with,
                                   project_dir=str(out / "tensorboard"))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    # The evaluator reads (and so validates) the eval and forgetting prompts.
    evaluator = PolicyEvaluator(cfg.eval, out, proxy=None, workers=cfg.reward.workers) if main else None

    # 2. Policy, score source, optimiser, prompt stream.
    policy, tokenizer = load_policy(cfg.model, device=device)
    reward = build_reward(cfg.reward, device=device)
    if main and cfg.reward.source != "gold":
        evaluator.proxy = reward  # eval/proxy: the optimised score of the eval answers
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    unwrapped_policy = accelerator.unwrap_model(policy)
    unwrapped_policy.eval()
    prompt_stream = DemoBatches(prompts, cfg.prompts_per_iteration * world, cfg.seed)  # same order on every rank

    # 3. A fresh run clears what an earlier run left in out_dir; then the SFT reference answers
    #    come from the initial policy (read back from out_dir on resume), before any checkpoint loads.
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is None and main:
        clear_run_dir(out, files=("metrics.jsonl", "summary.json", "samples_final.md"),
                      dirs=("samples", "kept", "checkpoints"))
    elif main:
        remove_partial_checkpoints(out)
    accelerator.wait_for_everyone()
    if main:
        save_config(cfg, out / "config.yaml")
        evaluator.prepare_reference(unwrapped_policy, tokenizer, device)
    iteration = 0
    if ckpt is not None:
        state = torch.load(ckpt / "state.pt", weights_only=True)
        load_trainable(unwrapped_policy, state["policy"], "policy")
        optimizer.load_state_dict(state["optimizer"])
        prompt_stream.load_state_dict(state["prompt_stream"])
        set_rng_state(state["rng"][rank])
        iteration = state["iteration"]
        if main:
            truncate_metrics(out / "metrics.jsonl", iteration)
            for later in (out / "kept").glob("iter-*.jsonl"):
                if int(later.stem.split("-")[1]) > iteration:
                    later.unlink()
            print(f"[rejection-sampling] resumed from {ckpt} (iteration {iteration})")
    if cfg.log_with != "none":
        accelerator.init_trackers("rejection-sampling", config=flat_hparams(to_dict(cfg)))

    log = RunLog(accelerator, out)

    def checkpoint() -> None:
        # "step-" names: runs.latest_checkpoint finds them; a step here is an iteration.
        save_checkpoint(accelerator, out, iteration, {
            "policy": trainable_state(unwrapped_policy), "optimizer": optimizer.state_dict(),
            "prompt_stream": prompt_stream.state_dict(), "iteration": iteration}, cfg.keep_checkpoints)

    def evaluate() -> dict:
        return eval_point(evaluator, accelerator, log, unwrapped_policy, tokenizer, iteration, "rejection-sampling",
                          {"iteration": iteration})

    if main:
        print(f"[rejection-sampling] {len(prompts)} prompts, reward {cfg.reward.source}, {world} process(es) on "
              f"{device}; {cfg.iterations} iterations of best-of-{cfg.n} on {cfg.prompts_per_iteration * world} "
              f"prompts")
    # None until an eval ran in this process (every rank gets {} from evaluate but the main one).
    last_eval = evaluate() if iteration == 0 else None

    while iteration < cfg.iterations:
        iteration += 1
        t_iter, times = time.time(), {}
        # 1. This rank's slice of the iteration's prompts.
        P = cfg.prompts_per_iteration
        records = prompt_stream.next()[rank * P : (rank + 1) * P]

        # 2. n samples per prompt from the current policy, prompt-major.
        t0 = time.time()
        gen = generate(unwrapped_policy, tokenizer, [r["prompt"] for r in records], cfg.generation, n=cfg.n,
                       seed=cfg.seed * 1_000_003 + iteration * world + rank, device=device)
        times["time/generate"] = time.time() - t0
        rows = [records[i] for i in gen.prompt_index]  # (P * n,) records

        # 3. Scores.
        t0 = time.time()
        scores = reward(rows, gen.responses).float().cpu()  # (P * n,)
        times["time/score"] = time.time() - t0

        # 4. Best of n per prompt; every rank gets every kept sample (in rank order).
        keep = select_best(gen.prompt_index, scores, gen.truncated, cfg.threshold, cfg.drop_truncated)
        kept = [{"iteration": iteration, "id": rows[i]["id"], "task": rows[i]["task"], "prompt": rows[i]["prompt"],
                 "response": gen.responses[i], "score": float(scores[i])} for i in keep]
        tokens = gen.response_mask.sum(-1).tolist()
        sampled = [{"task": r["task"], "score": float(s), "truncated": bool(t), "tokens": int(k)}
                   for r, s, t, k in zip(rows, scores.tolist(), gen.truncated.tolist(), tokens)]
        kept, sampled = gather_object(kept), gather_object(sampled)

        # 5. NLL fine-tuning on the kept samples.
        t0 = time.time()
        update_stats, skipped = _finetune(policy, tokenizer, optimizer, accelerator, kept, cfg, iteration) \
            if kept else ([], 0)
        times["time/update"] = time.time() - t0
        fault_point("train", iteration)

        # 6. Statistics and the kept samples.
        stats = {"step": iteration, "iteration": iteration, **_iteration_stats(sampled, kept, P * world),
                 **mean_stats(update_stats), "optim/steps": len(update_stats), "skipped_updates": skipped,
                 **times, "time/iteration": time.time() - t_iter}
        log(stats)
        if main:
            atomic_write_jsonl(out / "kept" / f"iter-{iteration:04d}.jsonl", kept)
            print(f"[rejection-sampling] iteration {iteration}: score {_fmt(stats['objective/score'])}, kept "
                  f"{len(kept)}/{P * world} (score {_fmt(stats['objective/kept_score'])}), "
                  + (f"nll {_fmt(stats.get('loss/nll'))}" if kept else "no update"))

        # 7. Eval and checkpoint.
        if iteration % cfg.eval.every == 0 or iteration == cfg.iterations:
            last_eval = evaluate()
        checkpoint()
        free_memory()

    if last_eval is None:  # a resumed run that had nothing left to do
        last_eval = evaluate()
    summary = {}
    if main:
        save_policy(unwrapped_policy, tokenizer, out / "model")
        history = [r for r in read_jsonl(out / "metrics.jsonl") if "objective/kept" in r]
        n_kept = sum(r["objective/kept"] for r in history)
        summary = {
            "iterations": iteration,
            "reward": cfg.reward.source,
            "final": final_metrics(last_eval),
            "per_task": per_task_final(last_eval),
            "kept": n_kept,
            "kept_fraction": n_kept / max(1, len(history) * cfg.prompts_per_iteration * world),
            "skipped_updates": sum(r.get("skipped_updates", 0) for r in history),
            "seconds": time.time() - start_time,
        }
        atomic_write_json(out / "summary.json", summary)
        atomic_write_text(out / "samples_final.md", evaluator.sample_table(iteration))
        print(f"[rejection-sampling] done: gold {summary['final']['gold_reward']:.4f}, win/lose/tie "
              f"{summary['final']['win']:.3f}/{summary['final']['lose']:.3f}/{summary['final']['tie']:.3f} -> {out}")
    accelerator.end_training()
    return summary
