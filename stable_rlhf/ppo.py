"""``stable-rlhf ppo``: PPO on a policy against a score source (RM, AM, per-task RM, gold).

The InstructGPT objective (docs/methods.md), with the implementation details of
"The N implementation details of RLHF with PPO" (Huang et al.) and lm-human-preferences:

    max E_{x~D, y~π}[ s(x, y) - β·log(π(y|x) / π_ref(y|x)) ]
        + γ_ptx · E_{(x,y)~D_ptx}[log π(y|x)] + γ_R · E_{(x,y)~D_R}[log π(y|x)]

``train(cfg)`` is the recipe, one PPO step per rollout, each step a function below:

1. ``sample_rollout``: the next batch of prompts; responses with the KV cache (left-padded
   queries);
2. ``score``: the score source's scores, RM scores normalised with running global moments,
   less a penalty (in running standard deviations) for a response that ran out of tokens
   without an end-of-turn. A
   non-finite score skips the step (``skip_step``), and too many in a row stop the run;
3. ``forward``, under no_grad, once per rollout: logprobs, reference logprobs and values;
4. ``estimate_advantages``: ``gae_advantages`` (per-token rewards -β·KL with the score
   added at the last real token; GAE (γ, λ); whitened advantages), or, with
   ``advantage.estimator`` rloo or grpo, ``critic_free_advantages`` (each prompt sampled
   ``group_size`` times; a sample's advantage from the others' scores, at all its tokens;
   no value model is built);
5. ``update``: ``ppo_epochs`` passes over shuffled minibatches of ``ppo_loss`` (clipped
   policy loss, clipped value loss; critic-free: ``critic_free_loss``) plus ``nll_mix_loss`` (γ_ptx / γ_R NLL on demonstration
   minibatches); an update whose loss or gradient is not finite is skipped and counted;
6. ``log_step``: the KL controller's update; every stability signal logged;
7. at eval intervals: gold reward and proxy per task, win/lose/tie against the SFT policy
   (and the forgetting set), samples; at save intervals an atomic checkpoint of the
   ``PPOState``, everything needed to continue exactly (``resume=true``).

The reference policy is a frozen copy of the initial policy, or, with LoRA, the same
network with its adapters disabled. The value model is a ``ScoreModel``: initialised
from the score model when the score source is one (same tokenizer), else from the
policy's backbone with a new head.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any, Literal, NoReturn, Optional

import torch

from .config import GenerationConfig
from .generation import Generation, generate
from .losses import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    explained_variance,
    gae,
    group_advantages,
    kl_penalised_rewards,
    kl_per_token,
    logprobs_from_logits,
    masked_mean,
    masked_rescale,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    value_loss,
)
from .models import free_memory
from .policy_eval import EvalConfig, PolicyTrainerConfig, TrainingEval
from .rewards import build_reward, check_reward_inputs
from .runs import NonFiniteError  # noqa: F401  (ppo.NonFiniteError: what a stopped run raises)
from .runs import (
    GuardedRunSettings,
    NonFiniteGuard,
    Run,
    adamw,
    all_finite,
    clipped_step,
    fault_point,
    load_trainable,
    mean_stats,
    timed,
    trainable_state,
    unwrap,
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
class AdvantageConfig:
    """How a rollout's scores become per-token advantages: PPO's GAE against a value model, or
    a critic-free estimator that compares the samples of one prompt with each other."""

    estimator: Literal["gae", "rloo", "grpo"] = "gae"
    """gae: per-token rewards and GAE(γ, λ) against a value model; rloo: each sample's score
    minus the mean of the other samples of its prompt (REINFORCE leave-one-out); grpo: minus
    its group's mean, over the group's std. rloo and grpo build no value model"""
    group_size: int = 4
    """rloo, grpo: samples per prompt; a rollout of batch_size rows is batch_size / group_size
    prompts, each sampled group_size times"""
    scale_by_std: bool = True
    """grpo: divide by the group's standard deviation; False is Dr. GRPO's advantage (the
    division weighs prompts whose samples barely differ up)"""
    kl: Literal["reward", "loss"] = "reward"
    """rloo, grpo: β·KL subtracted from each sample's score before the baseline (RLOO), or a
    loss term β·mean k3(π, π_ref) over the response tokens (GRPO); gae has it in the rewards"""

    @property
    def critic_free(self) -> bool:
        return self.estimator != "gae"


@dataclasses.dataclass
class PPOConfig(PolicyTrainerConfig, GuardedRunSettings):
    """``stable-rlhf ppo``: PPO with a KL penalty against the initial policy (``prompts``,
    ``model`` and ``reward`` come from ``PolicyTrainerConfig``, the run settings from
    ``GuardedRunSettings``)."""

    out_dir: str = "runs/ppo"
    """run directory"""
    generation: GenerationConfig = dataclasses.field(
        default_factory=lambda: GenerationConfig(max_new_tokens=48, temperature=0.7, top_p=1.0))
    """rollout sampling; logprobs are computed from logits / temperature, so top_p < 1 makes
    the sampling distribution differ from the one PPO optimises (kept at 1 by default)"""
    seed: int = 0
    """seed for prompts order, sampling and initialisation"""
    steps: int = 40
    """PPO steps (rollouts)"""
    batch_size: int = 16
    """rollout rows per process: prompts, or prompts x advantage.group_size for rloo and grpo"""
    mini_batch_size: int = 4
    """rollout rows per optimiser step"""
    ppo_epochs: int = 1
    """passes over each rollout"""
    lr: float = 1e-5
    """policy learning rate (AdamW)"""
    value_lr: float = 1e-5
    """value-model learning rate"""
    value_head_lr: Optional[float] = None
    """learning rate of the value model's head (None: value_lr)"""
    value_head_init: Literal["random", "zero"] = "zero"
    """a new value head's weights (the value model does not start from a score model): zero,
    so V = 0 at the start and the first advantages are the returns rather than returns minus
    an untrained head's output, or random (std 1/sqrt(d+1), like a score head). The gold-PPO
    preset with a random head trained at 100 x value_lr (the earlier default) kept the
    value model's explained variance between -13.2 and -0.9 all run"""
    lr_schedule: Literal["constant", "linear"] = "constant"
    """constant, or linear decay to 0 over the run"""
    grad_clip: float = 1.0
    """max gradient norm (policy and value together)"""
    cliprange: float = 0.2
    """ε of the policy ratio clip"""
    cliprange_value: float = 0.2
    """ε of the value clip: the clipped term keeps a new value within ±ε of the rollout's, and
    the larger of the clipped and unclipped squared errors is the loss"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE λ: 1 makes each token's advantage its return minus V (nothing bootstrapped from the
    critic's later values); lower trades that variance for the critic's bias"""
    whiten_advantages: bool = True
    """whiten advantages over each rollout"""
    whiten_centre: bool = True
    """whitening subtracts the rollout's token-mean advantage before dividing by its std; False:
    it only divides, so every advantage keeps its sign. Centring shifts every token by the same
    amount: with most scores' weight at the answers' ends and long (truncated, penalised)
    answers holding most tokens, the shift is positive for the tokens that continue an answer,
    which lowers P(end) at every step. The main job's RM-PPO and AM-PPO arms over policy
    seeds 0-2 (README): uncentred is better on average (mean objective gain -0.008 against
    -0.146, -0.102 against -0.479) but the seeds overlap: not yet a default"""
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
    """subtracted from the score of a response that hit max_new_tokens without ending, in
    running standard deviations of the source's scores (the same weight for every source)"""
    score_clip: Optional[float] = None
    """clip (normalised) scores to ±score_clip"""
    forward_batch_size: int = 8
    """rows per no-grad forward pass (logprobs, reference, values)"""
    old_logprobs: Literal["auto", "generation", "forward"] = "auto"
    """where a rollout's log π_old comes from: 'generation', the sampler's own logits (no second
    policy pass; equal to a forward pass to float rounding, as the KV cache orders its sums
    differently), or 'forward', a no-grad forward pass over the finished sequences; 'auto':
    generation in float32, forward under bf16-mixed (the sampler runs the float32 weights,
    the update bf16 autocast: their log-probs differ by ~1%, which would start the ratio off 1)"""
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    """LoRA on the policy"""
    value_model: Optional[str] = None
    """value-model init: a saved score model directory (default: the reward's model if it is
    one, else the policy backbone with a new head)"""
    critic_warmup: int = 0
    """the first N rollouts update only the value model (the policy stays put), so the
    advantages of the first policy updates do not come from an untrained critic"""
    advantage: AdvantageConfig = dataclasses.field(default_factory=AdvantageConfig)
    """the advantage estimator: gae (PPO's, with a value model), rloo or grpo (critic-free)"""
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
    keep_checkpoints: int = 1
    """checkpoints kept on disk while the run goes (the newest; each is written whole before an
    older one goes)"""
    warn_truncation: float = 0.1
    """warn (log and summary.json) when more than this share of a rollout ran out of tokens"""
    warn_ev_after: int = 2
    """warn when the value model's explained variance is below 0 this many steps or more after
    the critic warm-up"""

    def __post_init__(self):
        super().__post_init__()
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
        if self.save_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("save_every and keep_checkpoints must be >= 1")
        adv = self.advantage
        if adv.critic_free and (adv.group_size < 2 or self.batch_size % adv.group_size or self.critic_warmup):
            raise ValueError(f"advantage.estimator={adv.estimator} compares the samples of a prompt: "
                             f"advantage.group_size ({adv.group_size}) must be >= 2 and divide batch_size "
                             f"({self.batch_size}), and there is no critic to warm up (critic_warmup 0)")

    @property
    def prompts_per_rollout(self) -> int:
        """Prompts per process per rollout: batch_size, over group_size for rloo and grpo."""
        return self.batch_size // self.advantage.group_size if self.advantage.critic_free else self.batch_size


