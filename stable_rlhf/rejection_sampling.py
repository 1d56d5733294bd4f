"""``stable-rlhf rejection-sampling``: best-of-n fine-tuning (Llama 2's rejection sampling, RAFT).

Per iteration (docs/methods.md, "Rejection sampling"), each step a function below:

1. ``sample``: the next ``prompts_per_iteration`` prompts from a seeded, resumable stream,
   and ``n`` responses to each from the *current* policy (a seed per iteration);
2. ``score``: every sample scored by the score source (gold, RM, AM, per-task RM);
3. ``select``: the best sample of each prompt (``select_best``: ties go to the first
   sample; optionally only complete responses, and only if the best reaches ``threshold``),
   gathered from every rank;
4. ``finetune``: ``epochs`` passes of NLL fine-tuning on the kept (x, y), the same NLL as
   SFT (``sft.encode_demos`` + ``sft.sequence_nll``: prompt tokens masked);
5. ``log_iteration``: the iteration's statistics; the kept samples in ``kept/iter-NNNN.jsonl``;
6. evaluate (gold reward per task, win/lose/tie against the initial policy, forgetting
   set) and save an atomic checkpoint of the ``RSState``, everything needed to continue
   exactly (``resume=true``).

Scores are the source's own (no running normalisation): best-of-n only compares the
samples of one prompt, so any monotone rescaling would keep the same ones; only
``threshold`` depends on the scale (gold: [0, 1] per task; AM: advantages around 0).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .config import GenerationConfig
from .generation import Generation, generate
from .io import atomic_write_jsonl
from .models import free_memory
from .policy_eval import EvalConfig, PolicyTrainerConfig, TrainingEval
from .rewards import build_reward, check_reward_inputs
from .runs import Run, adamw, clipped_step, fault_point, load_trainable, mean_stats, timed, trainable_state, unwrap
from .sft import DemoBatches, encode_demos, sequence_nll


@dataclasses.dataclass
class RejectionSamplingConfig(PolicyTrainerConfig):
    """``stable-rlhf rejection-sampling``: iterated best-of-n sampling + NLL fine-tuning
    (``prompts``, ``model`` and ``reward`` come from ``PolicyTrainerConfig``, the run settings
    from the ``RunSettings`` it extends)."""

    out_dir: str = "runs/rejection-sampling"
    """run directory; the final policy is saved in out_dir/model"""
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


# --------------------------------------------------------------------------- run state


@dataclasses.dataclass
class RSState:
    """What rejection sampling carries from iteration to iteration; ``state_dict`` is what a
    checkpoint saves and resume restores."""

    policy: Any
    """the policy, as ``accelerator.prepare`` returned it (DDP-wrapped under several processes)"""
    tokenizer: Any
    optimizer: Any
    """AdamW at a constant learning rate; its state carries across iterations"""
    prompt_stream: DemoBatches
    """global batches of prompts, in the same order on every rank"""
    iteration: int = 0

    @property
    def policy_module(self):
        return unwrap(self.policy)

    def state_dict(self) -> dict:
        return {"policy": trainable_state(self.policy_module), "optimizer": self.optimizer.state_dict(),
                "prompt_stream": self.prompt_stream.state_dict(), "iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        load_trainable(self.policy_module, state["policy"], "policy")
        self.optimizer.load_state_dict(state["optimizer"])
        self.prompt_stream.load_state_dict(state["prompt_stream"])
        self.iteration = state["iteration"]


@dataclasses.dataclass
class Samples:
    """One iteration's samples on this rank: ``n`` per prompt, prompt-major."""

    records: list[dict]
    """(P * n,) the prompt record of each sample"""
    gen: Generation
    scores: Optional[torch.Tensor] = None
    """(P * n,) the score source's, on the CPU"""


# --------------------------------------------------------------------------- the recipe


