#!/usr/bin/env bash
# Peak memory of `nbl-onnx calibrate` against the number of calibration tokens: two runs over 1x
# and 4x the blocks. Statistics are O(layers x d^2) and activations are never kept, so the peak
# should not grow with the tokens. Writes bench/calibrate-memory.json.
#
#   scripts/bench-calibrate-memory.sh MODEL DATA [SAMPLES] [SEQ_LEN]
#   e.g. scripts/bench-calibrate-memory.sh models/smollm2-optimum/model.onnx data.json 8 512
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 2 ]] || { echo "usage: $0 MODEL DATA [SAMPLES] [SEQ_LEN]" >&2; exit 2; }
model=$1 data=$2 samples=${3:-8} seq_len=${4:-512}
[[ -x /usr/bin/time ]] || { apt-get update -qq && apt-get install -y -qq time; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/nbl-onnx/target}"
cargo build --release --locked --quiet
bin="$CARGO_TARGET_DIR/release/nbl-onnx"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
runs=()
for n in "$samples" $((samples * 4)); do
  /usr/bin/time -f "%M %e" -o "$tmp/time" "$bin" calibrate "$model" --data "$data" --samples "$n" \
    --seq-len "$seq_len" -o "$tmp/stats.safetensors" 2> "$tmp/log"
  read -r rss_kb seconds < "$tmp/time"
  stats_bytes=$(stat -c %s "$tmp/stats.safetensors")
  echo "samples $n ($((n * seq_len)) tokens): peak RSS $((rss_kb / 1024)) MiB, $seconds s, statistics $((stats_bytes / 1048576)) MiB"
  runs+=("{\"samples\": $n, \"tokens\": $((n * seq_len)), \"peak_rss_mb\": $((rss_kb / 1024)), \"seconds\": $seconds, \"stats_mb\": $((stats_bytes / 1048576))}")
done
mkdir -p bench
printf '{"model": "%s", "seq_len": %s, "runs": [%s, %s]}\n' "$model" "$seq_len" "${runs[0]}" "${runs[1]}" > bench/calibrate-memory.json
echo "wrote bench/calibrate-memory.json"