def nll_mixes(cfg: PPOConfig) -> dict[str, NLLMixConfig]:
    """The NLL terms that are on (data given, γ > 0), by name: ptx, then rehearsal."""
    return {name: mix for name, mix in (("ptx", cfg.ptx), ("rehearsal", cfg.rehearsal)) if mix.data and mix.coef > 0}


# --------------------------------------------------------------------------- model plumbing


def response_logprobs(model, query_ids, query_mask, response_ids, response_mask, temperature: float,
                      with_entropy: bool = False):
    """log π(y_t | x, y_<t) for every response token, (B, Tr), and optionally the entropy.

    Logits are divided by the sampling temperature (the distribution the tokens were drawn
    from); the position before each response token predicts it. The LM head runs on those
    Tr positions only (transformers' ``logits_to_keep``), not on the prompt's: for a
    135M-parameter model with a 49k vocabulary the head is a fifth of the forward pass."""
    from .models import position_ids_from_mask

    input_ids = torch.cat([query_ids, response_ids], 1)  # (B, Tq + Tr)
    attention_mask = torch.cat([query_mask, response_mask], 1)
    Tr = response_ids.shape[1]
    keep = {"logits_to_keep": Tr + 1} if accepts_logits_to_keep(model) else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask.long(),
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False, **keep).logits
    logits = logits[:, -Tr - 1 : -1] / temperature  # (B, Tr, V)
    logprobs = logprobs_from_logits(logits, response_ids)
    with torch.no_grad():  # logged, never differentiated: no (B, Tr, V) softmax kept for backward
        entropy = entropy_from_logits(logits) if with_entropy else None
    return logprobs, entropy


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under any wrappers (DDP, PEFT) takes ``logits_to_keep``."""
    import inspect

    while hasattr(model, "module"):  # DDP
        model = model.module
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def response_values(value_model, query_ids, query_mask, response_ids, response_mask):
    """V(x, y_<t) for every response token, (B, Tr): the value at the position before it."""
    input_ids = torch.cat([query_ids, response_ids], 1)
    attention_mask = torch.cat([query_mask, response_mask], 1)
    values = value_model(input_ids, attention_mask, per_token=True)  # (B, Tq + Tr)
    return values[:, query_ids.shape[1] - 1 : -1]


def _chunks(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# --------------------------------------------------------------------------- run state


@dataclasses.dataclass
class PPOState:
    """What a PPO run carries from step to step; ``state_dict`` is what a checkpoint saves and
    resume restores (the models' trainable parameters only: frozen weights never change)."""

    policy: Any
    """the policy, as ``accelerator.prepare`` returned it (DDP-wrapped under several processes)"""
    value_model: Any
    """V(x, y_<t): a ``ScoreModel`` read per token, prepared like the policy; None for a
    critic-free estimator"""
    reference: Any
    """the frozen initial policy; None with LoRA: the policy with its adapters disabled"""
    tokenizer: Any
    optimizer: Any
    """AdamW over the policy, the value model's body and its head"""
    scheduler: Any
    kl_ctl: AdaptiveKLController | FixedKLController
    score_moments: RunningMoments
    """running global moments of the scores (their normalisation)"""
    prompt_stream: DemoBatches
    """global batches of prompts, in the same order on every rank"""
    mix_streams: dict[str, DemoBatches]
    """demonstration minibatches of each NLL term that is on"""
    guard: NonFiniteGuard
    step: int = 0
    eval_moments: Optional[list[float]] = None
    """[mean, std] of the source's scores of the SFT policy's answers to the eval prompts: the
    fixed normalisation of the objective measured at eval points (``EvalObjective``)"""

    @property
    def policy_module(self):
        return unwrap(self.policy)

    @property
    def value_module(self):
        return None if self.value_model is None else unwrap(self.value_model)

    def state_dict(self) -> dict:
        value = {} if self.value_model is None else {"value": trainable_state(self.value_module)}
        return {"policy": trainable_state(self.policy_module), **value,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "kl_ctl": self.kl_ctl.state_dict(), "score_moments": self.score_moments.state_dict(),
                "prompt_stream": self.prompt_stream.state_dict(),
                "mix_streams": {n: s.state_dict() for n, s in self.mix_streams.items()},
                "step": self.step, "eval_moments": self.eval_moments, **self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        load_trainable(self.policy_module, state["policy"], "policy")
        if self.value_model is not None:
            load_trainable(self.value_module, state["value"], "value")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.prompt_stream.load_state_dict(state["prompt_stream"])
        for name, s in state["mix_streams"].items():
            self.mix_streams[name].load_state_dict(s)
        self.step = state["step"]
        self.eval_moments = state.get("eval_moments")
        self.guard.load_state_dict(state)


@dataclasses.dataclass
class Rollout:
    """One rollout and what a PPO step computes from it. Token tensors are (B, Tr) over the
    response tokens, zero past each response's end (``mask`` False)."""

    records: list[dict]
    """this rank's prompt records"""
    gen: Generation
    """queries and sampled responses: token ids, masks, texts, truncated flags"""
    started: float
    """when the step began (time.time())"""
    times: dict[str, float] = dataclasses.field(default_factory=dict)
    raw_scores: Optional[torch.Tensor] = None
    """(B,) the score source's"""
    scores: Optional[torch.Tensor] = None
    """(B,) what the reward adds: less the missing-EOS penalty, normalised, clipped"""
    logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    """None for a critic-free estimator"""
    rewards: Optional[torch.Tensor] = None
    """-β·KL per token, plus the score at the last real token"""
    kl: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None

    @property
    def mask(self) -> torch.Tensor:
        return self.gen.response_mask


class EvalObjective:
    """What PPO maximises, measured on the eval prompts at each eval point (``eval/objective``):
    the mean over the answers of the sequence reward of ``gae_advantages``, the shaped score
    (``shape_scores``) less β·KL to the reference, for answers sampled with the rollouts'
    settings (``generation``; the evaluator's own answers when its settings are the same,
    else a sample of its own with the eval seed) at the current β. At step 0, with the same
    settings, the answers are the SFT reference's, the very ones the gold and win rates of
    that eval point read, and their KL is 0 (the policy is the reference). The score is normalised
    with fixed moments, those of the SFT policy's answers at step 0 (the running moments
    move with the policy: they would hide a rise), so the objective of two eval points is
    comparable; ``eval/objective_se`` is its standard error over the answers."""

    def __init__(self, run: Run, cfg: PPOConfig, state: PPOState, reward):
        self.run, self.cfg, self.state, self.reward = run, cfg, state, reward
        self.sampling = cfg.generation

    @torch.no_grad()
    def __call__(self, model, records: list[dict], gen: Optional[Generation],
                 reference: Optional[list[dict]] = None) -> dict:
        cfg, state, device = self.cfg, self.state, self.run.device
        if reference is not None:  # the policy is the reference: its answers are these, their KL 0
            responses, truncated = [r["response"] for r in reference], torch.tensor([r["truncated"] for r in reference])
            prompt_index = list(range(len(records)))
        else:
            if gen is None:
                gen = generate(model, state.tokenizer, [r["prompt"] for r in records], cfg.generation,
                               seed=cfg.eval.seed, device=device, progress=False)
            gen = gen.to(device)
            responses, truncated, prompt_index = gen.responses, gen.truncated, gen.prompt_index
        raw = self.reward([records[i] for i in prompt_index], responses).to(device).float()
        if not torch.isfinite(raw).all():
            return {"eval/objective": None, "eval/objective_se": None}
        if state.eval_moments is None:
            state.eval_moments = [raw.mean().item(), raw.std().item() if len(raw) > 1 else 1.0]
        scores = shape_scores(cfg, raw, truncated.to(device), *state.eval_moments)
        if reference is not None:
            objective, kl = scores.double(), torch.zeros(len(scores), device=device)
        else:
            logprobs, ref_logprobs, _ = sequence_passes(cfg, state, gen)
            rewards, kl = kl_penalised_rewards(scores, logprobs, ref_logprobs, gen.response_mask,
                                               state.kl_ctl.value, cfg.kl_estimator)
            objective, kl = rewards.sum(-1).double(), kl.sum(-1)
        n = len(objective)
        by_prompt = [0.0] * len(records)  # one answer per prompt: in the records' order, for paired differences
        for i, value in zip(prompt_index, objective.tolist()):
            by_prompt[i] = value
        return {"eval/objective": objective.mean().item(),
                "eval/objective_se": objective.std().item() / n ** 0.5 if n > 1 else None,
                "eval/objective_by_prompt": by_prompt,
                "eval/objective_score": scores.mean().item(), "eval/objective_kl": kl.mean().item(),
                "eval/objective_truncated": truncated.float().mean().item()}


# --------------------------------------------------------------------------- the recipe


def train(cfg: PPOConfig) -> dict:
    """PPO, one step per rollout (the module docstring's recipe)."""
    prompts, demos = load_data(cfg)  # every file is validated before a model loads
    run = Run(cfg, "ppo", log_with=cfg.log_with, keep_checkpoints=cfg.keep_checkpoints,
              fresh_files=("samples_final.md",), fresh_dirs=("samples", "model"))
    evals = TrainingEval(run, cfg.eval, cfg.reward.workers)
    state, reward = setup(run, cfg, prompts, demos)
    resumed = run.start(cfg.resume)
    # The SFT reference answers come from the initial policy, before any update (a resumed
    # run reads the ones it saved then).
    evals.prepare(None if resumed else state.policy_module, state.tokenizer,
                  None if cfg.reward.source == "gold" else reward)
    if evals.evaluator is not None:
        evals.evaluator.probe = EvalObjective(run, cfg, state, reward)
    if resumed:
        state.load_state_dict(resumed)
    else:
        evals(state.policy_module, state.tokenizer, 0)

    bar = run.progress(cfg.steps, state.step)
    while state.step < cfg.steps:
        rollout = sample_rollout(run, cfg, state)  # 1. prompts -> responses
        if not score(run, cfg, state, rollout, reward):  # 2. scores (a non-finite one skips the step)
            skip_step(run, state)
            bar.update(1)
            continue
        forward(run, cfg, state, rollout)  # 3. logprobs, ref_logprobs, values (no grad)
        estimate_advantages(cfg, rollout, state.kl_ctl.value)  # 4. rewards -> advantages (GAE: returns)
        with timed(rollout.times, "time/update"):  # 5. PPO epochs of minibatches
            update_stats, skipped = update(run, cfg, state, rollout)
        state.step += 1
        fault_point("train", state.step)
        stats, stop = log_step(run, cfg, state, rollout, update_stats, skipped)  # 6. KL controller, stats
        bar.update(1)
        bar.set_postfix(score=f"{stats['objective/score']:.3f}", kl=f"{stats['objective/kl']:.3f}")
        if stop:
            halt(run, state, "losses")
        if evals.due(state.step, cfg.steps):  # 7. eval and checkpoint
            evals(state.policy_module, state.tokenizer, state.step)
        if state.step % cfg.save_every == 0 or state.step == cfg.steps:
            run.checkpoint(state.step, state.state_dict())
        free_memory()
    bar.close()
    return finish(run, cfg, state, evals)


# --------------------------------------------------------------------------- setup


def load_data(cfg: PPOConfig) -> tuple[list[dict], dict[str, list[dict]]]:
    """The prompts (checked against the score source) and the demonstrations of each NLL term."""
    from .data import load_records

    prompts = load_records(cfg.prompts, "prompt")
    check_reward_inputs(cfg.reward, prompts, cfg.prompts)
    return prompts, {name: load_records(mix.data, "sft") for name, mix in nll_mixes(cfg).items()}


def setup(run: Run, cfg: PPOConfig, prompts: list[dict], demos: dict[str, list[dict]]) -> tuple[PPOState, Any]:
    """The models (loaded in a fixed order: their random initialisation draws from the seeded
    RNG), the score source, the optimiser and the streams; returns the state and the score source."""
    policy, reference, tokenizer = _load_policy(run, cfg)
    reward = build_reward(cfg.reward, device=run.device)
    value_model, value_init = (None, None) if cfg.advantage.critic_free else _load_value_model(run, cfg, tokenizer)
    optimizer, scheduler = _optimizer(cfg, policy, value_model, value_init)
    if value_model is None:
        policy, optimizer = run.accelerator.prepare(policy, optimizer)
    else:
        policy, value_model, optimizer = run.accelerator.prepare(policy, value_model, optimizer)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    state = PPOState(
        policy, value_model, reference, tokenizer, optimizer, scheduler, kl_ctl, RunningMoments(),
        prompt_stream=DemoBatches(prompts, cfg.prompts_per_rollout * run.world, cfg.seed),
        mix_streams={name: DemoBatches(demos[name], mix.batch_size, cfg.seed + 1 + run.rank)
                     for name, mix in nll_mixes(cfg).items()},
        guard=NonFiniteGuard(cfg.max_bad_steps))
    n_train = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    run.print(f"{len(prompts)} prompts, reward {cfg.reward.source}, {run.world} process(es) on {run.device}; "
              f"{n_train / 1e6:.1f}M trainable policy parameters; {cfg.steps} steps of {cfg.batch_size * run.world} "
              f"rollouts")
    return state, reward


def _load_policy(run: Run, cfg: PPOConfig):
    """The policy, its reference (None with LoRA) and the tokenizer."""
    from .models import apply_lora, load_policy

    policy, tokenizer = load_policy(cfg.model, device=run.device, trainable=True)
    reference = None
    if cfg.lora.enabled:
        policy = apply_lora(policy, cfg.lora)
    else:
        reference, _ = load_policy(cfg.model, device=run.device)
        reference.requires_grad_(False)
    policy.eval()  # no dropout: the PPO ratio of the first minibatch is exactly 1
    return policy, reference, tokenizer


def _load_value_model(run: Run, cfg: PPOConfig, tokenizer):
    """The value model and the score model it starts from (None: the policy's backbone with a new head)."""
    from .models import freeze_lower_layers, load_score_model

    value_init = cfg.value_model or (cfg.reward.path if cfg.reward.source != "gold" else None)
    if value_init and not _same_tokenizer(value_init, tokenizer):
        # A value model reads the policy's tokens: a score model on another backbone (e.g. an
        # encoder RM) cannot be its init. An explicit value_model must match; the default falls back.
        if cfg.value_model:
            raise ValueError(f"value_model {value_init} uses a different tokenizer from the policy")
        run.print(f"the score model {value_init} has another tokenizer than the policy: the value model "
                  "starts from the policy backbone with a new head")
        value_init = None
    value_model, _ = load_score_model(cfg.model, device=run.device, init_from=value_init, trainable=True)
    if value_init is None and cfg.value_head_init == "zero":
        with torch.no_grad():
            value_model.head.weight.zero_()
            value_model.head.bias.zero_()
    freeze_lower_layers(value_model, cfg.value_train_layers)
    value_model.eval()
    return value_model, value_init


def _same_tokenizer(score_model_dir: str, tokenizer) -> bool:
    from transformers import AutoTokenizer

    if not Path(score_model_dir, "tokenizer_config.json").is_file():
        return True  # saved without one: it was trained with the policy's
    return AutoTokenizer.from_pretrained(score_model_dir).get_vocab() == tokenizer.get_vocab()


def _optimizer(cfg: PPOConfig, policy, value_model, value_init):
    """AdamW with three learning rates (policy, value body, value head; the policy's alone
    without a value model) and its schedule."""
    from transformers import get_constant_schedule, get_linear_schedule_with_warmup

    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.lr}]
    if value_model is not None:
        head_ids = {id(p) for p in value_model.head.parameters()}
        groups += [{"params": [p for p in value_model.parameters() if p.requires_grad and id(p) not in head_ids],
                    "lr": cfg.value_lr},
                   {"params": list(value_model.head.parameters()), "lr": cfg.value_head_lr or cfg.value_lr}]
    optimizer = adamw([g for g in groups if g["params"]], eps=1e-5)
    updates_per_step = cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
    scheduler = (get_constant_schedule(optimizer) if cfg.lr_schedule == "constant"
                 else get_linear_schedule_with_warmup(optimizer, 0, cfg.steps * updates_per_step))
    return optimizer, scheduler


