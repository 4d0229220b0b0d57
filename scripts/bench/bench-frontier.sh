#!/usr/bin/env bash
# The frontier of speed against quality on SmolLM2-135M-Instruct (the Optimum export): calibrate every
# unit (attention, MLP, whole layer, runs of 2-4 layers, folds of 1-4) on C4 documents 0-199, then
# `nbl-onnx sweep` at held-out KL budgets 0.1, 0.2 and 0.3 on documents 200-299: the budget mode among
# all units, among attention alone and among each other kind alone, beside the paper's NBL (CCA
# order), the cosine order and attention dropping.
# Each budget's chosen points are timed against the original in one bench run. Writes
# bench/frontier/{sweep.json,sweep.md,sweep.svg}, bench/frontier.json (the costs), and the tables of
# docs/results/frontier.md with the chart docs/results/frontier.svg (python3 -m nblbench.frontier).
#
#   scripts/bench/bench-frontier.sh            # about 70 minutes on 2 cores; run nothing else meanwhile
#   scripts/bench/bench-frontier.sh --resume   # reuses the calibrations in bench/tmp/frontier
#
# Needs models/smollm2-optimum (scripts/models/prepare-smollm2.sh) and GNU time; builds nbl-onnx and
# installs ONNX Runtime (scripts/setup-ort.sh) if missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
cd "$NBL_REPO"
seq_len=512 samples=64 probe_sequences=2 heldout_sequences=8 budgets=0.1,0.2,0.3 runs=5 resume=0
[[ ${1:-} == --resume ]] && resume=1
model=models/smollm2-optimum/model.onnx
need_model "$(dirname "$model")"
need_gnu_time
use_nblbench
ensure_ort
nbl=$(nbl_binary)
work=bench/tmp/frontier
mkdir -p "$work" bench/frontier

calibrate() { # calibrate NAME UNITS: statistics of UNITS on documents 0-199, timed, with peak memory
  local name=$1 units=$2
  if ((resume)) && [[ -f $work/$name.safetensors ]]; then return; fi
  echo "==> calibrating $units on $samples sequences of $seq_len tokens"
  /usr/bin/time -f "%e %M" -o "$work/$name.time" "$nbl" calibrate "$model" --seq-len "$seq_len" \
    --samples "$samples" --units "$units" -o "$work/$name.safetensors" 2> "$work/$name.log"
}
calibrate attention attention
calibrate all all

echo "==> sweep at held-out KL $budgets"
/usr/bin/time -f "%e %M" -o "$work/sweep.time" "$nbl" sweep "$model" --stats "$work/all.safetensors" \
  --units all --seq-len "$seq_len" --max-kl "$budgets" --probe-sequences "$probe_sequences" \
  --heldout-sequences "$heldout_sequences" --bench --runs "$runs" -o bench/frontier 2> "$work/sweep.log" \
  > /dev/null
tail -n 3 "$work/sweep.log"
python3 -m nblbench.frontier "$work" bench/frontier
# bench/ holds JSON only: the table and the chart are in docs/results/ now.
rm -f bench/frontier/sweep.md bench/frontier/sweep.svg
