#!/usr/bin/env bash
# NBL on the fp16 exports of SmolLM2-135M-Instruct, on the CPU: the ONNX Runtime GenAI builder's
# (`-p fp16 -e cpu`: f16 throughout, MultiHeadAttention) and Optimum's (`--dtype fp16`: f16 branches
# summed into an f32 residual stream). For each, calibrated on C4 documents 0-199:
#
#   1. inspect; calibrate (32 x 512 tokens); rewrite k = 8 (cosine ranking) with `--weight-format
#      auto`, which stores W in f16;
#   2. check the rewrite against the original (a KV-cache decode on ONNX Runtime and tract);
#   3. eval original and rewrite on 32 blocks of C4 documents 200-299 (perplexity, KL, top-1, greedy
#      continuations);
#   4. bench both in one run.
#
# Writes bench/fp16.json and prints the README's table.
#
#   scripts/bench-fp16.sh [--runs N]
#
# Needs models/smollm2-genai-fp16 and models/smollm2-optimum-fp16 (scripts/prepare-smollm2.sh) and
# ONNX Runtime (scripts/setup-ort.sh). About 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=3
while [[ $# -gt 0 ]]; do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    *) echo "usage: $0 [--runs N]" >&2; exit 2 ;;
  esac
done

exports=(smollm2-genai-fp16 smollm2-optimum-fp16)
for name in "${exports[@]}"; do
  [[ -f models/$name/model.onnx ]] || { echo "error: models/$name not found: run scripts/prepare-smollm2.sh" >&2; exit 2; }
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/nbl-onnx/target}"
echo "==> building nbl-onnx (release)"
cargo build --release --locked --quiet
nbl="$CARGO_TARGET_DIR/release/nbl-onnx"
work=bench/tmp/fp16
rm -rf "$work"
mkdir -p "$work"
seq_len=512 k=8

for name in "${exports[@]}"; do
  model=models/$name/model.onnx
  w=$work/$name
  mkdir -p "$w"
  echo "==> $name: inspect; calibrate (C4 documents 0-199, 32 x $seq_len tokens)"
  "$nbl" inspect "$model" --json > "$w/inspect.json"
  "$nbl" calibrate "$model" --seq-len "$seq_len" --samples 32 -o "$w/stats.safetensors" 2> "$w/calibrate.log"
  echo "==> $name: rewrite k = $k (cosine ranking, W as the model stores it); check"
  "$nbl" rewrite "$model" --stats "$w/stats.safetensors" --layers "$k" --criterion cosine \
    -o "$w/k$k/model.onnx" --report "$w/rewrite.json" > /dev/null
  # The original's own check is recorded too: the GenAI export as written does not decode on ONNX
  # Runtime's CPU provider (see the README), which is what the rewrite's missing annotations fix.
  "$nbl" check "$model" --json > "$w/check-original.json" 2> /dev/null || true
  "$nbl" check "$w/k$k/model.onnx" --reference "$model" --json > "$w/check.json"
  echo "==> $name: eval on C4 documents 200-299"
  "$nbl" eval "$model" "$w/k$k/model.onnx" --seq-len "$seq_len" --samples 32 --json > "$w/eval.json"
  echo "==> $name: bench, $runs runs"
  "$nbl" bench "$model" "$w/k$k/model.onnx" --runs "$runs" --json > "$w/bench.json"
done

python3 - "$work" "${exports[@]}" <<'PY'
import json, sys
from pathlib import Path
work, names = Path(sys.argv[1]), sys.argv[2:]
load = lambda name, f: json.loads((work / name / f).read_text())
result = {}
for name in names:
    rewrite = load(name, "rewrite.json")
    result[name] = {
        "layers": len(load(name, "inspect.json")["layers"]),
        "selected": rewrite["selected"],
        "weight_format": rewrite["rewrite"]["weight_format"],
        "weights_before": rewrite["rewrite"]["weights_before"],
        "weights_after": rewrite["rewrite"]["weights_after"],
        "check": load(name, "check.json"),
        "check_original_problems": load(name, "check-original.json")["problems"],
        "eval": load(name, "eval.json"),
        "bench": load(name, "bench.json"),
    }
Path("bench/fp16.json").write_text(json.dumps(result, indent=2) + "\n")
print("\n| export | W | check | perplexity (original → k = 8) | KL | top-1 | greedy tokens in common | prefill x | decode x |")
print("|---|---|---|---|---|---|---|---|---|")
for name, r in result.items():
    original, rewritten = r["eval"]["models"]
    generation = rewritten.get("generation_vs_first") or {}
    check = "passes" if not r["check"]["problems"] else "FAILS"
    m = r["bench"]["models"][1]
    w = r["weight_format"].get("Float", r["weight_format"]) if isinstance(r["weight_format"], dict) else r["weight_format"]
    print(f"| {name} | {w} | {check} | {original['ppl']:.2f} → {rewritten['ppl']:.2f} | "
          f"{rewritten['kl_vs_first']:.3f} | {rewritten['top1_vs_first']:.3f} | "
          f"{generation.get('mean_common_tokens', float('nan')):.2f} of {generation.get('tokens', '-')} | "
          f"{m['prefill_speedup']:.2f} | {m['decode_speedup']:.2f} |")
PY
