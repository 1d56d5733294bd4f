"""``stable-rlhf sft``: NLL fine-tuning on demonstrations, and the one NLL every stage shares.

SFT, rejection sampling (fine-tuning on the kept best samples), PPO-ptx (γ_ptx · NLL on
SFT or pretraining data) and selective rehearsal (γ_R · NLL on the rehearsal set) all
go through ``encode_demos`` + ``sequence_nll``: the prompt is formatted with the chat
template exactly as ``generate`` formats it, the response follows and ends with the
end-of-turn token, and only response tokens count in the loss (prompt tokens masked).

``DemoBatches`` deals minibatches from a demonstration set in a seeded order, epoch
after epoch, and can save and restore its position, so a resumed PPO run mixes in
exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .config import ModelConfig, save_config
from .io import append_jsonl, atomic_dir, atomic_write_json, atomic_write_jsonl, read_jsonl
from .losses import nll_loss
from .models import chat_prompt, position_ids_from_mask
from .rng import rng_state, seed_everything, set_rng_state


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
    """Endless seeded minibatches of (prompt, response) demonstrations, resumable."""

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


# --------------------------------------------------------------------------- the sft stage


@dataclasses.dataclass
class SFTConfig:
    """``stable-rlhf sft``: NLL fine-tuning of a causal LM on demonstrations."""

    data: str = "data/testbed/sft_demos.jsonl"
    """demonstrations ({prompt, response} records; a data spec: path.jsonl, hf:name, ...)"""
    out_dir: str = "runs/sft"
    """run directory; the fine-tuned policy is saved in out_dir/model"""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """the policy to fine-tune"""
    seed: int = 0
    """seed for the data order"""
    epochs: int = 1
    """passes over the demonstrations"""
    batch_size: int = 8
    """demonstrations per optimiser step"""
    lr: float = 1e-5
    """peak learning rate (AdamW), linear warm-up then linear decay"""
    warmup_ratio: float = 0.1
    """fraction of steps spent warming up"""
    grad_clip: float = 1.0
    """max gradient norm"""
    max_length: int = 512
    """tokens per demonstration (prompt cut from the left first)"""
    system_prompt: Optional[str] = None
    """system message in the chat template (use the one the policy will be sampled with)"""
    resume: bool = False
    """continue from out_dir/checkpoint (saved after every epoch)"""

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")


def train(cfg: SFTConfig) -> dict:
    """1. read the demonstrations; 2. load the policy; 3. epochs of NLL steps with a
    checkpoint after each; 4. save the policy and summary.json."""
    from transformers import get_linear_schedule_with_warmup

    from .data import load_records
    from .models import load_policy, make_accelerator

    start = time.time()
    out = Path(cfg.out_dir)
    demos = load_records(cfg.data, "sft")  # 1. bad data stops us before a model loads
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    seed_everything(cfg.seed)
    accelerator = make_accelerator(seed=cfg.seed)
    model, tokenizer = load_policy(cfg.model, device=accelerator.device)  # 2.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    steps_per_epoch = math.ceil(len(demos) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = DemoBatches(demos, cfg.batch_size, cfg.seed)

    ckpt, step, first_epoch = out / "checkpoint", 0, 0
    loss_first = loss_last = float("nan")
    if cfg.resume and (ckpt / "state.pt").exists():
        state = torch.load(ckpt / "state.pt", weights_only=True)
        accelerator.unwrap_model(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["batches"])
        set_rng_state(state["rng"])
        step, first_epoch = state["step"], state["epoch"] + 1
        loss_first, loss_last = state["nll_first"], state["nll_last"]
        if (out / "metrics.jsonl").exists():  # drop the killed run's steps after the checkpoint: they rerun
            logged = read_jsonl(out / "metrics.jsonl")
            atomic_write_jsonl(out / "metrics.jsonl", [m for m in logged if m["step"] <= step])
        print(f"[sft] resumed after epoch {state['epoch']} (step {step})")
    elif (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()

    print(f"[sft] {len(demos)} demonstrations, {total} steps")
    for epoch in range(first_epoch, cfg.epochs):  # 3.
        model.train()
        for _ in range(steps_per_epoch):
            rows = batches.next()
            batch = encode_demos(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                                 cfg.max_length, cfg.system_prompt)
            loss, stats = sequence_nll(model, batch)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            loss_last = stats["loss/nll"]
            loss_first = loss_last if step == 1 else loss_first
            append_jsonl(out / "metrics.jsonl", {"step": step, "epoch": epoch, **stats,
                                                 "optim/grad_norm": float(grad_norm),
                                                 "optim/lr": scheduler.get_last_lr()[0]})
        with atomic_dir(ckpt) as tmp:
            torch.save({"model": accelerator.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "batches": batches.state_dict(), "epoch": epoch,
                        "step": step, "rng": rng_state(), "nll_first": loss_first, "nll_last": loss_last},
                       tmp / "state.pt")
        print(f"[sft] epoch {epoch}: nll {loss_last:.4f}")

    policy = accelerator.unwrap_model(model)  # 4.
    with atomic_dir(out / "model") as tmp:
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    summary = {"steps": step, "demos": len(demos), "nll_first": loss_first, "nll_last": loss_last,
               "seconds": time.time() - start}
    atomic_write_json(out / "summary.json", summary)
    print(f"[sft] done in {summary['seconds']:.0f}s -> {out / 'model'}")
    return summary
