#!/usr/bin/env bash
# Kiln on a GPU, in one short run: a correctness check (the same pre-training run, greedy answer
# and evaluation loss as the CPU build gives: val_loss 2.6133075184 at step 60, eval loss
# 2.6411778938, greedy " a a a ..."; AMD EPYC, 1 or 2 threads, 2026-12-04), then Kiln's and PyTorch eager's throughput on the same GPU with the same model
# shapes and protocol (bench/torch_cuda.py, when torch sees a CUDA GPU).
#
# Build the binary anywhere (GPU libraries are loaded at run time):
#   CARGO_TARGET_DIR=target/gpu CARGO_PROFILE_RELEASE_DEBUG=0 \
#     cargo build --release -p kiln-cli --features kiln-model/vulkan
# (`kiln-model/cuda` too, with CUDARC_CUDA_VERSION=13000 for a CUDA 13.0 driver; but burn 0.22.1's
# CUDA backend downloads LLVM 23 from GitHub while it builds, so it needs that network access.)
# Then on the GPU machine:
#   bash bench/gpu_check.sh target/gpu/release/kiln [OUT_DIR] [path/to/torch_llama_bench.py]
set -u
K=${1:?usage: gpu_check.sh KILN_CUDA_BINARY [OUT_DIR] [TORCH_LLAMA_BENCH_PY]}
O=${2:-/tmp/kiln-gpu}
TB=${3:-$(dirname "$0")/../../shared/bench/torch_llama_bench.py}
W=$(mktemp -d)
mkdir -p "$O"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# A CUDA build compiles its kernels with NVRTC at run time: find it where the loader does not.
if ! ldconfig -p | grep -q libnvrtc.so; then
    lib=$(find /usr/local /opt /usr/lib -name 'libnvrtc.so*' 2>/dev/null | head -1)
    [ -n "$lib" ] && export LD_LIBRARY_PATH=$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
echo "nvrtc: ${LD_LIBRARY_PATH:-on the loader path}"

step() { # name timeout command...: runs it, keeps its output under $O, prints rc, seconds, tail
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s%N)
    timeout "$limit" "$@" >"$O/$name.out" 2>"$O/$name.err"
    rc=$?
    echo "== $name rc=$rc $((($(date +%s%N) - t0) / 1000000)) ms"
    tail -c 700 "$O/$name.out"
    [ "$rc" -ne 0 ] && tail -n 15 "$O/$name.err"
    return "$rc"
}

step smoke 180 "$K" bench --preset tiny --what forward --steps 2 --json || exit 1
"$K" data synth --out "$W/world" >/dev/null
head -c 200000 "$W/world/corpus.txt" >"$W/eval.txt"
step pretrain 120 "$K" pretrain --config test --data "$W/world/corpus.txt" --out "$W/p" --seed 0 --json
cp "$W/p/metrics.jsonl" "$O/pretrain_metrics.jsonl" 2>/dev/null
step generate 60 "$K" generate --model "$W/p" --prompt "Sudam has" --temperature 0 --max-new-tokens 40 --json
step eval_loss 60 "$K" eval loss --model "$W/p" --data "$W/eval.txt" --json
for p in tiny small; do
    step "kiln_$p" 150 "$K" bench --preset "$p" --what train,forward,gen --json
    [ -f "$TB" ] && python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null && step "torch_$p" 120 python3 "$(dirname "$0")/torch_cuda.py" --preset "$p" --torch-script "$TB"
done
step kiln_ppo_trl 120 "$K" bench --preset tiny --what ppo_trl --ppo-iters 3 --json
