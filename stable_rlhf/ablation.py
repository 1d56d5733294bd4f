"""``stable-rlhf ablation``: the paper's ablation, every arm over seeds, in one command.

Shared stages run once under ``out_dir/shared/`` and every arm reuses them:

    prompt_pool.jsonl    the PPO prompts (``prompts``, first ``prompts_per_task`` of each task)
    rm/, am/             the reward and advantage models (train-rm, train-am; with ``am_from_rm``
                         the AM starts from the trained RM)
    rm-pertask/          the per-task-normalised RM's held-out scores (Table 1; its PPO score is
                         the RM z-scored per task with the RM's training statistics)
    eval_reference/      the SFT policy's answers to the eval and forgetting prompts, the
                         reference of every arm's win/lose/tie
    select-<strategy>/   the Selective Rehearsal split of the pool; the clustered selector samples
                         and scores (AM), the ablation selectors reuse its samples

Arms (``out_dir/arms/<name>/seed<N>/``) are named in the config; each is one of

    sft                  the SFT policy itself, answering the eval prompts with another sampling
                         seed: the win/lose/tie a policy equal to SFT gets by sampling luck alone
    ppo                  PPO on ``score`` (gold | rm | am | rm-pertask), optionally with the PTX
                         mix (``ptx``) or rehearsal on a selector's D_R (``rehearsal``: the arm's
                         PPO prompts are then that selector's D_PPO)
    rejection-sampling   best-of-n fine-tuning on ``score``

A stage or run with a summary.json is finished and skipped; an interrupted trainer run
resumes from its checkpoint, so running the command again continues where it stopped.
``ablation.json`` indexes the runs for ``analysis/ablation_report.py``, which builds the
report from the run directories alone.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .config import ConfigError, ModelConfig, build_config, save_config, to_dict, yaml_load
from .io import atomic_write_json, atomic_write_jsonl, read_jsonl
from .policy_eval import EvalConfig, final_metrics, per_task_final
from .ppo import NLLMixConfig, PPOConfig
from .rejection_sampling import RejectionSamplingConfig
from .reward_model import ScoreTrainConfig
from .rewards import RewardConfig
from .selection import STRATEGIES, SelectConfig

SCORES = ("gold", "rm", "am", "rm-pertask")


@dataclasses.dataclass
class ArmConfig:
    """One arm of the ablation."""

    kind: Literal["sft", "ppo", "rejection-sampling"] = "ppo"
    """sft (the SFT policy, resampled), ppo or rejection-sampling"""
    score: Literal["gold", "rm", "am", "rm-pertask"] = "am"
    """the score the trainer optimises (the shared RM / AM)"""
    rehearsal: Literal["none", "clustered", "random", "global_topk"] = "none"
    """PPO only: rehearse the D_R of this selector (γ_R = ppo.rehearsal.coef) and train on its D_PPO"""
    ptx: bool = False
    """PPO only: mix the ``ptx`` section's NLL term into the updates (PPO-ptx)"""
    label: Optional[str] = None
    """name in the report (default: the arm's key)"""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """trainer settings of this arm only, as a nested mapping over the ppo / rejection_sampling section"""

    def __post_init__(self):
        if self.kind != "ppo" and (self.rehearsal != "none" or self.ptx):
            raise ValueError(f"rehearsal and ptx are PPO options; this arm is kind={self.kind}")
        if self.kind == "sft" and self.overrides:
            raise ValueError("the sft arm trains nothing: overrides do not apply")


def default_arms() -> dict[str, ArmConfig]:
    """The paper's ablation (shared/DESIGN.md), plus rejection sampling and the gold oracle."""
    return {
        "sft": ArmConfig(kind="sft", label="SFT"),
        "rejection-sampling": ArmConfig(kind="rejection-sampling", score="rm", label="RS (RM)"),
        "rm-ppo": ArmConfig(score="rm", label="RM-PPO"),
        "rm-ppo-ptx": ArmConfig(score="rm", ptx=True, label="RM-PPO-ptx"),
        "rm-pertask-ppo": ArmConfig(score="rm-pertask", label="per-task RM-PPO"),
        "am-ppo": ArmConfig(score="am", label="AM-PPO"),
        "am-ppo-sr": ArmConfig(score="am", rehearsal="clustered", label="AM-PPO-SR"),
        "am-ppo-random-rehearsal": ArmConfig(score="am", rehearsal="random", label="AM-PPO random rehearsal"),
        "gold-ppo": ArmConfig(score="gold", label="gold-PPO (oracle)"),
    }


