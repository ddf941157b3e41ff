#!/usr/bin/env bash
# The self-contained GPU check, for a GPU box that has JAX with CUDA but no TensorFlow and no
# network. Under 8 minutes on one GPU (two 30-epoch runs of mnist-5k plus checks).
#
#   1. where there is network, same Python version as the GPU box:
#        bench/gpu_check.sh --download wheels/        # keras, tfp-nightly, mlxtend, kvae (+ deps)
#   2. copy this repository and wheels/ to the GPU box, then there:
#        python -m venv --system-site-packages .venv-gpu && . .venv-gpu/bin/activate   # keeps jax
#        bench/gpu_check.sh --wheels wheels/ [--epochs 30] [--batch-size 256] [--eval-k 100]
#   re-check finished run folders (e.g. the two kept by --out DIR), training nothing:
#        bench/gpu_check.sh --check-runs DIR/float32 DIR/mixed [--max-nll 130]
#
# Installs from wheels/ only (pip --no-index), trains with KERAS_BACKEND=jax in float32 and mixed
# precision, prints samples/second, checks the saved encoder/decoder (and the ONNX export where
# TensorFlow is installed), writes bench/results/gpu_check.json. Exit status 0 = PASS.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
PACKAGES=(keras "tfp-nightly" mlxtend)  # pinned in requirements-jax.txt

if [ "${1:-}" = "--download" ]; then
  dir="${2:?usage: bench/gpu_check.sh --download DIR}"
  grep -v -E '^(jax|pytest)' requirements-jax.txt > "${TMPDIR:-/tmp}/kvae-gpu-requirements.txt"
  "$PYTHON" -m pip download -q -d "$dir" -r "${TMPDIR:-/tmp}/kvae-gpu-requirements.txt"
  "$PYTHON" -m pip wheel -q --no-deps -w "$dir" .
  echo "gpu_check: wheels in $dir ($(ls "$dir" | wc -l) files); copy it with this repository to the GPU box"
  exit 0
fi

args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="${2:?--wheels needs a folder}"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done

if ! "$PYTHON" -c "import jax" 2>/dev/null; then
  echo "gpu_check: $PYTHON cannot import jax: use an environment with JAX (for a GPU: jax[cuda12])" >&2
  exit 1
fi
if [ -n "${wheels:-}" ]; then
  [ -d "$wheels" ] || { echo "gpu_check: no wheel folder $wheels (make it with --download)" >&2; exit 1; }
  "$PYTHON" -m pip install -q --no-index --find-links "$wheels" "${PACKAGES[@]}"
  # kvae itself without its TensorFlow dependencies: the JAX path does not import them
  "$PYTHON" -m pip install -q --no-index --no-deps --find-links "$wheels" kvae
fi
KERAS_BACKEND=jax exec "$PYTHON" bench/gpu_check.py ${args[@]+"${args[@]}"}
