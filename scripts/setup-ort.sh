#!/usr/bin/env bash
# Installs the ONNX Runtime shared library that nbl-onnx loads at run time, from the PyPI wheel
# (the only place it can come from without a download of prebuilt binaries from elsewhere).
#
#   scripts/setup-ort.sh               # CPU: onnxruntime
#   scripts/setup-ort.sh --gpu         # CUDA/TensorRT: onnxruntime-gpu with the NVIDIA runtime wheels
#   scripts/setup-ort.sh --with-genai  # also onnxruntime-genai in the same virtualenv (the tests run
#                                      # rewritten GenAI models with it: scripts/genai_generate.py)
#
# The library ends up at $NBL_ORT_DIR/{cpu,gpu}/libonnxruntime.so (default
# NBL_ORT_DIR=$HOME/.cache/nbl-onnx/onnxruntime), where nbl-onnx looks for it; ORT_DYLIB_PATH overrides.
# Idempotent: a second run with the same version does nothing.
set -euo pipefail

# onnxruntime-gpu lags the CPU wheel: 1.31.1 is its newest release (CUDA 13, cuDNN 9).
ORT_CPU_VERSION=1.32.0
ORT_GPU_VERSION=1.31.1
GENAI_VERSION="${GENAI_VERSION:-0.18.0}"
flavour=cpu
with_genai=false
for arg in "$@"; do
  case "$arg" in
    --gpu) flavour=gpu ;;
    --with-genai) with_genai=true ;;
    *) echo "usage: $0 [--gpu] [--with-genai]" >&2; exit 2 ;;
  esac
done

if [[ $flavour == gpu ]]; then
  ORT_VERSION="${ORT_VERSION:-$ORT_GPU_VERSION}"
  requirement="onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION"
else
  ORT_VERSION="${ORT_VERSION:-$ORT_CPU_VERSION}"
  requirement="onnxruntime==$ORT_VERSION"
fi

root="${NBL_ORT_DIR:-$HOME/.cache/nbl-onnx/onnxruntime}"
dest="$root/$flavour"
venv="$dest/venv"
link="$dest/libonnxruntime.so"

install_genai() {
  if "$venv/bin/python" -c "import onnxruntime_genai" 2>/dev/null; then
    return
  fi
  echo "==> installing onnxruntime-genai==$GENAI_VERSION into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "onnxruntime-genai==$GENAI_VERSION" \
    "$requirement"
}

if [[ -e "$link" && -f "$dest/version" && "$(cat "$dest/version")" == "$ORT_VERSION" ]]; then
  echo "ONNX Runtime $ORT_VERSION ($flavour) already installed: $(readlink -f "$link")"
  if $with_genai; then install_genai; fi
  exit 0
fi

python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "error: $python not found; install Python 3.10+" >&2; exit 2; }

echo "==> creating a virtualenv for $requirement in $venv"
mkdir -p "$dest"
"$python" -m venv "$venv"
echo "==> installing $requirement from PyPI"
"$venv/bin/pip" install --quiet --disable-pip-version-check "$requirement"

lib=$(find "$venv" -path '*/onnxruntime/capi/libonnxruntime.so.*' -type f | head -n 1)
[[ -n "$lib" ]] || { echo "error: the wheel has no libonnxruntime.so.*" >&2; exit 1; }
ln -sfn "$lib" "$link"
echo "$ORT_VERSION" > "$dest/version"
if $with_genai; then install_genai; fi
echo "==> ONNX Runtime $ORT_VERSION ($flavour): $link -> $lib"