@dataclasses.dataclass
class AblationConfig:
    """``stable-rlhf ablation``: shared score models and selection, then every arm over seeds."""

    out_dir: str = "runs/ablation"
    """directory of the whole ablation (shared/, arms/, ablation.json, report)"""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    """policy seeds: every arm runs once per seed"""
    arms: dict[str, ArmConfig] = dataclasses.field(default_factory=default_arms)
    """the arms by name: the paper's set by default; entries given in a config update an arm of
    that name (``arms.am-ppo.overrides.lr=1e-5``) or add one"""
    run_arms: Optional[list[str]] = None
    """run only these arms, in this order (None: all, in config order)"""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """the SFT policy every arm starts from (and the sampler of the selector)"""
    prompts: str = "data/testbed/prompts_train.jsonl"
    """PPO / rejection-sampling prompt records"""
    prompts_per_task: Optional[int] = None
    """use the first N prompts of each task as the pool (None: all)"""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    """evaluation of every arm (the same prompts, seed and settings, one shared SFT reference)"""
    score: ScoreTrainConfig = dataclasses.field(default_factory=ScoreTrainConfig)
    """RM / AM training (objective and out_dir are set per model)"""
    score_seed: int = 0
    """seed of the shared RM and AM"""
    am_from_rm: bool = True
    """initialise the AM from the trained RM (on the testbed a from-scratch AM did not learn to rank)"""
    select: SelectConfig = dataclasses.field(default_factory=SelectConfig)
    """Selective Rehearsal's selector (prompts, model, score and strategy are set by the runner)"""
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    """PPO settings shared by the PPO arms (prompts, model, reward, eval, seed and out_dir are set
    per arm; ptx and rehearsal.data too)"""
    ptx: NLLMixConfig = dataclasses.field(
        default_factory=lambda: NLLMixConfig(data="data/testbed/sft_demos.jsonl", coef=0.01))
    """the PTX term of arms with ptx: true"""
    rejection_sampling: RejectionSamplingConfig = dataclasses.field(default_factory=RejectionSamplingConfig)
    """rejection-sampling settings shared by its arms"""

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        unknown = [a for a in self.run_arms or [] if a not in self.arms]
        if unknown:
            raise ValueError(f"run_arms names unknown arm(s) {unknown} (known: {', '.join(self.arms)})")
        if self.prompts_per_task is not None and self.prompts_per_task < 1:
            raise ValueError("prompts_per_task must be >= 1 (or null for all)")
        for name in self.arms:
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"arm name {name!r}: use letters, digits, '-' and '_' (it names a directory)")

    def selected_arms(self) -> dict[str, ArmConfig]:
        names = self.run_arms if self.run_arms is not None else list(self.arms)
        return {n: self.arms[n] for n in names}


# --------------------------------------------------------------------------- plan


def needs(arms: dict[str, ArmConfig], am_from_rm: bool) -> dict[str, bool]:
    """Which shared stages the arms need."""
    scores = {a.score for a in arms.values() if a.kind != "sft"}
    strategies = {a.rehearsal for a in arms.values() if a.rehearsal != "none"}
    am = "am" in scores or bool(strategies)
    rm = bool(scores & {"rm", "rm-pertask"}) or (am and am_from_rm)
    return {"rm": rm, "am": am, "select": bool(strategies)}


