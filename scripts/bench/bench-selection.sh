#!/usr/bin/env bash
# How the layers are chosen and fitted, compared on SmolLM2-135M-Instruct (the Optimum export):
# k = 4, 8, 12 layers, perplexity, KL and top-1 against the original on C4 documents 200-299,
# calibrating on documents 0-199 (sequences of 512 tokens). Rows:
#   cca, cosine, residual, weighted-cca   one-shot maps, layers ranked by the statistic
#   measured                              greedy by KL on 2 probe sequences of the calibration text,
#                                         among the 2k lowest-bound layers (one-shot maps)
#   sequential                            the best ranking at k = 8 (of the rows above), maps fitted
#                                         in stages of 2 layers on the partly linearised model,
#                                         each stage on 48 sequences of the calibration text
#   drop                                  the cosine ranking's layers with their attention removed
# and the cost of measured and sequential against one calibration pass. Writes bench/selection.json
# and the table of docs/results/selection.md (python3 -m nblbench.selection);
# scripts/bench/bench-smollm2.sh runs it.
#
#   scripts/bench/bench-selection.sh            # about an hour on 2 cores; reuses bench/tmp/stats.safetensors
#   scripts/bench/bench-selection.sh --resume   # reuses the one-shot rewrites and their evaluation
#
# Needs models/smollm2-optimum (scripts/models/prepare-smollm2.sh) and GNU time; builds nbl-onnx and
# installs ONNX Runtime (scripts/setup-ort.sh) if missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
cd "$NBL_REPO"
seq_len=512 stage_size=2 stage_samples=48 probe_sequences=2 resume=0
[[ ${1:-} == --resume ]] && resume=1
model=models/smollm2-optimum/model.onnx
need_model "$(dirname "$model")"
need_gnu_time
use_nblbench
ensure_ort
nbl=$(nbl_binary)
work=bench/tmp/selection
mkdir -p "$work"

python3 -m nblbench.corpus "$work" > /dev/null
stats=bench/tmp/stats.safetensors
if [[ ! -f $stats ]]; then
  echo "==> calibrating on documents 0-199"
  "$nbl" calibrate "$model" --data "$work/calibration.json" --seq-len "$seq_len" --samples 256 -o "$stats"
fi
if ! ((resume)) || [[ ! -f $work/pass.time ]]; then
  echo "==> one calibration pass of $stage_samples sequences, for the cost of a stage"
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
    rewrite measured "$k" --criterion measured --probe-sequences "$probe_sequences"
    rewrite drop "$k" --criterion cosine --replace drop
  done
  first=(cca cosine residual weighted-cca measured drop)
  paths=()
  for name in "${first[@]}"; do for k in 4 8 12; do paths+=("$work/$name-k$k/model.onnx"); done; done
  echo "==> evaluating ${#paths[@]} rewrites and the original on documents 200-299"
  evaluate "$work/eval-first.json" "${paths[@]}"
fi

best=$(python3 -m nblbench.selection best "$work/eval-first.json")
echo "==> sequential fitting with the best ranking at k = 8: $best"
for k in 4 8 12; do
  # The layers that ranking chose, in its order: only the fitting differs.
  ids=$(python3 -m nblbench.layers selected "$work/$best-k$k/report.json")
  rewrite sequential "$k" --layer-ids "$ids" --sequential --stage-size "$stage_size" --samples "$stage_samples"
done
evaluate "$work/eval-sequential.json" "$work"/sequential-k{4,8,12}/model.onnx

python3 -m nblbench.selection report "$work" "$best" "$stage_size" "$stage_samples"
