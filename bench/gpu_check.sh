#!/usr/bin/env bash
# The GPU check, for one NVIDIA H100 / H200 (about 8 minutes; each part time-boxed so that (b) always runs):
#   (a) the default job with device=cuda: its metrics and wall time;
#   (b) a LLaMA-2-7B-shaped random model (32 layers, hidden 4096, FFN 11008, bf16) under ZeRO-3 with CPU offload:
#       Faster-VTrans and VTrans steps at 2048 tokens: tokens/s and peak GPU memory;
#   (c) decide + materialise of that shape: seconds, peak GPU and host memory;
#   (d) bench/speed.py on the trained SmolLM2 shapes (bench/configs/smollm2_trained): prefill, compiled decode.
# Writes bench/results/gpu_check.md (and the raw results beside it). Without CUDA it stops at once, saying so.
#
#   bash bench/gpu_check.sh                 # a connected GPU machine: installs what is missing with pip
#   bash bench/gpu_prep.sh && (carry .gpu)  # an offline one: wheels, the SmolLM2 GGUF and the text prepared here
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-bench/results}
RAW=${OUT:-$RESULTS}  # the device tool brings back what is written under $OUT
mkdir -p "$RESULTS" "$RAW"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export VTRANS_CACHE=${VTRANS_CACHE:-/tmp/vtrans-cache}
T0=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*"; }

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "bench/gpu_check.sh needs a CUDA GPU: torch.cuda.is_available() is False on this machine (nothing run)" >&2
    exit 2
fi

# --- what the image lacks, and the overrides for what .gpu/ carries (MODEL_ARGS, DATA_ARGS)
source bench/gpu_env.sh
"$PY" - <<'EOF' > "$RAW/gpu_env.txt" 2>&1
import torch, transformers
print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0),
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
log "environment: $(cat "$RAW/gpu_env.txt")"

# --- (b) and (c) first: they are the part the check exists for
log "(b) Faster-VTrans steps at 7B shape"
timeout 200 "$PY" bench/gpu_steps.py --part faster > "$RAW/gpu_b_faster.log" 2>&1; echo "rc=$?" >> "$RAW/gpu_b_faster.log"
log "(b) VTrans steps at 7B shape"
timeout 240 "$PY" bench/gpu_steps.py --part vtrans > "$RAW/gpu_b_vtrans.log" 2>&1; echo "rc=$?" >> "$RAW/gpu_b_vtrans.log"
log "(c) decide + materialise at 7B shape"
timeout 150 "$PY" bench/gpu_steps.py --part materialise > "$RAW/gpu_c.log" 2>&1; echo "rc=$?" >> "$RAW/gpu_c.log"

# --- (a) the default job on the GPU
log "(a) the default job, device=cuda"
START=$(date +%s)
timeout 180 "$PY" launch.py device=cuda progress=false hydra.run.dir=/tmp/gpu_default "${MODEL_ARGS[@]}" \
    "${DATA_ARGS[@]}" > "$RAW/gpu_a.log" 2>&1; echo "rc=$? wall_s=$(( $(date +%s) - START ))" >> "$RAW/gpu_a.log"
cp /tmp/gpu_default/metrics.json "$RAW/gpu_a_metrics.json" 2>/dev/null

# --- (d) speed of the trained SmolLM2 shapes
log "(d) bench/speed.py --from-config"
timeout 150 "$PY" bench/speed.py --from-config --dense bench/configs/smollm2_trained/dense \
    --pruned bench/configs/smollm2_trained/{vtrans-80,vtrans-80-m64,vtrans-50,vtrans-50-m64} \
    --out "$RAW/gpu_d_speed.md" > "$RAW/gpu_d.log" 2>&1; echo "rc=$?" >> "$RAW/gpu_d.log"

"$PY" bench/gpu_report.py "$RAW" > "$RESULTS/gpu_check.md"
[ "$RAW" != "$RESULTS" ] && cp "$RESULTS/gpu_check.md" "$RAW/"
log "done: $RESULTS/gpu_check.md"
cat "$RESULTS/gpu_check.md"
