#!/usr/bin/env bash
# Does `nbl-onnx eval` measure the perplexity PyTorch measures? On pre-tokenised held-out blocks
# (C4 documents 200-299 of ../shared/data/c4_demo.json, packed as nbl-onnx packs text), the PyTorch
# float32 model and the Optimum export of SmolLM2-135M must agree within 0.5%.
#
#   scripts/check-perplexity.sh [BLOCKS]     # default 64 blocks of 512 tokens; ~6 minutes on 2 cores
#
# Needs models/smollm2-{hf,optimum} (scripts/prepare-smollm2.sh) and its export virtualenv
# (NBL_EXPORT_VENV, default $HOME/.cache/nbl-onnx/py/export).
set -euo pipefail
cd "$(dirname "$0")/.."
blocks=${1:-64}
python="${NBL_EXPORT_VENV:-$HOME/.cache/nbl-onnx/py/export}/bin/python"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/nbl-onnx/target}"
cargo build --release --locked --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -c "import json, sys; json.dump(json.load(open(sys.argv[1]))[200:300], open(sys.argv[2], 'w'))" \
  ../shared/data/c4_demo.json "$work/heldout.json"
torch=$("$python" scripts/pytorch_perplexity.py models/smollm2-hf "$work/heldout.json" --seq-len 512 \
  --blocks "$blocks" --out "$work/blocks.json" | tail -n 1)
onnx=$("$CARGO_TARGET_DIR/release/nbl-onnx" eval models/smollm2-optimum/model.onnx --data "$work/blocks.json" \
  --seq-len 512 --gen-prompts 1 --gen-tokens 1 --json)
python3 - "$torch" "$onnx" <<'PY'
import json, sys
torch, onnx = json.loads(sys.argv[1]), json.loads(sys.argv[2])
a, b = torch["perplexity"], onnx["models"][0]["ppl"]
print(f"{torch['blocks']} blocks of {torch['seq_len']} tokens: PyTorch {a:.4f}, nbl-onnx eval {b:.4f} "
      f"({(b / a - 1) * 100:+.2e}%)")
sys.exit(0 if abs(b / a - 1) <= 0.005 else 1)
PY