# --------------------------------------------------------------------------- a PPO step


def sample_rollout(run: Run, cfg: PPOConfig, state: PPOState) -> Rollout:
    """This rank's slice of the next global batch of prompts, and a response to each (a seed
    per step and rank: ranks sample different responses)."""
    started = time.time()
    n = cfg.prompts_per_rollout
    records = state.prompt_stream.next()[run.rank * n : (run.rank + 1) * n]
    if cfg.advantage.critic_free:  # each prompt group_size times, in consecutive blocks
        records = [r for r in records for _ in range(cfg.advantage.group_size)]
    times: dict[str, float] = {}
    with timed(times, "time/generate"):
        gen = generate(state.policy_module, state.tokenizer, [r["prompt"] for r in records], cfg.generation,
                       seed=cfg.seed * 1_000_003 + state.step * run.world + run.rank, device=run.device,
                       logprobs=old_logprobs_from_generation(cfg)).to(run.device)
    return Rollout(records, gen, started, times)


def old_logprobs_from_generation(cfg: PPOConfig) -> bool:
    """``old_logprobs`` resolved: whether the sampler's logits give log π_old."""
    from .models import mixed_precision

    if cfg.old_logprobs == "auto":
        return mixed_precision(cfg.precision) == "no"
    return cfg.old_logprobs == "generation"


