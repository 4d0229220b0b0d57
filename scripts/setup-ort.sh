#!/usr/bin/env bash
# Installs the ONNX Runtime shared library that nbl-onnx loads at run time, from the PyPI wheel
# (the only place it can come from without a download of prebuilt binaries from elsewhere).
#
#   scripts/setup-ort.sh          # CPU: onnxruntime
#   scripts/setup-ort.sh --gpu    # CUDA/TensorRT: onnxruntime-gpu with the NVIDIA runtime wheels
#
# The library ends up at $NBL_ORT_DIR/{cpu,gpu}/libonnxruntime.so (default
# NBL_ORT_DIR=$HOME/.cache/nbl-onnx/onnxruntime), where nbl-onnx looks for it; ORT_DYLIB_PATH overrides.
# Idempotent: a second run with the same version does nothing.
set -euo pipefail

ORT_VERSION="${ORT_VERSION:-1.32.0}"
flavour=cpu
requirement="onnxruntime==$ORT_VERSION"
if [[ "${1:-}" == "--gpu" ]]; then
  flavour=gpu
  requirement="onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION"
elif [[ -n "${1:-}" ]]; then
  echo "usage: $0 [--gpu]" >&2
  exit 2
fi

root="${NBL_ORT_DIR:-$HOME/.cache/nbl-onnx/onnxruntime}"
dest="$root/$flavour"
venv="$dest/venv"
link="$dest/libonnxruntime.so"

if [[ -e "$link" && -f "$dest/version" && "$(cat "$dest/version")" == "$ORT_VERSION" ]]; then
  echo "ONNX Runtime $ORT_VERSION ($flavour) already installed: $(readlink -f "$link")"
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
echo "==> ONNX Runtime $ORT_VERSION ($flavour): $link -> $lib"
