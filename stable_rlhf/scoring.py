"""Score sources: turning (prompt, response) texts into scalar scores.

One encoding for every score model (training and use must see the same text): a
causal-LM backbone with a chat template reads the chat-formatted prompt followed by the
response and the end-of-turn token, exactly what the policy produced; an encoder
(no chat template) reads the (prompt, response) pair with its own separator, and an
uncased one (MiniLM) reads it with marks for the capitals, line breaks and indentation
its tokenizer drops (``mark_layout``). Prompts are truncated from the left so the
response is always seen whole.

``ScoreSource`` is what PPO and rejection sampling call: a trained RM/AM, optionally
z-normalised per task with the statistics of its own training data (the
"per-task-normalised RM", the cheap alternative to the advantage model).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal, Sequence

import torch

from .models import ScoreModel, chat_prompt


# What an uncased tokenizer (BERT's, MiniLM's) throws away, put back as marks: a word with
# a capital first letter, a word in capitals, a line break, a step of indentation (4 columns,
# a tab is one). Without them the score model cannot see the lowercase task's constraint,
# a bullet list's lines or code's indentation. The marks are reserved vocabulary entries,
# registered as special tokens so the tokenizer neither lowercases nor splits them: the
# vocabulary and its ids do not change, and the marks' embeddings learn in training.
LAYOUT_MARKS = {"capital": "[unused1]", "capitals": "[unused2]", "newline": "[unused3]", "indent": "[unused4]"}
_CAPITALISED_RE = re.compile(r"\b[A-Z]\w*")


def reads_lowercase(tokenizer) -> bool:
    """Whether ``tokenizer`` lowercases its input (and so reads text through ``mark_layout``)."""
    return bool(getattr(tokenizer, "do_lower_case", False)) and all(
        tokenizer.convert_tokens_to_ids(m) != tokenizer.unk_token_id for m in LAYOUT_MARKS.values())


def mark_layout(text: str) -> str:
    """``text`` with ``LAYOUT_MARKS`` before capitalised and all-capitals words, for each line
    break and for each step of a line's indentation."""
    def mark(word: re.Match) -> str:
        w = word.group(0)
        letters = [c for c in w if c.isalpha()]
        kind = "capitals" if len(letters) > 1 and all(c.isupper() for c in letters) else "capital"
        return f"{LAYOUT_MARKS[kind]} {w}"

    out = []
    for line in text.split("\n"):
        body = line.lstrip(" \t")
        lead = line[: len(line) - len(body)]
        steps = lead.count("\t") + -(-lead.count(" ") // 4)
        out.append(" ".join([LAYOUT_MARKS["indent"]] * steps + [_CAPITALISED_RE.sub(mark, body)]))
    return f" {LAYOUT_MARKS['newline']} ".join(out)


def _with_marks(tokenizer) -> None:
    """Register ``LAYOUT_MARKS`` as special tokens (once): their ids stay the vocabulary's."""
    added = tokenizer.get_added_vocab()
    missing = [m for m in LAYOUT_MARKS.values() if m not in added]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)


def encode(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` (N, T) for (prompt, response) rows; an
    uncased tokenizer reads them through ``mark_layout``."""
    if reads_lowercase(tokenizer):
        _with_marks(tokenizer)
        prompts, responses = [mark_layout(p) for p in prompts], [mark_layout(r) for r in responses]
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"  # drop the start of a long prompt, never the response
    try:
        if getattr(tokenizer, "chat_template", None):
            eos = tokenizer.eos_token or ""
            texts = [chat_prompt(tokenizer, p) + r + eos for p, r in zip(prompts, responses)]
            enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                            add_special_tokens=False, return_tensors="pt")
        else:
            enc = tokenizer(list(prompts), list(responses), padding=True, truncation="only_first",
                            max_length=max_length, return_tensors="pt")
    finally:
        tokenizer.truncation_side = side
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def score_texts(
    model: ScoreModel,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 32,
    max_length: int = 512,
    device=None,
) -> torch.Tensor:
    """Scores (N,) in float32 on the CPU, batched; the model's mode is restored after."""
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = encode(tokenizer, prompts[start : start + batch_size], responses[start : start + batch_size], max_length)
            out.append(model(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def per_task_stats(scores: Sequence[float], tasks: Sequence[str]) -> dict:
    """{"global": {mean, std, n}, "per_task": {task: {mean, std, n}}} of a set of scores."""
    def moments(xs: torch.Tensor) -> dict:
        return {"mean": xs.mean().item(), "std": xs.std(unbiased=False).item() if len(xs) > 1 else 0.0, "n": len(xs)}

    values = torch.as_tensor(list(scores), dtype=torch.float64)
    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        by_task.setdefault(t, []).append(i)
    return {
        "global": moments(values),
        "per_task": {t: moments(values[idx]) for t, idx in sorted(by_task.items())},
    }


def normalise_per_task(scores: torch.Tensor, tasks: Sequence[str], stats: dict, eps: float = 1e-6) -> torch.Tensor:
    """z-score each score with its task's training statistics (unknown task: global)."""
    out = scores.clone().double()
    for i, task in enumerate(tasks):
        s = stats["per_task"].get(task, stats["global"])
        out[i] = (out[i] - s["mean"]) / max(s["std"], eps)
    return out.to(scores.dtype)


class ScoreSource:
    """A trained score model as a reward: ``source(prompts, responses, tasks) -> (N,)``.

    normalize: 'none' (raw RM/AM scores) or 'per_task' (z-scored with the per-task
    statistics saved with the model at training time).
    """

    def __init__(self, model: ScoreModel, tokenizer, normalize: Literal["none", "per_task"] = "none",
                 batch_size: int = 32, max_length: int = 512):
        if normalize == "per_task" and "score_stats" not in model.extra:
            raise ValueError("per-task normalisation needs the training score statistics saved with the model")
        self.model, self.tokenizer = model, tokenizer
        self.normalize, self.batch_size, self.max_length = normalize, batch_size, max_length
        self.objective = model.extra.get("objective", "rm")

    @classmethod
    def load(cls, path: str | Path, normalize: Literal["none", "per_task"] = "none", device=None, **kwargs):
        model = ScoreModel.from_pretrained(path, device=device)
        if model.tokenizer is None:
            raise ValueError(f"{path}: no tokenizer saved with the score model")
        model.tokenizer.padding_side = "right"
        return cls(model, model.tokenizer, normalize, **kwargs)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], tasks: Sequence[str]) -> torch.Tensor:
        scores = score_texts(self.model, self.tokenizer, prompts, responses, self.batch_size, self.max_length)
        if self.normalize == "per_task":
            scores = normalise_per_task(scores, tasks, self.model.extra["score_stats"])
        return scores

    def describe(self) -> str:
        return json.dumps({"objective": self.objective, "normalize": self.normalize})
