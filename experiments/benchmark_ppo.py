"""Seconds per PPO phase, tokens per second and peak memory for one workload.

    python -m experiments.benchmark_ppo                       # SmolLM2, batch 8, 32 new tokens
    python -m experiments.benchmark_ppo --model tiny-random --steps 2
    python -m experiments.benchmark_ppo --lora --batch-size 16 --new-tokens 64

Each measured step runs the phases of one PPO step with the trainer's own functions:
generation (KV cache, left padding), scoring (the gold reward), the no-grad forward
passes (policy logprobs, reference logprobs, values), and the update (one epoch of
minibatches through policy and value model, backward and optimiser step). The first
step is a warm-up and is not counted. Peak memory is the process's peak resident set
on CPU and ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="policy: smollm2, tiny-random, a directory or hub id")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per rollout")
    parser.add_argument("--mini-batch-size", type=int, default=4, help="rows per optimiser step")
    parser.add_argument("--new-tokens", type=int, default=32, help="max new tokens per response")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    parser.add_argument("--lora", action="store_true", help="LoRA policy (reference = adapters disabled)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)

    from stable_rlhf.config import GenerationConfig, ModelConfig
    from stable_rlhf.data import read_jsonl
    from stable_rlhf.generation import generate
    from stable_rlhf.losses import gae, kl_penalised_rewards, masked_whiten, policy_loss, value_loss
    from stable_rlhf.models import apply_lora, default_device, load_policy, load_score_model, resolve_dtype
    from stable_rlhf.ppo import LoRAConfig, response_logprobs, response_values
    from stable_rlhf.rewards import GoldReward

    device = torch.device(args.device) if args.device else default_device()
    cfg = ModelConfig(name_or_path=args.model)
    gen_cfg = GenerationConfig(max_new_tokens=args.new_tokens, temperature=0.7, top_p=1.0, batch_size=args.batch_size)
    prompts = read_jsonl("data/testbed/prompts_train.jsonl", "prompt")
    torch.manual_seed(0)

    policy, tokenizer = load_policy(cfg, device=device)
    reference = None
    if args.lora:
        policy = apply_lora(policy, LoRAConfig(enabled=True))
    else:
        reference, _ = load_policy(cfg, device=device)
        reference.requires_grad_(False)
    value_model, _ = load_score_model(cfg, device=device)
    params = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    reward = GoldReward(workers=2)
    dtype = resolve_dtype(cfg, device)
    autocast = torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    phases: dict[str, list[float]] = {k: [] for k in ("generate", "score", "forward", "update", "step")}
    tokens: list[int] = []
    for step in range(args.steps + 1):
        records = prompts[step * args.batch_size : (step + 1) * args.batch_size]
        t_step = time.perf_counter()
        t0 = time.perf_counter()
        gen = generate(policy, tokenizer, [r["prompt"] for r in records], gen_cfg, seed=step, device=device).to(device)
        _sync(device)
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = reward(records, gen.responses).to(device)
        t_score = time.perf_counter() - t0
        t0 = time.perf_counter()
        args_ = (gen.query_ids, gen.query_mask, gen.response_ids, gen.response_mask)
        mask = gen.response_mask
        with torch.no_grad(), autocast:
            logprobs = response_logprobs(policy, *args_, gen_cfg.temperature)[0]
            if reference is None:
                with policy.disable_adapter():
                    ref_logprobs = response_logprobs(policy, *args_, gen_cfg.temperature)[0]
            else:
                ref_logprobs = response_logprobs(reference, *args_, gen_cfg.temperature)[0]
            values = response_values(value_model, *args_).float()
        _sync(device)
        t_fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        rewards, _ = kl_penalised_rewards(scores, logprobs * mask, ref_logprobs * mask, mask, 0.05)
        advantages, returns = gae(rewards, values * mask, mask)
        advantages = masked_whiten(advantages, mask)
        for mb in torch.arange(len(gen), device=device).split(args.mini_batch_size):
            mb_args = tuple(a[mb] for a in args_)
            with autocast:
                new_logprobs = response_logprobs(policy, *mb_args, gen_cfg.temperature)[0]
                new_values = response_values(value_model, *mb_args).float()
            loss = policy_loss(new_logprobs, logprobs[mb], advantages[mb], mask[mb], 0.2)[0] \
                + 0.1 * value_loss(new_values, values[mb], returns[mb], mask[mb], 0.2)[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        _sync(device)
        t_upd = time.perf_counter() - t0
        if step == 0:
            continue  # warm-up
        for k, v in zip(phases, (t_gen, t_score, t_fwd, t_upd, time.perf_counter() - t_step)):
            phases[k].append(v)
        tokens.append(int(mask.sum()))

    mean = {k: statistics.mean(v) for k, v in phases.items()}
    gen_tokens = statistics.mean(tokens)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        peak_what = "GPU max_memory_allocated"
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        peak_what = "process peak RSS"
    result = {
        "model": args.model, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "lora": args.lora,
        "batch_size": args.batch_size, "new_tokens": args.new_tokens, "measured_steps": args.steps,
        "seconds": {k: round(v, 3) for k, v in mean.items()},
        "generated_tokens_per_step": gen_tokens,
        "generation_tokens_per_s": round(gen_tokens / mean["generate"], 1),
        "step_tokens_per_s": round(gen_tokens / mean["step"], 1),
        "peak_memory_mb": round(peak_mb, 1), "peak_memory_kind": peak_what,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"PPO benchmark: {args.model} on {device} ({result['dtype']}{', LoRA' if args.lora else ''}), "
          f"batch {args.batch_size}, {args.new_tokens} new tokens, mean of {args.steps} steps after a warm-up")
    print("| phase | seconds |\n|---|---|")
    for k, v in mean.items():
        print(f"| {k} | {v:.3f} |")
    print(f"generated tokens per step: {gen_tokens:.0f}; generation {result['generation_tokens_per_s']} tok/s; "
          f"whole step {result['step_tokens_per_s']} tok/s; peak memory {peak_mb:.0f} MiB ({peak_what})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
