"""``stable-rlhf dpo``: Direct Preference Optimisation of the SFT policy on comparisons.

No reward model and no sampling: the policy is fitted to the labelled pairs directly,
with the log-ratio against the frozen initial policy π_ref as an implicit reward
(Rafailov et al. 2023). docs/methods.md §5a has the losses:

    h = (log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))
    dpo   -log σ(β·h)                                  (Rafailov et al. 2023)
    cdpo  -(1 - ε)·log σ(β·h) - ε·log σ(-β·h)           (Mitchell 2023, ε = label_smoothing)
    ipo   (h - 1/(2β))²                                 (Azar et al. 2023)

log π(y|x) is the sum over the response tokens (the end-of-turn token included, prompt
tokens masked; the encoding is SFT's ``encode_demos``, so the chat template is the one
``generate`` uses). IPO takes per-token means instead of sums, as TRL does since its PR
#1265, after the IPO authors told the TRL team so (the paper itself writes π(y|x)): IPO's
squared loss pulls h to the fixed target 1/(2β), and with sums that target's meaning
would change with the responses' length.

Pairs: every K-ranked comparison gives its C(K, 2) (better, worse) pairs (``ranked_pairs``);
a pairwise record is a K = 2 comparison. π_ref: the initial policy's log-probabilities of
every training and held-out pair, computed once before the first update and cached in
out_dir/ref_logprobs.json (``precompute_ref``, the default: one model in memory and one
forward per step); otherwise a frozen copy of the initial policy, or with LoRA the policy
with its adapters disabled, computes them every step.

``train(cfg)``, an epoch trainer on the run layer like ``sft`` (``runs.Run`` +
``runs.TrainState``):

1. read the comparisons and expand them into pairs, before any model loads;
2. load the policy (LoRA adapters on it when asked; a frozen reference copy only when
   the reference is neither precomputed nor the adapter-free policy);
3. start or resume the run;
4. the reference log-probabilities (precomputed or read from the cache, with the initial
   weights, before a checkpoint's weights load);
5. epochs of DPO steps, each epoch ending with a held-out evaluation and a checkpoint;
6. the final policy in out_dir/model and summary.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from typing import Any, Literal, Optional

import torch

from .config import ModelConfig
from .io import atomic_write_json
from .losses import dpo_loss, ipo_loss, logprobs_from_logits
from .models import position_ids_from_mask
from .ppo import LoRAConfig
from .runs import Run, TrainState, adamw, save_policy
from .sft import DemoBatches, FineTuneSettings, encode_demos

REF_CACHE = "ref_logprobs.json"


@dataclasses.dataclass
class DPOConfig(FineTuneSettings):
    """``stable-rlhf dpo``: DPO / cDPO / IPO of a policy on comparisons (the training and run
    settings come from ``FineTuneSettings``)."""

    train_data: str = "data/testbed/preferences_train.jsonl"
    """comparisons to train on (a data spec: path.jsonl, hh:path, hf:name[:split], ...); each
    K-ranked comparison gives its C(K, 2) pairs"""
    eval_data: str = "data/testbed/preferences_eval.jsonl"
    """held-out comparisons, evaluated after every epoch"""
    data_kind: Literal["ranked", "pair"] = "ranked"
    """record kind of both files; a pair is a K = 2 comparison"""
    out_dir: str = "runs/dpo"
    """run directory; the trained policy is saved in out_dir/model"""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """the policy to train, and (its initial weights) the reference π_ref"""
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    """LoRA on the policy (the reference is then the policy with its adapters disabled)"""
    loss_type: Literal["dpo", "ipo", "cdpo"] = "dpo"
    """dpo: -log σ(β·h); cdpo: DPO with label smoothing; ipo: (h - 1/(2β))² on per-token mean log-probabilities"""
    beta: float = 0.1
    """β: the strength of the KL regularisation towards π_ref (IPO's τ)"""
    label_smoothing: float = 0.0
    """ε in [0, 0.5): cdpo's probability that a label is flipped (must be > 0 for cdpo, 0 otherwise)"""
    precompute_ref: bool = True
    """compute π_ref's log-probabilities of every pair once, before training, and cache them in
    out_dir/ref_logprobs.json; false: a frozen copy of the initial policy (with LoRA: the policy
    with adapters disabled) computes them every step, twice the weights in memory without LoRA"""
    eval_batch_size: int = 16
    """pairs per no-grad forward pass (held-out evaluation and the precomputed reference)"""
    lr: float = 5e-6
    """peak learning rate (AdamW), linear warm-up then linear decay (each step sees 2 x
    batch_size sequences)"""

    def __post_init__(self):
        super().__post_init__()
        if self.eval_batch_size < 1:
            raise ValueError("eval_batch_size must be >= 1")
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        if self.max_length < 2:
            raise ValueError("max_length must be >= 2 (a prompt token and a response token)")
        if self.loss_type == "cdpo" and not 0 < self.label_smoothing < 0.5:
            raise ValueError("loss_type=cdpo needs label_smoothing in (0, 0.5) (0 is plain dpo)")
        if self.loss_type != "cdpo" and self.label_smoothing != 0:
            raise ValueError(f"label_smoothing is cdpo's; loss_type={self.loss_type} needs label_smoothing=0")


# --------------------------------------------------------------------------- pairs


def ranked_pairs(comparison: dict) -> list[dict]:
    """The C(K, 2) (chosen, rejected) pairs of a K-ranked comparison in ranking order: for
    ranking [2, 0, 1], response 2 over 0, 2 over 1, then 0 over 1. Each pair keeps the prompt
    and task, and the two responses' gold scores where the comparison has them."""
    ranking, responses = comparison["ranking"], comparison["responses"]
    pairs = []
    for position, better in enumerate(ranking):
        for worse in ranking[position + 1:]:
            pair = {"prompt": comparison["prompt"], "chosen": responses[better], "rejected": responses[worse],
                    "task": comparison.get("task", "default")}
            if "gold" in comparison:
                pair["gold"] = [comparison["gold"][better], comparison["gold"][worse]]
            pairs.append(pair)
    return pairs


def load_pairs(spec: str, kind: str) -> list[dict]:
    """Every pair of a comparison file (bad records fail here, located by file:line:field),
    each with its ``index`` in the file's pair list (its row of the reference table)."""
    from .reward_model import load_comparisons

    pairs = [pair for comparison in load_comparisons(spec, kind) for pair in ranked_pairs(comparison)]
    return [{**pair, "index": i} for i, pair in enumerate(pairs)]


def encode_pairs(tokenizer, pairs: list[dict], cfg: DPOConfig) -> dict[str, torch.Tensor]:
    """``encode_demos`` rows (2B, T): the B chosen responses, then the B rejected ones."""
    prompts = [p["prompt"] for p in pairs]
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    return encode_demos(tokenizer, prompts + prompts, responses, cfg.max_length, cfg.system_prompt)


def response_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_t log π(y_t | x, y_<t) over each row's response tokens and their count, (N,) each."""
    device = next(model.parameters()).device
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask.long(),
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits  # (N, T, V)
    logprobs = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])  # (N, T - 1): position t predicts t + 1
    mask = batch["loss_mask"][:, 1:].to(device)
    return (logprobs * mask).sum(-1), mask.sum(-1)


