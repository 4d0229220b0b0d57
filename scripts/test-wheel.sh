#!/usr/bin/env bash
# The Python wheel as a user gets it: builds it with maturin, installs it into a fresh virtualenv (which
# pulls the onnxruntime wheel from PyPI), and runs the installed executable on a fixture with nothing
# but the model: inspect, rewrite (built-in corpus, default count), and check gated on KL, top-1 and
# generation agreement; then the Python API's test (python/tests/test_api.py) and the GitHub Action's
# check step (python/tests/test_action.py) with the venv's Python.
# Then, with onnxruntime uninstalled, `--engine ort` must fail with exit 2,
# saying what to install. No other ONNX Runtime is visible to it (ORT_DYLIB_PATH unset, NBL_ORT_DIR
# pointed at nothing).
#
#   scripts/test-wheel.sh            # WHEEL_PROFILE=release for the wheel one would publish
#
# The default profile is the tests' (dev, dependencies optimised), so that CI reuses their build.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/nbl-onnx/target}"
MATURIN_VERSION=1.16.0

tools="$HOME/.cache/nbl-onnx/maturin"
if ! "$tools/bin/maturin" --version 2>/dev/null | grep -q "$MATURIN_VERSION"; then
  echo "==> installing maturin $MATURIN_VERSION into $tools"
  python3 -m venv "$tools"
  "$tools/bin/pip" install --quiet --disable-pip-version-check "maturin==$MATURIN_VERSION"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "==> building the wheel (profile ${WHEEL_PROFILE:-dev})"
"$tools/bin/maturin" build --quiet --profile "${WHEEL_PROFILE:-dev}" --locked -o "$work/dist"
echo "==> installing $(basename "$work"/dist/*.whl) into a fresh virtualenv"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check "$work"/dist/*.whl

unset ORT_DYLIB_PATH
export NBL_ORT_DIR="$work/no-other-onnxruntime"
nbl="$work/venv/bin/nbl-onnx"
mkdir "$work/model"
cp fixtures/llama-optimum-past/* "$work/model/"
cd "$work/model"
"$nbl" inspect model.onnx --run --engine ort
"$nbl" rewrite model.onnx
# The fixture is a random 3-layer model: the gates are loose, and still fail a broken rewrite.
"$nbl" check model.nbl.onnx --reference model.onnx --max-kl 0.5 --min-top1 0.3 --min-common-tokens 0.25
[[ -f model.nbl.onnx && -f model.nbl.json ]]

echo "==> the Python API (python/tests/test_api.py), from the same wheel"
mkdir "$work/api"
cp "$repo"/fixtures/llama-optimum-past/* "$work/api/"
"$work/venv/bin/python" "$repo/python/tests/test_api.py" "$work/api"

echo "==> the GitHub Action's check step (action.yml), run as a script with the same wheel"
mkdir "$work/action"
cp "$repo"/fixtures/llama-optimum-past/* "$work/action/"
"$work/venv/bin/python" "$repo/python/tests/test_action.py" "$repo" "$work/action"

echo "==> without onnxruntime in the environment"
"$work/venv/bin/pip" uninstall --quiet --yes onnxruntime
set +e
"$nbl" inspect model.onnx --run --engine ort 2> err.txt
code=$?
set -e
cat err.txt
[[ $code == 2 ]] || { echo "expected exit 2, got $code" >&2; exit 1; }
grep -q "pip install onnxruntime" err.txt || { echo "the error does not say what to install" >&2; exit 1; }
echo "==> the wheel works"