def score(run: Run, cfg: PPOConfig, state: PPOState, rollout: Rollout, reward) -> bool:
    """The scores the reward uses: the source's, normalised with running global moments
    where the source asks for it, less ``missing_eos_penalty`` running standard deviations
    for a response that ran out of tokens, clipped. The penalty is in standard deviations
    of the source's scores so that it weighs the same for every source (in raw units, 0.5
    was ~0.26 sigma of the RM's scores and ~1 of the AM's). False (and nothing normalised)
    when a score is not finite on some rank."""
    with timed(rollout.times, "time/score"):
        rollout.raw_scores = reward(rollout.records, rollout.gen.responses).to(run.device)  # (B,)
    scores = rollout.raw_scores
    if not all_finite(run.accelerator, scores):
        return False
    state.score_moments.update(run.accelerator.gather(scores))
    rollout.scores = shape_scores(cfg, scores, rollout.gen.truncated, state.score_moments.mean,
                                  state.score_moments.std)
    return True


def shape_scores(cfg: PPOConfig, scores: torch.Tensor, truncated: torch.Tensor, mean: float,
                 std: float) -> torch.Tensor:
    """``score``'s scores from the source's, given the moments to normalise with."""
    sigma = max(std, 1e-6)
    if cfg.reward.running_normalisation:
        scores, sigma = (scores - mean) / sigma, 1.0
    scores = scores - cfg.missing_eos_penalty * sigma * truncated.float()
    if cfg.score_clip is not None:
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
    return scores