def config_drift(saved: dict, planned: dict, prefix: str = "", ignore: tuple[str, ...] = ("resume",)) -> list[str]:
    """Dotted keys whose values differ between a saved config and the planned one."""
    keys = []
    for key in sorted(set(saved) | set(planned)):
        if key in ignore:
            continue
        a, b = saved.get(key), planned.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_drift(a, b, f"{prefix}{key}.", ignore)
        elif a != b and not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)):
            keys.append(prefix + key)
    return keys


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` updated by ``extra``, nested mappings merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class Ablation:
    """The runner: paths of the shared stages and arm runs, and how each is built."""

    def __init__(self, cfg: AblationConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.shared = self.out / "shared"
        self.arms = cfg.selected_arms()
        self.need = needs(self.arms, cfg.am_from_rm)
        self.timings_path = self.out / "timings.json"

    # Paths ---------------------------------------------------------------------------
    def score_dir(self, kind: str) -> Path:
        return self.shared / kind

    def score_path(self, score: str) -> Optional[str]:
        """reward.path of a score source (rm-pertask is the RM z-scored per task)."""
        return None if score == "gold" else str(self.score_dir("rm" if score == "rm-pertask" else score) / "model")

    def select_dir(self, strategy: str) -> Path:
        return self.shared / f"select-{strategy}"

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.out / "arms" / arm / f"seed{seed}"

    @property
    def pool(self) -> Path:
        return self.shared / "prompt_pool.jsonl"

    @property
    def reference_dir(self) -> Path:
        return self.shared / "eval_reference"

    # Configs -------------------------------------------------------------------------
    def eval_config(self, seed_offset: int | None = None) -> dict:
        ev = to_dict(self.cfg.eval)
        ev["reference_dir"] = str(self.reference_dir)
        if seed_offset is not None:
            ev["seed"] = self.cfg.eval.seed + seed_offset
        return ev

    def score_config(self, objective: str) -> ScoreTrainConfig:
        data = deep_merge(to_dict(self.cfg.score), {
            "objective": objective, "seed": self.cfg.score_seed, "out_dir": str(self.score_dir(objective)),
            "resume": (self.score_dir(objective) / "checkpoint").is_dir()})
        if objective == "am" and self.cfg.am_from_rm:
            data["init_from"] = str(self.score_dir("rm") / "model")
        return build_config(ScoreTrainConfig, data, "score.")

    def select_config(self, strategy: str) -> SelectConfig:
        data = deep_merge(to_dict(self.cfg.select), {
            "prompts": str(self.pool), "limit_per_task": None, "out_dir": str(self.select_dir(strategy)),
            "strategy": strategy, "model": to_dict(self.cfg.model),
            "reward": {"source": "am", "path": self.score_path("am")}})
        if strategy != "clustered":
            data["reuse_samples"] = str(self.select_dir("clustered"))
        return build_config(SelectConfig, data, "select.")

    def trainer_config(self, name: str, arm: ArmConfig, seed: int):
        run_dir = self.run_dir(name, seed)
        common = {"model": to_dict(self.cfg.model), "eval": self.eval_config(), "seed": seed,
                  "out_dir": str(run_dir), "prompts": str(self.pool),
                  "reward": {"source": arm.score, "path": self.score_path(arm.score)},
                  "resume": (run_dir / "checkpoints").is_dir()}
        if arm.kind == "rejection-sampling":
            data = deep_merge(deep_merge(to_dict(self.cfg.rejection_sampling), common), arm.overrides)
            return build_config(RejectionSamplingConfig, data, f"arms.{name}: ")
        data = deep_merge(to_dict(self.cfg.ppo), common)
        data["ptx"] = to_dict(self.cfg.ptx) if arm.ptx else {**data["ptx"], "data": None}
        if arm.rehearsal != "none":
            sel = self.select_dir(arm.rehearsal)
            data["prompts"] = str(sel / "ppo_prompts.jsonl")
            data["rehearsal"] = {**data["rehearsal"], "data": str(sel / "rehearsal.jsonl")}
        else:
            data["rehearsal"] = {**data["rehearsal"], "data": None}
        return build_config(PPOConfig, deep_merge(data, arm.overrides), f"arms.{name}: ")

    # Stages --------------------------------------------------------------------------
    def _timed(self, key: str, fn) -> Any:
        t0 = time.time()
        result = fn()
        timings = json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}
        timings[key] = round(time.time() - t0, 1)
        atomic_write_json(self.timings_path, timings)
        return result

    def check(self) -> None:
        """Every file a run reads is validated before any model loads (``check_finished`` then
        builds, and so validates, every stage's and arm's config)."""
        from .data import load_records
        from .rewards import check_reward_inputs

        records = load_records(self.cfg.prompts, "prompt")
        check_reward_inputs(RewardConfig(source="gold"), records, self.cfg.prompts)  # eval is by gold
        load_records(self.cfg.eval.prompts, "prompt")
        if self.cfg.eval.forget_prompts:
            load_records(self.cfg.eval.forget_prompts, "prompt")
        if self.need["rm"] or self.need["am"]:
            load_records(self.cfg.score.train_data, self.cfg.score.data_kind)
            load_records(self.cfg.score.eval_data, self.cfg.score.data_kind)
        if any(a.ptx for a in self.arms.values()):
            if not self.cfg.ptx.data:
                raise ConfigError("ptx.data: an arm has ptx: true but ptx.data is not set")
            load_records(self.cfg.ptx.data, "sft")

    def check_finished(self) -> None:
        """A finished stage or run is reused only if it was made with the settings it would be
        made with now: an edited config must not mix old results into the report silently."""
        planned: list[tuple[Path, Any]] = []
        for objective in ("rm", "am"):
            if self.need[objective]:
                planned.append((self.score_dir(objective), self.score_config(objective)))
        unused = {self.score_dir("rm"): ("resume", "am")}  # the RM does not read the AM's loss terms
        if self.need["select"]:
            for strategy in {"clustered"} | {a.rehearsal for a in self.arms.values()} - {"none"}:
                planned.append((self.select_dir(strategy), self.select_config(strategy)))
        for name, arm in self.arms.items():
            for seed in self.cfg.seeds:
                cfg = (build_config(EvalConfig, self.eval_config(seed_offset=1 + seed), "eval.") if arm.kind == "sft"
                       else self.trainer_config(name, arm, seed))
                planned.append((self.run_dir(name, seed), cfg))
        for run_dir, cfg in planned:
            done = (run_dir / "summary.json").exists() or (run_dir / "selection_report.json").exists()
            if done and (run_dir / "config.yaml").exists():
                as_saved = yaml_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))  # tuples become lists
                diff = config_drift(yaml_load((run_dir / "config.yaml").read_text()), as_saved,
                                    ignore=unused.get(run_dir, ("resume",)))
                if diff:
                    raise ConfigError(f"{run_dir} was made with other settings ({', '.join(diff[:5])} differ): "
                                      "use another out_dir, or delete that run to redo it")

    def write_pool(self) -> list[dict]:
        from .data import load_records
        from .testbed.evaluate import limit_per_task

        records = limit_per_task(load_records(self.cfg.prompts, "prompt"), self.cfg.prompts_per_task)
        if not self.pool.exists() or read_jsonl(self.pool) != records:
            atomic_write_jsonl(self.pool, records)
        return records

    def score_models(self) -> None:
        from .reward_model import per_task_normalised_run, train

        for objective in ("rm", "am"):
            if self.need[objective] and not (self.score_dir(objective) / "summary.json").exists():
                print(f"[ablation] shared: train-{objective} -> {self.score_dir(objective)}")
                self._timed(f"shared/{objective}", lambda: train(self.score_config(objective)))
        if self.need["rm"] and not (self.score_dir("rm-pertask") / "summary.json").exists():
            per_task_normalised_run(self.score_dir("rm"), self.score_dir("rm-pertask"))

    def eval_reference(self) -> None:
        from .models import default_device, free_memory, load_policy
        from .policy_eval import PolicyEvaluator

        evaluator = PolicyEvaluator(self.cfg.eval, self.reference_dir, proxy=None)
        if all((self.reference_dir / f"eval_reference_{s}.jsonl").exists() for s in evaluator.sets):
            return
        print(f"[ablation] shared: the SFT policy's eval answers -> {self.reference_dir}")

        def sample():
            device = default_device()
            model, tokenizer = load_policy(self.cfg.model, device=device)
            evaluator.prepare_reference(model, tokenizer, device)
            del model
            free_memory()

        self._timed("shared/eval_reference", sample)

    def selection(self) -> None:
        from .selection import train

        strategies = ["clustered"] + sorted({a.rehearsal for a in self.arms.values()} - {"none", "clustered"})
        for strategy in strategies:
            if not (self.select_dir(strategy) / "selection_report.json").exists():
                print(f"[ablation] shared: select ({strategy}) -> {self.select_dir(strategy)}")
                self._timed(f"shared/select-{strategy}", lambda: train(self.select_config(strategy)))

    def sft_arm(self, name: str, seed: int) -> dict:
        """The SFT policy with sampling seed eval.seed + 1 + seed against the reference answers."""
        from .models import default_device, free_memory, load_policy
        from .policy_eval import PolicyEvaluator

        run_dir = self.run_dir(name, seed)
        run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        ev = build_config(EvalConfig, self.eval_config(seed_offset=1 + seed), "eval.")
        evaluator = PolicyEvaluator(ev, run_dir, proxy=None)
        evaluator.prepare_reference(None, None, None)
        device = default_device()
        model, tokenizer = load_policy(self.cfg.model, device=device)
        stats = {"step": 0, **evaluator.run(model, tokenizer, 0, device)}
        del model
        free_memory()
        save_config(ev, run_dir / "config.yaml")
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        atomic_write_jsonl(run_dir / "metrics.jsonl", [stats])
        summary = {"steps": 0, "reward": None, "final": {**final_metrics(stats), "kl": 0.0},
                   "per_task": per_task_final(stats), "sampling_seed": ev.seed, "seconds": time.time() - t0}
        atomic_write_json(run_dir / "summary.json", summary)
        return summary

    def run_arm(self, name: str, arm: ArmConfig, seed: int) -> None:
        run_dir = self.run_dir(name, seed)
        if (run_dir / "summary.json").exists():
            print(f"[ablation] {name} seed {seed}: finished, skipped")
            return
        print(f"[ablation] {name} seed {seed} -> {run_dir}")
        if arm.kind == "sft":
            self._timed(f"arms/{name}/seed{seed}", lambda: self.sft_arm(name, seed))
            return
        from . import ppo, rejection_sampling

        trainer = ppo if arm.kind == "ppo" else rejection_sampling
        cfg = self.trainer_config(name, arm, seed)
        self._timed(f"arms/{name}/seed{seed}", lambda: trainer.train(cfg))

    def index(self) -> dict:
        return {
            "seeds": self.cfg.seeds,
            "arms": {name: {"label": arm.label or name, "kind": arm.kind,
                            "score": None if arm.kind == "sft" else arm.score, "rehearsal": arm.rehearsal,
                            "ptx": arm.ptx, "runs": {str(s): str(self.run_dir(name, s).relative_to(self.out))
                                                     for s in self.cfg.seeds}}
                     for name, arm in self.arms.items()},
            "shared": {k: str(p.relative_to(self.out)) for k, p in (
                ("rm", self.score_dir("rm")), ("am", self.score_dir("am")),
                ("rm-pertask", self.score_dir("rm-pertask")), ("eval_reference", self.reference_dir),
                *((f"select-{s}", self.select_dir(s)) for s in STRATEGIES))
                if (p / "summary.json").exists() or (p / "selection_report.json").exists()
                or k == "eval_reference"},
        }


def run(cfg: AblationConfig) -> dict:
    """Shared stages, then every arm over seeds; writes ablation.json; returns it."""
    runner = Ablation(cfg)
    runner.out.mkdir(parents=True, exist_ok=True)
    runner.check()
    runner.check_finished()
    save_config(cfg, runner.out / "config.yaml")
    print(f"[ablation] arms {', '.join(runner.arms)}; seeds {cfg.seeds}; shared stages: "
          + ", ".join(k for k, v in runner.need.items() if v) + " -> " + str(runner.out))
    pool = runner.write_pool()
    print(f"[ablation] prompt pool: {len(pool)} prompts")
    runner.score_models()
    runner.eval_reference()
    if runner.need["select"]:
        runner.selection()
    for seed in cfg.seeds:
        for name, arm in runner.arms.items():
            runner.run_arm(name, arm, seed)
    index = runner.index()
    atomic_write_json(runner.out / "ablation.json", index)
    print(f"[ablation] done -> {runner.out}/ablation.json; report: python -m analysis.ablation_report {runner.out}")
    return index


def train(cfg: AblationConfig) -> dict:
    """The stage entry point (named like every stage's)."""
    return run(cfg)
