"""``stable-rlhf ppo``: PPO on a policy against a score source (RM, AM, per-task RM, gold).

The InstructGPT objective (shared/DESIGN.md), with the implementation details of
"The N implementation details of RLHF with PPO" (Huang et al.) and lm-human-preferences:

    max E_{x~D, y~π}[ s(x, y) - β·log(π(y|x) / π_ref(y|x)) ]
        + γ_ptx · E_{(x,y)~D_ptx}[log π(y|x)] + γ_R · E_{(x,y)~D_R}[log π(y|x)]

``train(cfg)`` as a recipe, one PPO step per rollout:

1. sample a batch of prompts; generate with the KV cache (left-padded queries);
2. score the responses; subtract a penalty from those that ran out of tokens without
   an end-of-turn; normalise RM scores with running global moments;
3. under no_grad, once per rollout: logprobs, reference logprobs and values;
4. per-token rewards -β·KL with the score added at the last real token; GAE (γ, λ);
   whitened advantages;
5. ``ppo_epochs`` passes over shuffled minibatches: clipped policy loss, clipped value
   loss, plus γ_ptx / γ_R NLL on demonstration minibatches; a step whose loss or scores
   are not finite is skipped and logged, and too many in a row stop the run;
6. KL controller update; every stability signal logged;
7. at eval intervals: gold reward and proxy per task, win/lose/tie against the SFT
   policy (and the forgetting set), samples; at save intervals an atomic checkpoint with
   everything needed to continue exactly (``resume=true``).

The reference policy is a frozen copy of the initial policy, or, with LoRA, the same
network with its adapters disabled. The value model is a ``ScoreModel``: initialised
from the score model when the score source is one (same tokenizer), else from the
policy's backbone with a new head.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Literal, Optional

import torch

from .generation import generate
from .config import GenerationConfig, ModelConfig, save_config, to_dict
from .io import atomic_write_json, atomic_write_text, read_jsonl
from .losses import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalised_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from .policy_eval import EvalConfig, PolicyEvaluator, eval_point, final_metrics, per_task_final
from .rewards import RewardConfig, build_reward, check_reward_inputs
from .rng import seed_everything, set_rng_state
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
from .sft import DemoBatches, encode_demos, sequence_nll


@dataclasses.dataclass
class LoRAConfig:
    """Low-rank adapters on the policy (the reference is the base with adapters disabled)."""

    enabled: bool = False
    """train LoRA adapters instead of every weight"""
    r: int = 16
    """adapter rank"""
    alpha: int = 32
    """adapter scaling numerator (scale = alpha / r)"""
    dropout: float = 0.0
    """adapter dropout (0 keeps the PPO ratio exact at the first minibatch)"""
    target_modules: str = "all-linear"
    """peft target_modules: 'all-linear' or a comma-separated list of module names"""


@dataclasses.dataclass
class NLLMixConfig:
    """An NLL term mixed into every PPO update: PPO-ptx or selective rehearsal."""

    data: Optional[str] = None
    """demonstrations ({prompt, response}); None: the term is off"""
    coef: float = 0.0
    """γ: weight of the NLL term"""
    batch_size: int = 4
    """demonstrations per PPO minibatch"""
    max_length: int = 512
    """tokens per demonstration (prompt cut from the left first)"""


@dataclasses.dataclass
class PPOConfig:
    """``stable-rlhf ppo``: PPO with a KL penalty against the initial policy."""

    prompts: str = "data/testbed/prompts_train.jsonl"
    """PPO prompt records (for the gold reward they need the testbed's task and meta)"""
    out_dir: str = "runs/ppo"
    """run directory"""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """the initial (SFT) policy; also the reference"""
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    """the score being optimised"""
    generation: GenerationConfig = dataclasses.field(
        default_factory=lambda: GenerationConfig(max_new_tokens=48, temperature=0.7, top_p=1.0))
    """rollout sampling; logprobs are computed from logits / temperature, so top_p < 1 makes
    the sampling distribution differ from the one PPO optimises (kept at 1 by default)"""
    seed: int = 0
    """seed for prompts order, sampling and initialisation"""
    steps: int = 40
    """PPO steps (rollouts)"""
    batch_size: int = 16
    """prompts per rollout (per process)"""
    mini_batch_size: int = 4
    """rollout rows per optimiser step"""
    ppo_epochs: int = 1
    """passes over each rollout"""
    lr: float = 1e-5
    """policy learning rate (AdamW)"""
    value_lr: float = 1e-5
    """value-model learning rate"""
    value_head_lr: Optional[float] = None
    """learning rate of the value model's head (None: value_lr when the value model starts
    from a score model, 100 x value_lr for a new head)"""
    value_head_init: Literal["random", "zero"] = "random"
    """a new value head's weights (the value model does not start from a score model):
    random (std 1/sqrt(d+1), like a score head) or zero, so V = 0 at the start and the
    first advantages are the returns rather than returns minus an untrained head's output"""
    lr_schedule: Literal["constant", "linear"] = "constant"
    """constant, or linear decay to 0 over the run"""
    grad_clip: float = 1.0
    """max gradient norm (policy and value together)"""
    cliprange: float = 0.2
    """ε of the policy ratio clip"""
    cliprange_value: float = 0.2
    """ε of the value clip"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE λ"""
    whiten_advantages: bool = True
    """whiten advantages over each rollout"""
    kl_coef: float = 0.05
    """β, the initial KL penalty coefficient"""
    adaptive_kl: bool = False
    """adapt β to keep the KL near kl_target (Ziegler et al.)"""
    kl_target: float = 6.0
    """target KL per sequence (nats) for the adaptive controller"""
    kl_horizon: int = 10000
    """adaptive controller horizon (in rollout rows)"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """per-token KL estimator in the penalty"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of a response that hit max_new_tokens without ending"""
    score_clip: Optional[float] = None
    """clip (normalised) scores to ±score_clip"""
    forward_batch_size: int = 8
    """rows per no-grad forward pass (logprobs, reference, values)"""
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    """LoRA on the policy"""
    value_model: Optional[str] = None
    """value-model init: a saved score model directory (default: the reward's model if it is
    one, else the policy backbone with a new head)"""
    critic_warmup: int = 0
    """the first N rollouts update only the value model (the policy stays put), so the
    advantages of the first policy updates do not come from an untrained critic"""
    value_train_layers: Optional[int] = None
    """train only the value model's top N layers and its head (None: all); saves CPU time"""
    ptx: NLLMixConfig = dataclasses.field(default_factory=NLLMixConfig)
    """PPO-ptx: γ_ptx · NLL on SFT or pretraining demonstrations"""
    rehearsal: NLLMixConfig = dataclasses.field(default_factory=lambda: NLLMixConfig(coef=0.01))
    """selective rehearsal: γ_R · NLL on the rehearsal set D_R (on when rehearsal.data is set)"""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    """evaluation during training"""
    save_every: int = 10
    """checkpoint every N steps (and at the end)"""
    keep_checkpoints: int = 2
    """checkpoints kept on disk"""
    max_bad_steps: int = 3
    """stop after this many consecutive steps skipped for a non-finite score or loss"""
    log_with: Literal["tensorboard", "none"] = "tensorboard"
    """TensorBoard event files in out_dir/tensorboard, besides metrics.jsonl"""
    resume: bool = False
    """continue from the latest checkpoint in out_dir/checkpoints"""

    def __post_init__(self):
        if not 0 <= self.critic_warmup < self.steps:
            raise ValueError(f"critic_warmup ({self.critic_warmup}) must be in [0, steps)")
        if min(self.steps, self.batch_size, self.mini_batch_size, self.ppo_epochs, self.forward_batch_size) < 1:
            raise ValueError("steps, batch_size, mini_batch_size, ppo_epochs and forward_batch_size must be >= 1")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size "
                             f"({self.mini_batch_size})")
        if self.value_head_lr is not None and self.value_head_lr <= 0:
            raise ValueError(f"value_head_lr ({self.value_head_lr}) must be > 0 (or null for the default)")
        if self.kl_coef < 0 or self.cliprange <= 0 or self.cliprange_value <= 0:
            raise ValueError("kl_coef must be >= 0 and the clip ranges > 0")
        if self.generation.temperature <= 0:
            raise ValueError("PPO samples its rollouts: generation.temperature must be > 0")
        if self.save_every < 1 or self.keep_checkpoints < 1 or self.max_bad_steps < 1:
            raise ValueError("save_every, keep_checkpoints and max_bad_steps must be >= 1")