def skip_step(run: Run, state: PPOState) -> None:
    """A rollout with a non-finite score: no update, a metrics row that says so; too many in a
    row stop the run."""
    stop = state.guard.end_step(bad=True)
    state.step += 1
    run.log({"step": state.step, "skipped": 1, "skip_reason": "non-finite score", "bad_in_row": state.guard.bad_in_row})
    run.print(f"step {state.step}: non-finite score, step skipped ({state.guard.bad_in_row} in a row)")
    if stop:
        halt(run, state, "scores or losses")


def halt(run: Run, state: PPOState, what: str) -> NoReturn:
    """Stop after too many bad steps in a row, with a checkpoint to resume from."""
    run.checkpoint(state.step, state.state_dict())
    raise state.guard.error(state.step, run.out, what)


@torch.no_grad()
def forward(run: Run, cfg: PPOConfig, state: PPOState, rollout: Rollout) -> None:
    """Once per rollout, in chunks of ``forward_batch_size`` rows: the policy's logprobs, the
    reference's and the values (with a value model), each (B, Tr), zero past the response."""
    with timed(rollout.times, "time/forward"):
        rollout.logprobs, rollout.ref_logprobs, rollout.values = sequence_passes(cfg, state, rollout.gen,
                                                                                 state.value_module)


