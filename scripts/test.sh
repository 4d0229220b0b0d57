#!/usr/bin/env bash
# The test command: installs ONNX Runtime from its PyPI wheel if missing, then runs every test.
# Per-layer X/Y differences against PyTorch are printed (hence --nocapture).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-ort.sh
cargo test --locked -- --nocapture