def train(cfg: RejectionSamplingConfig) -> dict:
    """Iterations of sample -> score -> select -> fine-tune (the module docstring's recipe)."""
    from .data import load_records

    prompts = load_records(cfg.prompts, "prompt")  # every file is validated before a model loads
    check_reward_inputs(cfg.reward, prompts, cfg.prompts)
    run = Run(cfg, "rejection-sampling", log_with=cfg.log_with, keep_checkpoints=cfg.keep_checkpoints,
              fresh_files=("samples_final.md",), fresh_dirs=("samples", "kept"), step_name="iteration")
    evals = TrainingEval(run, cfg.eval, cfg.reward.workers)
    state, reward = setup(run, cfg, prompts)
    resumed = run.start(cfg.resume)
    # The SFT reference answers come from the initial policy, before a checkpoint loads (a
    # resumed run reads the ones it saved).
    evals.prepare(state.policy_module, state.tokenizer, None if cfg.reward.source == "gold" else reward)
    if resumed:
        state.load_state_dict(resumed)
        _drop_later_kept(run, state.iteration)
    else:
        evals(state.policy_module, state.tokenizer, 0, {"iteration": 0})

    bar = run.progress(cfg.iterations, state.iteration)
    while state.iteration < cfg.iterations:
        state.iteration += 1
        started, times = time.time(), {}
        samples = sample(run, cfg, state, times)  # 1. prompts -> n responses each
        score(samples, reward, times)  # 2. scores
        kept, sampled = select(cfg, state.iteration, samples)  # 3. the best of n, from every rank
        with timed(times, "time/update"):  # 4. NLL fine-tuning on the kept samples
            update_stats, skipped = finetune(run, cfg, state, kept) if kept else ([], 0)
        fault_point("train", state.iteration)
        times["time/iteration"] = time.time() - started
        log_iteration(run, cfg, state, kept, sampled, update_stats, skipped, times)  # 5. statistics
        if evals.due(state.iteration, cfg.iterations):  # 6. eval and checkpoint
            evals(state.policy_module, state.tokenizer, state.iteration, {"iteration": state.iteration})
        run.checkpoint(state.iteration, state.state_dict())
        bar.update(1)
        free_memory()
    return finish(run, cfg, state, evals)


def setup(run: Run, cfg: RejectionSamplingConfig, prompts: list[dict]) -> tuple[RSState, Any]:
    """The policy, the score source, the optimiser and the prompt stream; returns the state
    and the score source."""
    from .models import load_policy

    policy, tokenizer = load_policy(cfg.model, device=run.device, trainable=True)
    reward = build_reward(cfg.reward, device=run.device)
    optimizer = adamw(policy.parameters(), lr=cfg.lr)
    policy, optimizer = run.accelerator.prepare(policy, optimizer)
    state = RSState(policy, tokenizer, optimizer,
                    DemoBatches(prompts, cfg.prompts_per_iteration * run.world, cfg.seed))
    state.policy_module.eval()
    run.print(f"{len(prompts)} prompts, reward {cfg.reward.source}, {run.world} process(es) on {run.device}; "
              f"{cfg.iterations} iterations of best-of-{cfg.n} on {cfg.prompts_per_iteration * run.world} prompts")
    return state, reward


def _drop_later_kept(run: Run, iteration: int) -> None:
    """The kept sets of the iterations after the checkpoint: they will be made again."""
    if run.is_main:
        for later in (run.out / "kept").glob("iter-*.jsonl"):
            if int(later.stem.split("-")[1]) > iteration:
                later.unlink()


# --------------------------------------------------------------------------- an iteration


def sample(run: Run, cfg: RejectionSamplingConfig, state: RSState, times: dict) -> Samples:
    """This rank's slice of the iteration's prompts and ``n`` samples of each from the current
    policy (a seed per iteration and rank)."""
    P = cfg.prompts_per_iteration
    records = state.prompt_stream.next()[run.rank * P : (run.rank + 1) * P]
    with timed(times, "time/generate"):
        gen = generate(state.policy_module, state.tokenizer, [r["prompt"] for r in records], cfg.generation,
                       n=cfg.n, seed=cfg.seed * 1_000_003 + state.iteration * run.world + run.rank,
                       device=run.device)
    return Samples([records[i] for i in gen.prompt_index], gen)


def score(samples: Samples, reward, times: dict) -> None:
    with timed(times, "time/score"):
        samples.scores = reward(samples.records, samples.gen.responses).float().cpu()  # (P * n,)


