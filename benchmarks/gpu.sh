#!/usr/bin/env bash
# Every GPU check in one go, for a CUDA machine (the lent GPU machine included): install the
# wheels it lacks (if .whl/ is here, from ../shared/gpu/fetch-wheels.sh), run the gpu-marked
# tests, then the GPU benchmarks (benchmarks/gpu.py, then gpu_predict.py), whose tables come last.
# Without CUDA the tests are skipped and the benchmark runs its small CPU fallback.
#   bash benchmarks/gpu.sh [gpu.py options]        PYTHON=... picks the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
has_cuda=0
"$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" && has_cuda=1
# The wheels are for the GPU machine's interpreter: a CPU machine runs the fallback with its own.
if [ "$has_cuda" = 1 ] && [ -d .whl ] && ! "$PYTHON" -c "import distributed, dask_cuda" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
if [ "$has_cuda" = 1 ]; then
  "$PYTHON" -c "import torch; print('CUDA:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
  # Only the files that hold gpu tests: the others import the dashboard's and notebooks' test
  # dependencies, which a bare GPU machine lacks. A failing test still lets the benchmark run.
  "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider $(grep -rl "mark.gpu" --include="test_*.py" tests) \
    || tests_failed=1
else
  echo "No CUDA device: gpu-marked tests skip; the benchmark runs its CPU fallback."
fi
"$PYTHON" benchmarks/gpu.py "$@"
"$PYTHON" benchmarks/gpu_predict.py "$@"
exit "${tests_failed:-0}"
