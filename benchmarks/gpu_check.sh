#!/usr/bin/env bash
# Every GPU code path in one short go, then the GPU rows of the speed table:
#   short training runs with the replay ring on the GPU, on the host (pinned-memory copies), under bf16 autocast,
#   compiled with CUDA graphs, and with 16 vectorized envs and float16 storage; then
#   benchmarks/run.py --quick --device cuda --only sampling updates --compile (CPU and CUDA rows, GPU busy share).
#
#   bash benchmarks/gpu_check.sh [out_dir]          # default out_dir: outputs/gpu_check
#   DEVICE=cpu bash benchmarks/gpu_check.sh /tmp/x  # the same runs on the CPU (a dry run of this script)
#
# Each run's log tail and the table land in out_dir; a failing run stops the script with its exit status.
set -euo pipefail
out=${1:-outputs/gpu_check}
device=${DEVICE:-cuda}
python=${PYTHON:-python}
mkdir -p "$out"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi

common=("trainer.device=$device" trainer.steps=1000 trainer.prefill=2000 trainer.val_steps=500
        trainer.eval_every=500 trainer.progress=false trainer.eval_figure=false)
train() {
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    "$python" scripts/train.py "${common[@]}" "$@" "hydra.run.dir=$out/$name" >"$out/$name.log" 2>&1 ||
        { tail -20 "$out/$name.log"; exit 1; }
    echo "   $(tail -1 "$out/$name.log") ($((SECONDS - start)) s)"
}
train ring_on_device
train ring_on_host buffer.device=cpu
train bf16 trainer.precision=bf16
train compiled_graphs trainer.compile=true trainer.compile_mode=reduce-overhead
train vector_fp16 env.num_envs=16 buffer.obs_dtype=float16

"$python" benchmarks/run.py --quick --device "$device" --only sampling updates --compile --json "$out/bench.json" |
    tee "$out/bench.md"
