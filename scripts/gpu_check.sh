#!/usr/bin/env bash
# The GPU checks in one run, on a machine with a CUDA GPU where this package and its dependencies import
# (pip install -e '.[dev]', or PYTHONPATH): the default model converted once, the CUDA equivalence tests
# (tests/engine/test_cuda.py, real weights included), then every notebook's smoke run on CUDA in fp32 and in bf16
# (tests/report/test_notebooks.py with LLMOPT_TEST_DEVICE=cuda). Usage: scripts/gpu_check.sh [LOG_DIR]
# JOBS=N runs N notebooks at once where pytest-xdist is installed (smoke runs: correctness, not timings).
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-gpu-check-logs}
mkdir -p "$logs"
py=${PYTHON:-python3}
jobs=${JOBS:-8}
start=$(date +%s)
stamp() { echo "== $1 (t=$(( $(date +%s) - start ))s)"; }
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1
failed=0

stamp "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__,
'|', torch.cuda.get_device_name(), '| git', __import__('llmopt.bench.environment', fromlist=['x']).git_revision())" || exit 1

stamp "default model (converted from the GGUF once)"
$py -m llmopt prepare 2>&1 | tail -2

stamp "tests/engine/test_cuda.py"
timeout 240 $py -m pytest tests/engine/test_cuda.py -q -p no:cacheprovider -rs 2>&1 | tee "$logs/test_cuda.log" | tail -8
[ "${PIPESTATUS[0]}" = 0 ] || failed=1

parallel=""
$py -c "import xdist" 2>/dev/null && parallel="-n $jobs"
for dtype in fp32 bf16; do
  stamp "notebook smoke runs on cuda, $dtype"
  LLMOPT_TEST_DEVICE=cuda LLMOPT_TEST_DTYPE=$dtype timeout 300 $py -m pytest tests/report/test_notebooks.py -k "not random_checkpoint" -q \
    -p no:cacheprovider $parallel --durations=8 2>&1 | tee "$logs/notebooks_cuda_$dtype.log" | \
    grep -E "^(E  |FAILED|[0-9.]+s call)|passed|failed" | head -30
  [ "${PIPESTATUS[0]}" = 0 ] || failed=1
done
stamp "done: $([ $failed = 0 ] && echo all passed || echo FAILURES, see $logs)"
exit $failed