# --------------------------------------------------------------------------- the reference


@contextlib.contextmanager
def as_reference(policy, lora: bool):
    """The policy as π_ref: with LoRA its adapters disabled, else the network as it is (the
    reference only before its first update)."""
    with policy.disable_adapter() if lora else contextlib.nullcontext():
        yield policy


@dataclasses.dataclass
class Reference:
    """Where π_ref's log-probabilities come from: ``tables`` ('train' / 'eval': (N, 2) sums for
    each pair's chosen and rejected response, by the pair's ``index``), else ``model`` (a frozen
    copy of the initial policy, or with ``lora`` the policy itself, run with adapters off)."""

    tables: Optional[dict[str, torch.Tensor]]
    model: Any
    lora: bool

    @torch.no_grad()
    def logps(self, split: str, pairs: list[dict], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B,) sums in ``encode_pairs`` order: the chosen responses, then the rejected ones."""
        if self.tables is not None:
            rows = self.tables[split][[p["index"] for p in pairs]]  # (B, 2)
            return torch.cat([rows[:, 0], rows[:, 1]])
        with as_reference(self.model, self.lora) as net:
            return response_logps(net, batch)[0]


@torch.no_grad()
def reference_table(policy, pairs: list[dict], tokenizer, cfg: DPOConfig) -> torch.Tensor:
    """(N, 2) log π_ref sums of every pair's chosen and rejected response, in chunks of
    ``eval_batch_size`` pairs, from the policy before its first update."""
    rows = []
    with as_reference(policy, cfg.lora.enabled) as net:
        for i in range(0, len(pairs), cfg.eval_batch_size):
            chunk = pairs[i: i + cfg.eval_batch_size]
            sums = response_logps(net, encode_pairs(tokenizer, chunk, cfg))[0].float().cpu()  # (2b,)
            rows.append(torch.stack(sums.chunk(2), 1))  # (b, 2)
    return torch.cat(rows)


def cache_key(cfg: DPOConfig, splits: dict[str, list[dict]]) -> str:
    """What the cached reference log-probabilities depend on: the model, how sequences are
    encoded, the precision and every pair's text."""
    from .config import to_dict
    from .models import mixed_precision

    texts = {name: [[p["prompt"], p["chosen"], p["rejected"]] for p in pairs] for name, pairs in splits.items()}
    what = {"model": to_dict(cfg.model), "lora": cfg.lora.enabled, "max_length": cfg.max_length,
            "system_prompt": cfg.system_prompt, "precision": mixed_precision(cfg.precision), "pairs": texts}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def make_reference(run: Run, policy, reference_model, tokenizer, splits: dict[str, list[dict]],
                   cfg: DPOConfig) -> Reference:
    """4. precompute_ref: the tables, read from out_dir/ref_logprobs.json when it holds these
    pairs' (a resumed run), else computed with the initial policy and written there; otherwise
    the model that computes π_ref each step."""
    if not cfg.precompute_ref:
        return Reference(None, policy if cfg.lora.enabled else reference_model, cfg.lora.enabled)
    path, key = run.out / REF_CACHE, cache_key(cfg, splits)
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if cached.get("key") == key:
        run.print(f"reference log-probabilities from {path}")
        return Reference({name: torch.tensor(cached[name], dtype=torch.float32) for name in splits}, None, False)
    start = time.time()
    tables = {name: reference_table(policy, pairs, tokenizer, cfg) for name, pairs in splits.items()}
    if run.is_main:
        atomic_write_json(path, {"key": key, **{name: table.tolist() for name, table in tables.items()}})
    run.print(f"reference log-probabilities of {sum(map(len, splits.values()))} pairs in {time.time() - start:.0f}s")
    return Reference(tables, None, False)


