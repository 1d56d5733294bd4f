"""The ablation in one command: shared stages, every arm over seeds, then the report.

    python -m experiments.ablation --config experiments/ablation_cpu.yaml            # the main job (2-core CPU)
    python -m experiments.ablation --config experiments/ablation_gpu.yaml            # all arms, 3 seeds, one GPU
    python -m experiments.ablation --config experiments/ablation_cpu.yaml run_arms=[sft,am-ppo] seeds=[0,1]

``key=value`` overrides apply to the ablation config (``stable-rlhf ablation --help`` lists
its fields; arms are under ``arms.<name>``). Running it again skips every finished stage and
run, resumes interrupted ones, and rebuilds the report from the run directories
(``analysis/ablation_report.py``).
"""

from __future__ import annotations

import argparse
import sys

from stable_rlhf.ablation import AblationConfig, run
from stable_rlhf.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/ablation_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the ablation config")
    args = parser.parse_args(argv)
    from stable_rlhf.data import DataError

    try:
        cfg = load_config(AblationConfig, args.config, args.overrides)
        run(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from analysis.ablation_report import build_report

    path = build_report(cfg.out_dir)
    print(f"report: {path} (and report.html, plots/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
