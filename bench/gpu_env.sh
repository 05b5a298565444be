# Sourced by bench/gpu_check.sh and bench/gpu_recovery.sh, in the repository root with PY set: installs what a GPU
# image lacks (offline: the wheels bench/gpu_prep.sh put in .gpu/wheels) and sets MODEL_ARGS / DATA_ARGS, the
# overrides that point launch.py and bench/quality.py at what .gpu/ carries (the SmolLM2 GGUF, the Lee corpus, the
# cross-domain sets as this project's packages give them).
if ! "$PY" -c 'import hydra, omegaconf, deepspeed, gguf' 2>/dev/null; then
    if [ -d .gpu/wheels ]; then
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
    else
        DS_BUILD_OPS=0 "$PY" -m pip install -q hydra-core omegaconf deepspeed gguf
    fi
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
MODEL_ARGS=()
if [ -f .gpu/parts/part-aa ]; then  # the SmolLM2 GGUF, carried in parts
    cat .gpu/parts/part-* > /tmp/smollm2.gguf
    MODEL_ARGS=(model.package= model.name_or_path=/tmp model.gguf_file=smollm2.gguf)
fi
DATA_ARGS=()
[ -f .gpu/lee_background.txt ] && DATA_ARGS=(data.source=$PWD/.gpu/lee_background.txt)
if [ -d .gpu/domains/vtrans_domains ]; then
    # every cross-domain set as one file per document (read back as package:vtrans_domains/<name>/*.txt: the same
    # documents in the same order, whatever gensim, scikit-learn and Python the GPU image has)
    export PYTHONPATH=$PWD/.gpu/domains:$PYTHONPATH
    for d in .gpu/domains/vtrans_domains/*/; do
        DATA_ARGS+=("eval.domains.$(basename "$d")=package:vtrans_domains/$(basename "$d")/*.txt")
    done
elif ! "$PY" -c 'import gensim, sklearn' 2>/dev/null; then
    # the default job's cross-domain sets come from gensim, Python's docs and scikit-learn: without those packages
    # the job evaluates the held-out split only (said in the report's log)
    DATA_ARGS+=(eval=none)
    echo "gensim / scikit-learn missing and no .gpu/domains: the jobs run with eval=none (no cross-domain sets)"
fi
