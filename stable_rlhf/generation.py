"""Sampling responses from a policy: batched, left-padded, seeded, with the token tensors kept.

``generate`` is what every stage samples with: the K responses per prompt that labelers
rank, rejection sampling's candidates, selective rehearsal's SFT samples and PPO's
rollouts. It returns the decoded text *and* the query/response tensors with their masks,
laid out as PPO wants them (TRL's convention): queries left-padded, responses
right-padded, so ``cat([query_ids, response_ids], 1)`` holds each row's real tokens in
one contiguous run.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Iterator, Optional

import torch
import torch.nn.functional as F

from .config import GenerationConfig
from .models import chat_prompt

if TYPE_CHECKING:
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclasses.dataclass
class Generation:
    """Responses to a list of prompts, n per prompt, prompt-major (p0, p0, .., p1, p1, ..)."""

    prompts: list[str]
    """the raw user prompt of each row"""
    prompt_index: list[int]
    """index into the input prompt list for each row"""
    responses: list[str]
    """decoded responses, special tokens dropped, whitespace stripped at both ends"""
    query_ids: torch.Tensor
    """(N, Tq) left-padded chat-formatted prompt tokens"""
    query_mask: torch.Tensor
    """(N, Tq) True where real"""
    response_ids: torch.Tensor
    """(N, Tr) right-padded response tokens; tokens after the first EOS are pad"""
    response_mask: torch.Tensor
    """(N, Tr) True for real response tokens, the EOS token included when present"""
    truncated: torch.Tensor
    """(N,) True where no EOS came within max_new_tokens"""
    logprobs: Optional[torch.Tensor] = None
    """(N, Tr) float32 log softmax(logits / temperature) of each response token, from the logits
    the sampler drew it from (zero past the response); only when ``generate(logprobs=True)``"""

    def __len__(self) -> int:
        return len(self.responses)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and response concatenated: ``(input_ids, attention_mask)``, both (N, Tq + Tr)."""
        return torch.cat([self.query_ids, self.response_ids], 1), torch.cat([self.query_mask, self.response_mask], 1)

    def to(self, device: torch.device | str) -> "Generation":
        """A copy with the tensors on ``device`` (generate returns them on the CPU)."""
        return dataclasses.replace(
            self,
            query_ids=self.query_ids.to(device),
            query_mask=self.query_mask.to(device),
            response_ids=self.response_ids.to(device),
            response_mask=self.response_mask.to(device),
            truncated=self.truncated.to(device),
            logprobs=self.logprobs.to(device) if self.logprobs is not None else None,
        )


def stop_token_ids(tokenizer: "PreTrainedTokenizerBase", model: "PreTrainedModel | None" = None) -> list[int]:
    """Token ids that end a response: the tokenizer's eos, ChatML's ``<|im_end|>`` where the
    vocabulary has it, and the model's generation_config eos ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if model_eos is not None:
        ids.update([model_eos] if isinstance(model_eos, int) else model_eos)
    if not ids:
        raise ValueError("the tokenizer has no eos token; generation could never stop early")
    return sorted(ids)


def response_masks(response_ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real response tokens (through the first stop token) and the truncated flags.

    (N, Tr) -> (N, Tr) bool, (N,) bool. A row with no stop token is all real and truncated.
    """
    is_stop = torch.isin(response_ids, torch.tensor(stop_ids, device=response_ids.device))  # (N, Tr)
    has_stop = is_stop.any(-1)  # (N,)
    first_stop = torch.where(has_stop, is_stop.int().argmax(-1), response_ids.shape[1])  # (N,)
    positions = torch.arange(response_ids.shape[1], device=response_ids.device)
    mask = positions[None, :] <= first_stop[:, None]  # the stop token itself is real
    return mask, ~has_stop


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG for the block and restore it afterwards (``transformers.generate``
    samples from the global generator, so a private torch.Generator cannot be passed)."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _pad_to(t: torch.Tensor, length: int, value: int | bool, left: bool) -> torch.Tensor:
    extra = length - t.shape[1]
    return F.pad(t, (extra, 0) if left else (0, extra), value=value) if extra else t


def generate(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: list[str],
    cfg: GenerationConfig,
    n: int = 1,
    seed: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    logprobs: bool = False,
) -> Generation:
    """Sample ``n`` responses to each prompt (chat-formatted with ``cfg.system_prompt``).

    Rows are generated ``cfg.batch_size`` at a time with left padding and the KV cache;
    temperature 0 is greedy, otherwise temperature + nucleus (top_p) sampling with no
    top-k cut and none of the model's own generation defaults (repetition penalty, ...).
    The same ``seed`` gives the same responses on the same device. The model
    is in eval mode under no_grad during the call (its mode is restored afterwards). Not
    ``inference_mode``: PPO feeds these tensors into forward passes that need autograd.
    ``logprobs``: also keep each sampled token's log-probability under softmax(logits / T)
    (T = 1 when greedy), the policy's own (PPO's old log-probabilities), from the logits
    the sampler read, so that no second forward pass recomputes them (they agree with one
    to float rounding: the KV cache changes the order of the sums).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not prompts:
        raise ValueError("no prompts to generate from")
    if not hasattr(model, "generate") and hasattr(model, "module"):  # DDP-wrapped
        model = model.module
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stop_ids = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    hf_cfg = _sampling_config(cfg, stop_ids, pad_id, logits=logprobs)
    texts = [chat_prompt(tokenizer, p, cfg.system_prompt) for p in prompts]
    prompt_index = [i for i in range(len(prompts)) for _ in range(n)]  # prompt-major

    with _plain_eval_mode(model, stop_ids, pad_id), torch.no_grad(), _seeded(seed, device):
        temperature = (cfg.temperature or 1.0) if logprobs else None
        queries, query_masks, responses, token_logprobs = _generate_batches(
            model, tokenizer, [texts[i] for i in prompt_index], hf_cfg, cfg.batch_size, device, progress, temperature
        )
    return _assemble(tokenizer, prompts, prompt_index, queries, query_masks, responses, stop_ids, pad_id,
                     token_logprobs if logprobs else None)


def _sampling_config(cfg: GenerationConfig, stop_ids: list[int], pad_id: int,
                     logits: bool = False) -> "HFGenerationConfig":
    """The transformers GenerationConfig for ``cfg``: greedy at temperature 0, else
    temperature + top_p with no top-k cut; ``logits``: return each step's raw logits."""
    from transformers import GenerationConfig as HFGenerationConfig

    sample = cfg.temperature > 0
    return HFGenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=sample,
        temperature=cfg.temperature if sample else None,
        top_p=cfg.top_p if sample else None,
        top_k=0 if sample else None,  # transformers would otherwise cut at top-50
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        # a pad that is not a stop token must never be sampled: it would read as padding
        suppress_tokens=[pad_id] if pad_id not in stop_ids else None,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=logits,
    )


