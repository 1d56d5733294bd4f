"""``stable-rlhf``: one subcommand per stage.

    stable-rlhf <stage> [--config FILE.yaml] [key=value ...]
    stable-rlhf <stage> --help        # every config field with its type, default and help
    stable-rlhf <group> <command> [--flag ...]   # tools with flags of their own (testbed red-team)

Stage modules are imported lazily (torch is slow to import) from the registry below:
name -> (module, config class, run function, one-line description). Command groups
(``GROUPS``) map a command to a module's ``main(argv) -> exit code``, which parses its own flags.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

from .config import ConfigError, field_help, load_config

STAGES: dict[str, tuple[str, str, str, str]] = {
    "train-rm": (
        "stable_rlhf.reward_model",
        "ScoreTrainConfig",
        "train",
        "train a reward model on K-ranked comparisons (ranking loss)",
    ),
    "train-am": (
        "stable_rlhf.reward_model",
        "ScoreTrainConfig",
        "train",
        "train an advantage model (ranking loss + centring, bound and per-task moment terms)",
    ),
    "sft": (
        "stable_rlhf.sft",
        "SFTConfig",
        "train",
        "fine-tune a policy with NLL on demonstrations (prompt tokens masked)",
    ),
    "dpo": (
        "stable_rlhf.dpo",
        "DPOConfig",
        "train",
        "direct preference optimisation (DPO, cDPO or IPO) of a policy on comparisons, against the frozen initial policy",
    ),
    "ppo": (
        "stable_rlhf.ppo",
        "PPOConfig",
        "train",
        "PPO against a score (gold, RM, AM, per-task-normalised RM) with a KL penalty, ptx and rehearsal",
    ),
    "rejection-sampling": (
        "stable_rlhf.rejection_sampling",
        "RejectionSamplingConfig",
        "train",
        "iterated best-of-n: sample n per prompt, keep the best by score, NLL fine-tune on it (Llama 2 / RAFT)",
    ),
    "select": (
        "stable_rlhf.selection",
        "SelectConfig",
        "train",
        "selective rehearsal: embed + k-means the PPO prompts, rehearse each cluster's top-k by AM score",
    ),
    "make-prompts": (
        "stable_rlhf.testbed.build",
        "MakePromptsConfig",
        "make_prompts",
        "write the testbed prompt splits (train / eval / forget_pool) from a seed",
    ),
    "build-data": (
        "stable_rlhf.testbed.build",
        "BuildDataConfig",
        "build_data",
        "sample K responses per prompt from a policy, score them with the gold reward, simulate labels",
    ),
    "relabel-data": (
        "stable_rlhf.testbed.build",
        "RelabelDataConfig",
        "relabel_data",
        "rescore a build's samples with today's gold reward and redraw its labels (as a rebuild would, without sampling)",
    ),
    "evaluate": (
        "stable_rlhf.testbed.evaluate",
        "EvaluateConfig",
        "evaluate",
        "per-task gold reward, response length and style leakage of a policy",
    ),
    "ablation": (
        "stable_rlhf.ablation",
        "AblationConfig",
        "train",
        "the ablation: shared RM / AM and selection, then every arm (SFT, RS, RM-PPO, AM-PPO, AM-PPO-SR, ...) over seeds",
    ),
}

# Commands that are tools, not config-driven stages: group -> command -> (module, function,
# one-line description); the function takes the remaining arguments and returns the exit code.
GROUPS: dict[str, dict[str, tuple[str, str, str]]] = {
    "testbed": {
        "red-team": (
            "stable_rlhf.testbed.adversarial",
            "main",
            "score families of gamed answers with the gold reward; exit 1 if one beats the SFT answers",
        ),
    },
}


# Overrides a stage applies before the user's (train-am is the score trainer with objective=am).
PRESETS: dict[str, list[str]] = {"train-rm": ["objective=rm"], "train-am": ["objective=am"]}


def _resolve(stage: str) -> tuple[type, Callable]:
    module_name, cfg_name, fn_name, _ = STAGES[stage]
    module = importlib.import_module(module_name)
    return getattr(module, cfg_name), getattr(module, fn_name)


def _usage() -> str:
    lines = ["usage: stable-rlhf <stage> [--config FILE.yaml] [key=value ...]",
             "       stable-rlhf <group> <command> [--flag ...]", "", "stages:"]
    commands = [f"{group} {command}" for group, cmds in GROUPS.items() for command in cmds]
    width = max(len(s) for s in [*STAGES, *commands])
    for name, (*_, desc) in STAGES.items():
        lines.append(f"  {name:<{width}}  {desc}")
    lines += ["", "commands:"]
    for group, cmds in GROUPS.items():
        for command, (*_, desc) in cmds.items():
            lines.append(f"  {group + ' ' + command:<{width}}  {desc}")
    lines.append("")
    lines.append("`stable-rlhf <stage> --help` lists the stage's config fields; "
                 "`stable-rlhf <group> <command> --help` a command's flags.")
    return "\n".join(lines)


def _group_usage(group: str) -> str:
    lines = [f"usage: stable-rlhf {group} <command> [--flag ...]", "", "commands:"]
    lines += [f"  {command}  {desc}" for command, (*_, desc) in GROUPS[group].items()]
    return "\n".join(lines)


def run_group(group: str, argv: list[str]) -> int:
    """``stable-rlhf <group> <command> ...``: the command's own ``main`` parses the rest."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_group_usage(group))
        return 0
    if argv[0] not in GROUPS[group]:
        print(f"error: unknown {group} command {argv[0]!r}\n\n{_group_usage(group)}", file=sys.stderr)
        return 2
    module_name, fn_name, _ = GROUPS[group][argv[0]]
    return int(getattr(importlib.import_module(module_name), fn_name)(argv[1:]))


def _stage_help(stage: str, cfg_cls: type) -> str:
    lines = [f"usage: stable-rlhf {stage} [--config FILE.yaml] [key=value ...]", "", STAGES[stage][3], ""]
    for name, tp, default, doc in field_help(cfg_cls):
        lines.append(f"  {name} ({tp}, default {default!r})")
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[str, str | None, list[str], bool]:
    if not argv or argv[0] in ("-h", "--help"):
        return "", None, [], True
    stage, rest = argv[0], argv[1:]
    config_path, overrides, want_help = None, [], False
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("-h", "--help"):
            want_help = True
        elif arg in ("-c", "--config"):
            if i + 1 >= len(rest):
                raise ConfigError("--config needs a file")
            config_path = rest[i + 1]
            i += 1
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("--"):
            # `--resume` style flags are sugar for `resume=true`; `--key=value` for `key=value`.
            body = arg[2:]
            overrides.append(body if "=" in body else f"{body}=true")
        else:
            overrides.append(arg)
        i += 1
    return stage, config_path, overrides, want_help


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in GROUPS:
        return run_group(argv[0], argv[1:])
    try:
        stage, config_path, overrides, want_help = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not stage:
        print(_usage())
        return 0
    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    cfg_cls, run = _resolve(stage)
    if want_help:
        print(_stage_help(stage, cfg_cls))
        return 0
    try:
        cfg = load_config(cfg_cls, config_path, PRESETS.get(stage, []) + overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .data import DataError

    try:
        run(cfg)
    except (DataError, ConfigError) as e:
        # Bad input is reported before anything trains; no traceback for it.
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