class NonFiniteError(RuntimeError):
    """Raised after ``max_bad_steps`` consecutive non-finite steps; a checkpoint is saved first."""


# --------------------------------------------------------------------------- model plumbing


def response_logprobs(model, query_ids, query_mask, response_ids, response_mask, temperature: float,
                      with_entropy: bool = False):
    """log π(y_t | x, y_<t) for every response token, (B, Tr), and optionally the entropy.

    Logits are divided by the sampling temperature (the distribution the tokens were drawn
    from); the position before each response token predicts it."""
    from .models import position_ids_from_mask

    input_ids = torch.cat([query_ids, response_ids], 1)  # (B, Tq + Tr)
    attention_mask = torch.cat([query_mask, response_mask], 1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask.long(),
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
    Tq = query_ids.shape[1]
    logits = logits[:, Tq - 1 : -1] / temperature  # (B, Tr, V)
    logprobs = logprobs_from_logits(logits, response_ids)
    entropy = entropy_from_logits(logits) if with_entropy else None
    return logprobs, entropy


def response_values(value_model, query_ids, query_mask, response_ids, response_mask):
    """V(x, y_<t) for every response token, (B, Tr): the value at the position before it."""
    input_ids = torch.cat([query_ids, response_ids], 1)
    attention_mask = torch.cat([query_mask, response_mask], 1)
    values = value_model(input_ids, attention_mask, per_token=True)  # (B, Tq + Tr)
    return values[:, query_ids.shape[1] - 1 : -1]


def _chunks(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# --------------------------------------------------------------------------- training


def train(cfg: PPOConfig) -> dict:
    from transformers import get_constant_schedule, get_linear_schedule_with_warmup

    from .data import load_records
    from .models import apply_lora, free_memory, freeze_lower_layers, load_policy, load_score_model, make_accelerator

    start_time = time.time()
    out = Path(cfg.out_dir)

    # 1. Data first: every file is validated before a model loads.
    prompts = load_records(cfg.prompts, "prompt")
    check_reward_inputs(cfg.reward, prompts, cfg.prompts)
    mixes = {name: (mix, load_records(mix.data, "sft")) for name, mix in (("ptx", cfg.ptx), ("rehearsal", cfg.rehearsal))
             if mix.data and mix.coef > 0}
    out.mkdir(parents=True, exist_ok=True)

    seed_everything(cfg.seed)
    accelerator = make_accelerator(seed=cfg.seed, log_with=None if cfg.log_with == "none" else cfg.log_with,
                                   project_dir=str(out / "tensorboard"))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if main:
        save_config(cfg, out / "config.yaml")

    # 2. Models: policy (+ reference), value model, score source.
    policy, tokenizer = load_policy(cfg.model, device=device)
    reference = None
    if cfg.lora.enabled:
        policy = apply_lora(policy, cfg.lora)
    else:
        reference, _ = load_policy(cfg.model, device=device)
        reference.requires_grad_(False)
    policy.eval()  # no dropout: the PPO ratio of the first minibatch is exactly 1

    reward = build_reward(cfg.reward, device=device)
    value_init = cfg.value_model or (cfg.reward.path if cfg.reward.source != "gold" else None)
    if value_init and not _same_tokenizer(value_init, tokenizer):
        # A value model reads the policy's tokens: a score model on another backbone (e.g. an
        # encoder RM) cannot be its init. An explicit value_model must match; the default falls back.
        if cfg.value_model:
            raise ValueError(f"value_model {value_init} uses a different tokenizer from the policy")
        if main:
            print(f"[ppo] the score model {value_init} has another tokenizer than the policy: the value model "
                  "starts from the policy backbone with a new head")
        value_init = None
    value_model, _ = load_score_model(cfg.model, device=device, init_from=value_init)
    if value_init is None and cfg.value_head_init == "zero":
        with torch.no_grad():
            value_model.head.weight.zero_()
            value_model.head.bias.zero_()
    freeze_lower_layers(value_model, cfg.value_train_layers)
    value_model.eval()

    head_ids = {id(p) for p in value_model.head.parameters()}
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.lr},
              {"params": [p for p in value_model.parameters() if p.requires_grad and id(p) not in head_ids],
               "lr": cfg.value_lr},
              {"params": list(value_model.head.parameters()),
               "lr": cfg.value_head_lr or cfg.value_lr * (1 if value_init else 100)}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], eps=1e-5)
    updates_per_step = cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
    scheduler = (get_constant_schedule(optimizer) if cfg.lr_schedule == "constant"
                 else get_linear_schedule_with_warmup(optimizer, 0, cfg.steps * updates_per_step))
    policy, value_model, optimizer = accelerator.prepare(policy, value_model, optimizer)
    unwrapped_policy = accelerator.unwrap_model(policy)

    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    score_moments = RunningMoments()
    prompt_stream = DemoBatches(prompts, cfg.batch_size * world, cfg.seed)  # same order on every rank
    mix_streams = {name: DemoBatches(demos, mix.batch_size, cfg.seed + 1 + rank) for name, (mix, demos) in mixes.items()}
    evaluator = PolicyEvaluator(cfg.eval, out, proxy=None if cfg.reward.source == "gold" else reward,
                                workers=cfg.reward.workers) if main else None

    # Resume: the latest complete checkpoint restores everything the loop depends on.
    step, bad_in_row = 0, 0
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if main:
        remove_partial_checkpoints(out)
    if ckpt is not None:
        state = torch.load(ckpt / "state.pt", weights_only=True)
        load_trainable(unwrapped_policy, state["policy"], "policy")
        load_trainable(accelerator.unwrap_model(value_model), state["value"], "value")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        kl_ctl.load_state_dict(state["kl_ctl"])
        score_moments.load_state_dict(state["score_moments"])
        prompt_stream.load_state_dict(state["prompt_stream"])
        for name, s in state["mix_streams"].items():
            mix_streams[name].load_state_dict(s)
        set_rng_state(state["rng"][rank])
        step, bad_in_row = state["step"], state["bad_in_row"]
        if main:
            truncate_metrics(out / "metrics.jsonl", step)
            print(f"[ppo] resumed from {ckpt} (step {step})")
    elif main:
        clear_run_dir(out, files=("metrics.jsonl", "summary.json", "samples_final.md"),
                      dirs=("samples", "checkpoints", "model"))
    if cfg.log_with != "none":
        accelerator.init_trackers("ppo", config=flat_hparams(to_dict(cfg)))

    log = RunLog(accelerator, out)

    def checkpoint() -> None:
        save_checkpoint(accelerator, out, step, {
            "policy": trainable_state(unwrapped_policy), "value": trainable_state(accelerator.unwrap_model(value_model)),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "kl_ctl": kl_ctl.state_dict(),
            "score_moments": score_moments.state_dict(), "prompt_stream": prompt_stream.state_dict(),
            "mix_streams": {n: s.state_dict() for n, s in mix_streams.items()}, "step": step,
            "bad_in_row": bad_in_row}, cfg.keep_checkpoints)

    def evaluate() -> dict:
        return eval_point(evaluator, accelerator, log, unwrapped_policy, tokenizer, step, "ppo")

    if main:
        n_train = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        print(f"[ppo] {len(prompts)} prompts, reward {cfg.reward.source}, {world} process(es) on {device}; "
              f"{n_train / 1e6:.1f}M trainable policy parameters; {cfg.steps} steps of {cfg.batch_size * world} "
              f"rollouts")
        # The SFT reference answers come from the initial policy, before any update (a resumed
        # run reads the ones it saved then).
        evaluator.prepare_reference(unwrapped_policy if step == 0 else None, tokenizer, device)
    accelerator.wait_for_everyone()
    last_eval = evaluate() if step == 0 else {}
    eval_step = 0 if step == 0 else -1

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc="ppo", disable=not main)
    while step < cfg.steps:
        t_step = time.time()
        times: dict[str, float] = {}
        # 1. Prompts (each rank its slice of the global batch) and rollouts.
        batch_records = prompt_stream.next()[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
        t0 = time.time()
        gen = generate(unwrapped_policy, tokenizer, [r["prompt"] for r in batch_records], cfg.generation,
                       seed=cfg.seed * 1_000_003 + step * world + rank, device=device).to(device)
        times["time/generate"] = time.time() - t0

        # 2. Scores.
        t0 = time.time()
        raw_scores = reward(batch_records, gen.responses).to(device)  # (B,)
        times["time/score"] = time.time() - t0
        scores = raw_scores - cfg.missing_eos_penalty * gen.truncated.float()
        all_finite = bool(accelerator.gather(torch.isfinite(scores).all().float()[None]).min().item())
        if not all_finite:
            bad_in_row += 1
            step += 1
            log({"step": step, "skipped": 1, "skip_reason": "non-finite score", "bad_in_row": bad_in_row})
            print(f"[ppo] step {step}: non-finite score, step skipped ({bad_in_row} in a row)")
            if bad_in_row >= cfg.max_bad_steps:
                checkpoint()
                raise NonFiniteError(f"{bad_in_row} consecutive steps with non-finite scores or losses; stopped at "
                                     f"step {step}; last checkpoint in {out / 'checkpoints'}")
            bar.update(1)
            continue
        if cfg.reward.running_normalisation:
            score_moments.update(accelerator.gather(scores))
            scores = (scores - score_moments.mean) / max(score_moments.std, 1e-6)
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)

        # 3. Logprobs, reference logprobs and values, once per rollout.
        t0 = time.time()
        B = len(gen)
        mask = gen.response_mask
        with torch.no_grad():
            logprobs, ref_logprobs, values = [], [], []
            for sl in _chunks(B, cfg.forward_batch_size):
                args = (gen.query_ids[sl], gen.query_mask[sl], gen.response_ids[sl], gen.response_mask[sl])
                logprobs.append(response_logprobs(unwrapped_policy, *args, cfg.generation.temperature)[0])
                if reference is None:
                    with unwrapped_policy.disable_adapter():
                        ref_logprobs.append(response_logprobs(unwrapped_policy, *args, cfg.generation.temperature)[0])
                else:
                    ref_logprobs.append(response_logprobs(reference, *args, cfg.generation.temperature)[0])
                values.append(response_values(accelerator.unwrap_model(value_model), *args))
            logprobs, ref_logprobs, values = torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)
            logprobs, ref_logprobs = logprobs * mask, ref_logprobs * mask
            values = values * mask
        times["time/forward"] = time.time() - t0

        # 4. Rewards and advantages.
        rewards, kl = kl_penalised_rewards(scores, logprobs, ref_logprobs, mask, kl_ctl.value, cfg.kl_estimator)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        # 5. PPO epochs of minibatches.
        t0 = time.time()
        policy.eval()
        value_model.eval()
        update_stats: list[dict] = []
        skipped_updates = 0
        warmup = step < cfg.critic_warmup  # value-only updates: the policy is neither run nor stepped
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=torch.Generator().manual_seed(cfg.seed * 7919 + step * 31 + epoch))
            for mb in order.split(cfg.mini_batch_size):
                mb = mb.to(device)
                mb_args = (gen.query_ids[mb], gen.query_mask[mb], gen.response_ids[mb], gen.response_mask[mb])
                mb_mask = mask[mb]
                optimizer.zero_grad(set_to_none=True)
                # One backward per forward (DDP marks each parameter ready once per backward):
                # with NLL terms the policy's gradients are all-reduced with the last of them.
                mb_mixes = {} if warmup else mixes
                with accelerator.no_sync(policy) if mb_mixes else contextlib.nullcontext():
                    mb_values = response_values(value_model, *mb_args)
                    vf_loss, vf_stats = value_loss(mb_values, values[mb], returns[mb], mb_mask, cfg.cliprange_value)
                    if warmup:
                        loss, stats = cfg.vf_coef * vf_loss, {**vf_stats, "policy/critic_warmup": 1.0}
                    else:
                        mb_logprobs, mb_entropy = response_logprobs(policy, *mb_args, cfg.generation.temperature,
                                                                    with_entropy=True)
                        pg_loss, pg_stats = policy_loss(mb_logprobs, logprobs[mb], advantages[mb], mb_mask,
                                                        cfg.cliprange)
                        loss = pg_loss + cfg.vf_coef * vf_loss
                        stats = {**pg_stats, **vf_stats, "policy/entropy": masked_mean(mb_entropy, mb_mask).item()}
                    accelerator.backward(loss)
                losses = [loss.detach()]
                for i, (name, (mix, _)) in enumerate(mb_mixes.items()):
                    rows = mix_streams[name].next()
                    demo = encode_demos(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                                        max_length=mix.max_length, system_prompt=cfg.generation.system_prompt)
                    with accelerator.no_sync(policy) if i < len(mb_mixes) - 1 else contextlib.nullcontext():
                        nll, _ = sequence_nll(policy, demo)
                        accelerator.backward(mix.coef * nll)
                    stats[f"loss/{name}"] = nll.item()
                    losses.append(mix.coef * nll.detach())
                stats["loss/total"] = float(sum(l.detach() for l in losses))
                grad_norm = accelerator.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
                # a NaN/inf anywhere (score, loss, gradient) shows in the loss or the norm
                ok = torch.isfinite(torch.stack([torch.as_tensor(stats["loss/total"]), grad_norm.detach().cpu()]))
                if not bool(accelerator.gather(ok.all().float()[None].to(device)).min().item()):
                    optimizer.zero_grad(set_to_none=True)
                    skipped_updates += 1
                    continue
                stats["optim/grad_norm"] = float(grad_norm)
                optimizer.step()
                scheduler.step()
                update_stats.append(stats)
        times["time/update"] = time.time() - t0
        step += 1
        fault_point("train", step)

        # 6. KL controller and the step's statistics.
        seq_kl = kl.sum(-1)  # (B,)
        kl_ctl.update(accelerator.gather(seq_kl).mean().item(), B * world)
        if skipped_updates:
            bad_in_row += 1
            print(f"[ppo] step {step}: {skipped_updates} minibatch update(s) skipped for a non-finite loss "
                  f"({bad_in_row} step(s) in a row)")
        else:
            bad_in_row = 0
        stats = {"step": step, **mean_stats(update_stats), **times, "time/step": time.time() - t_step,
                 "objective/score": accelerator.gather(raw_scores).mean().item(),
                 "objective/score_used": accelerator.gather(scores).mean().item(),
                 "objective/kl": accelerator.gather(seq_kl).mean().item(),
                 "objective/non_score_reward": accelerator.gather((rewards.sum(-1) - scores)).mean().item(),
                 "objective/kl_coef": kl_ctl.value,
                 "value/explained_variance": explained_variance(values, returns, mask),
                 "value/mean": masked_mean(values, mask).item(),
                 "policy/response_tokens": mask.sum(-1).float().mean().item(),
                 "policy/truncated": gen.truncated.float().mean().item(),
                 "skipped_updates": skipped_updates}
        for task in sorted({r["task"] for r in batch_records}):
            idx = [i for i, r in enumerate(batch_records) if r["task"] == task]
            stats[f"score/{task}/mean"] = raw_scores[idx].mean().item()
        log(stats)
        bar.update(1)
        bar.set_postfix(score=f"{stats['objective/score']:.3f}", kl=f"{stats['objective/kl']:.3f}")
        if bad_in_row >= cfg.max_bad_steps:
            checkpoint()
            raise NonFiniteError(f"{bad_in_row} consecutive steps with non-finite losses; stopped at step {step}; "
                                 f"last checkpoint in {out / 'checkpoints'}")

        # 7. Eval and checkpoints.
        if step % cfg.eval.every == 0 or step == cfg.steps:
            last_eval, eval_step = evaluate(), step
        if step % cfg.save_every == 0 or step == cfg.steps:
            checkpoint()
        free_memory()
    bar.close()

    if eval_step != step:  # a resumed run that had nothing left to do
        last_eval = evaluate()
    summary = {}
    if main:
        save_policy(unwrapped_policy.merge_and_unload() if cfg.lora.enabled else unwrapped_policy, tokenizer,
                    out / "model")
        history = read_jsonl(out / "metrics.jsonl")
        last_train = [r for r in history if "objective/kl" in r]
        summary = {
            "steps": step,
            "reward": cfg.reward.source,
            "final": {**final_metrics(last_eval), "kl": last_train[-1]["objective/kl"] if last_train else None},
            "per_task": per_task_final(last_eval),
            "skipped_steps": sum(1 for r in history if r.get("skipped")),
            "seconds": time.time() - start_time,
        }
        atomic_write_json(out / "summary.json", summary)
        atomic_write_text(out / "samples_final.md", evaluator.sample_table(step))
        print(f"[ppo] done: gold {summary['final']['gold_reward']:.4f}, KL {summary['final']['kl']}, "
              f"win/lose/tie {summary['final']['win']:.3f}/{summary['final']['lose']:.3f}/"
              f"{summary['final']['tie']:.3f} -> {out}")
    accelerator.end_training()
    return summary


def _same_tokenizer(score_model_dir: str, tokenizer) -> bool:
    from transformers import AutoTokenizer

    if not Path(score_model_dir, "tokenizer_config.json").is_file():
        return True  # saved without one: it was trained with the policy's
    return AutoTokenizer.from_pretrained(score_model_dir).get_vocab() == tokenizer.get_vocab()