def select(cfg: RejectionSamplingConfig, iteration: int, samples: Samples) -> tuple[list[dict], list[dict]]:
    """The best sample of each prompt (``select_best``) and a summary row of every sample,
    from every rank (in rank order)."""
    from accelerate.utils import gather_object

    rows, gen, scores = samples.records, samples.gen, samples.scores
    keep = select_best(gen.prompt_index, scores, gen.truncated, cfg.threshold, cfg.drop_truncated)
    kept = [{"iteration": iteration, "id": rows[i]["id"], "task": rows[i]["task"], "prompt": rows[i]["prompt"],
             "response": gen.responses[i], "score": float(scores[i])} for i in keep]
    tokens = gen.response_mask.sum(-1).tolist()
    sampled = [{"task": r["task"], "score": float(s), "truncated": bool(t), "tokens": int(k)}
               for r, s, t, k in zip(rows, scores.tolist(), gen.truncated.tolist(), tokens)]
    return gather_object(kept), gather_object(sampled)


def finetune(run: Run, cfg: RejectionSamplingConfig, state: RSState, kept: list[dict]) -> tuple[list[dict], int]:
    """``cfg.epochs`` shuffled passes of NLL steps over the kept samples (every process holds
    all of them); one step per ``batch_size * world`` samples, each rank taking its stride.

    Returns the per-step statistics and the number of steps skipped for a non-finite loss
    or gradient."""
    rank, world = run.rank, run.world
    step_stats, skipped = [], 0
    state.policy.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(
            cfg.seed * 7919 + state.iteration * 31 + epoch)).tolist()
        for start in range(0, len(order), cfg.batch_size * world):
            mine = order[start : start + cfg.batch_size * world][rank::world]
            # A rank left without rows in the last batch still runs a (zero-weight) forward and
            # backward: DDP all-reduces gradients on every backward of every rank.
            rows = [kept[i] for i in (mine or order[:1])]
            batch = encode_demos(state.tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                                 cfg.max_length, cfg.generation.system_prompt)
            nll, stats = sequence_nll(state.policy, batch)
            state.optimizer.zero_grad(set_to_none=True)
            run.accelerator.backward(nll if mine else 0.0 * nll)
            grad_norm = clipped_step(run.accelerator, state.optimizer, state.policy.parameters(), cfg.grad_clip, nll)
            if grad_norm is None:
                skipped += 1
            elif mine:
                step_stats.append({**stats, "optim/grad_norm": grad_norm})
    state.policy.eval()
    return step_stats, skipped


def log_iteration(run: Run, cfg: RejectionSamplingConfig, state: RSState, kept: list[dict], sampled: list[dict],
                  update_stats: list[dict], skipped: int, times: dict) -> None:
    """The iteration's statistics (logged, and a line printed) and its kept samples."""
    n_prompts = cfg.prompts_per_iteration * run.world
    stats = {"step": state.iteration, "iteration": state.iteration, **_iteration_stats(sampled, kept, n_prompts),
             **mean_stats(update_stats), "optim/steps": len(update_stats), "skipped_updates": skipped, **times}
    run.log(stats)
    if run.is_main:
        atomic_write_jsonl(run.out / "kept" / f"iter-{state.iteration:04d}.jsonl", kept)
    run.print(f"iteration {state.iteration}: score {_fmt(stats['objective/score'])}, kept {len(kept)}/{n_prompts} "
              f"(score {_fmt(stats['objective/kept_score'])}), "
              + (f"nll {_fmt(stats.get('loss/nll'))}" if kept else "no update"))


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


# --------------------------------------------------------------------------- the end


def finish(run: Run, cfg: RejectionSamplingConfig, state: RSState, evals: TrainingEval) -> dict:
    """The final eval point (unless the last iteration had one), then the final policy, the
    last sample table and summary.json."""
    model, iteration = state.policy_module, state.iteration
    evals.final(model, state.tokenizer, iteration, {"iteration": iteration})
    summary = {}
    if run.is_main:
        history = [r for r in run.metrics() if "objective/kept" in r]
        n_kept = sum(r["objective/kept"] for r in history)
        summary = evals.summary({"iterations": iteration, "reward": cfg.reward.source}, {
            "kept": n_kept, "kept_fraction": n_kept / max(1, len(history) * cfg.prompts_per_iteration * run.world),
            "skipped_updates": sum(r.get("skipped_updates", 0) for r in history)})
    return evals.finish(model, state.tokenizer, iteration, summary)
