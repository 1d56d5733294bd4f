"""``stable-rlhf ablation``: the paper's ablation, every arm over seeds, in one command.

Shared stages run once under ``out_dir/shared/`` and every arm reuses them:

    prompt_pool.jsonl    the PPO prompts (``prompts``, first ``prompts_per_task`` of each task)
    rm/, am/             the reward and advantage models (train-rm, train-am, from the same starting
                         point; with ``am_from_rm`` the AM starts from the trained RM)
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
    dpo                  DPO (``dpo`` section) on the comparisons the RM and AM train on (``score.train_data``
                         / ``eval_data``), from the same SFT policy, in ``<arm>/seed<N>/train/``; then the
                         trained policy evaluated like every arm's final eval point (``final_eval``), with
                         ``score``'s model as the proxy (gold: none)

A PPO arm's ``estimator`` (gae | rloo | grpo) sets ``ppo.advantage.estimator``: rloo and grpo are
the critic-free estimators (each prompt sampled ``advantage.group_size`` times; no value model).

``build_plan(cfg)`` turns the config into a ``Plan``: the stages in the order they run, each
with its name (``shared/rm``, ``arms/am-ppo/seed0``: its directory under out_dir), its built and
validated config, the stages it reads and the files that mark it finished. It trains nothing and
loads no model. ``execute(plan)`` validates every input file and every finished stage's saved
config, then runs the stages: a finished one (its summary.json) is skipped, one made with other
settings is refused, an interrupted trainer run resumes from its checkpoint, so running the
command again continues where it stopped. ``ablation.json`` indexes the runs for
``analysis/ablation_report.py``, which builds the report from the run directories alone.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .config import ConfigError, ModelConfig, build_config, save_config, to_dict, yaml_load
from .dpo import DPOConfig
from .final_eval import FinalEvalConfig
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

    kind: Literal["sft", "ppo", "rejection-sampling", "dpo"] = "ppo"
    """sft (the SFT policy, resampled), ppo, rejection-sampling or dpo"""
    score: Literal["gold", "rm", "am", "rm-pertask"] = "am"
    """the score the trainer optimises (the shared RM / AM); dpo optimises none: its eval proxy"""
    estimator: Literal["gae", "rloo", "grpo"] = "gae"
    """PPO only: ppo.advantage.estimator, gae (PPO with a value model) or the critic-free rloo / grpo
    (each prompt sampled ppo.advantage.group_size times, which must divide ppo.batch_size)"""
    rehearsal: Literal["none", "clustered", "random", "global_topk"] = "none"
    """PPO only: rehearse the D_R of this selector (γ_R = ppo.rehearsal.coef) and train on its D_PPO"""
    ptx: bool = False
    """PPO only: mix the ``ptx`` section's NLL term into the updates (PPO-ptx)"""
    label: Optional[str] = None
    """name in the report (default: the arm's key)"""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """trainer settings of this arm only, as a nested mapping over the ppo / rejection_sampling / dpo section"""

    def __post_init__(self):
        if self.kind != "ppo" and (self.rehearsal != "none" or self.ptx):
            raise ValueError(f"rehearsal and ptx are PPO options; this arm is kind={self.kind}")
        if self.kind != "ppo" and self.estimator != "gae":
            raise ValueError(f"estimator is a PPO option (rloo and grpo are PPO estimators); "
                             f"this arm is kind={self.kind}")
        if "estimator" in self.overrides.get("advantage", {}):
            raise ValueError("set an arm's advantage estimator with its estimator field, not overrides")
        if self.kind == "sft" and self.overrides:
            raise ValueError("the sft arm trains nothing: overrides do not apply")


