#!/usr/bin/env bash
# How the layers are chosen and fitted, compared on SmolLM2-135M-Instruct (the Optimum export):
# k = 4, 8, 12 layers, perplexity, KL and top-1 against the original on C4 documents 200-299,
# calibrating on documents 0-199 (blocks of 512 tokens). Rows:
#   cca, cosine, residual, weighted-cca   one-shot maps, layers ranked by the statistic
#   measured                              greedy by KL on 2 probe blocks of the calibration text,
#                                         among the 2k lowest-bound layers (one-shot maps)
#   sequential                            the best ranking at k = 8 (of the rows above), maps fitted
#                                         in stages of 2 layers on the partly linearised model,
#                                         each stage on 48 blocks of the calibration text
#   drop                                  the cosine ranking's layers with their attention removed
# and the cost of measured and sequential against one calibration pass. Writes
# bench/selection.{json,md}; scripts/bench-smollm2.sh runs it and puts the table in the README.
#
#   scripts/bench-selection.sh            # about an hour on 2 cores; reuses bench/tmp/stats.safetensors
#   scripts/bench-selection.sh --resume   # reuses the one-shot rewrites and their evaluation
set -euo pipefail
cd "$(dirname "$0")/.."
seq_len=512 stage_size=2 stage_samples=48 probe_blocks=2 resume=0
[[ ${1:-} == --resume ]] && resume=1
data=../shared/data/c4_demo.json
model=models/smollm2-optimum/model.onnx
[[ -f $data ]] || { echo "error: $data not found" >&2; exit 2; }
[[ -f $model ]] || { echo "error: $model not found: run scripts/prepare-smollm2.sh" >&2; exit 2; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/nbl-onnx/target}"
cargo build --release --locked --quiet
nbl="$CARGO_TARGET_DIR/release/nbl-onnx"
work=bench/tmp/selection
mkdir -p "$work"

python3 - "$data" "$work" <<'PY'
import json, sys
docs = json.load(open(sys.argv[1]))
json.dump(docs[:200], open(f"{sys.argv[2]}/calibration.json", "w"))
json.dump(docs[200:300], open(f"{sys.argv[2]}/evaluation.json", "w"))
PY
stats=bench/tmp/stats.safetensors
if [[ ! -f $stats ]]; then
  echo "==> calibrating on documents 0-199"
  "$nbl" calibrate "$model" --data "$work/calibration.json" --seq-len "$seq_len" --samples 256 -o "$stats"
fi
if ! ((resume)) || [[ ! -f $work/pass.time ]]; then
  echo "==> one calibration pass of $stage_samples blocks, for the cost of a stage"
  /usr/bin/time -f "%e" -o "$work/pass.time" "$nbl" calibrate "$model" --data "$work/calibration.json" \
    --seq-len "$seq_len" --samples "$stage_samples" -o "$work/pass.safetensors" 2> "$work/pass.log"
fi

rewrite() { # rewrite NAME K ARGS...: the rewrite of K layers (or of --layer-ids) into $work/NAME-kK, timed
  local name=$1 k=$2
  shift 2
  local out="$work/$name-k$k"
  rm -rf "$out" && mkdir -p "$out"
  echo "==> $name, k = $k"
  local choice=(--layers "$k")
  [[ " $* " == *" --layer-ids "* ]] && choice=()
  /usr/bin/time -f "%e" -o "$out/time" "$nbl" rewrite "$model" --stats "$stats" "${choice[@]}" \
    --data "$work/calibration.json" --seq-len "$seq_len" -o "$out/model.onnx" --report "$out/report.json" "$@" \
    2> "$out/log"
}
evaluate() { # evaluate OUT MODELS...: the original and MODELS on documents 200-299
  local out=$1
  shift
  "$nbl" eval "$model" "$@" --data "$work/evaluation.json" --seq-len "$seq_len" --engine ort --json > "$out"
}

if ((resume)) && [[ -f $work/eval-first.json ]]; then
  echo "==> reusing the one-shot rewrites and $work/eval-first.json"
else
  for k in 4 8 12; do
    for criterion in cca cosine residual weighted-cca; do
      rewrite "$criterion" "$k" --criterion "$criterion"
    done
    rewrite measured "$k" --criterion measured --probe-blocks "$probe_blocks"
    rewrite drop "$k" --criterion cosine --replace drop
  done
  first=(cca cosine residual weighted-cca measured drop)
  paths=()
  for name in "${first[@]}"; do for k in 4 8 12; do paths+=("$work/$name-k$k/model.onnx"); done; done
  echo "==> evaluating ${#paths[@]} rewrites and the original on documents 200-299"
  evaluate "$work/eval-first.json" "${paths[@]}"
fi

