#!/usr/bin/env bash
# Set up a virtual environment (CPU PyTorch first, then the package with its dev extras) and run a job.
#   bash scripts/dev.sh demo [demo options]   # the main job
#   bash scripts/dev.sh test [pytest options] # the test suite
# VENV=path chooses the environment folder (default .venv); an existing one is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
python="${PYTHON:-python3}"
say() { echo "dev.sh: $*" >&2; }
if [ ! -x "$venv/bin/python" ]; then
  say "creating the virtual environment $venv"
  "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
if ! python -c "import lightning_metaif, torch, lightning, higher, wandb, sklearn, jsonargparse, matplotlib, pytest, mkdocs, material, mkdocstrings" >/dev/null 2>&1; then
  start=$SECONDS
  say "installing into $venv (first run only; a few minutes)"
  say "[1/3] upgrading pip"
  python -m pip install --quiet --upgrade pip
  # The CPU build first: a bare `torch` requirement would pull several GB of CUDA packages.
  if python -c "import torch" >/dev/null 2>&1; then
    say "[2/3] PyTorch already installed"
  else
    say "[2/3] PyTorch 2.13.0, CPU build (about 200 MB download)"
    python -m pip install --quiet "torch==2.13.0"
  fi
  say "[3/3] lightning-metaif and its extras [dev]: Lightning, W&B, higher, scikit-learn, matplotlib, pytest, ruff, MkDocs"
  python -m pip install --quiet -e ".[dev]"
  say "installed in $((SECONDS - start)) s"
fi
job="${1:-}"
shift || true
case "$job" in
  demo) exec lightning-metaif demo "$@" ;;
  test) exec python -m pytest "$@" ;;
  *) echo "usage: bash scripts/dev.sh {demo|test} [options]" >&2; exit 2 ;;
esac
