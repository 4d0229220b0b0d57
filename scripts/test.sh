#!/usr/bin/env bash
# The test command: installs ONNX Runtime (and onnxruntime-genai, which runs rewritten GenAI models
# in the tests) from their PyPI wheels if missing, then runs every test.
# Per-layer X/Y differences against PyTorch are printed (hence --nocapture).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-ort.sh --with-genai
cargo test --locked -- --nocapture