def default_arms() -> dict[str, ArmConfig]:
    """The paper's ablation (docs/methods.md), plus rejection sampling, the gold oracle, the
    critic-free RLOO and GRPO (GRPO with its KL as a loss term, as DeepSeekMath's) and DPO."""
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
        "rloo-rm": ArmConfig(score="rm", estimator="rloo", label="RLOO (RM)"),
        "grpo-rm": ArmConfig(score="rm", estimator="grpo", overrides={"advantage": {"kl": "loss"}}, label="GRPO (RM)"),
        "grpo-am": ArmConfig(score="am", estimator="grpo", overrides={"advantage": {"kl": "loss"}}, label="GRPO (AM)"),
        "dpo": ArmConfig(kind="dpo", score="rm", label="DPO"),
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
    am_from_rm: bool = False
    """initialise the AM from the trained RM instead of the RM's own starting point (with
    ``am.scale: free`` the AM learns to rank from scratch)"""
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
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    """DPO settings shared by the DPO arms (train_data, eval_data and data_kind are the score section's;
    model, seed and out_dir are set per arm)"""

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
        if self.ppo.advantage.estimator != "gae":
            raise ValueError("ppo.advantage.estimator: each arm names its estimator (arms.<name>.estimator: "
                             "gae | rloo | grpo); the ppo section's must stay gae")
        for name in self.arms:
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"arm name {name!r}: use letters, digits, '-' and '_' (it names a directory)")

    def selected_arms(self) -> dict[str, ArmConfig]:
        names = self.run_arms if self.run_arms is not None else list(self.arms)
        return {n: self.arms[n] for n in names}


# --------------------------------------------------------------------------- plan


