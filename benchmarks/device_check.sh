#!/usr/bin/env bash
# Weight matching on a CUDA machine, in about 9 minutes: the CUDA tests, the benchmark (autoperm vs
# the cache-free reference) with --device cuda, the LAP backends on the GPU (the torch auction
# against scipy / lapx on the host), and a LLaMA-7B-shaped planted pair in bfloat16
# (benchmarks/bench_llm_scale.py; needs transformers for the spec and about 45 GB of disk in
# $LLM_WORKDIR, default ./llm-scale-checkpoints). Run from anywhere:
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

echo "== LAP backends: auction on the GPU vs scipy / lapx on the host"
timeout 120 python benchmarks/bench_lap.py --device cuda --sizes 1024,4096,11008 --kinds planted,random \
    --methods scipy,lapx,auction,auction+warm --repeats 3 --max-seconds 20 || status=1

echo "== LLaMA-7B-shaped planted pair, bfloat16, on cuda"
timeout 330 python benchmarks/bench_llm_scale.py --shapes llama-7b --pairs planted --dtype bfloat16 \
    --device cuda --max-iter 10 --workdir "${LLM_WORKDIR:-llm-scale-checkpoints}" || status=1
exit $status
