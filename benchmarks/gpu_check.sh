#!/usr/bin/env bash
# GPU check (≤ 5 minutes on one H100): GPU-marked tests, extraction vs raw ViT-L/16 fp16 throughput at
# batch 256 (synthetic + her2st), FAISS GPU vs CPU on a 10^6 bank. Results: $OUT/gpu_check.{json,md},
# $OUT/pytest_gpu.log, $OUT/gpu_check.log ($OUT defaults to ./gpu_results).
#
#   bash benchmarks/gpu_check.sh [HER2ST_DIR] [extra gpu_extract_speed.py flags...]
#
# HER2ST_DIR defaults to .gpu_data/her2st (an ignored folder: `mkdir -p .gpu_data && cp -r
# ../shared/data/her2st .gpu_data/` here, then carry ".gpu_data" to the device). Python packages the
# device image lacks (zarr, numcodecs, donfig, google-crc32c, faiss-gpu) travel as wheels in .whl/ (carried);
# they are installed into /tmp/site first. Dry run on CPU: `DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh`.
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

# ---- 3. throughput + retrieval (writes gpu_check.json / gpu_check.md)
say "extraction vs raw throughput, retrieval (device $DEVICE, her2st $HER2ST)"
timeout 200 "$PY" benchmarks/gpu_extract_speed.py --device "$DEVICE" --her2st "$HER2ST" --out "$OUT" \
  --pytest-log "$OUT/pytest_gpu.log" --pytest-rc "$PYTEST_RC" "${EXTRA[@]}" "$@" 2>&1 | tee -a "$LOG"
BENCH_RC=${PIPESTATUS[0]}
[ "$BENCH_RC" -eq 0 ] || say "benchmark exit $BENCH_RC (124 = timed out; parts that failed are marked in gpu_check.json)"

say "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
[ "$BENCH_RC" -eq 0 ] && { [ "$PYTEST_RC" -eq 0 ] || [ "$PYTEST_RC" -eq 5 ]; }
