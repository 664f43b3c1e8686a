#!/usr/bin/env bash
# Set-up-to-result commands for a fresh clone (the README's two commands, and what CI runs):
#   bash scripts/dev.sh demo [demo options]   check the fused op against the reference and time both
#   bash scripts/dev.sh test [pytest options] the whole test suite (real kernels; interpreted without a GPU)
# Creates ./.venv on first use. An interpreter that already has torch >= 2.11 (a GPU machine) keeps
# its torch: the venv then sees the system site-packages and nothing replaces torch.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c 'import sys, torch; v = tuple(map(int, torch.__version__.split("+")[0].split(".")[:2])); sys.exit(v < (2, 11))' 2>/dev/null; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
VPY=.venv/bin/python
if ! "$VPY" -c 'import torch, triton' 2>/dev/null; then
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "torch==2.13.0" "triton==3.6.0" "setuptools>=69"
fi
if ! "$VPY" -c "import fused_gate, pytest, hypothesis, matplotlib" 2>/dev/null; then
  "$VPY" -m pip install -q --no-build-isolation -e ".[test,bench]"
fi

cmd=${1:-test}
shift || true
case "$cmd" in
  demo) exec "$VPY" -m fused_gate.demo "$@" ;;
  test) exec "$VPY" -m pytest tests -q -W ignore::DeprecationWarning "$@" ;;
  *) echo "usage: bash scripts/dev.sh {demo|test} [options]" >&2; exit 2 ;;
esac
