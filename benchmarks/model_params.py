"""The parameters of the GPU performance models (docs/design.md, "Performance model").

One table for the CUDA and Triton models, fixed before their kernels were redesigned and not
tuned afterwards: a model whose parameters move to fit the kernels predicts nothing. Each entry
says where its value comes from:

- *measured*: read on an H200 of the kind the GPU figures come from (one GPU, 141 GB HBM3e);
- *datasheet*: the vendor's figure, used only where nothing was measured;
- *assumed*: our estimate, stated so that a GPU run can show it wrong.

Only the measured ceilings bound a prediction from below; the assumed entries are the ones a
first GPU run should check (benchmarks/gpu_cuda.py and benchmarks/gpu_triton.py print measured
beside modelled).
"""

from __future__ import annotations

H200 = {
    # measured: a device-to-device copy through PyTorch, counting bytes read and written
    "hbm_bytes_per_s": 4.3e12,
    # measured: an 8192³ bf16 matrix product through PyTorch on random data
    "bf16_gemm_flop_per_s": 790e12,
    # measured: multiprocessors and L2 as PyTorch reports them
    "num_sms": 132,
    "l2_bytes": 60e6,
    # datasheet (Hopper, compute capability 9.0): per-SM limits that decide occupancy
    "regs_per_sm": 65536,
    "max_threads_per_sm": 2048,
    "max_blocks_per_sm": 32,
    "smem_per_sm_bytes": 228 * 1024,
    "max_smem_per_block_bytes": 227 * 1024,
    "hbm_bytes": 141e9,
    # assumed: fp32 GEMM without TF32 (FFMA), 75% of the 67 TFLOP/s datasheet rate
    "fp32_gemm_flop_per_s": 50e12,
    # assumed: fraction of the bf16 ceiling a GEMM of the large-head shapes reaches
    # (M = 8192, K = 512, N = 10^5..10^6 and their transposes)
    "gemm_efficiency": 0.7,
    # assumed: fraction of the copy bandwidth a streaming kernel with enough bytes in flight
    # reaches (below it: occupancy too low to cover the memory latency)
    "stream_efficiency": 0.9,
    # assumed: host cost of one eager kernel launch, and device cost of one kernel node in a
    # CUDA-graph replay (launch and drain of a small grid)
    "eager_launch_s": 5e-6,
    "graph_kernel_s": 2.5e-6,
    # assumed: one HBM round trip, and one block-wide barrier with its shared-memory traffic
    "dram_latency_s": 0.6e-6,
    "barrier_s": 0.05e-6,
    # assumed: what one SM moves on its own per second (loads from L2 or HBM with enough in
    # flight, 64 B a clock at about 1.6 GHz): the rate of a phase that runs on few SMs, such as a
    # small batch or the last block's reduction of partials
    "sm_bytes_per_s": 100e9,
    # measured (on the CPU: the same autograd graph): extra peak memory of the eager reference
    # (udat_kernels.reference, forward + backward) per element of the (B, C) logits, 25.3 to 26.0
    # bytes for float32 and bfloat16 inputs at B = 512 and 1024, C = 20000
    # (benchmarks.harness.measure(Case("arcface", B, 64, C, device="cpu"), "reference"))
    "eager_extra_bytes_per_logit": 25.5,
}
