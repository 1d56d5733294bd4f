#!/usr/bin/env bash
# The two entry points of the README:
#   bash run.sh main [key=value ...]   the default experiment (the ablation's CPU preset), its report and plots
#   bash run.sh test [pytest args]     the test suite
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
venv=${STABLE_RLHF_VENV:-.venv}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
cmd=${1:-}
shift || true
case "$cmd" in
  main)
    run_dir=${RUN_DIR:-runs/main}
    exec "$venv/bin/python" -m experiments.ablation --config experiments/ablation_cpu.yaml out_dir="$run_dir" "$@" ;;
  test) exec "$venv/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: bash run.sh main|test [args]" >&2; exit 2 ;;
esac
