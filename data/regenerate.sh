#!/usr/bin/env bash
# Regenerate data/testbed/ from its seed and check it against the shipped checksums.
#   bash data/regenerate.sh                       # rebuild into a temp dir, compare (sha256)
#   bash data/regenerate.sh --write               # rebuild and overwrite data/testbed/
#   bash data/regenerate.sh --write --from DIR    # ship an existing build (e.g. runs/main)
# data/testbed is the default build (`stable-rlhf build-data`, seed 0; the main job's
# data). The prompt splits are a pure function of the seed and match byte for byte
# anywhere. The preference data holds SmolLM2 samples: they match byte for byte on CPU
# with the same torch version and thread count (seen on our 2-core machines); float
# kernels differ across hardware, so a GPU rebuild samples other responses.
set -euo pipefail
cd "$(dirname "$0")/.."
write=0 from=""
while [ $# -gt 0 ]; do
  case "$1" in
    --write) write=1 ;;
    --from) from=$2; shift ;;
    *) echo "usage: bash data/regenerate.sh [--write] [--from DIR]" >&2; exit 2 ;;
  esac
  shift
done
files="prompts_train.jsonl prompts_eval.jsonl prompts_forget_pool.jsonl prompts_forget.jsonl
preferences_train.jsonl preferences_eval.jsonl sft_demos.jsonl samples_eval.jsonl labeler_stats.json"
if [ -z "$from" ]; then
  bash scripts/setup_env.sh
  export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  .venv/bin/stable-rlhf build-data out_dir="$tmp/build" seed=0
  from="$tmp/build"
fi
if [ "$write" = 1 ]; then
  mkdir -p data/testbed
  for f in $files; do cp "$from/$f" data/testbed/; done
  # the build's resolved config, minus the run directory it happened to use
  grep -v '^out_dir:' "$from/config.yaml" > data/testbed/build_config.yaml
  (cd data/testbed && sha256sum $files > SHA256SUMS)
  echo "wrote data/testbed/"
else
  (cd "$from" && sha256sum -c "$OLDPWD/data/testbed/SHA256SUMS")
fi
