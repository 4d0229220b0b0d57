#!/usr/bin/env bash
# Runs one fuzz target for a bounded time: scripts/fuzz.sh model|stats|data SECONDS [libFuzzer flags]
# (e.g. -runs=1000000 to stop after a million executions)
# Uses cargo-fuzz (libFuzzer) on the stable toolchain (RUSTC_BOOTSTRAP=1 lets it pass its -Z
# flags). The corpus starts from the small seeds in fuzz/seeds/TARGET (decoders of hidden size 8,
# a statistics file of them, data files; the fixtures are too large to mutate quickly) and grows
# under fuzz/corpus/TARGET, which is not committed; crashes land in fuzz/artifacts/TARGET and each
# becomes a regression test in tests/hostile.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: $0 model|stats|data SECONDS}"
seconds="${2:?usage: $0 model|stats|data SECONDS}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
corpus="fuzz/corpus/$target"
mkdir -p "$corpus"
case "$target" in
  model|stats|data) ;;
  *) echo "unknown target $target (model, stats, data)" >&2; exit 2 ;;
esac
export RUSTC_BOOTSTRAP=1
# Sanitizer builds of their own, away from the test builds.
export CARGO_TARGET_DIR="${NBL_FUZZ_TARGET_DIR:-$HOME/.cache/nbl-onnx/fuzz-target}"
cd fuzz
exec cargo fuzz run "$target" "../$corpus" "../fuzz/seeds/$target" -- -max_total_time="$seconds" \
  -print_final_stats=1 -rss_limit_mb=4096 "${@:3}"
