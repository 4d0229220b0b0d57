#!/usr/bin/env bash
# NBL on the int4 format people deploy on CPUs: SmolLM2-135M-Instruct as the ONNX Runtime GenAI builder
# exports it by default (`-p int4 -e cpu`: int4 MatMulNBits, the token embedding a GatherBlockQuantized
# tied to the int4 LM head), calibrated on C4 documents 0-199 and evaluated on 200-299.
#
#   1. inspect; calibrate; rewrite k = 4, 8, 12 with int4 W (GPTQ, the model's own block size);
#      check each against the original; generate 20 tokens with onnxruntime-genai from each directory;
#   2. bench the original and k = 4, 8, 12 in one run, with sizes on disk;
#   3. quality at k = 8 on held-out text: W as f32, int4 GPTQ and int4 round-to-nearest;
#   4. a 4-layer slice of Llama-3-8B's shape (random weights, GenAI int4): the original, 2 of 4 layers
#      with int4 W and with f32 W, in one bench run.
#
# Writes bench/int4.json and prints the README's tables.
#
#   scripts/bench-int4.sh [--runs N] [--skip-slice]
#
# Needs models/smollm2-genai-int4 (scripts/prepare-smollm2.sh), ONNX Runtime with onnxruntime-genai
# (scripts/setup-ort.sh --with-genai), and for the slice the GenAI builder's virtualenv (NBL_GENAI_VENV,
# default $HOME/.cache/nbl-onnx/py/genai; see scripts/make-fixtures.py). About 25 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=3 slice=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    --skip-slice) slice=0; shift ;;
    *) echo "usage: $0 [--runs N] [--skip-slice]" >&2; exit 2 ;;
  esac
done

model_dir=models/smollm2-genai-int4
[[ -f $model_dir/model.onnx ]] || { echo "error: $model_dir not found: run scripts/prepare-smollm2.sh" >&2; exit 2; }
ort_python="${NBL_ORT_DIR:-$HOME/.cache/nbl-onnx/onnxruntime}/cpu/venv/bin/python"
"$ort_python" -c "import onnxruntime_genai" 2>/dev/null \
  || { echo "error: onnxruntime-genai not found: run scripts/setup-ort.sh --with-genai" >&2; exit 2; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/nbl-onnx/target}"
echo "==> building nbl-onnx (release)"
cargo build --release --locked --quiet
nbl="$CARGO_TARGET_DIR/release/nbl-onnx"
work=bench/tmp/int4
rm -rf "$work"
mkdir -p "$work"
seq_len=512

echo "==> inspect"
"$nbl" inspect "$model_dir/model.onnx" --json > "$work/inspect.json"
echo "==> calibrate (C4 documents 0-199, 128 x $seq_len tokens)"
"$nbl" calibrate "$model_dir/model.onnx" --seq-len "$seq_len" --samples 128 -o "$work/stats.safetensors"

rewrite() { # rewrite NAME K [rewrite options...]: a GenAI directory of its own
  local name=$1 k=$2
  shift 2
  "$nbl" rewrite "$model_dir/model.onnx" --stats "$work/stats.safetensors" --layers "$k" \
    -o "$work/$name/model.onnx" --report "$work/$name.report.json" "$@" > /dev/null
}
for k in 4 8 12; do
  echo "==> rewrite k = $k (int4 W, GPTQ); check; onnxruntime-genai generates 20 tokens"
  rewrite "k$k" "$k"
  "$nbl" check "$work/k$k/model.onnx" --reference "$model_dir/model.onnx" --json > "$work/k$k.check.json"
  "$ort_python" scripts/genai_generate.py "$work/k$k" --prompt 504,3458,282,4649,314 --tokens 20 \
    > "$work/k$k.genai.json"
done
echo "==> rewrite k = 8 with f32 W and with round-to-nearest int4 W"
rewrite k8-f32 8 --weight-format f32
rewrite k8-rtn 8 --quantizer rtn

echo "==> bench: original, k = 4, 8, 12 (int4 W), $runs runs"
"$nbl" bench "$model_dir/model.onnx" "$work"/k{4,8,12}/model.onnx --runs "$runs" --json > "$work/bench.json"
echo "==> eval on C4 documents 200-299: original, k = 8 with f32, GPTQ int4 and RTN int4 W"
"$nbl" eval "$model_dir/model.onnx" "$work"/k8-f32/model.onnx "$work"/k8/model.onnx "$work"/k8-rtn/model.onnx \
  --seq-len "$seq_len" --json > "$work/eval.json"

