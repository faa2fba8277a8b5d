#!/usr/bin/env bash
# GPU check (≈ 7 minutes on one H100/H200): GPU-marked tests (FAISS GPU, mixed-precision training), training on
# the GPU (AMP vs fp32: seconds per epoch, and leave-one-section-out accuracy on her2st), extraction vs raw
# ViT-L/16 fp16 throughput at batch 256 (synthetic + her2st), FAISS GPU vs CPU on a 10^6 bank, and the cohort
# scale benchmark (25k spots, D = 1,024, the reference width). Results: $OUT/gpu_check.{json,md},
# $OUT/gpu_train.{json,md}, $OUT/scale/scale.json, $OUT/pytest_gpu.log, $OUT/gpu_check.log ($OUT defaults to
# ./gpu_results).
#
#   bash benchmarks/gpu_check.sh [HER2ST_DIR] [extra gpu_extract_speed.py flags...]
#
# HER2ST_DIR defaults to .gpu_data/her2st (an ignored folder: `mkdir -p .gpu_data && cp -r
# ../shared/data/her2st .gpu_data/` here, then carry ".gpu_data" to the device). Python packages the
# device image lacks (zarr, numcodecs, donfig, google-crc32c, anndata and its small dependencies, faiss) travel
# as wheels in .whl/ (carried); they are installed into /tmp/site first. Dry run on CPU:
# `DEVICE=cpu QUICK=1 TRAIN_WORK=benchmarks/work bash benchmarks/gpu_check.sh ../shared/data/her2st`
# (TRAIN_WORK: where gpu_train.py finds or builds the ResNet18 cache; default a temporary folder).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

OUT="${OUT:-./gpu_results}"
mkdir -p "$OUT"
HER2ST="${1:-.gpu_data/her2st}"
shift $(( $# > 0 ? 1 : 0 ))
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
EXTRA=()
[ -n "${QUICK:-}" ] && EXTRA+=(--quick)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/gpu_check.log"
: >"$LOG"
say() { echo "== $*" | tee -a "$LOG"; }

# ---- 0. packages the device image lacks, carried as wheels (no registry is reachable there)
if compgen -G ".whl/*.whl" >/dev/null; then
  say "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || say "wheel install FAILED (see log)"
fi

# ---- 1. environment
say "environment"
{ if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not available"; fi
  "$PY" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for name in ("timm", "zarr", "numcodecs", "faiss", "typer", "rich", "anndata", "imagecodecs", "genedml"):
    try:
        mod = importlib.import_module(name)
        extra = f" (faiss GPUs: {mod.get_num_gpus()})" if name == "faiss" and hasattr(mod, "get_num_gpus") else ""
        print(f"{name}: {getattr(mod, '__version__', 'ok')}{extra}")
    except Exception as exc:  # report every missing package, not just the first
        print(f"{name}: MISSING ({type(exc).__name__}: {exc})")
EOF
} 2>&1 | tee -a "$LOG"
if ! "$PY" -c "import faiss" 2>/dev/null; then
  # No registry is reachable from the device machine; this only helps where one is.
  say "faiss not importable: trying pip install faiss-gpu (fails fast without a registry)"
  timeout 60 "$PY" -m pip install -q --retries 0 --timeout 5 --target /tmp/site faiss-gpu >>"$LOG" 2>&1 \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || say "faiss-gpu not installable here: carry its wheel in .whl/"
fi
"$PY" -c "import faiss; print('faiss GPUs:', faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0)" 2>&1 | tee -a "$LOG"

# ---- 2. GPU-marked tests (exit 5 = none collected)
say "pytest -m gpu"
timeout 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests >"$OUT/pytest_gpu.log" 2>&1
PYTEST_RC=$?
tail -n 3 "$OUT/pytest_gpu.log" | tee -a "$LOG"
case $PYTEST_RC in
  0) say "gpu tests: exit 0 ($(tail -n 1 "$OUT/pytest_gpu.log"))" ;;
  5) say "no tests marked gpu were collected" ;;
  124|137) say "gpu tests TIMED OUT" ;;
  *) say "gpu tests FAILED (exit $PYTEST_RC; see pytest_gpu.log)" ;;
esac

# ---- 3. training on the device: AMP vs fp32 speed and accuracy (writes gpu_train.json / gpu_train.md)
say "training: AMP vs fp32 (device $DEVICE)"
TRAIN_FLAGS=(--data "$HER2ST" --out "$OUT" --device "$DEVICE" --budget "${TRAIN_BUDGET:-180}" --work "${TRAIN_WORK:-/tmp/gpu_train}")
[ -n "${QUICK:-}" ] && TRAIN_FLAGS+=(--quick)
timeout $(( ${TRAIN_BUDGET:-180} + 60 )) "$PY" benchmarks/gpu_train.py "${TRAIN_FLAGS[@]}" 2>&1 | tee -a "$LOG"
TRAIN_RC=${PIPESTATUS[0]}
[ "$TRAIN_RC" -eq 0 ] || say "training check exit $TRAIN_RC (124 = timed out; failed parts are marked in gpu_train.json)"

# ---- 4. throughput + retrieval (writes gpu_check.json / gpu_check.md)
say "extraction vs raw throughput, retrieval (device $DEVICE, her2st $HER2ST)"
timeout 200 "$PY" benchmarks/gpu_extract_speed.py --device "$DEVICE" --her2st "$HER2ST" --out "$OUT" \
  --pytest-log "$OUT/pytest_gpu.log" --pytest-rc "$PYTEST_RC" "${EXTRA[@]}" "$@" 2>&1 | tee -a "$LOG"
BENCH_RC=${PIPESTATUS[0]}
[ "$BENCH_RC" -eq 0 ] || say "benchmark exit $BENCH_RC (124 = timed out; parts that failed are marked in gpu_check.json)"

# ---- 5. cohort scale on the device (scale.py: synthetic cohort, fit 1 epoch, predict with retrieval)
SPOTS="${SCALE_SPOTS:-25000}"; DIM=1024
[ -n "${QUICK:-}" ] && { SPOTS=2000; DIM=64; }
say "scale: $SPOTS spots, D = $DIM, the reference width (device memory sampled by nvidia-smi)"
SMI=/tmp/gpu_check_smi.txt; : >"$SMI"
command -v nvidia-smi >/dev/null && { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 >"$SMI" 2>/dev/null & SMI_PID=$!; }
rm -rf /tmp/gpu_check_scale
timeout "${SCALE_CAP:-120}" "$PY" benchmarks/scale.py --spots "$SPOTS" --dim "$DIM" --batch-slides 1 --spots-per-slide 4000 \
  --out "$OUT/scale" --work /tmp/gpu_check_scale 2>&1 | tee -a "$LOG"
SCALE_RC=${PIPESTATUS[0]}
[ -n "${SMI_PID:-}" ] && kill "$SMI_PID" 2>/dev/null
say "scale exit $SCALE_RC; device memory used at most $(sort -n "$SMI" | tail -n 1) MiB (whole device, nvidia-smi, every 250 ms)"
[ "$SCALE_RC" -eq 0 ] || tail -n 20 /tmp/gpu_check_scale/*.log 2>/dev/null | tee -a "$LOG"

say "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
[ "$BENCH_RC" -eq 0 ] && [ "$TRAIN_RC" -eq 0 ] && [ "$SCALE_RC" -eq 0 ] && { [ "$PYTEST_RC" -eq 0 ] || [ "$PYTEST_RC" -eq 5 ]; }