# --------------------------------------------------------------------------- the loss


def pair_logps(model, reference: Reference, split: str, pairs: list[dict], tokenizer, cfg: DPOConfig):
    """(policy chosen, policy rejected, reference chosen, reference rejected), (B,) each: sums of
    the response tokens' log-probabilities, or per-token means for IPO (module docstring)."""
    batch = encode_pairs(tokenizer, pairs, cfg)
    logps, counts = response_logps(model, batch)  # (2B,)
    ref_logps = reference.logps(split, pairs, batch).to(logps.device)  # (2B,)
    if cfg.loss_type == "ipo":
        logps, ref_logps = logps / counts, ref_logps / counts
    B = len(pairs)
    return logps[:B], logps[B:], ref_logps[:B], ref_logps[B:]


def preference_loss(cfg: DPOConfig, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    """The loss of ``cfg.loss_type`` (``losses.dpo_loss`` / ``ipo_loss``), with ``loss/total``."""
    if cfg.loss_type == "ipo":
        loss, stats = ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, cfg.beta)
    else:
        loss, stats = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, cfg.beta, cfg.label_smoothing)
    return loss, {"loss/total": loss.item(), **stats}


def dpo_step(state: TrainState, reference: Reference, pairs: list[dict], tokenizer, cfg: DPOConfig) -> None:
    """One step: the minibatch's chosen and rejected responses in one forward pass, one update."""
    loss, stats = preference_loss(cfg, *pair_logps(state.model, reference, "train", pairs, tokenizer, cfg))
    state.update(loss, stats)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(state: TrainState, reference: Reference, pairs: list[dict], tokenizer, cfg: DPOConfig) -> dict:
    """The held-out pairs' loss and implicit-reward statistics (no update): accuracy against the
    labels, and against the gold reward on the pairs whose gold scores differ."""
    parts = [pair_logps(state.unwrapped, reference, "eval", pairs[i: i + cfg.eval_batch_size], tokenizer, cfg)
             for i in range(0, len(pairs), cfg.eval_batch_size)]
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = (torch.cat(t).double() for t in zip(*parts))
    _, stats = preference_loss(cfg, policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    metrics = {"loss": stats["loss/total"], **{k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith("dpo/")}}
    margins = ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)).tolist()  # h of each pair
    gold = [(m, p["gold"]) for m, p in zip(margins, pairs) if "gold" in p and p["gold"][0] != p["gold"][1]]
    metrics["gold_pairs"] = len(gold)
    if gold:
        metrics["accuracy_gold"] = sum((m > 0) == (g[0] > g[1]) and m != 0 for m, g in gold) / len(gold)
    return metrics


