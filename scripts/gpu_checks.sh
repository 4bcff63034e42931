#!/usr/bin/env bash
# The checks that need a CUDA device, in one call (CI has no GPU; run this where one is lent):
#   bash scripts/gpu_checks.sh [OUT_DIR]
# 1. the dispatch backends on CUDA: compiled Triton kernels (and tutel, when importable) equal the
#    eager oracle, forward and backward, every routing case (tests/test_gpu_backends.py, -m gpu too);
# 2. `make demo`'s run on the GPU (TrainConfig.device "auto" picks it): trains, evaluates, saves;
# 3. bench_moe_layer.py's GPU rows (--quick grid);
# 4. model, merged-inference, trainer, golden-curve and FSDP tests with the GPU visible (gpu-marked ones too).
# Each stage has its own time limit and writes its log under OUT_DIR; a table of exit codes ends it.
# Expects torch, triton and the package's dependencies importable by python3 (see setup.py).
set -uo pipefail
out=${1:-${OUT:-gpu_checks_out}}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
declare -A status

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    status[$name]="rc $? in $((SECONDS - start))s"
    tail -n 12 "$out/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee -a "$out/device.txt"

stage gpu_backends 150 $py -m pytest -q -m "not slow" -p no:cacheprovider tests/test_gpu_backends.py
stage demo 200 $py -m moe_gen.cli pretrain --config demo --overwrite --output /tmp/moe_gen_demo_gpu
cp /tmp/moe_gen_demo_gpu/logs/train.jsonl "$out/demo_train.jsonl" 2>/dev/null
stage bench_moe_layer 70 $py scripts/bench_moe_layer.py --quick --no-cpu --out "$out/moe_layer.json"
stage model_tests 120 $py -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_merged_inference.py \
    tests/test_trainer.py tests/test_golden.py tests/test_gpu_fsdp.py -m "not slow"

echo "=== summary"
for name in gpu_backends demo bench_moe_layer model_tests; do
    printf '%-16s %s\n' "$name" "${status[$name]:-not run}"
done | tee "$out/summary.txt"