if ((slice)); then
  genai_python="${NBL_GENAI_VENV:-$HOME/.cache/nbl-onnx/py/genai}/bin/python"
  slice_dir=$work/llama3-8b-slice
  echo "==> a 4-layer slice of Llama-3-8B's shape, GenAI int4 (random weights)"
  "$genai_python" scripts/make_synthetic.py --shape llama-3-8b --layers 4 --precision int4 --provider cpu \
    --out "$slice_dir" > "$work/slice-build.log" 2>&1
  "$nbl" calibrate "$slice_dir/model.onnx" --seq-len 256 --samples 16 -o "$work/slice.safetensors"
  for format in auto f32; do
    "$nbl" rewrite "$slice_dir/model.onnx" --stats "$work/slice.safetensors" --layers 2 \
      --weight-format "$format" -o "$work/slice-$format/model.onnx" --report "$work/slice-$format.report.json" \
      > /dev/null
  done
  "$nbl" bench "$slice_dir/model.onnx" "$work"/slice-{auto,f32}/model.onnx --prompt-len 128 --gen 32 \
    --runs "$runs" --json > "$work/slice-bench.json"
fi

python3 - "$work" "$model_dir" "$slice" <<'PY'
import json, os, sys
from pathlib import Path
work, model_dir, slice_ = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
load = lambda name: json.loads((work / name).read_text())
size = lambda d: sum(f.stat().st_size for f in Path(d).iterdir() if f.name.startswith("model.onnx"))
result = {"layers": len(load("inspect.json")["layers"]), "rewrites": {}}
for k in (4, 8, 12):
    check = load(f"k{k}.check.json")
    result["rewrites"][k] = {
        "check_problems": check["problems"], "kl": check["reference"]["mean_kl"],
        "top1": check["reference"]["top1_agreement"], "genai_tokens": load(f"k{k}.genai.json"),
        "bytes_on_disk": size(work / f"k{k}"),
        "weights_before": load(f"k{k}.report.json")["rewrite"]["weights_before"],
        "weights_after": load(f"k{k}.report.json")["rewrite"]["weights_after"],
    }
result["original_bytes_on_disk"] = size(model_dir)
result["bench"] = load("bench.json")
result["eval"] = load("eval.json")
if slice_:
    result["slice_bench"] = load("slice-bench.json")
    result["slice_bytes_on_disk"] = {f: size(work / f) for f in ("llama3-8b-slice", "slice-auto", "slice-f32")}
Path("bench/int4.json").write_text(json.dumps(result, indent=2) + "\n")

print(f"\nSmolLM2-135M int4 (GenAI, tied): {result['layers']} layers")
print("| k | W | size on disk | prefill x | decode x (predicted: MACs, bytes) | check KL | top-1 |")
print("|---|---|---|---|---|---|---|")
models = result["bench"]["models"]
print(f"| 0 | - | {result['original_bytes_on_disk'] / 1e6:.1f} MB | 1.00 | 1.00 | - | - |")
for k, m in zip((4, 8, 12), models[1:]):
    r = result["rewrites"][k]
    print(f"| {k} | int4 GPTQ | {r['bytes_on_disk'] / 1e6:.1f} MB | {m['prefill_speedup']:.2f} | "
          f"{m['decode_speedup']:.2f} ({m['predicted_decode_speedup']:.2f}, {m['predicted_decode_speedup_bytes']:.2f}) | "
          f"{r['kl']:.3f} | {r['top1']:.3f} |")
print("\nk = 8 on C4 documents 200-299:")
print("| model | perplexity | KL to the original | top-1 |")
print("|---|---|---|---|")
for label, m in zip(("original", "f32 W", "int4 W, GPTQ", "int4 W, RTN"), result["eval"]["models"]):
    print(f"| {label} | {m['ppl']:.2f} | {m.get('kl_vs_first', 0):.4f} | {m.get('top1_vs_first', 1):.3f} |")
if slice_:
    print("\nLlama-3-8B shape, 4 layers, GenAI int4, 2 layers linearised:")
    print("| model | size on disk | decode tokens/s | decode x (predicted: MACs, bytes) |")
    print("|---|---|---|---|")
    for label, m, d in zip(("original", "int4 W", "f32 W"), result["slice_bench"]["models"],
                           ("llama3-8b-slice", "slice-auto", "slice-f32")):
        print(f"| {label} | {result['slice_bytes_on_disk'][d] / 1e6:.0f} MB | {m['decode_tok_s']:.2f} | "
              f"{m['decode_speedup']:.2f} ({m['predicted_decode_speedup']:.2f}, {m['predicted_decode_speedup_bytes']:.2f}) |")
PY