# Settings that change how a run goes, not what it computes: a finished stage made with other
# values of these is still the same result.
NOT_RESULTS = ("resume", "keep_final_checkpoint", "log_with")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the ablation: what runs, with which config, on whose outputs, and where it writes."""

    name: str
    """``shared/rm``, ``arms/am-ppo/seed0``, ...: its directory under out_dir and its key in timings.json"""
    kind: str
    """pool | score | rm-pertask | reference | select | sft | ppo | rejection-sampling | dpo | final-eval"""
    out: Path
    """the directory it writes (the pool: its file)"""
    config: Any = None
    """the config it runs with, built and so validated (None: the pool and the per-task RM, which take
    their inputs from the ablation config and the RM stage)"""
    inputs: tuple[str, ...] = ()
    """the stages whose outputs it reads"""
    done: tuple[str, ...] = ()
    """files under ``out`` that are all there once it has finished (none: it runs every time)"""
    unread: tuple[str, ...] = NOT_RESULTS
    """config keys it does not read: a finished stage made with other values of these is still valid"""


@dataclasses.dataclass
class Plan:
    """The ablation as stages in the order they run; each shared stage appears once."""

    cfg: AblationConfig
    stages: list[Stage]

    def __post_init__(self):
        made: set[str] = set()
        for stage in self.stages:
            if stage.name in made:
                raise ValueError(f"stage {stage.name} is planned twice")
            missing = [name for name in stage.inputs if name not in made]
            if missing:
                raise ValueError(f"stage {stage.name} reads {missing}, which no earlier stage makes")
            made.add(stage.name)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def arms(self) -> dict[str, ArmConfig]:
        return self.cfg.selected_arms()

    def __getitem__(self, name: str) -> Stage:
        return {stage.name: stage for stage in self.stages}[name]


SCORE_STAGE: dict[str, Optional[str]] = {"gold": None, "rm": "shared/rm", "rm-pertask": "shared/rm", "am": "shared/am"}
"""The shared stage whose model a score reads (rm-pertask: the RM, z-scored per task by the trainer with
the RM's training statistics)."""
POOL, POOL_FILE, REFERENCE = "shared/prompt_pool", "shared/prompt_pool.jsonl", "shared/eval_reference"


def needs(arms: dict[str, ArmConfig], am_from_rm: bool) -> dict[str, bool]:
    """Which shared stages the arms need."""
    scores = {a.score for a in arms.values() if a.kind != "sft"}
    strategies = {a.rehearsal for a in arms.values() if a.rehearsal != "none"}
    am = "am" in scores or bool(strategies)
    rm = bool(scores & {"rm", "rm-pertask"}) or (am and am_from_rm)
    return {"rm": rm, "am": am, "select": bool(strategies)}


def config_drift(saved: dict, planned: dict, prefix: str = "", ignore: tuple[str, ...] = NOT_RESULTS) -> list[str]:
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


def arm_stage_name(arm: str, seed: int) -> str:
    return f"arms/{arm}/seed{seed}"


def model_path(cfg: AblationConfig, score: str) -> Optional[str]:
    """reward.path of a score source: the model its shared stage trains (None: the gold reward)."""
    stage = SCORE_STAGE[score]
    return None if stage is None else str(Path(cfg.out_dir) / stage / "model")


def eval_config(cfg: AblationConfig, seed_offset: int | None = None) -> dict:
    """Every run's eval settings, judged against the shared SFT reference answers."""
    ev = to_dict(cfg.eval)
    ev["reference_dir"] = str(Path(cfg.out_dir) / REFERENCE)
    if seed_offset is not None:
        ev["seed"] = cfg.eval.seed + seed_offset
    return ev


def score_stage(cfg: AblationConfig, objective: str) -> Stage:
    """The shared RM or AM (train-rm / train-am); with ``am_from_rm`` the AM starts from the RM."""
    name = f"shared/{objective}"
    out = Path(cfg.out_dir) / name
    data = deep_merge(to_dict(cfg.score), {"objective": objective, "seed": cfg.score_seed, "out_dir": str(out),
                                           "resume": False})  # the runner resumes an interrupted one
    inputs: tuple[str, ...] = ()
    if objective == "am" and cfg.am_from_rm:
        data["init_from"] = model_path(cfg, "rm")
        inputs = ("shared/rm",)
    unread = (*NOT_RESULTS, "am") if objective == "rm" else NOT_RESULTS  # the RM does not read the AM's loss terms
    return Stage(name, "score", out, build_config(ScoreTrainConfig, data, "score."), inputs, ("summary.json",),
                 unread)


def select_stage(cfg: AblationConfig, strategy: str) -> Stage:
    """Selective Rehearsal's split of the pool into D_R and D_PPO, scored with the shared AM."""
    name = f"shared/select-{strategy}"
    out = Path(cfg.out_dir) / name
    data = deep_merge(to_dict(cfg.select), {
        "prompts": str(Path(cfg.out_dir) / POOL_FILE), "limit_per_task": None,
        "out_dir": str(out), "strategy": strategy, "model": to_dict(cfg.model),
        "reward": {"source": "am", "path": model_path(cfg, "am")}})
    inputs: tuple[str, ...] = (POOL, "shared/am")
    if strategy != "clustered":  # the ablation selectors reuse the clustered selector's samples
        data["reuse_samples"] = str(Path(cfg.out_dir) / "shared" / "select-clustered")
        inputs += ("shared/select-clustered",)
    return Stage(name, "select", out, build_config(SelectConfig, data, "select."), inputs,
                 ("selection_report.json",))


def dpo_config(cfg: AblationConfig, name: str, arm: ArmConfig, seed: int) -> DPOConfig:
    """A DPO arm's trainer at one seed: the dpo section on the score models' comparisons, from the
    SFT policy, into the arm's train/ directory, then the arm's overrides."""
    score = cfg.score
    data = deep_merge(to_dict(cfg.dpo), {
        "model": to_dict(cfg.model), "seed": seed, "resume": False,
        "out_dir": str(Path(cfg.out_dir) / arm_stage_name(name, seed) / "train"),
        "train_data": score.train_data, "eval_data": score.eval_data, "data_kind": score.data_kind})
    return build_config(DPOConfig, deep_merge(data, arm.overrides), f"arms.{name}: ")


def final_eval_config(cfg: AblationConfig, name: str, arm: ArmConfig, seed: int) -> FinalEvalConfig:
    """The evaluation of a DPO arm's trained policy: the PPO arms' eval settings and seed, the SFT
    reference answers, ``score``'s model as the proxy with the ppo section's reward settings."""
    out = Path(cfg.out_dir) / arm_stage_name(name, seed)
    reward = deep_merge(to_dict(cfg.ppo.reward), {"source": arm.score, "path": model_path(cfg, arm.score)})
    return build_config(FinalEvalConfig, {"run_dir": str(out / "train"), "out_dir": str(out),
                                          "model": to_dict(cfg.model), "reward": reward, "eval": eval_config(cfg)},
                        f"arms.{name}: ")


def trainer_config(cfg: AblationConfig, name: str, arm: ArmConfig, seed: int):
    """The PPO or rejection-sampling config of one arm and seed: the shared sections, this arm's
    score, PPO prompts, ptx and rehearsal data and advantage estimator, then the arm's own overrides."""
    common = {"model": to_dict(cfg.model), "eval": eval_config(cfg), "seed": seed, "resume": False,
              "out_dir": str(Path(cfg.out_dir) / arm_stage_name(name, seed)),
              "prompts": str(Path(cfg.out_dir) / POOL_FILE),
              "reward": {"source": arm.score, "path": model_path(cfg, arm.score)}}
    if arm.kind == "rejection-sampling":
        data = deep_merge(deep_merge(to_dict(cfg.rejection_sampling), common), arm.overrides)
        return build_config(RejectionSamplingConfig, data, f"arms.{name}: ")
    if arm.ptx and not cfg.ptx.data:
        raise ConfigError(f"arms.{name}: ptx: true but ptx.data is not set")
    data = deep_merge(to_dict(cfg.ppo), common)
    data["ptx"] = to_dict(cfg.ptx) if arm.ptx else {**data["ptx"], "data": None}
    data["rehearsal"] = {**data["rehearsal"], "data": None}
    data["advantage"] = {**data["advantage"], "estimator": arm.estimator}
    if arm.rehearsal != "none":  # rehearse the selector's D_R, train on its D_PPO
        selection = Path(cfg.out_dir) / "shared" / f"select-{arm.rehearsal}"
        data["prompts"] = str(selection / "ppo_prompts.jsonl")
        data["rehearsal"]["data"] = str(selection / "rehearsal.jsonl")
    return build_config(PPOConfig, deep_merge(data, arm.overrides), f"arms.{name}: ")


def arm_stages(cfg: AblationConfig, name: str, arm: ArmConfig, seed: int) -> list[Stage]:
    """One arm at one seed; the sft arm resamples the SFT policy with eval seed + 1 + seed; a dpo arm
    is two stages, DPO (``<arm>/seed<N>/train``) and its evaluation (``<arm>/seed<N>``)."""
    stage = arm_stage_name(name, seed)
    out = Path(cfg.out_dir) / stage
    if arm.kind == "sft":
        config = build_config(EvalConfig, eval_config(cfg, seed_offset=1 + seed), "eval.")
        return [Stage(stage, "sft", out, config, (REFERENCE,), ("summary.json",))]
    if arm.kind == "dpo":
        inputs = tuple(i for i in (f"{stage}/train", SCORE_STAGE[arm.score], REFERENCE) if i is not None)
        return [Stage(f"{stage}/train", "dpo", out / "train", dpo_config(cfg, name, arm, seed), (), ("summary.json",)),
                Stage(stage, "final-eval", out, final_eval_config(cfg, name, arm, seed), inputs, ("summary.json",))]
    prompts = POOL if arm.rehearsal == "none" else f"shared/select-{arm.rehearsal}"
    inputs = tuple(i for i in (prompts, SCORE_STAGE[arm.score], REFERENCE) if i is not None)
    return [Stage(stage, arm.kind, out, trainer_config(cfg, name, arm, seed), inputs, ("summary.json",))]


def build_plan(cfg: AblationConfig) -> Plan:
    """The stages in the order they run: the prompt pool, the score models the arms need, the SFT
    reference answers and the selections, then every arm at the first seed, every arm at the next...
    Every config is built, and so validated, here; nothing is read, trained or loaded."""
    out = Path(cfg.out_dir)
    arms = cfg.selected_arms()
    need = needs(arms, cfg.am_from_rm)
    stages = [Stage(POOL, "pool", out / POOL_FILE)]
    stages += [score_stage(cfg, objective) for objective in ("rm", "am") if need[objective]]
    if need["rm"]:  # Table 1's per-task-normalised RM: the RM's held-out scores, z-scored per task
        stages.append(Stage("shared/rm-pertask", "rm-pertask", out / "shared" / "rm-pertask",
                            inputs=("shared/rm",), done=("summary.json",)))
    sets = ("eval", "forget") if cfg.eval.forget_prompts else ("eval",)
    stages.append(Stage(REFERENCE, "reference", out / REFERENCE, cfg.eval,
                        done=tuple(f"eval_reference_{s}.jsonl" for s in sets)))
    if need["select"]:
        strategies = sorted({a.rehearsal for a in arms.values()} - {"none", "clustered"})
        stages += [select_stage(cfg, strategy) for strategy in ("clustered", *strategies)]
    stages += [stage for seed in cfg.seeds for name, arm in arms.items() for stage in arm_stages(cfg, name, arm, seed)]
    return Plan(cfg, stages)


# --------------------------------------------------------------------------- runner


TRAINERS = {"score": "reward_model", "select": "selection", "ppo": "ppo", "rejection-sampling": "rejection_sampling",
            "dpo": "dpo", "final-eval": "final_eval"}
"""The module whose ``train(cfg)`` runs a stage of this kind."""
CHECKPOINTS = {"score": "checkpoint", "ppo": "checkpoints", "rejection-sampling": "checkpoints", "dpo": "checkpoints"}
"""Where a trainer keeps its checkpoints: a stage that has them was interrupted and resumes."""


def finished(stage: Stage) -> bool:
    return bool(stage.done) and all((stage.out / name).exists() for name in stage.done)


def check_inputs(plan: Plan) -> None:
    """Every data file a stage reads is validated before any stage runs (the configs were
    validated when the plan was built)."""
    from .data import load_records
    from .rewards import check_reward_inputs
    from .testbed.tasks import gold_record_problem

    cfg = plan.cfg
    records = load_records(cfg.prompts, "prompt")
    check_reward_inputs(RewardConfig(source="gold"), records, cfg.prompts)  # every arm is evaluated by gold
    load_records(cfg.eval.prompts, "prompt", check=gold_record_problem)
    if cfg.eval.forget_prompts:
        load_records(cfg.eval.forget_prompts, "prompt", check=gold_record_problem)
    files: list[tuple[str, str]] = []  # (path, record kind) of the trainers' data
    for stage in plan.stages:
        if stage.kind in ("score", "dpo"):  # the comparisons
            kind = stage.config.data_kind
            files += [(stage.config.train_data, kind), (stage.config.eval_data, kind)]
        elif stage.kind == "ppo" and stage.config.ptx.data:
            files.append((stage.config.ptx.data, "sft"))
    for path, kind in dict.fromkeys(files):  # each file once, in stage order
        load_records(path, kind)


def refuse_stale(plan: Plan) -> None:
    """A finished stage is reused only if it was made with the settings it would be made with now:
    an edited config must not mix old results into the report silently."""
    for stage in plan.stages:
        saved = stage.out / "config.yaml"
        if stage.config is None or not finished(stage) or not saved.exists():
            continue
        planned = yaml_load(yaml.safe_dump(to_dict(stage.config), sort_keys=False))  # tuples become lists
        diff = config_drift(yaml_load(saved.read_text()), planned, ignore=stage.unread)
        if diff:
            raise ConfigError(f"{stage.out} was made with other settings ({', '.join(diff[:5])} differ): "
                              "use another out_dir, or delete that run to redo it")


def write_pool(plan: Plan, stage: Stage) -> None:
    """The PPO prompts: the first ``prompts_per_task`` of each task (rewritten only when they changed)."""
    from .data import load_records
    from .testbed.evaluate import limit_per_task

    records = limit_per_task(load_records(plan.cfg.prompts, "prompt"), plan.cfg.prompts_per_task)
    if not stage.out.exists() or read_jsonl(stage.out) != records:
        atomic_write_jsonl(stage.out, records)
    print(f"[ablation] prompt pool: {len(records)} prompts")


def train_stage(plan: Plan, stage: Stage) -> None:
    """A trainer's ``train(cfg)``, resuming from the stage's checkpoint when it has one."""
    import importlib

    config = stage.config
    if stage.kind in CHECKPOINTS:
        config = dataclasses.replace(config, resume=(stage.out / CHECKPOINTS[stage.kind]).is_dir())
    importlib.import_module(f".{TRAINERS[stage.kind]}", __package__).train(config)


def per_task_rm(plan: Plan, stage: Stage) -> None:
    from .reward_model import per_task_normalised_run

    per_task_normalised_run(plan[stage.inputs[0]].out, stage.out)


def eval_reference(plan: Plan, stage: Stage) -> None:
    """The SFT policy's answers to the eval and forgetting prompts: every arm's win/lose/tie reference."""
    from .models import default_device, free_memory, load_policy
    from .policy_eval import PolicyEvaluator

    evaluator = PolicyEvaluator(stage.config, stage.out, proxy=None)
    device = default_device()
    model, tokenizer = load_policy(plan.cfg.model, device=device)
    evaluator.prepare_reference(model, tokenizer, device)
    del model
    free_memory()


def sft_arm(plan: Plan, stage: Stage) -> None:
    """The SFT policy, resampled with the stage's eval seed, against the reference answers."""
    from .models import default_device, free_memory, load_policy
    from .policy_eval import PolicyEvaluator

    stage.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ev = stage.config
    evaluator = PolicyEvaluator(ev, stage.out, proxy=None)
    evaluator.prepare_reference(None, None, None)
    device = default_device()
    model, tokenizer = load_policy(plan.cfg.model, device=device)
    stats = {"step": 0, **evaluator.run(model, tokenizer, 0, device)}
    del model
    free_memory()
    save_config(ev, stage.out / "config.yaml")
    (stage.out / "metrics.jsonl").unlink(missing_ok=True)
    atomic_write_jsonl(stage.out / "metrics.jsonl", [stats])
    summary = {"steps": 0, "reward": None, "final": {**final_metrics(stats), "kl": 0.0},
               "per_task": per_task_final(stats), "sampling_seed": ev.seed, "seconds": time.time() - t0}
    atomic_write_json(stage.out / "summary.json", summary)


RUNNERS = {"pool": write_pool, "score": train_stage, "rm-pertask": per_task_rm, "reference": eval_reference,
           "select": train_stage, "sft": sft_arm, "ppo": train_stage, "rejection-sampling": train_stage,
           "dpo": train_stage, "final-eval": train_stage}
"""How each kind of stage runs: ``runner(plan, stage)``."""


def record_timing(path: Path, name: str, seconds: float) -> None:
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[name] = round(seconds, 1)
    atomic_write_json(path, timings)


def run_stage(plan: Plan, stage: Stage) -> None:
    """One stage, unless it has finished; the seconds of every stage that ran go to timings.json."""
    if finished(stage):
        print(f"[ablation] {stage.name}: finished, skipped")
        return
    print(f"[ablation] {stage.name} -> {stage.out}")
    t0 = time.time()
    RUNNERS[stage.kind](plan, stage)
    if stage.done:  # the pool runs every time (it is rewritten only when it changed): no time worth keeping
        record_timing(plan.out / "timings.json", stage.name, time.time() - t0)


def ablation_index(plan: Plan) -> dict:
    """``ablation.json``: every arm's runs and the finished shared stages, as paths under out_dir
    (``analysis/ablation_report.py`` builds the report from these alone)."""
    shared = ("rm", "am", "rm-pertask", "eval_reference", *(f"select-{s}" for s in STRATEGIES))
    return {
        "seeds": plan.cfg.seeds,
        "arms": {name: {"label": arm.label or name, "kind": arm.kind,
                        "score": None if arm.kind == "sft" else arm.score, "rehearsal": arm.rehearsal,
                        "ptx": arm.ptx, "estimator": arm.estimator if arm.kind == "ppo" else None,
                        "runs": {str(s): arm_stage_name(name, s) for s in plan.cfg.seeds}}
                 for name, arm in plan.arms.items()},
        "shared": {key: f"shared/{key}" for key in shared
                   if key == "eval_reference" or any((plan.out / "shared" / key / marker).exists()
                                                     for marker in ("summary.json", "selection_report.json"))},
    }


def execute(plan: Plan) -> dict:
    """Validate every input and finished stage, then run the stages in order; writes ablation.json
    and returns it."""
    check_inputs(plan)
    refuse_stale(plan)
    plan.out.mkdir(parents=True, exist_ok=True)
    save_config(plan.cfg, plan.out / "config.yaml")
    shared = [s.name.removeprefix("shared/") for s in plan.stages if s.name.startswith("shared/")]
    print(f"[ablation] arms {', '.join(plan.arms)}; seeds {plan.cfg.seeds}; shared stages: {', '.join(shared)}"
          f" -> {plan.out}")
    for stage in plan.stages:
        run_stage(plan, stage)
    index = ablation_index(plan)
    atomic_write_json(plan.out / "ablation.json", index)
    print(f"[ablation] done -> {plan.out}/ablation.json; report: python -m analysis.ablation_report {plan.out}")
    return index


def run(cfg: AblationConfig) -> dict:
    """Plan the ablation, then run it: shared stages, then every arm over seeds."""
    return execute(build_plan(cfg))


def train(cfg: AblationConfig) -> dict:
    """The stage entry point (named like every stage's)."""
    return run(cfg)
