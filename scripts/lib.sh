# shellcheck shell=bash
# Shared helpers of the scripts: where the repository is, which nbl-onnx binary and which Python to
# run, and what to do when one is missing. Sourced, never run:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"    # from scripts/bench/ or scripts/models/
#   cd "$NBL_REPO"
#
# Every helper that cannot find what it needs stops the script with exit 2 and a message that says
# what to run (error messages name a script or a command, never just a missing package).
#
# Environment (all optional):
#   NBL              the nbl-onnx binary to run (default: a release build of this checkout)
#   CARGO_TARGET_DIR where that build goes (default $HOME/.cache/nbl-onnx/target, shared with the tests)
#   ORT_DYLIB_PATH   an ONNX Runtime library; when unset, scripts/setup-ort.sh installs one
#   NBL_ORT_DIR      where scripts/setup-ort.sh installs it (default $HOME/.cache/nbl-onnx/onnxruntime)
#   NBL_PY_DIR       where the Python virtualenvs live (default $HOME/.cache/nbl-onnx/py)
#   NBL_EXPORT_VENV  torch, transformers 4, optimum (scripts/fixtures/requirements.txt; default $NBL_PY_DIR/export)
#   NBL_GENAI_VENV   torch, transformers 5, onnxruntime-genai (scripts/fixtures/requirements-genai.txt;
#                    default $NBL_PY_DIR/genai)
#   PYTHON           the interpreter that creates virtualenvs (default python3)
#   NBL_NICE         niceness of the heavy Python commands (default 10)

NBL_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nbl_py_dir="${NBL_PY_DIR:-$HOME/.cache/nbl-onnx/py}"
export_venv="${NBL_EXPORT_VENV:-$nbl_py_dir/export}"
genai_venv="${NBL_GENAI_VENV:-$nbl_py_dir/genai}"
ort_venv="${NBL_ORT_DIR:-$HOME/.cache/nbl-onnx/onnxruntime}/cpu/venv"

# die MESSAGE...: print "error: MESSAGE" and exit 2 (bad or missing input, as nbl-onnx does).
die() {
  echo "error: $*" >&2
  exit 2
}

# run_nice COMMAND...: run a heavy command at lower priority.
run_nice() {
  nice -n "${NBL_NICE:-10}" "$@"
}

# nbl_binary: print the nbl-onnx binary to run. $NBL when set; else a release build of this checkout
# (cargo build --release, incremental, into $CARGO_TARGET_DIR); else an nbl-onnx on the PATH (the
# wheel's). Build messages go to stderr.
nbl_binary() {
  if [[ -n "${NBL:-}" ]]; then
    [[ -x "$NBL" ]] || die "NBL=$NBL is not an executable"
    echo "$NBL"
    return
  fi
  if command -v cargo >/dev/null; then
    local target="${CARGO_TARGET_DIR:-$HOME/.cache/nbl-onnx/target}"
    echo "==> building nbl-onnx (release, in $target)" >&2
    (cd "$NBL_REPO" && CARGO_TARGET_DIR="$target" cargo build --release --locked --quiet) >&2 \
      || die "cargo build --release failed (see above)"
    echo "$target/release/nbl-onnx"
    return
  fi
  if command -v nbl-onnx >/dev/null; then
    command -v nbl-onnx
    return
  fi
  die "no nbl-onnx: install Rust (https://rustup.rs) so that this script can build it, or install the" \
    "wheel (README.md: Install), or set NBL=/path/to/nbl-onnx"
}

# ensure_ort [--gpu]: make sure nbl-onnx finds an ONNX Runtime library: unless ORT_DYLIB_PATH is set,
# run scripts/setup-ort.sh (idempotent: a second run only says where the library is).
# shellcheck disable=SC2120  # the flag is optional
ensure_ort() {
  [[ -n "${ORT_DYLIB_PATH:-}" ]] && return
  "$NBL_REPO/scripts/setup-ort.sh" "$@" >&2
}

# ort_genai_python: print the Python of scripts/setup-ort.sh's virtualenv, with onnxruntime-genai
# installed into it if missing (what scripts/genai_generate.py runs with).
ort_genai_python() {
  "$NBL_REPO/scripts/setup-ort.sh" --with-genai >&2 || die "scripts/setup-ort.sh --with-genai failed (see above)"
  "$ort_venv/bin/python" -c "import onnxruntime_genai" 2>/dev/null \
    || die "$ort_venv has no onnxruntime_genai: run scripts/setup-ort.sh --with-genai (NBL_ORT_DIR=${NBL_ORT_DIR:-unset})"
  echo "$ort_venv/bin/python"
}