@torch.no_grad()
def sequence_passes(cfg: PPOConfig, state: PPOState, gen: Generation, value_model=None):
    """``forward``'s passes over ``gen``: (logprobs, reference logprobs, values or None), each
    (B, Tr), zero past the response; values only with a ``value_model``. The policy's
    logprobs are the generation's own where it kept them (``old_logprobs: generation``)."""
    temperature, mask, policy = cfg.generation.temperature, gen.response_mask, state.policy_module
    logprobs, ref_logprobs, values = [], [], []
    for sl in _chunks(len(gen), cfg.forward_batch_size):
        args = (gen.query_ids[sl], gen.query_mask[sl], gen.response_ids[sl], gen.response_mask[sl])
        if gen.logprobs is None:
            logprobs.append(response_logprobs(policy, *args, temperature)[0])
        if state.reference is None:  # LoRA: the reference is the network without its adapters
            with policy.disable_adapter():
                ref_logprobs.append(response_logprobs(policy, *args, temperature)[0])
        else:
            ref_logprobs.append(response_logprobs(state.reference, *args, temperature)[0])
        if value_model is not None:
            values.append(response_values(value_model, *args))
    logprobs = torch.cat(logprobs) if gen.logprobs is None else gen.logprobs
    return logprobs * mask, torch.cat(ref_logprobs) * mask, torch.cat(values) * mask if values else None


def estimate_advantages(cfg: PPOConfig, rollout: Rollout, kl_coef: float) -> None:
    """The configured estimator: GAE against the value model, or RLOO / GRPO."""
    if cfg.advantage.critic_free:
        critic_free_advantages(cfg, rollout, kl_coef)
    else:
        gae_advantages(cfg, rollout, kl_coef)


def critic_free_advantages(cfg: PPOConfig, rollout: Rollout, kl_coef: float) -> None:
    """RLOO's or GRPO's: one advantage per sample, from the other samples of its prompt, at
    every token of it (not whitened). The sequence reward is the score less β·ΣKL
    (``advantage.kl=reward``), or the score alone with the KL left to the loss."""
    adv = cfg.advantage
    rollout.rewards, rollout.kl = kl_penalised_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs,
                                                       rollout.mask, kl_coef, cfg.kl_estimator)
    seq_rewards = rollout.rewards.sum(-1) if adv.kl == "reward" else rollout.scores  # (B,)
    if adv.estimator == "rloo":
        seq_advantages = rloo_advantages(seq_rewards, adv.group_size)
    else:
        seq_advantages = group_advantages(seq_rewards, adv.group_size, adv.scale_by_std)
    rollout.advantages = seq_advantages[:, None] * rollout.mask  # (B, Tr)