def log_eval(state: TrainState, epoch: int, metrics: dict) -> None:
    state.run.log({"step": state.step, "epoch": epoch, **{f"eval/{k}": v for k, v in metrics.items()}})
    state.run.print(f"epoch {epoch}: loss {state.last['loss/total']:.4f}  held-out loss {metrics['loss']:.4f}  "
                    f"accuracy {metrics['accuracy']:.4f}  margin {metrics['margin']:.4f}")


# --------------------------------------------------------------------------- the dpo stage


def load_models(run: Run, cfg: DPOConfig):
    """2. the policy (float32, no dropout: at step 0 it is exactly π_ref), LoRA-wrapped when
    asked; the frozen reference copy, only where the reference is neither precomputed nor the
    policy without adapters; the tokenizer."""
    from .models import apply_lora, load_policy

    policy, tokenizer = load_policy(cfg.model, device=run.device, trainable=True)
    if cfg.lora.enabled:
        policy = apply_lora(policy, cfg.lora).eval()
    reference = None
    if not cfg.precompute_ref and not cfg.lora.enabled:
        # the policy's float32 weights under the policy's autocast, so that π_ref is exactly the
        # policy's starting point (a bf16 copy, as PPO keeps, differs from it by rounding)
        reference, _ = load_policy(cfg.model, device=run.device, trainable=True)
        reference = run.accelerator.prepare_model(reference.requires_grad_(False), evaluation_mode=True)
    return policy, reference, tokenizer


def finish(state: TrainState, reference: Reference, eval_pairs: list[dict], metrics: Optional[dict], tokenizer,
           cfg: DPOConfig, n_train: int) -> dict:
    """6. the final policy (LoRA adapters merged in) in out_dir/model and summary.json with the
    last held-out metrics (evaluated here when a resumed run had no epoch left)."""
    run = state.run
    if metrics is None:
        metrics = evaluate(state, reference, eval_pairs, tokenizer, cfg)
    if run.is_main:
        model = state.unwrapped.merge_and_unload() if cfg.lora.enabled else state.unwrapped
        save_policy(model, tokenizer, run.out / "model")
    summary = run.finish({"loss_type": cfg.loss_type, "beta": cfg.beta, "steps": state.step, "train_pairs": n_train,
                          "eval_pairs": len(eval_pairs), "loss_first": state.first.get("loss/total"),
                          "loss_last": state.last.get("loss/total"), "skipped_updates": state.skipped,
                          "eval": metrics, "seconds": run.seconds()})
    run.print(f"done in {summary['seconds']:.0f}s: held-out accuracy {metrics['accuracy']:.4f}, "
              f"margin {metrics['margin']:.4f} -> {run.out / 'model'}")
    return summary


def train(cfg: DPOConfig) -> dict:
    """1. pairs; 2. the policy; 3. resume; 4. the reference; 5. epochs of DPO steps, each with a
    held-out evaluation and a checkpoint; 6. the policy and summary.json."""
    splits = {"train": load_pairs(cfg.train_data, cfg.data_kind),  # 1. bad data stops us before a model loads
              "eval": load_pairs(cfg.eval_data, cfg.data_kind)}
    run = Run(cfg, "dpo", log_with=cfg.log_with, fresh_files=(REF_CACHE,), fresh_dirs=("model",))
    policy, reference_model, tokenizer = load_models(run, cfg)  # 2.
    batches = DemoBatches(splits["train"], cfg.batch_size, cfg.seed)
    optimizer = adamw([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    state = TrainState(run, policy, optimizer, cfg, len(splits["train"]), batches=batches)
    checkpoint = run.start(cfg.resume)  # 3.
    # 4. before the checkpoint's weights load: the policy is still the initial one, π_ref
    reference = make_reference(run, state.unwrapped, reference_model, tokenizer, splits, cfg)
    state.resume(checkpoint)
    n_trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    run.print(f"{len(splits['train'])} train / {len(splits['eval'])} held-out pairs; {cfg.loss_type}, beta {cfg.beta}; "
              f"{n_trainable / 1e6:.1f}M trainable parameters, {state.total} steps")

    metrics = None  # the last epoch's held-out metrics are the final ones: the policy is done changing
    for epoch in range(state.epoch, cfg.epochs):  # 5.
        for _ in state.batches_left(epoch):
            dpo_step(state, reference, batches.next(), tokenizer, cfg)
        metrics = evaluate(state, reference, splits["eval"], tokenizer, cfg)
        log_eval(state, epoch, metrics)
        run.checkpoint(state.step, state.state_dict())
    return finish(state, reference, splits["eval"], metrics, tokenizer, cfg, len(splits["train"]))  # 6.