best=$(python3 - "$work/eval-first.json" <<'PY'
import json, sys
models = json.load(open(sys.argv[1]))["models"]
scores = {m["path"].split("/")[-2]: m["ppl"] for m in models[1:]}
ranked = [name for name in ("cca", "cosine", "residual", "weighted-cca", "measured")]
print(min(ranked, key=lambda n: scores[f"{n}-k8"]))
PY
)
echo "==> sequential fitting with the best ranking at k = 8: $best"
for k in 4 8 12; do
  # The layers that ranking chose, in its order: only the fitting differs.
  ids=$(python3 -c 'import json, sys; print(",".join(map(str, json.load(open(sys.argv[1]))["selected"])))' \
    "$work/$best-k$k/report.json")
  rewrite sequential "$k" --layer-ids "$ids" --sequential --stage-size "$stage_size" --samples "$stage_samples"
done
evaluate "$work/eval-sequential.json" "$work"/sequential-k{4,8,12}/model.onnx

python3 - "$work" "$best" "$stage_size" "$stage_samples" <<'PY'
import json, sys
from pathlib import Path
work, best, stage_size, stage_samples = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pass_s = float((work / "pass.time").read_text())
scores = {}
for name in ("eval-first.json", "eval-sequential.json"):
    models = json.loads((work / name).read_text())["models"]
    original = models[0]
    for m in models[1:]:
        scores[m["path"].split("/")[-2]] = m
rows = [{"method": "original", "k": 0, "layers": [], "ppl": original["ppl"], "kl": 0.0, "top1": 1.0}]
for method in ("cca", "cosine", "residual", "weighted-cca", "measured", "sequential", "drop"):
    for k in (4, 8, 12):
        label = f"{method}-k{k}"
        report = json.loads((work / label / "report.json").read_text())
        score = scores[label]
        row = {"method": method if method != "sequential" else f"sequential ({best})", "k": k,
               "layers": report["selected"], "ppl": score["ppl"], "kl": score["kl_vs_first"],
               "top1": score["top1_vs_first"], "rewrite_s": float((work / label / "time").read_text())}
        if report.get("measured"):
            row["passes"] = report["measured"]["passes"]
            row["probe_tokens"] = report["measured"]["probe_tokens"]
            row["selection_s"] = report["measured"]["seconds"]
        if report.get("stages"):
            row["stages"] = len(report["stages"])
            row["stage_s"] = sum(s["seconds"] for s in report["stages"])
        rows.append(row)
base = original["ppl"]
for k in (8, 12):
    reference = min(r["ppl"] for r in rows if r["k"] == k and r["method"] in ("cca", "cosine"))
    for r in rows:
        if r["k"] == k:
            r["increase_vs_best_published"] = (r["ppl"] - base) / (reference - base)
result = {"model": "SmolLM2-135M-Instruct (Optimum)", "calibration": "C4 documents 0-199, 512-token blocks",
          "evaluation": "C4 documents 200-299", "stage_size": stage_size, "stage_samples": stage_samples,
          "calibration_pass_s": pass_s, "rows": rows}
(Path("bench") / "selection.json").write_text(json.dumps(result, indent=2) + "\n")
lines = [
    "| method | k | layers | perplexity | KL | top-1 | increase vs best of cca/cosine | extra cost |",
    "|---|---|---|---|---|---|---|---|",
]
for r in rows:
    cost = ""
    if "passes" in r:
        cost = f"{r['passes']} passes of {r['probe_tokens']} tokens, {r['selection_s']:.0f} s ({r['selection_s'] / pass_s:.1f} calibration passes)"
    if "stages" in r:
        cost = f"{r['stages']} stages, {r['stage_s']:.0f} s ({r['stage_s'] / pass_s:.1f} calibration passes)"
    ratio = f"{r['increase_vs_best_published']:.2f}" if "increase_vs_best_published" in r else ""
    layers = ",".join(map(str, sorted(r["layers"]))) or "-"
    lines.append(f"| {r['method']} | {r['k']} | {layers} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.4f} | {ratio} | {cost} |")
note = (f"\nA calibration pass of {stage_samples} blocks of 512 tokens took {pass_s:.0f} s; the ratio column is the "
        "perplexity increase over the original relative to the better of cca and cosine at the same k.\n")
(Path("bench") / "selection.md").write_text("\n".join(lines) + "\n" + note)
print("\n".join(lines) + "\n" + note)
# The README shows the table between its selection markers.
readme = Path("README.md")
begin, end = "<!-- selection:begin -->\n", "<!-- selection:end -->"
text = readme.read_text()
head, rest = text.split(begin, 1)
readme.write_text(head + begin + "\n".join(lines) + "\n" + note + end + rest.split(end, 1)[1])
PY