def gae_advantages(cfg: PPOConfig, rollout: Rollout, kl_coef: float) -> None:
    """PPO's estimator: per-token rewards -β·KL with the score at the last real token
    (Ziegler et al.), GAE(γ, λ) against the values, advantages whitened over the rollout."""
    rollout.rewards, rollout.kl = kl_penalised_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs,
                                                       rollout.mask, kl_coef, cfg.kl_estimator)
    advantages, rollout.returns = gae(rollout.rewards, rollout.values, rollout.mask, cfg.gamma, cfg.lam)
    if not cfg.whiten_advantages:
        rollout.advantages = advantages
    elif cfg.whiten_centre:
        rollout.advantages = masked_whiten(advantages, rollout.mask)
    else:
        rollout.advantages = masked_rescale(advantages, rollout.mask)


def update(run: Run, cfg: PPOConfig, state: PPOState, rollout: Rollout) -> tuple[list[dict], int]:
    """``ppo_epochs`` passes over shuffled minibatches, one optimiser step each; returns the
    stats of the steps taken and how many were skipped (a non-finite loss or gradient norm).
    During the critic warm-up only the value model trains: the policy is neither run nor
    stepped, and no NLL term is mixed in."""
    state.policy.eval()
    if state.value_model is not None:
        state.value_model.eval()
    warmup = state.step < cfg.critic_warmup
    mixes = {} if warmup else nll_mixes(cfg)
    params = [p for g in state.optimizer.param_groups for p in g["params"]]
    update_stats, skipped = [], 0
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(len(rollout.gen), generator=torch.Generator().manual_seed(
            cfg.seed * 7919 + state.step * 31 + epoch))
        for mb in order.split(cfg.mini_batch_size):
            state.optimizer.zero_grad(set_to_none=True)
            # One backward per forward (DDP marks each parameter ready once per backward): with
            # NLL terms the policy's gradients are all-reduced with the last of them.
            with run.accelerator.no_sync(state.policy) if mixes else contextlib.nullcontext():
                loss, stats = ppo_loss(cfg, state, rollout, mb.to(run.device), warmup)
                run.accelerator.backward(loss)
            losses = [loss.detach()]
            for name, mix in mixes.items():
                losses.append(nll_mix_loss(run, state, name, mix, cfg.generation.system_prompt, stats,
                                           sync=name == list(mixes)[-1]))
            stats["loss/total"] = float(sum(l.detach() for l in losses))
            grad_norm = clipped_step(run.accelerator, state.optimizer, params, cfg.grad_clip, stats["loss/total"],
                                     state.scheduler)
            if grad_norm is None:
                skipped += 1
                continue
            update_stats.append({**stats, "optim/grad_norm": grad_norm})
    return update_stats, skipped


def ppo_loss(cfg: PPOConfig, state: PPOState, rollout: Rollout, mb: torch.Tensor, warmup: bool):
    """The clipped value loss of minibatch ``mb`` (row indices) and, after the critic warm-up,
    the clipped policy loss: (loss, stats). Critic-free: the policy loss (and the KL term)."""
    gen = rollout.gen
    mb_args = (gen.query_ids[mb], gen.query_mask[mb], gen.response_ids[mb], gen.response_mask[mb])
    mb_mask = rollout.mask[mb]
    if state.value_model is None:
        return critic_free_loss(cfg, state, rollout, mb, mb_args)
    mb_values = response_values(state.value_model, *mb_args)
    vf_loss, vf_stats = value_loss(mb_values, rollout.values[mb], rollout.returns[mb], mb_mask, cfg.cliprange_value)
    if warmup:
        return cfg.vf_coef * vf_loss, {**vf_stats, "policy/critic_warmup": 1.0}
    mb_logprobs, mb_entropy = response_logprobs(state.policy, *mb_args, cfg.generation.temperature,
                                                with_entropy=True)
    pg_loss, pg_stats = policy_loss(mb_logprobs, rollout.logprobs[mb], rollout.advantages[mb], mb_mask, cfg.cliprange)
    loss = pg_loss + cfg.vf_coef * vf_loss
    return loss, {**pg_stats, **vf_stats, "policy/entropy": masked_mean(mb_entropy, mb_mask).item()}


def critic_free_loss(cfg: PPOConfig, state: PPOState, rollout: Rollout, mb: torch.Tensor, mb_args: tuple):
    """RLOO / GRPO: the clipped policy loss (a token mean over the minibatch, no per-sequence
    length normalisation) plus, with ``advantage.kl=loss``, β · the mean k3 KL to the reference."""
    mb_mask = rollout.mask[mb]
    mb_logprobs, mb_entropy = response_logprobs(state.policy, *mb_args, cfg.generation.temperature,
                                                with_entropy=True)
    loss, stats = policy_loss(mb_logprobs, rollout.logprobs[mb], rollout.advantages[mb], mb_mask, cfg.cliprange)
    if cfg.advantage.kl == "loss":
        kl = masked_mean(kl_per_token(mb_logprobs, rollout.ref_logprobs[mb], "k3"), mb_mask)
        loss = loss + state.kl_ctl.value * kl
        stats["loss/kl"] = kl.item()
    return loss, {**stats, "policy/entropy": masked_mean(mb_entropy, mb_mask).item()}


def nll_mix_loss(run: Run, state: PPOState, name: str, mix: NLLMixConfig, system_prompt: Optional[str],
                 stats: dict, sync: bool) -> torch.Tensor:
    """γ · NLL of the next demonstrations of an NLL term (PPO-ptx, selective rehearsal),
    backpropagated; logs ``loss/<name>`` and returns γ · NLL (detached). ``sync``: the
    step's last backward, the one that all-reduces the policy's gradients."""
    rows = state.mix_streams[name].next()
    demo = encode_demos(state.tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                        max_length=mix.max_length, system_prompt=system_prompt)
    with contextlib.nullcontext() if sync else run.accelerator.no_sync(state.policy):
        nll, _ = sequence_nll(state.policy, demo)
        run.accelerator.backward(mix.coef * nll)
    stats[f"loss/{name}"] = nll.item()
    return mix.coef * nll.detach()


