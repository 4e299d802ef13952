#!/usr/bin/env bash
# scripts/gpu_check.sh - one call on a lent GPU machine (no package registry there):
# the machine's facts (GPU, driver, NVRTC, cuMemcpyBatchAsync), the build, the GPU
# tests (tests/test_gpu.py on the real driver, tests/test_gpu_fake.py on the stand-in),
# and the CUDA transfer benchmark (bench/transfer_bw.py --device cuda), logs and JSON
# under $OUT. GPU_CHECK_HOST=1 also runs the host suite's transfer tests;
# GPU_CHECK_SWEEP=1 tuning runs; BENCH_ARGS extra benchmark arguments.
# Exit status: the first failing step's.
#   device tool: run(command="bash scripts/gpu_check.sh", kind="nvidia-h100-x1", carry=[".whl"])
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
status=0
step() { local rc=$?; [ "$status" -eq 0 ] && [ "$rc" -ne 0 ] && status=$rc; return 0; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,pci.bus_id --format=csv
  uname -r; python3 --version; nproc
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  python3 -c 'import ctypes; l = ctypes.CDLL("libcuda.so.1"); print("cuMemcpyBatchAsync_v2:", hasattr(l, "cuMemcpyBatchAsync_v2"), "cuMemcpyBatchAsync:", hasattr(l, "cuMemcpyBatchAsync"))'
  ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null
} 2>&1 | tee "$OUT/machine.txt"
python3 setup.py -q build_ext --inplace > "$OUT/build.txt" 2>&1; step
tail -5 "$OUT/build.txt"
python3 -c 'from kvtransfer import _C; from kvtransfer.memory import find_nvrtc
print("pip nvrtc:", find_nvrtc()); print("cuda_copy_info:", _C.cuda_copy_info())' 2>&1 | tee -a "$OUT/machine.txt"
timeout 330 python3 -m pytest -q -rs -s -p no:cacheprovider tests/test_gpu.py tests/test_gpu_fake.py 2>&1 \
  | tee "$OUT/pytest_gpu.txt" | grep -v '^$' | tail -40; step
if [ "${GPU_CHECK_HOST:-0}" = 1 ]; then
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_c_core.py tests/test_read.py tests/test_refusals.py \
    tests/test_failures.py tests/test_register.py tests/test_descriptors.py 2>&1 | tail -5 | tee "$OUT/pytest_host.txt"; step
fi
timeout 240 python3 bench/transfer_bw.py --device cuda --iters 20 \
  --json "$OUT/bench_cuda.json" ${BENCH_ARGS:-} > "$OUT/bench_cuda.txt" 2> "$OUT/bench_cuda.err"; step
# where a shm batch's time goes: KVTRANSFER_TRACE=1 (a line every 100 ms; apart, as it
# costs the batch an event or two), medians by bench/trace_summary.py
KVTRANSFER_TRACE=1 timeout 60 python3 bench/transfer_bw.py --device cuda --transports shm --sizes 32K,256K \
  --iters 20 > /dev/null 2> "$OUT/trace.err"
python3 bench/trace_summary.py "$OUT/trace.err"
# GPU_CHECK_SWEEP=1: tuning runs, one line each (the kernel's two shapes alone, shm
# with 1 and 4 copy threads, the batch mode); bench/gather_sweep.py tunes the shapes
ratios() { sed -n '/Ratios/,$p' "$1" | sed -n '2,4p' | tr -s ' ' | tr '\n' ';'; }
if [ "${GPU_CHECK_SWEEP:-0}" = 1 ]; then
  {
    timeout 90 python3 bench/transfer_bw.py --device cuda --transports d2d,kernel0,kernel1 \
      --iters 20 > "$OUT/sweep_kernels.txt" 2>&1
    echo "kernels: $(grep -E '^\[transfer_bw\]' "$OUT/sweep_kernels.txt" | awk '{print $2, $3, $6}' | tr '\n' ';')"
    grep -E "FAILED|Error|error" "$OUT/sweep_kernels.txt" | head -3
    for th in 1 4; do
      timeout 90 python3 bench/transfer_bw.py --device cuda --transports shm,d2d --shm-threads $th \
        --iters 20 > "$OUT/sweep_shm_t$th.txt" 2>&1
      echo "shm, $th threads: $(ratios "$OUT/sweep_shm_t$th.txt")"
    done
    KVTRANSFER_CUDA_COPY=batch timeout 90 python3 bench/transfer_bw.py --device cuda --transports shm,d2d,kernel \
      --iters 20 > "$OUT/sweep_shm_batch.txt" 2>&1
    echo "shm batch mode: $(ratios "$OUT/sweep_shm_batch.txt")"
  } | tee "$OUT/sweep.txt"
fi
tail -25 "$OUT/bench_cuda.err"
cat "$OUT/bench_cuda.txt" | sed -n '/Ratios/,$p'
exit $status
