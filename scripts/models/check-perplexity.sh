#!/usr/bin/env bash
# Does `nbl-onnx eval` measure the perplexity PyTorch measures? On pre-tokenised held-out sequences
# (C4 documents 200-299 of the built-in sample, packed as nbl-onnx packs text), the PyTorch float32
# model and the Optimum export of SmolLM2-135M must agree within 0.5% (python3 -m nblbench.perplexity).
#
#   scripts/models/check-perplexity.sh [SEQUENCES]   # default 64 sequences of 512 tokens; ~6 minutes on 2 cores
#
# Needs models/smollm2-{hf,optimum} (scripts/models/prepare-smollm2.sh) and its export virtualenv
# (NBL_EXPORT_VENV, default $HOME/.cache/nbl-onnx/py/export; completed from scripts/fixtures/requirements.txt
# if a package is missing); builds nbl-onnx and installs ONNX Runtime (scripts/setup-ort.sh) if missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
cd "$NBL_REPO"
sequences=${1:-64}
[[ -f models/smollm2-hf/config.json ]] || die "models/smollm2-hf not found: run scripts/models/prepare-smollm2.sh first"
need_model models/smollm2-optimum
use_nblbench
ensure_ort
python=$(export_python)
nbl=$(nbl_binary)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m nblbench.corpus "$work" > /dev/null
torch=$(run_nice "$python" scripts/models/pytorch_perplexity.py models/smollm2-hf "$work/evaluation.json" \
  --seq-len 512 --blocks "$sequences" --out "$work/sequences.json" | tail -n 1)
onnx=$("$nbl" eval models/smollm2-optimum/model.onnx --data "$work/sequences.json" \
  --seq-len 512 --gen-prompts 1 --gen-tokens 1 --json)
python3 -m nblbench.perplexity "$torch" "$onnx"
