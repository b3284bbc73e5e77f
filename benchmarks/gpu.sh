#!/usr/bin/env bash
# The speed benchmarks on a CUDA device, when one is present (issue 12, item 6).
#
#   bash benchmarks/gpu.sh        # PYTHON=... to choose the interpreter; writes benchmarks/results/bench_speed_gpu.json
#
# Runs bench_speed.py rows 1, 2 and 5 on the GPU: the list and TaskBatch paths against the torch.func floors, and
# the MAML meta-step (vmap chosen by measurement) against a hand-written autograd loop; the device's name is
# recorded in the JSON (environment.device). Not run here: tracing overhead (bench_overhead.py trains on the CPU)
# and store scoring (bench_store.py, bounded by host memory bandwidth). Without a GPU it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "$PYTHON cannot import torch: set PYTHON to the project's interpreter (e.g. PYTHON=.venv/bin/python)."
    exit 1
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "No CUDA device visible to torch $("$PYTHON" -c 'import torch; print(torch.__version__)'): nothing to run."
    exit 0
fi
"$PYTHON" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
"$PYTHON" benchmarks/bench_speed.py --device cuda --only 1 2 5 --threads 4 --name bench_speed_gpu