def log_step(run: Run, cfg: PPOConfig, state: PPOState, rollout: Rollout, update_stats: list[dict],
             skipped: int) -> tuple[dict, bool]:
    """The KL controller's update and the step's statistics, logged; returns them and whether
    the run must stop (too many steps in a row with a skipped update)."""
    gather = run.accelerator.gather
    mask, scores = rollout.mask, rollout.scores
    seq_kl = rollout.kl.sum(-1)  # (B,)
    state.kl_ctl.update(gather(seq_kl).mean().item(), len(rollout.gen) * run.world)
    stop = state.guard.end_step(bad=skipped > 0)
    if skipped:
        run.print(f"step {state.step}: {skipped} minibatch update(s) skipped for a non-finite loss "
                  f"({state.guard.bad_in_row} step(s) in a row)")
    seconds = time.time() - rollout.started
    stats = {"step": state.step, **mean_stats(update_stats), **rollout.times,
             "time/step": seconds, "time/samples_per_s": len(rollout.gen) * run.world / seconds,
             "time/generated_tokens_per_s": mask.sum().item() / max(rollout.times.get("time/generate", 0.0), 1e-9),
             "objective/score": gather(rollout.raw_scores).mean().item(),
             "objective/score_used": gather(scores).mean().item(),
             "objective/kl": gather(seq_kl).mean().item(),
             "objective/non_score_reward": gather((rollout.rewards.sum(-1) - scores)).mean().item(),
             "objective/kl_coef": state.kl_ctl.value,
             "policy/response_tokens": mask.sum(-1).float().mean().item(),
             "policy/truncated": rollout.gen.truncated.float().mean().item(),
             "skipped_updates": skipped}
    if rollout.values is not None:
        stats["value/explained_variance"] = explained_variance(rollout.values, rollout.returns, mask)
        stats["value/mean"] = masked_mean(rollout.values, mask).item()
    # Whether the advantages point where the score does: the first token's advantage against
    # the sequence's score (0.91 with a working critic; -0.10 with a biased one).
    stats["advantage/score_corr"] = pearson(gather(rollout.advantages[:, 0]), gather(scores))
    for task in sorted({r["task"] for r in rollout.records}):
        idx = [i for i, r in enumerate(rollout.records) if r["task"] == task]
        stats[f"score/{task}/mean"] = rollout.raw_scores[idx].mean().item()
    run.log(stats)
    for warning in step_warnings(cfg, stats):
        run.print(f"warning: {warning}")
    return stats, stop


def pearson(x: torch.Tensor, y: torch.Tensor) -> Optional[float]:
    """Pearson correlation of two (N,) tensors; None when either is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.square().sum() * y.square().sum()).sqrt().item()
    return (x * y).sum().item() / denom if denom > 0 else None


def step_warnings(cfg: PPOConfig, stats: dict) -> list[str]:
    """What a step's stats say is going wrong: truncation above ``warn_truncation``, a critic
    that explains less than nothing ``warn_ev_after`` steps after its warm-up."""
    out = []
    if stats.get("policy/truncated", 0.0) > cfg.warn_truncation:
        out.append(f"step {stats['step']}: {stats['policy/truncated']:.0%} of the responses ran out of tokens "
                   f"(warn_truncation {cfg.warn_truncation:.0%})")
    ev = stats.get("value/explained_variance")
    if ev is not None and ev < 0 and stats["step"] >= cfg.critic_warmup + cfg.warn_ev_after:
        out.append(f"step {stats['step']}: value explained variance {ev:.2f} < 0 "
                   f"({stats['step'] - cfg.critic_warmup} step(s) after the critic warm-up)")
    return out


# --------------------------------------------------------------------------- the end


def objective_change(history: list[dict]) -> dict:
    """summary.json's ``objective_start``, ``objective_end`` (``eval/objective`` at the first
    and last eval points), ``objective_gain`` and ``objective_gain_se``: the gain over the
    standard error of the mean of the per-prompt differences (the two points answer the same
    prompts with the same sampling seed: a paired comparison)."""
    points = [r for r in history if r.get("eval/objective") is not None]
    if len(points) < 2:
        return {}
    first, last = points[0], points[-1]
    diffs = [b - a for a, b in zip(first["eval/objective_by_prompt"], last["eval/objective_by_prompt"])]
    gain = statistics.mean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return {"objective_start": first["eval/objective"], "objective_end": last["eval/objective"],
            "objective_gain": gain, "objective_gain_se": gain / (sd / len(diffs) ** 0.5) if sd > 0 else None}


def finish(run: Run, cfg: PPOConfig, state: PPOState, evals: TrainingEval) -> dict:
    """The final eval point (unless the last step had one), then the final policy (LoRA
    adapters merged into it), the last sample table and summary.json."""
    model = state.policy_module
    evals.final(model, state.tokenizer, state.step)
    summary = {}
    if run.is_main:
        history = run.metrics()
        last_train = [r for r in history if "objective/kl" in r]
        warnings = [w for r in last_train for w in step_warnings(cfg, r)]
        summary = evals.summary({"steps": state.step, "reward": cfg.reward.source},
                                {"skipped_steps": sum(1 for r in history if r.get("skipped")), "warnings": warnings},
                                kl=last_train[-1]["objective/kl"] if last_train else None,
                                **objective_change(history))
        if cfg.lora.enabled:
            model = model.merge_and_unload()
    return evals.finish(model, state.tokenizer, state.step, summary)
