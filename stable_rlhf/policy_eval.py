"""Periodic evaluation of a policy being trained (PPO, rejection sampling).

At each eval point the policy answers the held-out prompts (and the forgetting set, if
given) with a fixed seed; every answer gets the gold reward and the proxy score. The
SFT policy's answers to the same prompts, sampled once with the same seed and settings,
are the reference for win/lose/tie judged by the gold reward (a tie: equal gold). The
same seed at every eval point means the curves move with the policy, not with sampling
luck (common random numbers).

Reported per eval point (namespaced for the metrics log):
    eval/gold_norm        mean over tasks of the range-normalised gold reward
    eval/gold/<task>      raw gold mean per task;   eval/proxy, eval/proxy/<task>
    eval/win, lose, tie   against the SFT policy;   eval/tokens, eval/truncated, eval/leakage
    forget/win, ...       the same on the forgetting set (the paper's Figure 1b)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np
import torch

from .config import GenerationConfig, ModelConfig
from .io import atomic_write_jsonl, read_jsonl
from .rewards import RewardConfig
from .runs import RunSettings


@dataclasses.dataclass
class PolicyTrainerConfig(RunSettings):
    """What every policy trainer (``ppo``, ``rejection-sampling``) starts from: prompts, the
    initial policy and a score. Its fields come first in each trainer's config, after the
    ``RunSettings`` it extends."""

    prompts: str = "data/testbed/prompts_train.jsonl"
    """prompt records to train on (for the gold reward they need the testbed's task and meta)"""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """the initial (SFT) policy: the KL reference of PPO and the win/lose/tie reference of every eval"""
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    """the score: PPO optimises it (RM scores with running normalisation); rejection sampling keeps
    each prompt's best sample by it, used raw"""


@dataclasses.dataclass
class EvalConfig:
    """Evaluation during training."""

    prompts: str = "data/testbed/prompts_eval.jsonl"
    """held-out prompt records with a gold reward"""
    limit_per_task: Optional[int] = 10
    """evaluate the first N prompts of each task (None: all)"""
    forget_prompts: Optional[str] = "data/testbed/prompts_forget.jsonl"
    """prompts the SFT policy already answers well (None: skip the forgetting set)"""
    every: int = 10
    """evaluate every N steps (and before the first and after the last)"""
    seed: int = 1234
    """sampling seed, the same at every eval point"""
    generation: GenerationConfig = dataclasses.field(default_factory=lambda: GenerationConfig(max_new_tokens=64))
    """sampling settings for eval answers (the SFT reference uses the same)"""
    n_samples_logged: int = 12
    """answers written to the sample table at each eval point"""
    reference_dir: Optional[str] = None
    """a directory holding eval_reference_<set>.jsonl sampled from the same SFT policy with these
    settings (the ablation runner shares one across its arms): copied, not resampled"""

    def __post_init__(self):
        if self.every < 1:
            raise ValueError("eval.every must be >= 1")


def win_lose_tie(gold: list[float], ref_gold: list[float]) -> dict:
    """Fractions of prompts where the policy's gold beats, loses to or ties the reference."""
    g, r = np.asarray(gold, dtype=np.float64), np.asarray(ref_gold, dtype=np.float64)
    if len(g) != len(r) or not len(g):
        raise ValueError("win/lose/tie needs two equal, non-empty lists")
    close = np.isclose(g, r, rtol=0, atol=1e-9)
    return {"win": float(np.mean((g > r) & ~close)), "lose": float(np.mean((g < r) & ~close)),
            "tie": float(np.mean(close))}


def same_sampling(a: GenerationConfig, b: GenerationConfig) -> bool:
    """Whether two settings sample from the same distribution (batch size aside)."""
    return all(getattr(a, f) == getattr(b, f) for f in ("max_new_tokens", "temperature", "top_p", "system_prompt"))


class PolicyEvaluator:
    """Held-out (and forgetting-set) evaluation against the SFT policy's answers."""

    def __init__(self, cfg: EvalConfig, out_dir: Path, proxy: Callable | None, workers: int = 2):
        from .data import read_jsonl as read_records
        from .testbed.evaluate import limit_per_task
        from .testbed.tasks import gold_record_problem

        # every eval answer is scored by the gold reward: a prompt it cannot score stops us here
        self.cfg, self.out, self.proxy, self.workers = cfg, Path(out_dir), proxy, workers
        self.sets = {"eval": limit_per_task(read_records(cfg.prompts, "prompt", check=gold_record_problem),
                                            cfg.limit_per_task)}
        if cfg.forget_prompts:
            self.sets["forget"] = read_records(cfg.forget_prompts, "prompt", check=gold_record_problem)
        self.reference: dict[str, list[dict]] = {}
        self.probe: Optional[ObjectiveProbe] = None
        """the trainer's objective on the eval prompts (PPO's), measured at each eval point"""

    def _answer(self, model, tokenizer, records: list[dict], device):
        """The answers' rows, and the ``Generation`` they were decoded from."""
        from .generation import generate
        from .testbed.evaluate import score_samples

        gen = generate(model, tokenizer, [r["prompt"] for r in records], self.cfg.generation, n=1,
                       seed=self.cfg.seed, device=device, progress=False)
        rows = score_samples(records, gen, self.workers)
        if self.proxy is not None:
            proxy = self.proxy(records, [r["response"] for r in rows])
            for row, s in zip(rows, proxy.tolist()):
                row["proxy"] = float(s)
        return rows, gen

    def prepare_reference(self, sft_model, tokenizer, device) -> None:
        """The SFT policy's answers, sampled once (cached in the run directory for resume;
        ``sft_model`` None: they must be there already)."""
        for name, records in self.sets.items():
            path = self.out / f"eval_reference_{name}.jsonl"
            shared = Path(self.cfg.reference_dir, path.name) if self.cfg.reference_dir else None
            if not path.exists() and shared is not None and shared.exists():
                rows = read_jsonl(shared)
                if [r["prompt"] for r in rows] != [r["prompt"] for r in records]:
                    raise ValueError(f"{shared}: its prompts are not the {name} prompts of this run's eval settings")
                atomic_write_jsonl(path, rows)
            if path.exists():
                self.reference[name] = read_jsonl(path)
                if self.proxy is not None and any("proxy" not in r for r in self.reference[name]):
                    # a shared reference sampled without this run's proxy: score it once here
                    proxy = self.proxy(records, [r["response"] for r in self.reference[name]])
                    for row, s in zip(self.reference[name], proxy.tolist()):
                        row["proxy"] = float(s)
                    atomic_write_jsonl(path, self.reference[name])
            elif sft_model is None:
                raise FileNotFoundError(f"{path}: the SFT reference answers of this run are missing")
            else:
                self.reference[name] = self._answer(sft_model, tokenizer, records, device)[0]
                atomic_write_jsonl(path, self.reference[name])

    @torch.no_grad()
    def run(self, model, tokenizer, step: int, device, is_reference: bool = False) -> dict:
        """Evaluate; write the answers to samples/step-N.jsonl; return the namespaced stats.
        ``is_reference``: the model is still the SFT policy (step 0), whose answers with the
        same seed are the reference ones already sampled; they are reused, not resampled."""
        import copy

        from .testbed.evaluate import task_table

        stats: dict = {}
        for name, records in self.sets.items():
            if is_reference:
                rows, gen = copy.deepcopy(self.reference[name]), None
            else:
                rows, gen = self._answer(model, tokenizer, records, device)
            if self.probe is not None and name == "eval":
                # on these very answers when they were sampled as the trainer samples, else on its own
                if not same_sampling(self.probe.sampling, self.cfg.generation):
                    stats.update(self.probe(model, records, None))
                elif is_reference:
                    stats.update(self.probe(model, records, None, reference=rows))
                else:
                    stats.update(self.probe(model, records, gen))
            table = task_table(rows)
            ref = self.reference[name]
            wlt = win_lose_tie([r["gold"] for r in rows], [r["gold"] for r in ref])
            stats.update({f"{name}/{k}": v for k, v in wlt.items()})
            stats[f"{name}/gold_norm"] = table["all"]["gold_norm_mean"]
            stats[f"{name}/degenerate"] = table["all"]["degenerate_rate"]
            if name == "eval":
                stats["eval/tokens"] = table["all"]["tokens_mean"]
                stats["eval/truncated"] = float(np.mean([r["truncated"] for r in rows]))
                stats["eval/leakage"] = table["all"]["leakage_rate"]
                for task in sorted(t for t in table if t != "all"):
                    stats[f"eval/gold/{task}"] = table[task]["gold_mean"]
                    stats[f"eval/leakage/{task}"] = table[task]["leakage_rate"]
                    stats[f"eval/degenerate/{task}"] = table[task]["degenerate_rate"]
                if self.proxy is not None:
                    stats["eval/proxy"] = float(np.mean([r["proxy"] for r in rows]))
                    for task in sorted(t for t in table if t != "all"):
                        stats[f"eval/proxy/{task}"] = float(np.mean([r["proxy"] for r in rows if r["task"] == task]))
            for row, r in zip(rows, ref):
                row["sft_response"], row["sft_gold"] = r["response"], r["gold"]
            atomic_write_jsonl(self.out / "samples" / f"{name}-step{step:06d}.jsonl", rows)
        return stats

    def sample_table(self, step: int, limit: int | None = None) -> str:
        """A markdown table of the step's first eval answers next to the SFT policy's."""
        rows = read_jsonl(self.out / "samples" / f"eval-step{step:06d}.jsonl")[: limit or self.cfg.n_samples_logged]

        def cell(s: str) -> str:
            return s.replace("|", "\\|").replace("\n", "<br>")[:300]

        lines = ["| task | prompt | response | gold | SFT response | SFT gold |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['task']} | {cell(r['prompt'])} | {cell(r['response'])} | {r['gold']:.2f} | "
                  f"{cell(r['sft_response'])} | {r['sft_gold']:.2f} |" for r in rows]
        return "\n".join(lines)


def per_task_final(stats: dict) -> dict:
    """summary.json's per_task block from an eval point's stats."""
    tasks = sorted(k.split("/", 2)[2] for k in stats if k.startswith("eval/gold/"))
    return {t: {"gold_reward": stats[f"eval/gold/{t}"], "proxy_score": stats.get(f"eval/proxy/{t}")} for t in tasks}


def eval_point(evaluator: PolicyEvaluator | None, accelerator, log, model, tokenizer, step: int, tag: str,
               extra: dict | None = None) -> dict:
    """Evaluate on the main process (others wait), log the stats and the sample table, print
    a line; returns the stats ({} on other ranks). Step 0 reuses the SFT reference answers."""
    import time

    from .runs import tensorboard_writer

    stats: dict = {}
    if accelerator.is_main_process:
        t0 = time.time()
        stats = evaluator.run(model, tokenizer, step, accelerator.device, is_reference=step == 0)
        stats.update({"step": step, **(extra or {}), "time/eval": time.time() - t0})
        log(stats)
        writer = tensorboard_writer(accelerator)
        if writer is not None:
            writer.add_text("samples", evaluator.sample_table(step), step)
        print(f"[{tag}] step {step}: eval gold {stats['eval/gold_norm']:.4f}  win/lose/tie "
              f"{stats['eval/win']:.3f}/{stats['eval/lose']:.3f}/{stats['eval/tie']:.3f}"
              + (f"  proxy {stats['eval/proxy']:.4f}" if "eval/proxy" in stats else "")
              + (f"  objective {stats['eval/objective']:.3f} ± {stats['eval/objective_se'] or 0:.3f}"
                 if stats.get("eval/objective") is not None else ""))
    accelerator.wait_for_everyone()
    return stats


def final_metrics(stats: dict) -> dict:
    """summary.json's ``final`` block (without the trainer's own keys) from an eval point."""
    out = {"gold_reward": stats["eval/gold_norm"], "proxy_score": stats.get("eval/proxy"),
           "win": stats["eval/win"], "lose": stats["eval/lose"], "tie": stats["eval/tie"],
           "degenerate": stats["eval/degenerate"]}
    if "forget/win" in stats:
        out.update({"forget_win": stats["forget/win"], "forget_lose": stats["forget/lose"],
                    "forget_tie": stats["forget/tie"], "forget_gold": stats["forget/gold_norm"],
                    "forget_degenerate": stats["forget/degenerate"]})
    return out


class ObjectiveProbe(Protocol):
    """What a trainer optimises, measured on the eval prompts: ``probe(model, records, gen)``
    returns ``eval/objective...`` stats for answers sampled with ``sampling`` (``gen``: the
    evaluator's own answers when its settings equal ``sampling``; None: the probe samples).
    ``reference``: at step 0, when the settings are equal, the SFT reference answers' rows,
    which are the policy's own answers (it is still the SFT policy): nothing is sampled."""

    sampling: GenerationConfig

    def __call__(self, model, records: list[dict], gen, reference: list[dict] | None = None) -> dict: ...


class TrainingEval:
    """The eval side of a policy trainer (PPO, rejection sampling) on its ``Run``: the SFT
    reference answers, an eval point before the first step, every ``eval.every`` steps and
    after the last, and the run's end (the final policy, the last sample table, a closing
    line, summary.json). The main process evaluates; the others wait."""

    def __init__(self, run, cfg: EvalConfig, workers: int):
        self.run, self.every = run, cfg.every
        # Made before any model loads: it reads (and so validates) the eval and forgetting prompts.
        self.evaluator = PolicyEvaluator(cfg, run.out, proxy=None, workers=workers) if run.is_main else None
        self.last: dict = {}
        """the stats of the latest eval point ({} on the other ranks)"""
        self.last_step: int | None = None

    def prepare(self, sft_model, tokenizer, proxy: Callable | None) -> None:
        """The SFT reference answers, sampled from ``sft_model`` (None: saved by the run being
        resumed, read back) and scored by ``proxy`` besides the gold reward (None: gold only)."""
        if self.run.is_main:
            self.evaluator.proxy = proxy
            self.evaluator.prepare_reference(sft_model, tokenizer, self.run.device)
        self.run.accelerator.wait_for_everyone()

    def due(self, step: int, last_step: int) -> bool:
        return step % self.every == 0 or step == last_step

    def __call__(self, model, tokenizer, step: int, extra: dict | None = None) -> dict:
        """An eval point (see ``eval_point``); step 0 is the SFT policy's."""
        self.last = eval_point(self.evaluator, self.run.accelerator, self.run.log, model, tokenizer, step,
                               self.run.name, extra)
        self.last_step = step
        return self.last

    def final(self, model, tokenizer, step: int, extra: dict | None = None) -> None:
        """The last step's eval point, unless it had one (a resumed run with nothing left to do,
        or a last step skipped before its eval)."""
        if self.last_step != step:
            self(model, tokenizer, step, extra)

    def summary(self, head: dict, tail: dict, **final) -> dict:
        """summary.json: ``head``, the last eval point's ``final`` block (with ``final``) and
        ``per_task`` block, ``tail``, the run's seconds."""
        return {**head, "final": {**final_metrics(self.last), **final}, "per_task": per_task_final(self.last),
                **tail, "seconds": self.run.seconds()}

    def finish(self, model, tokenizer, step: int, summary: dict) -> dict:
        """The final policy in out_dir/model, the last sample table, a closing line and (last)
        summary.json; the trackers closed. Returns the summary ({} on the other ranks)."""
        from .io import atomic_write_text
        from .runs import save_policy

        if self.run.is_main:
            save_policy(model, tokenizer, self.run.out / "model")
            atomic_write_text(self.run.out / "samples_final.md", self.evaluator.sample_table(step))
            f = summary["final"]
            self.run.print(f"done: gold {f['gold_reward']:.4f}, " + (f"KL {f['kl']}, " if "kl" in f else "")
                           + f"win/lose/tie {f['win']:.3f}/{f['lose']:.3f}/{f['tie']:.3f} -> {self.run.out}")
        return self.run.finish(summary)