@contextlib.contextmanager
def _plain_eval_mode(model: "PreTrainedModel", stop_ids: list[int], pad_id: int) -> Iterator[None]:
    """The model in eval mode with a bare generation_config and its plain (float32) forward
    for the block; all restored after.

    transformers fills every unset field from model.generation_config (a hub model may
    ship top_k=20 or repetition_penalty=1.05); PPO and the KL penalty assume samples from
    softmax(logits / T) cut only by top_p, so generate sees none of those defaults."""
    from transformers import GenerationConfig as HFGenerationConfig

    was_training, model_gen_cfg = model.training, model.generation_config
    model.eval()
    model.generation_config = HFGenerationConfig(
        bos_token_id=model_gen_cfg.bos_token_id, eos_token_id=stop_ids, pad_token_id=pad_id
    )
    # Under accelerate's bf16 mixed precision the model's forward is wrapped in an autocast
    # that re-casts every fp32 weight at every decoding step: on 2 CPU cores SmolLM2 decodes
    # 8 rows at 44 tokens/s that way and 80 in float32. Sampling runs the weights as stored.
    autocast_forward = model.__dict__.get("forward") if "_original_forward" in model.__dict__ else None
    if autocast_forward is not None:
        model.forward = model._original_forward
    try:
        yield
    finally:
        model.train(was_training)
        model.generation_config = model_gen_cfg
        if autocast_forward is not None:
            model.forward = autocast_forward


def _generate_batches(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    texts: list[str],
    hf_cfg: "HFGenerationConfig",
    batch_size: int,
    device: torch.device,
    progress: bool,
    temperature: float | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per batch of ``batch_size`` rows, on the CPU: the left-padded query ids (b, Tq_b), their
    bool mask, the generated response ids (b, Tr_b) and, given a ``temperature``, their
    log-probabilities at it (b, Tr_b) (else an empty list); lengths differ between batches."""
    from tqdm.auto import tqdm

    from .losses import logprobs_from_logits

    # A template already writes the special tokens (e.g. a BOS); do not add them twice.
    add_special = not getattr(tokenizer, "chat_template", None)
    queries, query_masks, responses, token_logprobs = [], [], [], []
    for start in tqdm(range(0, len(texts), batch_size), desc="generate", disable=not progress):
        enc = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=add_special,
        ).to(device)
        out = model.generate(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], generation_config=hf_cfg
        )
        Tq_b = enc["input_ids"].shape[1]
        response = out.sequences[:, Tq_b:]  # (b, Tr_b)
        queries.append(enc["input_ids"].cpu())
        query_masks.append(enc["attention_mask"].bool().cpu())
        responses.append(response.cpu())
        if temperature is not None:  # the raw logits of each step, before any processor
            logits = torch.stack(out.logits, 1)  # (b, Tr_b, V)
            token_logprobs.append(logprobs_from_logits(logits / temperature, response).cpu())
    return queries, query_masks, responses, token_logprobs


def _assemble(
    tokenizer: "PreTrainedTokenizerBase",
    prompts: list[str],
    prompt_index: list[int],
    queries: list[torch.Tensor],
    query_masks: list[torch.Tensor],
    responses: list[torch.Tensor],
    stop_ids: list[int],
    pad_id: int,
    token_logprobs: list[torch.Tensor] | None = None,
) -> Generation:
    """One Generation from the per-batch tensors: responses cut after their first stop token."""
    # Batches end at different lengths: queries are left-padded, responses right-padded
    # to the longest of all.
    Tq = max(q.shape[1] for q in queries)
    Tr = max(r.shape[1] for r in responses)
    query_ids = torch.cat([_pad_to(q, Tq, pad_id, left=True) for q in queries])  # (N, Tq)
    query_mask = torch.cat([_pad_to(m, Tq, False, left=True) for m in query_masks])  # (N, Tq)
    response_ids = torch.cat([_pad_to(r, Tr, pad_id, left=False) for r in responses])  # (N, Tr)
    response_mask, truncated = response_masks(response_ids, stop_ids)
    response_ids = response_ids.masked_fill(~response_mask, pad_id)
    texts = [
        tokenizer.decode(ids[m], skip_special_tokens=True).strip() for ids, m in zip(response_ids, response_mask)
    ]
    return Generation(
        prompts=[prompts[i] for i in prompt_index],
        prompt_index=prompt_index,
        responses=texts,
        query_ids=query_ids,
        query_mask=query_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        truncated=truncated,
        logprobs=(torch.cat([_pad_to(lp, Tr, 0.0, left=False) for lp in token_logprobs]) * response_mask
                  if token_logprobs is not None else None),
    )
