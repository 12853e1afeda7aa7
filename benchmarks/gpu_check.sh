#!/usr/bin/env bash
# Every GPU code path in one short go, then the GPU rows of the speed table:
#   tests/test_cuda.py (each CUDA path against its CPU counterpart: the GRU, the ring on the GPU or behind pinned
#   memory, every model's updates, eager and as one CUDA graph); short training runs with the replay ring on the GPU,
#   on the host (pinned-memory copies), under bf16 autocast, compiled with CUDA graphs, with 16 vectorized envs and
#   float16 storage, eager (trainer.cuda_graph=false) and compiled inside the update's graph; then
#   benchmarks/run.py --quick --device cuda --device-only --only sampling updates --compile (the CUDA rows, with the
#   share of the time the GPU was busy). tests/test_fused_gru.py runs with the tests: Triton's interpreter on the CPU.
#
#   bash benchmarks/gpu_check.sh [out_dir]          # default out_dir: outputs/gpu_check
#   DEVICE=cpu bash benchmarks/gpu_check.sh /tmp/x  # the same runs on the CPU (a dry run of this script)
#   PARTS="tests runs" bash benchmarks/gpu_check.sh  # some of the three parts (tests, runs, bench), e.g. to split
#                                                    # them over two commands that each have a time limit
#   PARALLEL=1 bash benchmarks/gpu_check.sh          # the tests (over 4 pytest-xdist workers where installed) and
#                                                    # the runs all at once, then the benchmarks alone on the GPU
#
# GPU time is scarce, so a failing check does not stop the others: each one's log lands in out_dir (its last lines
# are printed when it fails), every check has a time limit (CHECK_TIMEOUT seconds, default 240; TESTS_TIMEOUT, default
# 480, for tests/test_cuda.py), and the script exits 1 at the end if any check failed.
set -uo pipefail
out=${1:-outputs/gpu_check}
device=${DEVICE:-cuda}
python=${PYTHON:-$(command -v python || command -v python3)}
limit=${CHECK_TIMEOUT:-240}
parts=" ${PARTS:-tests runs bench} "
mkdir -p "$out"
rm -f "$out"/*.failed "$out"/*.summary
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi

failed=()
check() {  # name command...: runs it (in the background with PARALLEL=1), its log in $out/name.log
    if [[ ${PARALLEL:-} == 1 ]]; then
        run_check "$@" >"$out/$1.summary" &
    else
        run_check "$@"
        [[ -e $out/$1.failed ]] && failed+=("$1")
    fi
}
run_check() {
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS status=0
    timeout "$limit" "$@" >"$out/$name.log" 2>&1 || status=$?
    if ((status == 0)); then
        echo "   $(tail -1 "$out/$name.log") ($((SECONDS - start)) s)"
    else
        local why="exit status $status"
        ((status == 124)) && why="over its ${limit} s limit"
        echo "   FAILED ($why) after $((SECONDS - start)) s; its last lines:"
        tail -20 "$out/$name.log" | sed 's/^/   | /'
        touch "$out/$name.failed"
    fi
}

common=("trainer.device=$device" trainer.steps=1000 trainer.prefill=2000 trainer.val_steps=500
        trainer.eval_every=500 trainer.progress=false trainer.eval_figure=false)
train() {
    local name=$1
    shift
    check "$name" "$python" scripts/train.py "${common[@]}" "$@" "hydra.run.dir=$out/$name"
}
if [[ $parts == *" tests "* ]]; then
    # Its own limit: it starts seven short training runs and compiles a loss twice.
    workers=()
    [[ ${PARALLEL:-} == 1 ]] && "$python" -c "import xdist" 2>/dev/null && workers=(-n 4)
    # -o addopts= drops pyproject.toml's "-n auto", which needs pytest-xdist (not in every GPU image).
    limit=${TESTS_TIMEOUT:-480} check cuda_tests "$python" -m pytest -q -o addopts= -p no:cacheprovider \
        -m "slow or not slow" "${workers[@]}" tests/test_cuda.py tests/test_fused_gru.py
fi
if [[ $parts == *" runs "* ]]; then
    # On CUDA every run but two replays its update as one CUDA graph (trainer.cuda_graph=auto, the default).
    train ring_on_device
    train ring_on_host buffer.device=cpu
    train bf16 trainer.precision=bf16
    train compiled_graphs trainer.compile=true trainer.compile_mode=reduce-overhead  # its own graphs instead
    train vector_fp16 env.num_envs=16 buffer.obs_dtype=float16
    train eager trainer.cuda_graph=false
    [[ $device == cuda* ]] && train cuda_graph_compiled trainer.cuda_graph=true trainer.compile=true  # CUDA only
fi
if [[ ${PARALLEL:-} == 1 ]]; then
    wait
    for f in "$out"/*.summary; do
        [[ -e $f ]] && cat "$f"
    done
    for f in "$out"/*.failed; do
        [[ -e $f ]] && failed+=("$(basename "$f" .failed)")
    done
fi
if [[ $parts == *" bench "* ]]; then
    # Its rows are printed as they are measured, so one cut off by its time limit keeps the rows it finished. The
    # limit: BENCH_TIMEOUT seconds, or what is left until DEADLINE (seconds since the epoch) when that is set.
    bench_limit=${BENCH_TIMEOUT:-1800}
    [[ -n ${DEADLINE:-} ]] && bench_limit=$((DEADLINE - $(date +%s)))
    if ((bench_limit < 1)); then  # timeout 0 would mean no limit at all, and a negative one fails at once
        echo "benchmarks skipped: DEADLINE has passed"
        failed+=(benchmarks)
    else
        timeout "$bench_limit" "$python" benchmarks/run.py --quick --device "$device" --device-only \
            --only sampling updates --compile --json "$out/bench.json" | tee "$out/bench.md" || failed+=(benchmarks)
    fi
fi
if ((${#failed[@]})); then
    echo "failed: ${failed[*]} (logs in $out)"
    exit 1
fi
