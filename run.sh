#!/usr/bin/env bash
# The one entry point for people. Usage: bash run.sh <command> [args...]
#   setup      create .venv (unless an environment is active) and install the package with its test extras
#   test       run the test suite (sets up first, with the MONAI peer, serve and dicom extras, and Debian's dicom3tools
#              and chromium where apt-get runs as root: all tests run)
#   data       generate the phantom dataset + its cache (python -m ahnet.data.phantom --help)
#   train      2D stage -> transfer -> 3D stage         (python -m ahnet.pipeline --help)
#   transfer   2D -> 3D weight transfer with checks    (python -m weights_transfer --help)
#   evaluate   per-type evaluation report               (python -m ahnet.evaluate --help)
#   demo       the whole job end to end on a small phantom, on a CPU in minutes (python -m ahnet.experiment)
#   bench      benchmarks against MONAI's AHNet; --serving: Triton (python -m ahnet.bench --help)
#   serve      Triton server for an exported ensemble   (python -m ahnet.serve --help; export: python -m ahnet.export)
#   gpu-check  the GPU proof: CUDA tests, bench, timed training (python -m ahnet.gpucheck --help; no setup, no network)
#   gpu-wheels download the wheels gpu-check installs on a bare GPU machine into .whl/ (carry .whl/ there)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$(pwd)
TORCH_PIN="torch==2.13.0"

choose_python() {
  if [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" || -n "${AHNET_NO_VENV:-}" ]]; then
    PY=$(command -v python || command -v python3)
  else
    if [[ ! -x "$ROOT/.venv/bin/python" ]]; then
      echo "[setup] creating .venv"
      python3 -m venv "$ROOT/.venv"
    fi
    PY="$ROOT/.venv/bin/python"
  fi
}

setup() {
  local extras="${1:-test}"
  choose_python
  # Re-install only when the package metadata changed (or the extras asked for are new).
  local stamp="$ROOT/.venv/.ahnet-setup-$extras"
  [[ -d "$ROOT/.venv" ]] || stamp="$ROOT/.ahnet-setup-$extras"
  local want
  want=$(cat setup.cfg pyproject.toml | sha1sum | cut -c1-16)
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$PY" -c "import ahnet, torch" 2>/dev/null; then
    return 0
  fi
  echo "[setup] installing into $("$PY" -c 'import sys; print(sys.prefix)')"
  "$PY" -m pip install -q --upgrade pip
  if ! "$PY" -c "import torch" 2>/dev/null; then
    # The pinned CPU build; an unpinned torch would pull a multi-GB CUDA build.
    "$PY" -m pip install -q "$TORCH_PIN"
  fi
  "$PY" -m pip install -q -e ".[$extras]"
  echo "$want" > "$stamp"
}

# gpu-check runs on a bare GPU machine: the active environment, else .venv when there is one, else python3; it
# never creates an environment or installs from a network (missing optional modules come from .whl/).
gpu_python() {
  if [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" ]]; then PY=$(command -v python || command -v python3); return; fi
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; return; fi
  local c
  for c in python3 python; do   # the first Python on PATH that has torch
    if command -v "$c" >/dev/null && "$c" -c "import torch" 2>/dev/null; then PY=$(command -v "$c"); return; fi
  done
  PY=$(command -v python3 || command -v python)
}

# Programs some tests need, from Debian's packages: dciodvfy (dicom3tools) validates the DICOM SEG and SR that
# predict writes, chromium renders the HTML report. Installed where apt-get runs as root (CI); elsewhere the tests that
# use them are skipped with the reason.
APT_TOOLS=("dciodvfy:dicom3tools" "chromium:chromium")

system_tools() {
  local missing=() t
  for t in "${APT_TOOLS[@]}"; do command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if ! command -v apt-get >/dev/null 2>&1 || [[ "$(id -u)" != 0 ]]; then
    echo "[setup] not installing ${missing[*]} (needs apt-get as root): the tests that use them are skipped"
    return 0
  fi
  echo "[setup] apt-get install ${missing[*]}"
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/dev/null; then
    echo "[setup] apt-get could not install ${missing[*]}: the tests that use them are skipped"
  fi
}

# the wheels gpu-check needs on a machine without a network: MONAI (pure Python), for the bench's peer rows
GPU_WHEELS=("monai==1.6.1")

cmd="${1:-help}"
shift || true
case "$cmd" in
  setup)    setup test ;;
  test)     setup "test,peer,serve,dicom"; system_tools   # peer, serve, dicom: MONAI, Triton and DICOM tests run
            exec "$PY" -m pytest -q "$@" ;;
  data)     # generate the phantom (default data/phantom), then its HDF5 cache where training looks (ahnet.paths)
            setup test
            out=""; prev=""
            for a in "$@"; do [[ "$prev" == "--out" ]] && out="$a"; prev="$a"; done
            if [[ -z "$out" ]]; then out="data/phantom"; set -- --out "$out" "$@"; fi
            "$PY" -m ahnet.data.phantom "$@"
            exec "$PY" -m ahnet.commands.cache --data "$out/dataset.json" ;;
  train)    setup test; exec "$PY" -m ahnet.pipeline "$@" ;;
  transfer) setup test; exec "$PY" -m weights_transfer "$@" ;;
  evaluate) setup test; exec "$PY" -m ahnet.evaluate "$@" ;;
  demo)     setup test; exec "$PY" -m ahnet.experiment --preset demo "$@" ;;
  bench)    extras="test,peer"; [[ " $* " == *" --serving "* ]] && extras="test,peer,serve"   # the serving section
            setup "$extras"; exec "$PY" -m ahnet.bench "$@" ;;
  serve)    setup "test,serve"; exec "$PY" -m ahnet.serve "$@" ;;
  gpu-check) gpu_python; export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"; exec "$PY" -m ahnet.gpucheck "$@" ;;
  gpu-wheels) setup test
            "$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
              --no-deps -d .whl "${GPU_WHEELS[@]}"
            ls -l .whl ;;
  help|-h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) echo "run.sh: unknown command '$cmd' (try: bash run.sh help)" >&2; exit 2 ;;
esac