# ensure_venv DIR REQUIREMENTS [PACKAGE... | --no-deps PACKAGE]...: create the virtualenv DIR if
# missing, install the pinned REQUIREMENTS (a no-op, without network, when they are satisfied), then
# the extra packages under the same pins as constraints. A first install downloads several GB (torch
# pulls the CUDA runtime wheels; everything runs on the CPU). Messages go to stderr.
ensured=" "
ensure_venv() {
  local venv="$1" req="$2"
  shift 2
  [[ "$ensured" == *" $venv "* ]] && return 0  # once per script run
  ensured+="$venv "
  local python="${PYTHON:-python3}"
  if [[ ! -x "$venv/bin/python" ]]; then
    command -v "$python" >/dev/null || die "$python not found; install Python 3.11 (or set PYTHON)"
    echo "  creating virtualenv $venv ($("$python" --version 2>&1)); the first install downloads several GB" >&2
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv" >&2 || die "$python -m venv failed (on Debian: apt-get install python3-venv)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  fi
  local extras=() nodeps=()
  while (($#)); do
    if [[ "$1" == --no-deps ]]; then nodeps+=("$2"); shift 2; else extras+=("$1"); shift; fi
  done
  echo "  $venv: installing / checking $(basename "$req")${extras[*]:+ + ${extras[*]}}${nodeps[*]:+ + ${nodeps[*]} (--no-deps)}" >&2
  run_nice "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" >&2 \
    || die "installing $req into $venv failed (see above)"
  if ((${#extras[@]})); then
    run_nice "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$req" "${extras[@]}" >&2 \
      || die "installing ${extras[*]} into $venv failed (see above)"
  fi
  if ((${#nodeps[@]})); then
    run_nice "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "${nodeps[@]}" >&2 \
      || die "installing ${nodeps[*]} into $venv failed (see above)"
  fi
}

# export_python: print the Python of the export virtualenv (torch, transformers 4, optimum, onnx),
# created or completed first from scripts/fixtures/requirements.txt.
export_python() {
  ensure_venv "$export_venv" "$NBL_REPO/scripts/fixtures/requirements.txt"
  echo "$export_venv/bin/python"
}

# genai_python: print the Python of the GenAI builder's virtualenv (torch, transformers 5,
# onnxruntime-genai, onnx), created or completed first from scripts/fixtures/requirements-genai.txt.
genai_python() {
  ensure_venv "$genai_venv" "$NBL_REPO/scripts/fixtures/requirements-genai.txt"
  echo "$genai_venv/bin/python"
}

# python_with MODULE...: print the first Python that imports every MODULE: $PYTHON, the active
# virtualenv, the export and GenAI virtualenvs, python3. Prints nothing and fails when none does.
python_with() {
  local imports
  imports=$(IFS=,; echo "$*")
  local candidate
  for candidate in "${PYTHON:-}" "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" "$export_venv/bin/python" \
    "$genai_venv/bin/python" python3; do
    [[ -n "$candidate" ]] || continue
    command -v "$candidate" >/dev/null || continue
    if "$candidate" -c "import $imports" 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  return 1
}

# need_model DIR: stop unless DIR holds a model.onnx, saying which script makes it.
need_model() {
  [[ -f "$1/model.onnx" ]] || die "$1/model.onnx not found: run scripts/models/prepare-smollm2.sh first"
}

# need_gnu_time: make sure GNU time (/usr/bin/time: wall time and peak memory) is installed; as root
# on Debian it is installed, otherwise the script stops saying what to install.
need_gnu_time() {
  [[ -x /usr/bin/time ]] && return
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "==> installing GNU time (apt-get install time)" >&2
    { apt-get update -qq && apt-get install -y -qq time; } >&2
  fi
  [[ -x /usr/bin/time ]] || die "/usr/bin/time not found: install GNU time (Debian: apt-get install time)"
}

# use_nblbench: let `python3 -m nblbench.<module>` find the scripts' Python package
# (scripts/bench/nblbench; standard library only, Python 3.9+).
use_nblbench() {
  export PYTHONPATH="$NBL_REPO/scripts/bench${PYTHONPATH:+:$PYTHONPATH}"
  command -v python3 >/dev/null || die "python3 not found; install Python 3.9 or later"
}
