"""``stable-rlhf sft``: NLL fine-tuning on demonstrations, and the one NLL every stage shares.

SFT, rejection sampling (fine-tuning on the kept best samples), PPO-ptx (γ_ptx · NLL on
SFT or pretraining data) and selective rehearsal (γ_R · NLL on the rehearsal set) all
go through ``encode_demos`` + ``sequence_nll``: the prompt is formatted with the chat
template exactly as ``generate`` formats it, the response follows and ends with the
end-of-turn token, and only response tokens count in the loss (prompt tokens masked).

``DemoBatches`` deals minibatches from a demonstration set in a seeded order, epoch
after epoch, and can save and restore its position, so a resumed PPO run mixes in
exactly the batches the uninterrupted one would have.

``train`` is an epoch trainer on the run layer (``runs.Run`` + ``runs.TrainState``, shared
with ``train-rm`` / ``train-am``); this module supplies its loss, ``nll_step``.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Optional, Sequence

import torch

from .config import ModelConfig
from .losses import nll_loss
from .models import chat_prompt, position_ids_from_mask
from .runs import GuardedRunSettings, Run, TrainState, adamw, save_policy


def encode_demos(
    tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int, system_prompt: str | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``loss_mask`` (B, T).

    ``loss_mask`` is True on response tokens (the end-of-turn token included): what
    ``sequence_nll`` scores. A sequence longer than ``max_length`` loses the start of its
    prompt first, then the end of its response."""
    if not prompts:
        raise ValueError("no demonstrations to encode")
    eos = tokenizer.eos_token or ""
    add_special = not getattr(tokenizer, "chat_template", None)
    rows, masks = [], []
    for prompt, response in zip(prompts, responses):
        p_ids = tokenizer(chat_prompt(tokenizer, prompt, system_prompt), add_special_tokens=add_special)["input_ids"]
        r_ids = tokenizer(response + eos, add_special_tokens=False)["input_ids"]
        r_ids = r_ids[:max_length - 1]  # keep at least one prompt token to condition on
        p_ids = p_ids[max(0, len(p_ids) - (max_length - len(r_ids))):]
        rows.append(p_ids + r_ids)
        masks.append([False] * len(p_ids) + [True] * len(r_ids))
    T = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.bool)
    loss_mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (ids, m) in enumerate(zip(rows, masks)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = True
        loss_mask[i, : len(ids)] = torch.tensor(m)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def sequence_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Mean NLL of the response tokens of an ``encode_demos`` batch under a causal LM."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask.long(),
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits  # (B, T, V)
    # position t predicts token t + 1
    return nll_loss(logits[:, :-1], input_ids[:, 1:], batch["loss_mask"][:, 1:].to(device))


class DemoBatches:
    """An endless, seeded stream of minibatches of records that stops and resumes exactly.

    Holds the records it was given (demonstrations: dicts with ``prompt`` and ``response``;
    PPO and rejection sampling also deal their prompt records with it), the batch size and
    the seed. Each ``next()`` returns the next ``batch_size`` records, as a list of the
    given dicts. Epoch e visits every record once, in the order of a shuffle seeded with
    ``(seed, e)``; a batch that runs past the end of an epoch takes the rest of its records
    from the start of the next epoch's order, so the stream never runs dry.

    ``state_dict()`` is the position: the epoch and how many records of its order were
    dealt. Loaded into a ``DemoBatches`` over the same records, batch size and seed, it
    continues with exactly the batches the uninterrupted stream would have dealt."""

    def __init__(self, demos: list[dict], batch_size: int, seed: int):
        if not demos:
            raise ValueError("an empty demonstration set")
        self.demos, self.batch_size, self.seed = demos, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.demos)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self) -> list[dict]:
        out = []
        while len(out) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            out.append(self.demos[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffled(self.epoch)


# --------------------------------------------------------------------------- the epoch trainer


# --------------------------------------------------------------------------- the sft stage


@dataclasses.dataclass
class FineTuneSettings(GuardedRunSettings):
    """What every epoch trainer of a policy on (prompt, response) text reads (``sft``, ``dpo``):
    the data order, the optimiser's schedule and the encoding; the run settings come from
    ``GuardedRunSettings``."""

    seed: int = 0
    """seed for the data order"""
    epochs: int = 1
    """passes over the training data"""
    batch_size: int = 8
    """examples per optimiser step (demonstrations for sft, pairs for dpo)"""
    lr: float = 1e-5
    """peak learning rate (AdamW), linear warm-up then linear decay"""
    warmup_ratio: float = 0.1
    """fraction of steps spent warming up"""
    grad_clip: float = 1.0
    """max gradient norm"""
    max_length: int = 512
    """tokens per (prompt, response) sequence (the prompt is cut from the left first)"""
    system_prompt: Optional[str] = None
    """system message in the chat template (use the one the policy will be sampled with)"""

    def __post_init__(self):
        super().__post_init__()
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")


@dataclasses.dataclass
class SFTConfig(FineTuneSettings):
    """``stable-rlhf sft``: NLL fine-tuning of a causal LM on demonstrations (the training and
    run settings come from ``FineTuneSettings``)."""

    data: str = "data/testbed/sft_demos.jsonl"
    """demonstrations ({prompt, response} records; a data spec: path.jsonl, hf:name, ...)"""
    out_dir: str = "runs/sft"
    """run directory; the fine-tuned policy is saved in out_dir/model"""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """the policy to fine-tune"""


def nll_step(state: TrainState, rows: list[dict], tokenizer, cfg: SFTConfig) -> None:
    """One SFT step: the minibatch's response-token NLL, one update."""
    batch = encode_demos(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows], cfg.max_length,
                         cfg.system_prompt)
    loss, stats = sequence_nll(state.model, batch)
    state.update(loss, stats)


def train(cfg: SFTConfig) -> dict:
    """1. read the demonstrations; 2. load the policy; 3. resume; 4. epochs of NLL steps with
    a checkpoint after each; 5. save the policy and summary.json."""
    from .data import load_records
    from .models import load_policy

    start = time.time()
    demos = load_records(cfg.data, "sft")  # 1. bad data stops us before a model loads (or a run dir appears)
    run = Run(cfg, "sft", log_with=cfg.log_with, fresh_dirs=("model",))
    model, tokenizer = load_policy(cfg.model, device=run.device, trainable=True)  # 2.
    batches = DemoBatches(demos, cfg.batch_size, cfg.seed)
    state = TrainState(run, model, adamw(model.parameters(), lr=cfg.lr), cfg, len(demos), batches=batches)
    state.resume(run.start(cfg.resume))  # 3.

    run.print(f"{len(demos)} demonstrations, {state.total} steps")
    for epoch in range(state.epoch, cfg.epochs):  # 4.
        state.model.train()
        for _ in state.batches_left(epoch):
            nll_step(state, batches.next(), tokenizer, cfg)
        run.checkpoint(state.step, state.state_dict())
        run.print(f"epoch {epoch}: nll {state.last['loss/nll']:.4f}")

    if run.is_main:  # 5.
        save_policy(state.unwrapped, tokenizer, run.out / "model")
    summary = run.finish({"steps": state.step, "demos": len(demos), "nll_first": state.first["loss/nll"],
                          "nll_last": state.last["loss/nll"], "skipped_updates": state.skipped,
                          "seconds": time.time() - start})
    run.print(f"done in {summary['seconds']:.0f}s -> {run.out / 'model'}")
    return summary
