#!/usr/bin/env bash
# The device check: nbl-onnx end to end on an NVIDIA GPU, in a few minutes, written to bench/gpu.json.
#
#   scripts/gpu-check.sh [MODEL_DIR[:K] ...]
#
# For each model (default: the fixture llama-genai-fp16-cuda, K = 1):
#   1. calibrate on CUDA, timed, beside the model's own prefill speed on $ep (calibration throughput
#      relative to plain inference);
#   2. rewrite K layers (the statistics come from the CUDA run);
#   3. check the rewrite against the original on CUDA, then on TensorRT (without TensorRT's libraries
#      that is a clear error, recorded as such);
#   4. bench original and rewrite side by side on CUDA.
#
# Environment: NBL (the binary; default target/release/nbl-onnx, built if missing), ORT_DYLIB_PATH (an
# onnxruntime-gpu libonnxruntime.so; default: scripts/setup-ort.sh --gpu), SAMPLES and SEQ_LEN
# (calibration blocks; default 16 x 512), PROMPT_LEN and GEN (bench; default 512, 128), GPU_JSON, WORK
# (a folder to keep the intermediate files in; default a temporary one, removed), and
# EP (default cuda; EP=cpu runs the same steps on the CPU, to try the script without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."

nbl=${NBL:-target/release/nbl-onnx}
out=${GPU_JSON:-bench/gpu.json}
samples=${SAMPLES:-16}
seq_len=${SEQ_LEN:-512}
prompt_len=${PROMPT_LEN:-512}
gen=${GEN:-128}
ep=${EP:-cuda}
models=("$@")
[[ ${#models[@]} -gt 0 ]] || models=(fixtures/llama-genai-fp16-cuda:1)

if [[ -z "${ORT_DYLIB_PATH:-}" && $ep != cpu ]]; then
  scripts/setup-ort.sh --gpu
fi
[[ -x $nbl ]] || cargo build --release --locked
if [[ $ep == cpu ]]; then
  gpu="none (EP=cpu)"
else
  command -v nvidia-smi >/dev/null || { echo "error: nvidia-smi not found: this script needs an NVIDIA GPU" >&2; exit 2; }
  gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1)
fi

if [[ -n "${WORK:-}" ]]; then
  work=$WORK  # kept: statistics, reports and rewritten models, for a closer look
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$(dirname "$out")"
echo "==> $gpu"

now() { date +%s.%N; }
results=()
for spec in "${models[@]}"; do
  dir=${spec%%:*}
  k=1
  [[ $spec == *:* ]] && k=${spec##*:}
  name=$(basename "$dir")
  w="$work/$name"
  mkdir -p "$w"
  for moments in host graph; do
    echo "==> $name: calibrate on $ep ($samples x $seq_len tokens, moments: $moments)"
    "$nbl" calibrate "$dir/model.onnx" --ep "$ep" --samples "$samples" --seq-len "$seq_len" --moments "$moments" \
      -o "$w/stats-$moments.nblstats" 2> >(tee "$w/calibrate-$moments.log" >&2)
    "$nbl" analyze "$w/stats-$moments.nblstats" --json > "$w/analyze-$moments.json"
  done
  cp "$w/stats-graph.nblstats" "$w/stats.nblstats"
  echo "==> $name: rewrite k = $k"
  "$nbl" rewrite "$dir/model.onnx" --stats "$w/stats.nblstats" --layers "$k" -o "$w/nbl/model.onnx" \
    --report "$w/rewrite.json"
  echo "==> $name: check on $ep"
  "$nbl" check "$w/nbl/model.onnx" --reference "$dir/model.onnx" --ep "$ep" --json > "$w/check.json"
  : > "$w/check-tensorrt.err"
  if [[ $ep == cuda ]]; then
    echo "==> $name: check on TensorRT"
    if "$nbl" check "$w/nbl/model.onnx" --reference "$dir/model.onnx" --ep tensorrt --json \
      > "$w/check-tensorrt.json" 2> "$w/check-tensorrt.err"; then
      echo "TensorRT: ran"
    else
      echo "TensorRT: $(tail -n 1 "$w/check-tensorrt.err")"
    fi
  fi
  echo "==> $name: bench on $ep (prompt $prompt_len, $gen new tokens)"
  "$nbl" bench "$dir/model.onnx" "$w/nbl/model.onnx" --ep "$ep" --prompt-len "$prompt_len" --gen "$gen" --json \
    > "$w/bench.json"
  python3 - "$w" "$name" "$k" "$samples" "$seq_len" > "$w/result.json" <<'EOF'
import json, pathlib, re, sys
w, name, k, samples, seq_len = sys.argv[1:]
w = pathlib.Path(w)
load = lambda f: json.loads((w / f).read_text()) if (w / f).exists() and (w / f).stat().st_size else None
bench = load("bench.json")
prefill_tok_s = int(bench["prompt_len"]) / (bench["models"][0]["prefill_ms"] / 1000)
calibration = {"samples": int(samples), "seq_len": int(seq_len), "prefill_tokens_per_s": prefill_tok_s}
for moments in ("host", "graph"):
    rate = float(re.search(r"\(([\d.]+) tokens/s", (w / f"calibrate-{moments}.log").read_text()).group(1))
    calibration[f"{moments}_tokens_per_s"] = rate
    calibration[f"{moments}_relative_to_inference"] = rate / prefill_tok_s
host, graph = (load(f"analyze-{m}.json")["layers"] for m in ("host", "graph"))
calibration["bound_max_relative_difference"] = max(
    abs(h["bound"] - g["bound"]) / max(abs(h["bound"]), 1e-300) for h, g in zip(host, graph))
calibration["same_ranking"] = load("analyze-host.json")["order"] == load("analyze-graph.json")["order"]
err = (w / "check-tensorrt.err").read_text().strip().splitlines()
print(json.dumps({
    "model": name, "k": int(k),
    "calibration": calibration,
    "rewrite": load("rewrite.json"),
    "check": load("check.json"),
    "check_tensorrt": load("check-tensorrt.json") or {"error": err[-1] if err else None},
    "bench": bench,
}, indent=2))
EOF
  results+=("$w/result.json")
done

python3 - "$out" "$gpu" "$ep" "${results[@]}" <<'EOF'
import json, sys
out, gpu, ep, *files = sys.argv[1:]
json.dump({"gpu": gpu, "ep": ep, "models": [json.load(open(f)) for f in files]}, open(out, "w"), indent=2)
EOF
echo "==> wrote $out"
