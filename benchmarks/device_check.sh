#!/usr/bin/env bash
# Weight matching on a CUDA machine, in under 3 minutes: the CUDA tests, then the benchmark
# (autoperm vs the cache-free reference) with --device cuda. Run from anywhere:
#   bash benchmarks/device_check.sh
# Output goes to stdout and to $OUT/device_check.txt when $OUT is set.
# Needs python with a CUDA build of torch, scipy, numpy, pydantic, pyyaml and pytest already
# installed (the device machine has no network): only autoperm itself is installed here.
set -uo pipefail
cd "$(dirname "$0")/.."
log="${OUT:-/tmp}/device_check.txt"
mkdir -p "$(dirname "$log")"
exec > >(tee "$log") 2>&1

python - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
PY
pip install --quiet --no-deps --no-build-isolation -e . \
    || { echo "pip install -e . failed; using the source tree"; export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }

status=0
echo "== CUDA tests"
timeout 90 python -m pytest -q tests -k cuda -p no:cacheprovider || status=1

echo "== weight matching benchmark on cuda (torchvision models if installed, else autoperm's)"
timeout 150 python benchmarks/bench_weight_matching.py --device cuda --repeats 3 --reference-repeats 1 || status=1
exit $status
