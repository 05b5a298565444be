#!/usr/bin/env bash
# Installs vtrans (scripts/setup.sh) and runs the tests. With no arguments: the default fast tier
# (tiny models and the real small models on CPU). Any arguments go to pytest, e.g. -m slow.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# one OpenMP thread per test process: tiny-model tests run 10x+ slower with two threads on a busy 2-core machine
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ $# -eq 0 ]; then
  set -- -m "not slow and not distributed and not slurm"
fi
exec .venv/bin/python -m pytest -q "$@"
