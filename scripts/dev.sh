#!/usr/bin/env bash
# Set-up-to-result commands for a fresh clone (the commands of the README and docs/benchmarks.md, and what CI runs):
#   bash scripts/dev.sh demo [demo options]    train MMoE with the softmax gate and the attention gate
#   bash scripts/dev.sh test [pytest options]  the whole test suite (real kernels; interpreted without a GPU)
#   bash scripts/dev.sh torchrec [app options] the TorchRec app on 2 processes (python -m fused_gate.apps.torchrec)
#   bash scripts/dev.sh bench [bench options]  the benchmark suite and its report under bench/results/
#   bash scripts/dev.sh gpu [OUTDIR] [--dry-run] on a GPU machine: tests, bench, tuning, traffic; a few files in OUTDIR
# Creates ./.venv on first use. An interpreter that already has torch >= 2.11 (a GPU machine, maybe
# offline) keeps its torch and its packages: the venv then sees the system site-packages and the
# package is installed with --no-deps, so nothing is downloaded and nothing replaces torch.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: bash scripts/dev.sh {demo|test|bench|gpu|torchrec} [options]   (options: the command's own, e.g. demo --help)"
cmd=${1:-test}
case "$cmd" in
  demo | test | bench | gpu | torchrec) shift || true ;;
  -h | --help | help) echo "$usage"; exit 0 ;;
  *) echo "dev.sh: unknown command '$cmd'; $usage" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c 'import sys, torch; v = tuple(map(int, torch.__version__.split("+")[0].split(".")[:2])); sys.exit(v < (2, 11))' 2>/dev/null; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
VPY=.venv/bin/python
if grep -q "include-system-site-packages = true" .venv/pyvenv.cfg; then
  if ! "$VPY" -c "import fused_gate" 2>/dev/null; then
    # The build reads the licence as an SPDX expression: setuptools >= 77 (an older system one is shadowed).
    "$VPY" -c 'import sys, setuptools; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null ||
      "$VPY" -m pip install -q "setuptools>=77"
    "$VPY" -m pip install -q --no-deps --no-build-isolation -e .
  fi
else
  if ! "$VPY" -c 'import torch, triton' 2>/dev/null; then
    "$VPY" -m pip install -q --upgrade pip
    "$VPY" -m pip install -q "torch==2.13.0" "triton==3.6.0" "setuptools>=77"
  fi
  # The integrations are looked up, not imported: importing deepctr_torch queries PyPI from a thread.
  if ! "$VPY" -c "import fused_gate, pytest, hypothesis, pytest_benchmark, matplotlib, importlib.util as u, sys
sys.exit(not all(map(u.find_spec, ('torch_rechub', 'deepctr_torch', 'requests', 'tensordict', 'torchmetrics', 'pyre_extensions'))))" 2>/dev/null; then
    "$VPY" -m pip install -q --no-build-isolation -e ".[test,bench,integrations,torchrec]"
  fi
  # TorchRec (fused_gate.apps.torchrec and its test) and fbgemm's CPU build, without their dependencies:
  # torchrec declares fbgemm-gpu, the CUDA build, which would replace the CPU one (the torchrec extra above
  # brings TorchRec's other dependencies).
  if ! "$VPY" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('torchrec', 'fbgemm_gpu'))))" 2>/dev/null; then
    "$VPY" -m pip install -q --no-deps "torchrec==1.8.0" "fbgemm-gpu-cpu==1.8.0"
  fi
fi

case "$cmd" in
  demo) exec "$VPY" -m fused_gate.apps.demo "$@" ;;
  # test: the whole suite, or the test files / node ids given first (test tests/test_ops.py -k mask)
  test) if [ $# -eq 0 ] || [ ! -e "${1%%::*}" ]; then set -- tests "$@"; fi
        exec "$VPY" -m pytest -q -W ignore::DeprecationWarning "$@" ;;
  bench) exec "$VPY" -m bench.run "$@" ;;
  gpu) exec "$VPY" -m bench.campaign "$@" ;;
  torchrec) exec "$VPY" -m torch.distributed.run --standalone --nproc-per-node 2 -m fused_gate.apps.torchrec "$@" ;;
esac
